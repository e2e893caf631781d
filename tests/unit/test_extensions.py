"""EHLO reconciliation."""

from __future__ import annotations

import pytest

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


def test_policy_can_offer_tls_and_auth_and_drop_chunking() -> None:
    out, _ = reconcile(
        parse_reply(UPSTREAM),
        ExtensionPolicy(chunking=False, starttls=True, auth=("PLAIN", "LOGIN")),
    )
    assert b"250-AUTH PLAIN LOGIN\r\n" in out
    assert b"CHUNKING" not in out
    # smtpwarden's own STARTTLS, once, at the end.
    assert out.count(b"STARTTLS") == 1
    assert out.endswith(b"250 STARTTLS\r\n")


def test_starttls_is_offered_even_when_the_upstream_does_not() -> None:
    wire = b"250-mx\r\n250 PIPELINING\r\n"
    out, _ = reconcile(parse_reply(wire), ExtensionPolicy(starttls=True))
    assert out == b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


@pytest.mark.parametrize(
    ("upstream", "allowed", "offered"),
    [
        (b"PLAIN LOGIN CRAM-MD5", ("LOGIN", "PLAIN"), b"AUTH PLAIN LOGIN"),
        (b"plain xoauth2", ("XOAUTH2", "PLAIN"), b"AUTH PLAIN XOAUTH2"),
        (b"GSSAPI", ("PLAIN",), None),
        (b"PLAIN PLAIN", ("PLAIN",), b"AUTH PLAIN"),
    ],
)
def test_auth_offers_the_mechanisms_both_sides_allow(
    upstream: bytes, allowed: tuple[str, ...], offered: bytes | None
) -> None:
    wire = b"250-mx\r\n250-AUTH " + upstream + b"\r\n250 8BITMIME\r\n"
    out, _ = reconcile(parse_reply(wire), ExtensionPolicy(auth=allowed))
    if offered is None:
        assert b"AUTH" not in out
    else:
        assert b"250-" + offered + b"\r\n" in out


def test_auth_is_dropped_without_a_policy() -> None:
    wire = b"250-mx\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n"
    out, _ = reconcile(parse_reply(wire), ExtensionPolicy())
    assert out == b"250-mx\r\n250 8BITMIME\r\n"


@pytest.mark.parametrize(
    ("upstream", "limit", "offered"),
    [
        (b"SIZE 10240000", 5000, b"SIZE 5000"),
        (b"SIZE 1000", 5000, b"SIZE 1000"),
        (b"SIZE", 5000, b"SIZE 5000"),
        (b"SIZE 0", 5000, b"SIZE 5000"),
        (b"SIZE 1000", 0, b"SIZE 1000"),
    ],
)
def test_size_offers_the_smaller_limit(upstream: bytes, limit: int, offered: bytes) -> None:
    wire = b"250-mx\r\n250 " + upstream + b"\r\n"
    out, _ = reconcile(parse_reply(wire), ExtensionPolicy(max_size=limit))
    assert out == b"250-mx\r\n250 " + offered + b"\r\n"


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
