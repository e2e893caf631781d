"""EHLO reconciliation."""

from __future__ import annotations

from smtpwarden.protocol.extensions import ExtensionPolicy, parse_ehlo, reconcile
from smtpwarden.protocol.replies import parse_reply

UPSTREAM = (
    b"250-mx.example.net\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-VRFY\r\n"
    b"250-ETRN\r\n"
    b"250-STARTTLS\r\n"
    b"250-AUTH PLAIN LOGIN\r\n"
    b"250-XCLIENT NAME ADDR PROTO HELO\r\n"
    b"250-XFORWARD NAME ADDR\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-8BITMIME\r\n"
    b"250-DSN\r\n"
    b"250-SMTPUTF8\r\n"
    b"250-X-EXPS GSSAPI\r\n"
    b"250-TURN\r\n"
    b"250 CHUNKING\r\n"
)


def test_client_sees_only_what_the_relay_honours() -> None:
    out, offered = reconcile(parse_reply(UPSTREAM), ExtensionPolicy())
    assert out == (
        b"250-mx.example.net\r\n"
        b"250-PIPELINING\r\n"
        b"250-SIZE 10240000\r\n"
        b"250-VRFY\r\n"
        b"250-ETRN\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n"
        b"250-8BITMIME\r\n"
        b"250-DSN\r\n"
        b"250-SMTPUTF8\r\n"
        b"250 CHUNKING\r\n"
    )
    assert "XCLIENT" in offered
    assert offered.keywords["SIZE"] == b"10240000"


def test_policy_can_keep_tls_and_auth_and_drop_chunking() -> None:
    out, _ = reconcile(
        parse_reply(UPSTREAM), ExtensionPolicy(chunking=False, starttls=True, auth=True)
    )
    assert b"250-STARTTLS\r\n" in out
    assert b"250-AUTH PLAIN LOGIN\r\n" in out
    assert b"CHUNKING" not in out
    assert out.endswith(b"250 SMTPUTF8\r\n")


def test_unchanged_reply_is_forwarded_as_received() -> None:
    wire = b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    reply = parse_reply(wire)
    out, _ = reconcile(reply, ExtensionPolicy())
    assert out is reply.raw


def test_everything_dropped_leaves_the_greeting() -> None:
    out, _ = reconcile(parse_reply(b"250-mx\r\n250 XCLIENT ADDR\r\n"), ExtensionPolicy())
    assert out == b"250 mx\r\n"


def test_refusal_passes_unchanged() -> None:
    wire = b"554 5.7.1 go away\r\n"
    out, offered = reconcile(parse_reply(wire), ExtensionPolicy())
    assert out == wire
    assert offered.keywords == {}


def test_keywords_are_case_insensitive() -> None:
    assert "PIPELINING" in parse_ehlo(parse_reply(b"250-mx\r\n250 pipelining\r\n"))
