"""The private Postfix harness: a real Postfix smtpd on loopback, talked to directly.

No relay is involved here: these tests show that ``postfix_upstream``
accepts mail, hands it on to its recorder, honours XCLIENT from 127.0.0.1
and logs what a test needs to assert on, so that relay tests can trust it
as an upstream.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from integration.postfix_instance import HOSTNAME, PostfixInstance
from integration.recording_upstreams import AiosmtpdUpstream
from integration.relay_harness import WireClient

pytestmark = pytest.mark.postfix

SENDER = "sender@example.org"
RECIPIENT = "rcpt@example.net"
MESSAGE = (
    f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: harness check\r\n\r\nHello from the test.\r\n"
)
XCLIENT_ADDR = "192.0.2.55"
QUEUED = re.compile(rb"^250 .*queued as ([0-9A-Za-z]+)", re.MULTILINE)
TIMEOUT_S = 10.0


def test_message_from_smtplib_reaches_the_recorder(
    postfix_upstream: PostfixInstance, aiosmtpd_upstream: AiosmtpdUpstream
) -> None:
    host, port = postfix_upstream.address
    with smtplib.SMTP(host, port, timeout=TIMEOUT_S) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        refused = client.sendmail(SENDER, [RECIPIENT], MESSAGE)
    assert refused == {}

    aiosmtpd_upstream.wait_for(lambda: len(aiosmtpd_upstream.deliveries) == 1)
    (delivery,) = aiosmtpd_upstream.deliveries
    assert delivery.mail_from == SENDER
    assert delivery.rcpt_tos == [RECIPIENT]
    assert f"by {HOSTNAME} (Postfix)".encode() in delivery.content
    assert delivery.content.endswith(b"\r\n\r\nHello from the test.\r\n")
    relay = re.escape(f"relay=127.0.0.1[127.0.0.1]:{aiosmtpd_upstream.port}")
    postfix_upstream.wait_log(rf"to=<{re.escape(RECIPIENT)}>, {relay}, .*status=sent")


def test_xclient_address_is_the_logged_client(
    postfix_upstream: PostfixInstance, aiosmtpd_upstream: AiosmtpdUpstream
) -> None:
    with WireClient(postfix_upstream.address) as client:
        client.expect(220)
        ehlo = client.command(b"EHLO x\r\n", 250)
        assert re.search(rb"^250[ -]XCLIENT .*\bADDR\b", ehlo, re.MULTILINE), ehlo
        client.command(
            f"XCLIENT ADDR={XCLIENT_ADDR} PORT=4242 NAME=[UNAVAILABLE]\r\n".encode(), 220
        )
        client.command(b"EHLO x\r\n", 250)
        client.command(f"MAIL FROM:<{SENDER}>\r\n".encode(), 250)
        client.command(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250)
        client.command(b"DATA\r\n", 354)
        queued = client.command(MESSAGE.encode() + b".\r\n", 250)
        client.command(b"QUIT\r\n", 221)
    found = QUEUED.search(queued)
    assert found is not None, queued
    queue_id = found.group(1).decode()

    logged = postfix_upstream.wait_log(rf"{queue_id}: client=(\S+)\[([0-9.]+)\]")
    assert logged.group(2) == XCLIENT_ADDR
    assert logged.group(1) == "unknown"
    postfix_upstream.wait_log(rf"{queue_id}: to=<{re.escape(RECIPIENT)}>, .*status=sent")
    aiosmtpd_upstream.wait_for(lambda: len(aiosmtpd_upstream.deliveries) == 1)
    (delivery,) = aiosmtpd_upstream.deliveries
    assert f"(unknown [{XCLIENT_ADDR}])".encode() in delivery.content


def test_starttls_offered_and_mail_discarded_without_relayhost(
    make_postfix_upstream: Callable[..., PostfixInstance], tmp_path: Path
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    leaf.private_key_pem.write_to_path(str(key_file))
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert_file), append=index > 0)
    postfix = make_postfix_upstream(
        cert_file=cert_file, key_file=key_file, settings={"smtpd_tls_loglevel": "1"}
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)

    host, port = postfix.address
    with smtplib.SMTP(host, port, timeout=TIMEOUT_S) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        client.starttls(context=context)
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        refused = client.sendmail(SENDER, [RECIPIENT], MESSAGE)
    assert refused == {}

    postfix.wait_log(r"TLS connection established from \S+\[127\.0\.0\.1\]")
    postfix.wait_log(rf"to=<{re.escape(RECIPIENT)}>, relay=none, .*status=sent \(no relayhost\)")
