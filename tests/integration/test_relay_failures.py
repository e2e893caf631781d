"""The relay when peers fail or misbehave, and when it is told to stop.

A client that leaves mid-DATA must leave no message upstream; a broken or
absent upstream, too many clients or an idle client each get a clear 421;
a graceful stop lets a transaction in progress finish. Every case ends with
its records (checked against the schemas by the fixture).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from integration.recording_upstreams import AiosmtpdUpstream, RawUpstream
from integration.relay_harness import WAIT_S, StartRelay, WireClient, free_port

# Where the client stops sending, inside the DATA section.
DROP_POINTS = {
    "mid-line": b"Subject: dropped\r\n\r\nhalf a li",
    "after-crlf": b"Subject: dropped\r\n\r\na whole line\r\n",
    "after-crlf-dot": b"Subject: dropped\r\n\r\nalmost\r\n.",
    "after-crlf-dot-cr": b"Subject: dropped\r\n\r\nalmost\r\n.\r",
}


@pytest.mark.parametrize("sent", DROP_POINTS.values(), ids=DROP_POINTS.keys())
def test_client_dropping_mid_data_leaves_nothing_upstream(
    start_relay: StartRelay, raw_upstream: RawUpstream, sent: bytes
) -> None:
    relay = start_relay(raw_upstream.config)
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(sent)

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.data == []
    assert conn.in_data_at_end
    assert b"\r\n.\r\n" not in b"\r\n" + conn.partial
    assert not conn.quit
    (record,) = relay.wait_records(lambda found: len(found) == 1, "transaction")
    assert record["outcome"] == "aborted"
    (session,) = relay.records("session")
    assert session["end"] in ("client_closed", "client_lost")


def test_client_dropping_mid_data_never_reaches_aiosmtpd_handler(
    start_relay: StartRelay, aiosmtpd_upstream: AiosmtpdUpstream
) -> None:
    relay = start_relay(aiosmtpd_upstream.config)
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(DROP_POINTS["after-crlf-dot"])

    aiosmtpd_upstream.wait_for(lambda: aiosmtpd_upstream.closed >= 1)
    assert aiosmtpd_upstream.deliveries == []
    (record,) = relay.wait_records(lambda found: len(found) == 1, "transaction")
    assert record["outcome"] == "aborted"


def test_upstream_unreachable(start_relay: StartRelay) -> None:
    port = free_port()  # nothing listens there
    relay = start_relay({"kind": "smtp", "host": "127.0.0.1", "port": port})
    with WireClient(relay.address()) as client:
        code, reply = client.reply()
        assert code == 421
        assert reply.startswith(b"421 4.4.1 ")
        assert client.read_to_eof() == b""

    (session,) = relay.wait_records(lambda found: len(found) == 1, "session")
    assert session["end"] == "upstream_unreachable"
    assert session["transactions"] == 0
    assert relay.records("transaction") == []


def test_connection_limit(start_relay: StartRelay, raw_upstream: RawUpstream) -> None:
    relay = start_relay(raw_upstream.config, limits={"max_connections": 2})
    with WireClient(relay.address()) as first, WireClient(relay.address()) as second:
        first.expect(220)
        second.expect(220)
        with WireClient(relay.address()) as third:
            assert third.expect(421).startswith(b"421 4.7.0 ")
            assert third.read_to_eof() == b""
        # The clients already in are served as before.
        first.command(b"EHLO client.test\r\n", 250)
        first.command(b"NOOP\r\n", 250)
        second.command(b"QUIT\r\n", 221)
        # A place is free again.
        relay.wait_records(
            lambda found: sum(record["end"] == "quit" for record in found) == 1, "session"
        )
        with WireClient(relay.address()) as fourth:
            fourth.expect(220)
            fourth.command(b"QUIT\r\n", 221)
        first.command(b"QUIT\r\n", 221)

    sessions = relay.wait_records(lambda found: len(found) == 4, "session")
    assert sorted(session["end"] for session in sessions) == [
        "connection_limit",
        "quit",
        "quit",
        "quit",
    ]


MALFORMED = {
    "not-a-reply": b"hello there\r\n",
    "bare-lf": b"250 2.1.0 Ok\n",
    "code-changes": b"250-first\r\n251 second\r\n",
    "bad-code": b"299x Ok\r\n",
}


@pytest.mark.parametrize("garbage", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_upstream_reply(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], garbage: bytes
) -> None:
    upstream = make_raw_upstream(replies={"MAIL": garbage})
    relay = start_relay(upstream.config)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.send(b"MAIL FROM:<sender@example.org>\r\n")
        code, reply = client.reply()
        assert code == 421, reply
        assert reply.startswith(b"421 4.4.2 ")
        assert garbage not in reply
        assert client.read_to_eof() == b""

    upstream.wait_all_ended()
    (session,) = relay.wait_records(lambda found: len(found) == 1, "session")
    assert session["end"] == "upstream_malformed"
    (record,) = relay.records("transaction")
    assert record["outcome"] == "deferred"
    assert record["final_reply"]["code"] == 421


def test_idle_client_times_out(start_relay: StartRelay, raw_upstream: RawUpstream) -> None:
    idle_s = 0.5
    relay = start_relay(raw_upstream.config, timeouts={"command": idle_s})
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        started = time.monotonic()
        code, reply = client.reply()
        waited = time.monotonic() - started
        assert code == 421
        assert reply.startswith(b"421 4.4.2 ")
        assert client.read_to_eof() == b""
    assert idle_s * 0.9 <= waited < idle_s + 5.0

    (session,) = relay.wait_records(lambda found: len(found) == 1, "session")
    assert session["end"] == "client_timeout"
    (conn,) = raw_upstream.wait_all_ended()
    assert conn.commands[-1] == b"QUIT\r\n"


def test_client_stalled_mid_data_times_out(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config, timeouts={"data_block": 0.5})
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(b"Subject: stalled\r\n\r\nand then nothing")
        code, reply = client.reply()
        assert code == 421
        assert reply.startswith(b"421 4.4.2 ")

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.data == []
    (record,) = relay.wait_records(lambda found: len(found) == 1, "transaction")
    assert record["outcome"] != "delivered"


def test_graceful_stop_lets_a_transaction_finish(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config)
    address = relay.address()
    grace = 15.0
    with WireClient(address) as busy, WireClient(address) as idle:
        busy.expect(220)
        busy.command(b"EHLO client.test\r\n", 250)
        busy.command(b"MAIL FROM:<sender@example.org>\r\n", 250)
        busy.command(b"RCPT TO:<rcpt@example.net>\r\n", 250)
        idle.expect(220)
        idle.command(b"EHLO idle.test\r\n", 250)
        started = time.monotonic()
        stopping = relay.begin_stop(grace)
        # A session between transactions is closed at once...
        assert idle.expect(421).startswith(b"421 4.3.2 ")
        # ...after the listener stopped accepting.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=WAIT_S).close()
        # The one in a transaction may finish it, and is closed after.
        busy.command(b"DATA\r\n", 354)
        busy.command(b"Subject: last one\r\n\r\nbody\r\n.\r\n", 250)
        assert busy.expect(421).startswith(b"421 4.3.2 ")
        stopping.result(WAIT_S)
        assert time.monotonic() - started < grace
    relay.join(WAIT_S)

    raw_upstream.wait_all_ended(2)
    assert raw_upstream.connections[0].data == [b"Subject: last one\r\n\r\nbody\r\n.\r\n"]
    (record,) = relay.records("transaction")
    assert record["outcome"] == "delivered"
    sessions = relay.records("session")
    assert [session["end"] for session in sessions] == ["shutdown", "shutdown"]


def test_graceful_stop_closes_what_outlives_the_grace(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config)
    grace = 0.5
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(b"Subject: too slow\r\n\r\nstill writing")
        started = time.monotonic()
        stopping = relay.begin_stop(grace)
        assert client.expect(421).startswith(b"421 4.3.2 ")
        stopping.result(WAIT_S)
        assert grace * 0.9 <= time.monotonic() - started < grace + WAIT_S
    relay.join(WAIT_S)

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.data == []
    (record,) = relay.records("transaction")
    assert record["outcome"] != "delivered"
