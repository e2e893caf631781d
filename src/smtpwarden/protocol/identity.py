"""The client's identity for the upstream: Postfix's XCLIENT and XFORWARD lines.

Both carry attributes as ``NAME=value`` with xtext values (RFC 3461 4:
octets outside "!" to "~", and "+" and "=", written as "+HH"). ADDR is an
IPv4 address, or "IPV6:" and an IPv6 address; NAME "[UNAVAILABLE]" says
the relay has no verified host name for the client (it does no DNS).
Postfix's XCLIENT_README and XFORWARD_README define the commands.
"""

from __future__ import annotations

from typing import Final

UNAVAILABLE: Final = "[UNAVAILABLE]"


def xtext(value: str) -> str:
    """RFC 3461 4 xtext: "+HH" for each octet outside "!".."~", and for "+" and "="."""
    out = []
    for octet in value.encode("utf-8"):
        if 33 <= octet <= 126 and octet not in (0x2B, 0x3D):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


def _address(address: str) -> str:
    return f"IPV6:{address}" if ":" in address else address


def xclient_command(address: str, port: int) -> bytes:
    """XCLIENT with the client's address and port, sent once per session.

    HELO and PROTO are left out: the client's own EHLO, relayed after it,
    sets both. LOGIN is left out: AUTH passes through to the upstream,
    which sees the exchange itself.
    """
    if not address:
        return b"XCLIENT NAME=" + UNAVAILABLE.encode("ascii") + b"\r\n"
    return f"XCLIENT ADDR={xtext(_address(address))} PORT={port} NAME={UNAVAILABLE}\r\n".encode()


def xforward_command(address: str, port: int, helo: str | None, *, esmtp: bool) -> bytes:
    """XFORWARD with the client's identity, sent before each MAIL."""
    parts = ["XFORWARD"]
    if address:
        parts += [f"ADDR={xtext(_address(address))}", f"PORT={port}"]
    parts.append(f"NAME={UNAVAILABLE}")
    if helo:
        parts.append(f"HELO={xtext(helo)}")
    parts.append(f"PROTO={'ESMTP' if esmtp else 'SMTP'}")
    return (" ".join(parts) + "\r\n").encode("ascii")
