"""TLS with the client: STARTTLS, implicit TLS, TLS required, STARTTLS injection.

Certificates come from a throw-away trustme CA; clients are smtplib, swaks
and a raw socket that pipelines commands after STARTTLS.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from typing import Any, BinaryIO

import pytest

from integration.external_tools import require_tool
from integration.pki import Pki
from integration.recording_upstreams import RawUpstream
from integration.relay_harness import UPSTREAM, WAIT_S, RunningRelay, StartRelay

MESSAGE = "Subject: tls\r\n\r\nover TLS\r\n"
SWAKS_TIMEOUT_S = 30.0


def tls_relay(
    start_relay: StartRelay, upstream: RawUpstream, pki: Pki, **tls: object
) -> RunningRelay:
    listener: dict[str, Any] = {
        "name": "main",
        "host": "127.0.0.1",
        "port": 0,
        "upstream": UPSTREAM,
        "tls": {"certificate": str(pki.certificate), "key": str(pki.key), **tls},
    }
    return start_relay(upstream.config, extra={"listeners": [listener]})


@pytest.fixture
def upstream() -> Iterator[RawUpstream]:
    server = RawUpstream()
    yield server
    server.close()


def sessions(relay: RunningRelay, count: int = 1) -> list[dict[str, Any]]:
    return relay.wait_records(lambda rs: len(rs) >= count, "session")


def test_starttls_then_a_message(start_relay: StartRelay, upstream: RawUpstream, pki: Pki) -> None:
    relay = tls_relay(start_relay, upstream, pki)
    host, port = relay.address()
    with smtplib.SMTP(host, port, timeout=WAIT_S) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=pki.client_context())
        assert code == 220
        client.ehlo("client.test")
        assert not client.has_extn("starttls")  # RFC 3207 4.2: not offered again
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (conn,) = upstream.wait_all_ended()
    assert conn.data == [MESSAGE.encode() + b".\r\n"]
    # The upstream hears both EHLOs, and never a STARTTLS: that one is ours.
    assert [line.split()[0].upper() for line in conn.commands[:2]] == [b"EHLO", b"EHLO"]
    assert not any(line.upper().startswith(b"STARTTLS") for line in conn.commands)
    (session,) = sessions(relay)
    assert session["tls"]["client"].startswith("TLSv1.")
    assert session["tls"]["upstream"] == "none"
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert record["tls"]["client"] == session["tls"]["client"]


def test_implicit_tls(start_relay: StartRelay, upstream: RawUpstream, pki: Pki) -> None:
    relay = tls_relay(start_relay, upstream, pki, mode="implicit")
    host, port = relay.address()
    with smtplib.SMTP_SSL(host, port, timeout=WAIT_S, context=pki.client_context()) as client:
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (conn,) = upstream.wait_all_ended()
    assert conn.data == [MESSAGE.encode() + b".\r\n"]
    (session,) = sessions(relay)
    assert session["tls"]["client"].startswith("TLSv1.")


def test_required_tls_refuses_mail_before_starttls(
    start_relay: StartRelay, upstream: RawUpstream, pki: Pki
) -> None:
    relay = tls_relay(start_relay, upstream, pki, require=True)
    host, port = relay.address()
    with smtplib.SMTP(host, port, timeout=WAIT_S) as client:
        client.ehlo("client.test")
        code, text = client.mail("a@example.org")
        assert (code, text[:5]) == (530, b"5.7.0")
        client.starttls(context=pki.client_context())
        client.ehlo("client.test")
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (conn,) = upstream.wait_all_ended()
    # Only the MAIL sent over TLS reached the upstream.
    (mail,) = [line for line in conn.commands if line.upper().startswith(b"MAIL")]
    assert mail.startswith(b"mail FROM:<a@example.org>")


def greet(raw: socket.socket) -> BinaryIO:
    """Read the banner, say EHLO and read its reply; return the reader."""
    reader = raw.makefile("rb")
    assert reader.readline().startswith(b"220")
    raw.sendall(b"EHLO client.test\r\n")
    while not reader.readline().startswith(b"250 "):
        pass
    return reader


def test_commands_pipelined_after_starttls_are_discarded(
    start_relay: StartRelay, upstream: RawUpstream, pki: Pki
) -> None:
    relay = tls_relay(start_relay, upstream, pki)
    host, port = relay.address()
    with socket.create_connection((host, port), timeout=WAIT_S) as raw:
        reader = greet(raw)
        # RFC 3207 5: the injected MAIL must never be executed.
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
        assert reader.readline().startswith(b"220 2.0.0")
        with pki.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"EHLO client.test\r\n")
            secure = tls.makefile("rb")
            while not (line := secure.readline()).startswith(b"250 "):
                assert line.startswith(b"250-")
            tls.sendall(b"MAIL FROM:<a@example.org>\r\n")
            assert secure.readline().startswith(b"250")
            tls.sendall(b"QUIT\r\n")
            assert secure.readline().startswith(b"221")
    (conn,) = upstream.wait_all_ended()
    assert not any(b"injected" in line for line in conn.commands)
    assert b"MAIL FROM:<a@example.org>\r\n" in conn.commands


def test_a_failed_handshake_ends_only_that_session(
    start_relay: StartRelay, upstream: RawUpstream, pki: Pki
) -> None:
    relay = tls_relay(start_relay, upstream, pki)
    host, port = relay.address()
    with socket.create_connection((host, port), timeout=WAIT_S) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"STARTTLS\r\n")
        assert reader.readline().startswith(b"220")
        raw.sendall(b"this is not a TLS ClientHello\r\n" * 4)
        assert reader.read() == b""  # the relay closed the connection
    (session,) = sessions(relay)
    assert session["end"] == "tls_failed"
    # The listener is still up.
    with smtplib.SMTP(host, port, timeout=WAIT_S) as client:
        assert client.noop()[0] == 250


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "tls-on-connect"])
def test_swaks_over_tls(
    start_relay: StartRelay, upstream: RawUpstream, pki: Pki, implicit: bool
) -> None:
    swaks = require_tool("swaks")
    relay = tls_relay(start_relay, upstream, pki, mode="implicit" if implicit else "starttls")
    _, port = relay.address()
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
            "--body",
            "over TLS",
            "--tls-on-connect" if implicit else "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(pki.ca_file),
            "--tls-sni",
            "localhost",
        ],
        capture_output=True,
        timeout=SWAKS_TIMEOUT_S,
        check=False,
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    assert "TLS started" in output
    (conn,) = upstream.wait_all_ended()
    assert len(conn.data) == 1


INJECTIONS = ("mail-in-the-write-after-starttls", "plaintext-instead-of-the-client-hello")


@pytest.mark.parametrize("variant", INJECTIONS)
def test_no_starttls_injection_is_ever_executed(
    start_relay: StartRelay, upstream: RawUpstream, pki: Pki, variant: str
) -> None:
    # RFC 3207 5: nothing sent before the handshake may be executed after
    # it. (STARTTLS and the injection in one write is the test above.)
    injected = b"MAIL FROM:<injected@example.org>\r\nRCPT TO:<victim@example.net>\r\n"
    relay = tls_relay(start_relay, upstream, pki)
    host, port = relay.address()
    with socket.create_connection((host, port), timeout=WAIT_S) as raw:
        reader = greet(raw)
        raw.sendall(b"STARTTLS\r\n")
        if variant == "mail-in-the-write-after-starttls":
            raw.sendall(injected)  # before the 220 is read
            assert reader.readline().startswith(b"220 2.0.0")
            tls = pki.client_context().wrap_socket(
                raw, server_hostname="localhost", do_handshake_on_connect=False
            )
            with tls:
                try:
                    tls.do_handshake()
                    tls.sendall(b"EHLO client.test\r\nQUIT\r\n")
                    tls.makefile("rb").read()
                except (ssl.SSLError, ConnectionResetError):
                    # The injected octets may reach the relay after its
                    # handshake began, which then fails: still not executed.
                    pass
        else:
            assert reader.readline().startswith(b"220 2.0.0")
            raw.sendall(injected)
            assert reader.read() == b""  # the handshake failed; the relay closed
    relay.wait_records(lambda found: len(found) == 1, "session")
    (conn,) = upstream.wait_all_ended()
    assert b"injected" not in conn.command_text()
    assert b"victim" not in conn.command_text()
    # The listener still serves.
    with smtplib.SMTP(host, port, timeout=WAIT_S) as client:
        assert client.noop()[0] == 250
