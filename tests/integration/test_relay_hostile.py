"""Hostile clients and broken upstreams the relay must outlast.

Each case: the reply smtpwarden gives, what reaches the upstream, and that
nothing grows without bound.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import (
    POLL_S,
    WAIT_S,
    RunningRelay,
    StartRelay,
    WireClient,
    relay_config,
)
from smtpwarden.net.flow import WRITE_HIGH_WATER_BYTES, Hold


def test_too_many_errors_closes_the_session(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config, limits={"max_errors": 3})
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.send(b"FOO\r\n" * 5)
        for _ in range(3):
            client.expect(500)
        assert client.expect(421).startswith(b"421 4.7.0 ")
        assert client.read_to_eof() == b""
    (session,) = relay.wait_records(lambda rs: len(rs) == 1, "session")
    assert session["end"] == "too_many_errors"
    conn = raw_upstream.wait_all_ended()[0]
    assert b"FOO" not in conn.command_text()


def test_recipients_past_the_limit_get_452_and_never_reach_the_upstream(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config, limits={"max_recipients": 100})
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        rcpts = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(102))
        client.send(b"MAIL FROM:<a@example.org>\r\n" + rcpts + b"RSET\r\nQUIT\r\n")
        client.expect(250)
        codes = [client.reply()[0] for _ in range(102)]
        assert codes == [250] * 100 + [452, 452]
        client.expect(250)
        client.expect(221)
    conn = raw_upstream.wait_all_ended()[0]
    assert conn.command_text().count(b"RCPT TO:") == 100
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert len(record["recipients"]) == 100


def test_a_stray_reply_is_never_taken_for_the_answer_to_the_dot(
    start_relay: StartRelay, make_raw_upstream: type[RawUpstream]
) -> None:
    upstream = make_raw_upstream(replies={"DATA": b"354 go\r\n250 2.0.0 stray\r\n"})
    relay = start_relay(upstream.config)
    with WireClient(relay.address()) as client:
        client.start_transaction()
        # The body is pipelined behind DATA, as a careless client might. The
        # 354 and the stray 250 come in one read: neither is relayed.
        client.send(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
        assert client.expect(421).startswith(b"421 4.4.2 ")
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert record["outcome"] != "delivered"
    (session,) = relay.wait_records(lambda rs: len(rs) == 1, "session")
    assert session["end"] == "upstream_unsolicited"


def test_a_client_that_never_reads_is_paused_not_buffered(
    start_relay: StartRelay, make_raw_upstream: type[RawUpstream]
) -> None:
    # Long replies, so that the client's unread replies outgrow every socket
    # buffer on the way long before its commands run out.
    upstream = make_raw_upstream(replies={"NOOP": b"250 " + b"x" * 400 + b"\r\n"})
    relay = start_relay(upstream.config)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(WAIT_S)
    client.connect(relay.address())
    with client:
        flood = b"NOOP\r\n" * 200_000
        sender = threading.Thread(target=client.sendall, args=(flood,), daemon=True)
        sender.start()

        def look() -> tuple[bool, int]:
            assert relay.relay is not None
            for session in relay.relay.sessions:
                return session.gate.holds(Hold.CLIENT), session.client.get_write_buffer_size()
            return False, 0  # not accepted yet

        deadline = time.monotonic() + WAIT_S
        while not relay.call(look)[0]:
            assert time.monotonic() < deadline, f"never paused: {relay.records()}"
            time.sleep(POLL_S)
        held, buffered = relay.call(look)
        assert held
        assert buffered <= WRITE_HIGH_WATER_BYTES + 256 * 1024
        client.shutdown(socket.SHUT_RDWR)
        sender.join(WAIT_S)


def test_an_unwritable_log_stops_nothing(
    tmp_path: Path, raw_upstream: RawUpstream, loop_kind: str
) -> None:
    document = relay_config(
        loop_kind=loop_kind,
        upstream=raw_upstream.config,
        log_path=tmp_path / "unused.jsonl",
        timeouts={"command": 0.5},
    )
    document["log"] = {"transactions": "/dev/full", "sessions": True, "level": "info"}
    relay = RunningRelay(document, tmp_path / "unused.jsonl")
    try:
        for _ in range(3):
            with WireClient(relay.address()) as client:
                client.start_transaction()
                client.command(b"DATA\r\n", 354)
                client.command(b"Subject: x\r\n\r\n" + b"y" * 70_000 + b"\r\n.\r\n", 250)
                client.command(b"QUIT\r\n", 221)
        # Deadlines still run: an idle client is closed after its timeout.
        with WireClient(relay.address()) as idle:
            idle.expect(220)
            assert idle.expect(421).startswith(b"421 4.4.2 ")
        assert relay.relay is not None
        assert relay.call(lambda: relay.relay.records.dropped if relay.relay else 0) >= 1
    finally:
        relay.stop()
