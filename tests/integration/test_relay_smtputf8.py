"""SMTPUTF8 end to end (RFC 6531): UTF-8 addresses and body through the relay.

The client's MAIL and RCPT lines carry UTF-8 mailboxes; they must reach the
upstream byte for byte, the body with them, and the transaction record must
show the addresses decoded, with the SMTPUTF8 parameter (which takes no
value) recorded as null. The raw recording upstream shows the exact bytes;
aiosmtpd (``enable_SMTPUTF8``) shows what a real server makes of them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from integration.recording_upstreams import AiosmtpdUpstream, RawUpstream
from integration.relay_harness import RunningRelay, StartRelay, WireClient

SENDER = "用户@例子.广告"
RECIPIENT = "δοκιμή@παράδειγμα.δοκιμή"
EHLO = b"EHLO client.test\r\n"
MAIL = f"MAIL FROM:<{SENDER}> SMTPUTF8 BODY=8BITMIME\r\n".encode()
RCPT = f"RCPT TO:<{RECIPIENT}>\r\n".encode()
MESSAGE = (
    f"From: {SENDER}\r\n"
    f"To: {RECIPIENT}\r\n"
    "Subject: καλημέρα\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=UTF-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "你好世界 Καλημέρα\r\n"
    ".ünïcödé on a dot-stuffed line\r\n"
).encode()
# RFC 5321 4.5.2: the client doubles the leading dot; the upstream gets that.
WIRE = MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def send_utf8_message(relay: RunningRelay) -> bytes:
    """Send the message through the relay; return the relay's EHLO reply."""
    with WireClient(relay.address()) as client:
        client.expect(220)
        ehlo = client.command(EHLO, 250)
        client.command(MAIL, 250)
        client.command(RCPT, 250)
        client.command(b"DATA\r\n", 354)
        client.command(WIRE, 250)
        client.command(b"QUIT\r\n", 221)
    return ehlo


def check_record(relay: RunningRelay) -> dict[str, Any]:
    relay.wait_idle()
    (record,) = relay.records("transaction")
    assert record["outcome"] == "delivered"
    assert record["mail_from"]["address"] == SENDER
    assert record["mail_from"]["params"] == {"SMTPUTF8": None, "BODY": "8BITMIME"}
    assert [rcpt["address"] for rcpt in record["recipients"]] == [RECIPIENT]
    # size and body_sha256 cover the octets sent upstream: stuffed, no ".<CRLF>".
    transmitted = WIRE[: -len(b".\r\n")]
    assert record["size"] == len(transmitted)
    assert record["body_sha256"] == hashlib.sha256(transmitted).hexdigest()
    return record


def test_smtputf8_reaches_raw_upstream_byte_identical(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config)
    ehlo = send_utf8_message(relay)
    assert b"250-SMTPUTF8\r\n" in ehlo or b"250 SMTPUTF8\r\n" in ehlo

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.commands == [EHLO, MAIL, RCPT, b"DATA\r\n", b"QUIT\r\n"]
    assert conn.data == [WIRE]
    check_record(relay)


def test_smtputf8_accepted_by_aiosmtpd(
    start_relay: StartRelay, aiosmtpd_upstream: AiosmtpdUpstream
) -> None:
    relay = start_relay(aiosmtpd_upstream.config)
    ehlo = send_utf8_message(relay)
    assert b"SMTPUTF8\r\n" in ehlo

    aiosmtpd_upstream.wait_for(lambda: len(aiosmtpd_upstream.deliveries) == 1)
    (delivery,) = aiosmtpd_upstream.deliveries
    assert delivery.mail_from == SENDER
    assert delivery.mail_options == ["SMTPUTF8", "BODY=8BITMIME"]
    assert delivery.rcpt_tos == [RECIPIENT]
    assert delivery.content == MESSAGE
    record = check_record(relay)
    assert record["final_reply"]["code"] == 250
