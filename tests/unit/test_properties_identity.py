"""Properties of the XCLIENT and XFORWARD lines (``protocol/identity.py``)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.protocol.identity import UNAVAILABLE, xclient_command, xforward_command, xtext
from strategies import scaled

# RFC 3461 4: xtext = *( xchar / hexchar ); xchar is "!".."~" but "+" and "=".
XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")

# Text as the relay holds it: decoded wire text, never a lone surrogate.
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
addresses = st.one_of(
    st.just(""),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
ports = st.integers(0, 65535)


def unxtext(value: bytes) -> bytes:
    """Decode xtext."""
    return re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), value)


def attributes(line: bytes, verb: bytes) -> dict[bytes, bytes]:
    """The ``NAME=value`` attributes of one command line; each name once."""
    assert line.endswith(b"\r\n")
    words = line[:-2].split(b" ")
    assert words[0] == verb
    found: dict[bytes, bytes] = {}
    for word in words[1:]:
        name, eq, value = word.partition(b"=")
        assert eq
        assert re.fullmatch(rb"[A-Z]+", name)
        assert name not in found
        found[name] = value
    return found


@given(texts)
def test_xtext_is_xtext_and_decodes_to_the_utf8_octets(value: str) -> None:
    encoded = xtext(value).encode("ascii")
    assert XTEXT.match(encoded)
    assert unxtext(encoded) == value.encode("utf-8")


def one_clean_line(line: bytes) -> None:
    # One ASCII line: whatever the client sent, it cannot add a command.
    line.decode("ascii")
    assert line.endswith(b"\r\n")
    assert line.count(b"\r") == line.count(b"\n") == 1


@scaled()
@given(addresses, ports, st.none() | texts, st.booleans())
def test_xforward_carries_the_client_and_nothing_can_be_injected(
    address: str, port: int, helo: str | None, esmtp: bool
) -> None:
    line = xforward_command(address, port, helo, esmtp=esmtp)
    one_clean_line(line)
    attrs = attributes(line, b"XFORWARD")
    assert attrs[b"NAME"] == UNAVAILABLE.encode("ascii")
    assert attrs[b"PROTO"] == (b"ESMTP" if esmtp else b"SMTP")
    if address:
        expected = ("IPV6:" if ":" in address else "") + address
        assert unxtext(attrs[b"ADDR"]) == expected.encode("ascii")
        assert attrs[b"PORT"] == b"%d" % port
    else:
        assert b"ADDR" not in attrs
        assert b"PORT" not in attrs
    if helo:
        assert unxtext(attrs[b"HELO"]) == helo.encode("utf-8")
    else:
        assert b"HELO" not in attrs


@scaled(cap=10_000)
@given(addresses, ports)
def test_xclient_carries_the_client_address_in_one_line(address: str, port: int) -> None:
    line = xclient_command(address, port)
    one_clean_line(line)
    attrs = attributes(line, b"XCLIENT")
    assert attrs[b"NAME"] == UNAVAILABLE.encode("ascii")
    if address:
        expected = ("IPV6:" if ":" in address else "") + address
        assert unxtext(attrs[b"ADDR"]) == expected.encode("ascii")
        assert attrs[b"PORT"] == b"%d" % port
    else:
        assert set(attrs) == {b"NAME"}
