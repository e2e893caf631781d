"""SMTP smuggling: no end of data but "<CRLF>.<CRLF>" ever reaches the upstream.

PRODUCT.md invariant 3. Each variant hides a second transaction behind an
end marker that some servers accept (Postfix's smtp-sink reads a bare LF as
a line end, so it is exactly the upstream a smuggler hopes for). The client
must get a 5xx, and the upstream must see neither the smuggled MAIL FROM nor
any completed message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest

from integration.external_tools import SmtpSink
from integration.recording_upstreams import RawUpstream
from integration.relay_harness import StartRelay, WireClient

SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n.\r\n"

VARIANTS = {
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "crlf-dot-cr-more": b"\r\n.\rmore data\r\n",
    "cr-dot-crlf": b"\r.\r\n",
    "lf-dot-cr": b"\n.\r",
    "cr-dot-lf": b"\r.\n",
    "crlf-dot-cr": b"\r\n.\r",
    "lf-lf-dot-lf": b"\n\n.\n",
    "crlf-lf-dot-crlf": b"\r\n\n.\r\n",
}


def smuggle(address: tuple[str, int], marker: bytes, *, bytewise: bool) -> bytes:
    """Send a message hiding SMUGGLED behind ``marker``; return the reply to it."""
    with WireClient(address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(b"MAIL FROM:<good@example.org>\r\n", 250)
        client.command(b"RCPT TO:<good@example.net>\r\n", 250)
        client.command(b"DATA\r\n", 354)
        client.send(b"Subject: innocent\r\n\r\nhello")
        payload = marker + SMUGGLED
        # The relay may close as soon as it sees the bare CR or LF.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if bytewise:
                for octet in payload:
                    client.send(bytes([octet]))
            else:
                client.send(payload)
        code, reply = client.reply()
        assert 500 <= code < 600, reply
        # Nothing more: no reply to the smuggled commands, then the end.
        rest = client.read_to_eof()
        assert rest == b"", rest
        return reply


@pytest.mark.parametrize("bytewise", [False, True], ids=["one-write", "bytewise"])
@pytest.mark.parametrize("marker", VARIANTS.values(), ids=VARIANTS.keys())
def test_smuggling_never_reaches_raw_upstream(
    start_relay: StartRelay, raw_upstream: RawUpstream, marker: bytes, bytewise: bool
) -> None:
    relay = start_relay(raw_upstream.config)
    reply = smuggle(relay.address(), marker, bytewise=bytewise)
    assert reply.startswith(b"521 ") or reply.startswith(b"500 ")

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.data == [], "the upstream received a completed message"
    assert conn.in_data_at_end
    assert b"evil@x" not in conn.command_text()
    assert b"victim@y" not in conn.command_text()
    assert b"evil@x" not in conn.partial, "smuggled commands were forwarded as body"
    assert b"\r\n.\r\n" not in b"\r\n" + conn.partial
    (record,) = relay.records("transaction")
    assert record["outcome"] == "aborted"
    assert record["mail_from"]["address"] == "good@example.org"
    (session,) = relay.records("session")
    assert session["end"] == "bare_line_ending"


@pytest.mark.postfix
@pytest.mark.parametrize("marker", VARIANTS.values(), ids=VARIANTS.keys())
def test_smuggling_never_reaches_smtp_sink(
    start_relay: StartRelay, make_smtp_sink: Callable[..., SmtpSink], marker: bytes
) -> None:
    sink = make_smtp_sink(dump=True)
    relay = start_relay(sink.config)
    smuggle(relay.address(), marker, bytewise=False)

    # The readiness probe was one session, the relayed one is the second.
    sink.wait_counters(sessions=2)
    dialogue = sink.dialogue()
    assert b"MAIL FROM:<good@example.org>" in dialogue
    assert b"evil@x" not in dialogue
    assert b"victim@y" not in dialogue
    assert b"smtp-sink: .\n" not in dialogue, "smtp-sink saw an end of data"
    assert sink.counters()[2] == 0
    assert sink.dumped() == []


def test_bare_line_endings_in_commands_are_refused_not_forwarded(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        assert client.command(b"NOOP\n", 500).startswith(b"500 5.5.2 ")
        # Some servers end a line at a bare CR: "QUIT" must not become a command.
        assert client.command(b"NOOP\rQUIT\r\n", 500).startswith(b"500 5.5.2 ")
        assert client.command(b"MAIL FROM:<a@example.org>\r\rRSET\r\n", 500).startswith(b"500 ")
        client.command(b"MAIL FROM:<a@example.org>\r\n", 250)
        client.command(b"RCPT TO:<b@example.net>\r\n", 250)
        client.command(b"QUIT\r\n", 221)

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.commands == [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<b@example.net>\r\n",
        b"QUIT\r\n",
    ]
