"""Access control and limits: allowed networks, per-address limits, message size."""

from __future__ import annotations

import socket
from typing import Any

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import UPSTREAM, WAIT_S, StartRelay, WireClient


def listener(**keys: Any) -> dict[str, Any]:
    return {"name": "main", "host": "127.0.0.1", "port": 0, "upstream": UPSTREAM, **keys}


def test_a_client_outside_the_allowed_networks_gets_554(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(
        raw_upstream.config, extra={"listeners": [listener(allow=["192.0.2.0/24"])]}
    )
    with WireClient(relay.address()) as client:
        reply = client.expect(554)
        assert reply.startswith(b"554 5.7.1 ")
        assert client.read_to_eof() == b""
    (session,) = relay.wait_records(lambda rs: len(rs) == 1, "session")
    assert session["end"] == "access_denied"
    assert raw_upstream.connections == []  # no upstream connection for it


def test_an_allowed_client_is_relayed(start_relay: StartRelay, raw_upstream: RawUpstream) -> None:
    relay = start_relay(
        raw_upstream.config, extra={"listeners": [listener(allow=["127.0.0.0/8", "::1"])]}
    )
    with WireClient(relay.address()) as client:
        client.start_transaction()
        client.command(b"QUIT\r\n", 221)


def test_connections_per_client_address(start_relay: StartRelay, raw_upstream: RawUpstream) -> None:
    relay = start_relay(raw_upstream.config, limits={"max_connections_per_client": 2})
    with WireClient(relay.address()) as one, WireClient(relay.address()) as two:
        one.expect(220)
        two.expect(220)
        with WireClient(relay.address()) as three:
            assert three.expect(421).startswith(b"421 4.7.0 ")
        # Once one leaves, another may come.
        one.command(b"QUIT\r\n", 221)
        one.read_to_eof()
        relay.wait_records(lambda rs: len(rs) == 2, "session")
        with WireClient(relay.address()) as four:
            four.expect(220)
            four.command(b"QUIT\r\n", 221)
        two.command(b"QUIT\r\n", 221)
    ends = [record["end"] for record in relay.wait_records(lambda rs: len(rs) == 4, "session")]
    assert ends.count("client_connection_limit") == 1


def test_connection_rate_per_client_address(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(
        raw_upstream.config,
        limits={"connection_rate_per_minute": 3, "max_connections_per_client": 0},
    )
    codes = []
    for _ in range(5):
        with WireClient(relay.address()) as client:
            code, _ = client.reply()
            codes.append(code)
            if code == 220:
                client.command(b"QUIT\r\n", 221)
    assert codes == [220, 220, 220, 421, 421]


def test_a_size_parameter_past_the_limit_is_refused(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config, limits={"max_message_bytes": 1000})
    with WireClient(relay.address()) as client:
        client.expect(220)
        ehlo = client.command(b"EHLO client.test\r\n", 250)
        assert b"250-SIZE 1000\r\n" in ehlo or b"250 SIZE 1000\r\n" in ehlo
        refused = client.command(b"MAIL FROM:<a@example.org> SIZE=1001\r\n", 552)
        assert refused.startswith(b"552 5.3.4 ")
        client.command(b"MAIL FROM:<a@example.org> SIZE=1000\r\n", 250)
        client.command(b"QUIT\r\n", 221)
    (conn,) = raw_upstream.wait_all_ended()
    assert [line for line in conn.commands if line.startswith(b"MAIL")] == [
        b"MAIL FROM:<a@example.org> SIZE=1000\r\n"
    ]


def test_a_message_past_the_limit_never_completes_upstream(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config, limits={"max_message_bytes": 1000})
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n")
        client.send((b"y" * 78 + b"\r\n") * 40)  # about 3 KB
        client.send(b".\r\n")
        assert client.expect(552).startswith(b"552 5.3.4 ")
        assert client.read_to_eof() == b""
    (conn,) = raw_upstream.wait_all_ended()
    assert conn.data == []  # no end of data reached the upstream
    (session,) = relay.wait_records(lambda rs: len(rs) == 1, "session")
    assert session["end"] == "message_too_big"
    # Other sessions go on.
    with WireClient(relay.address()) as client:
        client.start_transaction()
        client.command(b"QUIT\r\n", 221)


def test_a_bdat_chunk_past_the_limit_is_refused_and_the_session_goes_on(
    start_relay: StartRelay,
) -> None:
    upstream = RawUpstream(ehlo=("PIPELINING", "CHUNKING", "8BITMIME"))
    try:
        relay = start_relay(upstream.config, limits={"max_message_bytes": 100})
        with WireClient(relay.address()) as client:
            client.start_transaction()
            client.send(b"BDAT 60\r\n" + b"a" * 60)
            client.expect(250)
            client.send(b"BDAT 60 LAST\r\n" + b"b" * 60)
            assert client.expect(552).startswith(b"552 5.3.4 ")
            client.command(b"RSET\r\n", 250)
            client.command(b"MAIL FROM:<a@example.org>\r\n", 250)
            client.command(b"RCPT TO:<b@example.net>\r\n", 250)
            client.send(b"BDAT 10 LAST\r\n" + b"c" * 10)
            client.expect(250)
            client.command(b"QUIT\r\n", 221)
        (conn,) = upstream.wait_all_ended()
        assert conn.bdat_chunks == [b"a" * 60, b"c" * 10]
    finally:
        upstream.close()


def test_the_listener_survives_a_refused_flood(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config, limits={"max_connections_per_client": 1})
    host, port = relay.address()
    with WireClient(relay.address()) as first:
        first.expect(220)
        for _ in range(50):
            with socket.create_connection((host, port), timeout=WAIT_S) as extra:
                assert extra.recv(64).startswith(b"421 4.7.0")
        first.command(b"QUIT\r\n", 221)
