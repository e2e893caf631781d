"""Message bytes and envelopes cross the relay unchanged (PRODUCT.md invariant 2).

The raw recording upstream keeps what arrived on the wire, dot-stuffing and
terminator included, so a test compares it with what the client wrote.
aiosmtpd and Postfix's smtp-sink show what a real server makes of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import smtplib
from collections.abc import Callable

import aiosmtplib
import pytest

from integration.external_tools import SmtpSink
from integration.recording_upstreams import AiosmtpdUpstream, RawUpstream
from integration.relay_harness import StartRelay, WireClient

EIGHT_BIT = bytes(range(0x80, 0x100))
LONGEST_LINE = b"x" * 998  # RFC 5321 4.5.3.1.6: 998 octets plus CRLF

# The message as its author wrote it (what a mailbox should end up with).
MESSAGE = b"".join(
    line + b"\r\n"
    for line in (
        b"From: sender@example.org",
        b"To: rcpt@example.net",
        b"Subject: bytes on the wire",
        b"",
        b".a line starting with one dot",
        b"..a line starting with two dots",
        b".",
        b"a line after a lone dot",
        b"8-bit octets: " + EIGHT_BIT,
        LONGEST_LINE,
        b"." + LONGEST_LINE[1:],
        b"",
        b"the end",
    )
)


def stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency: the DATA section a client sends for ``message``."""
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


WIRE = stuff(MESSAGE)


def greet(client: WireClient) -> bytes:
    client.expect(220)
    return client.command(b"EHLO client.test\r\n", 250)


def test_data_section_reaches_upstream_byte_identical(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config)
    commands = [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<sender@example.org> BODY=8BITMIME\r\n",
        b"RCPT TO:<rcpt@example.net>\r\n",
        b"DATA\r\n",
    ]
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(commands[0], 250)
        client.command(commands[1], 250)
        client.command(commands[2], 250)
        client.command(commands[3], 354)
        client.command(WIRE, 250)
        client.command(b"QUIT\r\n", 221)

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.data == [WIRE]
    assert conn.commands == [*commands, b"QUIT\r\n"]
    (record,) = relay.records("transaction")
    assert record["outcome"] == "delivered"
    assert record["body"] == "data"
    assert record["final_reply"]["code"] == 250


def test_smtplib_message_reaches_upstream_byte_identical(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config)
    host, port = relay.address()
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=10) as client:
        refused = client.sendmail(
            "sender@example.org", ["rcpt@example.net"], MESSAGE, mail_options=["BODY=8BITMIME"]
        )
    assert refused == {}

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.data == [WIRE]
    # smtplib writes its commands in lower case; the relay passes them on as they are.
    mail = [line for line in conn.commands if line[:4].upper() == b"MAIL"]
    assert mail == [b"mail FROM:<sender@example.org> size=%d BODY=8BITMIME\r\n" % len(MESSAGE)]


def test_aiosmtplib_message_reaches_aiosmtpd_unchanged(
    start_relay: StartRelay, aiosmtpd_upstream: AiosmtpdUpstream
) -> None:
    relay = start_relay(aiosmtpd_upstream.config)
    host, port = relay.address()

    async def send() -> None:
        errors, reply = await aiosmtplib.send(
            MESSAGE,
            sender="sender@example.org",
            recipients=["rcpt@example.net", "other@example.net"],
            hostname=host,
            port=port,
            local_hostname="client.test",
            mail_options=["BODY=8BITMIME"],
            timeout=10,
        )
        assert errors == {}
        assert "recorded" in reply

    asyncio.run(send())
    aiosmtpd_upstream.wait_for(lambda: len(aiosmtpd_upstream.deliveries) == 1)
    (delivery,) = aiosmtpd_upstream.deliveries
    assert delivery.content == MESSAGE
    assert delivery.mail_from == "sender@example.org"
    assert delivery.rcpt_tos == ["rcpt@example.net", "other@example.net"]
    assert "BODY=8BITMIME" in delivery.mail_options


def test_concurrent_aiosmtplib_clients(
    start_relay: StartRelay, aiosmtpd_upstream: AiosmtpdUpstream
) -> None:
    relay = start_relay(aiosmtpd_upstream.config)
    host, port = relay.address()
    count = 20

    async def send_all() -> None:
        async def one(number: int) -> None:
            body = f"Subject: client {number}\r\n\r\nmessage {number}\r\n".encode()
            errors, _ = await aiosmtplib.send(
                body,
                sender=f"s{number}@example.org",
                recipients=[f"r{number}@example.net"],
                hostname=host,
                port=port,
                timeout=10,
            )
            assert errors == {}

        await asyncio.gather(*(one(number) for number in range(count)))

    asyncio.run(send_all())
    aiosmtpd_upstream.wait_for(lambda: len(aiosmtpd_upstream.deliveries) == count)
    got = sorted(delivery.content for delivery in aiosmtpd_upstream.deliveries)
    want = sorted(
        f"Subject: client {number}\r\n\r\nmessage {number}\r\n".encode() for number in range(count)
    )
    assert got == want
    records = relay.wait_records(lambda found: len(found) == count, "transaction")
    assert {record["outcome"] for record in records} == {"delivered"}


def test_record_size_and_hash_follow_the_schema(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    """size and body_sha256 cover the octets transmitted to the upstream.

    transaction.schema.json: DATA counts the dot-stuffed octets without the
    final ".<CRLF>"; BDAT counts the octets of all chunks.
    """
    relay = start_relay(raw_upstream.config)
    with WireClient(relay.address()) as client:
        greet(client)
        client.command(b"MAIL FROM:<sender@example.org> BODY=8BITMIME\r\n", 250)
        client.command(b"RCPT TO:<rcpt@example.net>\r\n", 250)
        client.command(b"DATA\r\n", 354)
        client.command(WIRE, 250)
        client.command(b"MAIL FROM:<sender@example.org> BODY=8BITMIME\r\n", 250)
        client.command(b"RCPT TO:<rcpt@example.net>\r\n", 250)
        client.command(b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE, 250)
        client.command(b"QUIT\r\n", 221)

    raw_upstream.wait_all_ended()
    by_data, by_bdat = relay.records("transaction")
    assert (by_data["body"], by_bdat["body"]) == ("data", "bdat")
    transmitted = WIRE[: -len(b".\r\n")]
    assert by_data["size"] == len(transmitted)
    assert by_data["body_sha256"] == hashlib.sha256(transmitted).hexdigest()
    assert by_bdat["size"] == len(MESSAGE)
    assert by_bdat["body_sha256"] == hashlib.sha256(MESSAGE).hexdigest()


# --- the envelope ------------------------------------------------------------

ENVELOPE = [
    b"MAIL FROM:<sender@example.org> SIZE=1234 BODY=8BITMIME\r\n",
    b"RCPT TO:<first@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;first@example.net\r\n",
    b"RCPT TO:<second@example.net> NOTIFY=NEVER\r\n",
    b"RCPT TO:<third@example.net>\r\n",
]


def send_envelope(client: WireClient) -> None:
    greet(client)
    for line in ENVELOPE:
        client.command(line, 250)
    client.command(b"DATA\r\n", 354)
    client.command(b"Subject: envelope\r\n\r\nbody\r\n.\r\n", 250)
    client.command(b"QUIT\r\n", 221)


def test_envelope_reaches_upstream_and_record(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config)
    with WireClient(relay.address()) as client:
        send_envelope(client)

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.commands[1:5] == ENVELOPE
    (record,) = relay.records("transaction")
    assert record["helo"] == "client.test"
    assert record["mail_from"]["address"] == "sender@example.org"
    assert record["mail_from"]["params"] == {"SIZE": "1234", "BODY": "8BITMIME"}
    assert record["mail_from"]["reply"]["code"] == 250
    recipients = [(rcpt["address"], rcpt["params"]) for rcpt in record["recipients"]]
    assert recipients == [
        (
            "first@example.net",
            {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;first@example.net"},
        ),
        ("second@example.net", {"NOTIFY": "NEVER"}),
        ("third@example.net", {}),
    ]
    assert [rcpt["reply"]["code"] for rcpt in record["recipients"]] == [250, 250, 250]
    assert [rcpt["reply"]["enhanced"] for rcpt in record["recipients"]] == ["2.1.5"] * 3


@pytest.mark.postfix
def test_envelope_reaches_smtp_sink(
    start_relay: StartRelay, make_smtp_sink: Callable[..., SmtpSink]
) -> None:
    sink = make_smtp_sink(dump=True)
    relay = start_relay(sink.config)
    with WireClient(relay.address()) as client:
        send_envelope(client)

    sink.wait_counters(messages=1)
    (dump,) = sink.dumped()
    headers = dump.split(b"\n\n", 1)[0].splitlines()
    assert b"X-Mail-Args: <sender@example.org> SIZE=1234 BODY=8BITMIME" in headers
    assert [line for line in headers if line.startswith(b"X-Rcpt-Args:")] == [
        b"X-Rcpt-Args: <first@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;first@example.net",
        b"X-Rcpt-Args: <second@example.net> NOTIFY=NEVER",
        b"X-Rcpt-Args: <third@example.net>",
    ]
    assert b"\nSubject: envelope\n\nbody\n" in dump


def test_envelope_reaches_aiosmtpd(
    start_relay: StartRelay, aiosmtpd_upstream: AiosmtpdUpstream
) -> None:
    relay = start_relay(aiosmtpd_upstream.config)
    host, port = relay.address()
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        assert client.mail("sender@example.org", ["SIZE=1234", "BODY=8BITMIME"])[0] == 250
        assert client.rcpt("first@example.net")[0] == 250
        assert client.rcpt("second@example.net")[0] == 250
        # aiosmtpd implements no RCPT parameter: its 555 must reach the client as it is.
        code, text = client.rcpt("third@example.net", ["NOTIFY=NEVER"])
        assert (code, text) == (555, b"RCPT TO parameters not recognized or not implemented")
        assert client.data(b"Subject: envelope\r\n\r\nbody\r\n")[0] == 250

    aiosmtpd_upstream.wait_for(lambda: len(aiosmtpd_upstream.deliveries) == 1)
    (delivery,) = aiosmtpd_upstream.deliveries
    assert delivery.mail_from == "sender@example.org"
    assert delivery.mail_options == ["SIZE=1234", "BODY=8BITMIME"]
    assert delivery.rcpt_tos == ["first@example.net", "second@example.net"]
    (record,) = relay.records("transaction")
    assert [rcpt["reply"]["code"] for rcpt in record["recipients"]] == [250, 250, 555]
    assert record["outcome"] == "delivered"


# --- EHLO ----------------------------------------------------------------------


def direct_ehlo(port: int) -> bytes:
    with WireClient(("127.0.0.1", port)) as client:
        return greet(client)


def test_ehlo_drops_what_the_relay_cannot_honour(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(
        ehlo=(
            "PIPELINING",
            "SIZE 10240000",
            "XCLIENT NAME ADDR PROTO HELO LOGIN",
            "8BITMIME",
            "XFORWARD NAME ADDR PROTO HELO",
            "STARTTLS",
            "AUTH PLAIN LOGIN",
            "XFOO bar",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "DSN",
        )
    )
    relay = start_relay(upstream.config)
    with WireClient(relay.address()) as client:
        reply = greet(client)
    assert reply == (
        b"250-upstream.test\r\n"
        b"250-PIPELINING\r\n"
        b"250-SIZE 10240000\r\n"
        b"250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n"
        b"250-SMTPUTF8\r\n"
        b"250 DSN\r\n"
    )


def test_ehlo_of_aiosmtpd_passes_unchanged(
    start_relay: StartRelay, aiosmtpd_upstream: AiosmtpdUpstream
) -> None:
    # Without a size limit of its own, the relay keeps the upstream's SIZE.
    relay = start_relay(aiosmtpd_upstream.config, limits={"max_message_bytes": 0})
    with WireClient(relay.address()) as client:
        relayed = greet(client)
    assert relayed == direct_ehlo(aiosmtpd_upstream.port)
    assert relayed.count(b"\r\n") > 3


@pytest.mark.postfix
def test_ehlo_of_smtp_sink_keeps_what_it_can(
    start_relay: StartRelay, make_smtp_sink: Callable[..., SmtpSink]
) -> None:
    sink = make_smtp_sink()
    relay = start_relay(sink.config)
    direct = direct_ehlo(sink.port).splitlines()
    with WireClient(relay.address()) as client:
        relayed = greet(client).splitlines()
    keywords = {line[4:].split(b" ")[0] for line in relayed[1:]}
    assert {b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"DSN"} <= keywords
    assert not keywords & {b"XCLIENT", b"XFORWARD", b"AUTH", b"STARTTLS"}
    # Every line kept is one of the upstream's, in the upstream's order.
    kept = [line[4:] for line in relayed]
    assert kept == [line[4:] for line in direct if line[4:] in kept]
