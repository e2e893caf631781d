"""Pipelining clients (RFC 2920) through the relay: replies come back in order.

The raw client writes several commands in one send and checks each reply
pairs with its command, including replies the relay gives itself between
upstream replies. swaks --pipeline is a real pipelining client. aiosmtplib
does not pipeline; it is run against a PIPELINING upstream and many at once.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from integration.external_tools import SmtpSink
from integration.recording_upstreams import RawUpstream
from integration.relay_harness import StartRelay, WireClient

SWAKS_TIMEOUT_S = 30.0


def test_pipelined_transaction_replies_in_order(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config)
    with WireClient(relay.address()) as client:
        client.expect(220)
        ehlo = client.command(b"EHLO client.test\r\n", 250)
        assert b"250-PIPELINING\r\n" in ehlo
        client.send(
            b"MAIL FROM:<sender@example.org>\r\n"
            b"RCPT TO:<first@example.net>\r\n"
            b"RCPT TO:<second@example.net>\r\n"
            b"DATA\r\n"
        )
        assert client.expect(250) == b"250 2.1.0 Ok\r\n"
        assert client.expect(250) == b"250 2.1.5 Ok\r\n"
        assert client.expect(250) == b"250 2.1.5 Ok\r\n"
        client.expect(354)
        client.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert client.expect(250) == b"250 2.0.0 Ok: queued\r\n"
        client.expect(221)

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.data == [b"Subject: pipelined\r\n\r\nbody\r\n.\r\n"]
    (record,) = relay.records("transaction")
    assert [rcpt["address"] for rcpt in record["recipients"]] == [
        "first@example.net",
        "second@example.net",
    ]
    assert record["outcome"] == "delivered"


def test_local_replies_keep_their_place_in_the_pipeline(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    """RFC 2920 3.1: responses come in the order the commands were received.

    The unknown verb and the bad address are answered by the relay itself,
    the rest by the upstream; neither kind may overtake the other.
    """
    relay = start_relay(raw_upstream.config)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.send(
            b"MAIL FROM:<sender@example.org>\r\n"
            b"XNOTAVERB something\r\n"
            b"RCPT TO:<first@example.net>\r\n"
            b"RCPT TO:<broken@example.net\r\n"
            b"RCPT TO:<second@example.net>\r\n"
            b"NOOP\r\n"
            b"RSET\r\n"
            b"QUIT\r\n"
        )
        replies = [client.reply()[1] for _ in range(8)]

    assert replies[0] == b"250 2.1.0 Ok\r\n"
    assert replies[1].startswith(b"500 ")
    assert replies[2] == b"250 2.1.5 Ok\r\n"
    assert replies[3].startswith(b"501 ")
    assert replies[4] == b"250 2.1.5 Ok\r\n"
    assert replies[5] == b"250 2.0.0 Ok\r\n"
    assert replies[6] == b"250 2.0.0 Ok\r\n"
    assert replies[7].startswith(b"221 ")
    (conn,) = raw_upstream.wait_all_ended()
    assert b"XNOTAVERB" not in conn.command_text()
    assert b"broken@" not in conn.command_text()
    (record,) = relay.records("transaction")
    assert record["outcome"] == "aborted"
    assert [rcpt["address"] for rcpt in record["recipients"]] == [
        "first@example.net",
        "second@example.net",
    ]


def test_many_pipelined_transactions_in_one_write(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config, limits={"max_pipelined_commands": 8})
    count = 50
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        # BDAT needs no 354, so whole transactions can be pipelined (RFC 3030 4.2).
        batch = b"".join(
            b"MAIL FROM:<s%d@example.org>\r\nRCPT TO:<r%d@example.net>\r\nBDAT 7 LAST\r\nmsg%04d"
            % (number, number, number)
            for number in range(count)
        )
        client.send(batch + b"QUIT\r\n")
        codes = [client.reply()[0] for _ in range(3 * count + 1)]

    assert codes == [250] * (3 * count) + [221]
    (conn,) = raw_upstream.wait_all_ended()
    assert conn.bdat_messages == [b"msg%04d" % number for number in range(count)]
    records = relay.records("transaction")
    assert [record["mail_from"]["address"] for record in records] == [
        f"s{number}@example.org" for number in range(count)
    ]
    assert {record["outcome"] for record in records} == {"delivered"}


def run_swaks(swaks: str, port: int, *extra: str) -> str:
    result = subprocess.run(
        [
            swaks,
            "--server",
            f"127.0.0.1:{port}",
            "--helo",
            "client.test",
            "--from",
            "sender@example.org",
            "--to",
            "rcpt@example.net",
            "--header",
            "Subject: from swaks",
            "--body",
            "sent by swaks",
            *extra,
        ],
        capture_output=True,
        timeout=SWAKS_TIMEOUT_S,
        check=False,
    )
    output = result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, output
    return output


@pytest.mark.swaks
def test_swaks_pipelining(start_relay: StartRelay, raw_upstream: RawUpstream, swaks: str) -> None:
    relay = start_relay(raw_upstream.config)
    output = run_swaks(swaks, relay.address()[1], "--pipeline")
    assert "<-  250 2.0.0 Ok: queued" in output

    (conn,) = raw_upstream.wait_all_ended()
    (section,) = conn.data
    assert b"\r\nSubject: from swaks\r\n" in section
    assert b"\r\nsent by swaks\r\n" in section
    assert section.endswith(b"\r\n.\r\n")
    (record,) = relay.records("transaction")
    assert record["mail_from"]["address"] == "sender@example.org"
    assert record["outcome"] == "delivered"


@pytest.mark.swaks
@pytest.mark.postfix
def test_swaks_pipelining_to_smtp_sink(
    start_relay: StartRelay, make_smtp_sink: Callable[..., SmtpSink], swaks: str
) -> None:
    sink = make_smtp_sink(dump=True)
    relay = start_relay(sink.config)
    run_swaks(swaks, relay.address()[1], "--pipeline")

    sink.wait_counters(messages=1)
    (dump,) = sink.dumped()
    assert b"X-Mail-Args: <sender@example.org>" in dump
    assert b"\nsent by swaks\n" in dump
    (record,) = relay.records("transaction")
    assert record["outcome"] == "delivered"


@pytest.mark.swaks
def test_swaks_quit_after_rcpt(
    start_relay: StartRelay, raw_upstream: RawUpstream, swaks: str
) -> None:
    relay = start_relay(raw_upstream.config)
    run_swaks(swaks, relay.address()[1], "--quit-after", "RCPT")

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.data == []
    assert conn.quit
    (record,) = relay.records("transaction")
    assert record["outcome"] == "aborted"
    (session,) = relay.records("session")
    assert session["end"] == "quit"


@pytest.mark.parametrize(
    "line",
    [b"XNOTAVERB something\r\n", b"NOOP\n", b"NOOP\x01\r\n"],
    ids=["unknown-verb", "bare-lf", "control-character"],
)
def test_refused_line_inside_a_transaction_does_not_end_it(
    start_relay: StartRelay, raw_upstream: RawUpstream, line: bytes
) -> None:
    """A line the relay refuses itself is no end of the transaction.

    The client goes on and the message is delivered, so the one record of
    the transaction must say "delivered" and list the recipient.
    """
    relay = start_relay(raw_upstream.config)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(b"MAIL FROM:<sender@example.org>\r\n", 250)
        assert client.command(line, 500).startswith(b"500 ")
        client.command(b"RCPT TO:<rcpt@example.net>\r\n", 250)
        client.command(b"DATA\r\n", 354)
        client.command(b"Subject: still one transaction\r\n\r\nbody\r\n.\r\n", 250)
        client.command(b"QUIT\r\n", 221)

    (conn,) = raw_upstream.wait_all_ended()
    assert len(conn.data) == 1
    (record,) = relay.records("transaction")
    assert record["outcome"] == "delivered"
    assert record["final_reply"]["code"] == 250
    assert [rcpt["address"] for rcpt in record["recipients"]] == ["rcpt@example.net"]
