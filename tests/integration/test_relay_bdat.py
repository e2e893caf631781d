"""BDAT (RFC 3030 CHUNKING) end to end.

A chunk is counted, not scanned: bare LF and "<CRLF>.<CRLF>" inside it are
message content and must reach the upstream exactly as sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import StartRelay, WireClient

CHUNKS = [
    b"Subject: chunked\r\n\r\nfirst chunk\r\n",
    b"bare\nLF, a lone dot line\r\n.\r\nand a bare CR\r inside \x00\xff\r\n",
    b".leading dot, never stuffed in BDAT\r\n",
]


def start_transaction(client: WireClient) -> bytes:
    return client.start_transaction(mail_from=b"MAIL FROM:<sender@example.org> BODY=BINARYMIME")


def test_bdat_chunks_reach_upstream_exactly(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config)
    with WireClient(relay.address()) as client:
        ehlo = start_transaction(client)
        assert b"250-CHUNKING\r\n" in ehlo
        for chunk in CHUNKS:
            client.command(b"BDAT %d\r\n" % len(chunk) + chunk, 250)
        client.command(b"BDAT 0 LAST\r\n", 250)
        client.command(b"QUIT\r\n", 221)

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.bdat_chunks == [*CHUNKS, b""]
    assert conn.bdat_messages == [b"".join(CHUNKS)]
    assert conn.data == []
    bdat_lines = [line for line in conn.commands if line.startswith(b"BDAT")]
    assert bdat_lines == [b"BDAT %d\r\n" % len(chunk) for chunk in CHUNKS] + [b"BDAT 0 LAST\r\n"]
    (record,) = relay.records("transaction")
    message = b"".join(CHUNKS)
    assert record["body"] == "bdat"
    assert record["outcome"] == "delivered"
    assert record["size"] == len(message)
    assert record["body_sha256"] == hashlib.sha256(message).hexdigest()
    assert [step["command"] for step in record["timeline"]] == [
        "MAIL",
        "RCPT",
        "BDAT",
        "BDAT",
        "BDAT",
        "BDAT LAST",
    ]


def test_bdat_pipelined_in_one_write_and_split_bytewise(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config)
    stream = b"".join(b"BDAT %d\r\n" % len(chunk) + chunk for chunk in CHUNKS[:-1])
    stream += b"BDAT %d LAST\r\n" % len(CHUNKS[-1]) + CHUNKS[-1]
    with WireClient(relay.address()) as client:
        start_transaction(client)
        client.send(stream)
        codes = [client.reply()[0] for _ in CHUNKS]
        assert codes == [250] * len(CHUNKS)
        client.command(b"MAIL FROM:<sender@example.org>\r\n", 250)
        client.command(b"RCPT TO:<rcpt@example.net>\r\n", 250)
        for octet in stream:
            client.send(bytes([octet]))
        codes = [client.reply()[0] for _ in CHUNKS]
        assert codes == [250] * len(CHUNKS)
        client.command(b"QUIT\r\n", 221)

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.bdat_messages == [b"".join(CHUNKS)] * 2
    assert [record["outcome"] for record in relay.records("transaction")] == ["delivered"] * 2


def test_bdat_refused_when_upstream_lacks_chunking(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    """Without CHUNKING upstream the relay offers none, and a BDAT gets 502.

    The chunk after a refused BDAT is read and dropped (RFC 3030 2), so the
    next command is still read as a command, and nothing reaches the upstream.
    """
    upstream = make_raw_upstream(ehlo=("PIPELINING", "8BITMIME", "SIZE 1000000"))
    relay = start_relay(upstream.config)
    chunk = b"RSET\r\nMAIL FROM:<evil@example.org>\r\n"
    with WireClient(relay.address()) as client:
        ehlo = start_transaction(client)
        assert b"CHUNKING" not in ehlo
        assert client.command(b"BDAT %d LAST\r\n" % len(chunk) + chunk, 502).startswith(b"502 ")
        client.command(b"NOOP\r\n", 250)
        client.command(b"QUIT\r\n", 221)

    (conn,) = upstream.wait_all_ended()
    assert conn.bdat_chunks == []
    assert b"BDAT" not in conn.command_text()
    assert b"evil@" not in conn.command_text()
    assert conn.commands[-2:] == [b"NOOP\r\n", b"QUIT\r\n"]


def test_message_sent_after_a_refused_bdat_is_recorded(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    """The 502 to BDAT comes from the relay; the upstream's transaction goes on.

    The upstream never saw the BDAT, so the DATA that follows completes the
    transaction there. The log must hold one record of that transaction,
    and it must say "delivered": invariant 6, one record per transaction.
    """
    upstream = make_raw_upstream(ehlo=("PIPELINING", "8BITMIME"))
    relay = start_relay(upstream.config)
    # Each reply comes in milliseconds; a few seconds means it is not coming.
    with WireClient(relay.address(), timeout=3.0) as client:
        start_transaction(client)
        client.command(b"BDAT 5 LAST\r\nhello", 502)
        client.command(b"DATA\r\n", 354)
        client.command(b"Subject: second try\r\n\r\nhello\r\n.\r\n", 250)
        client.command(b"QUIT\r\n", 221)

    (conn,) = upstream.wait_all_ended()
    assert conn.data == [b"Subject: second try\r\n\r\nhello\r\n.\r\n"]
    records = relay.records("transaction")
    assert [record["outcome"] for record in records] == ["delivered"]
