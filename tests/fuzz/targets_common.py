"""What the fuzz targets share: the invariant check and a few helpers.

A target fails an input by raising ``InvariantBroken`` (through ``check``)
when a property the code under test promises does not hold; the other
helpers read the settings octets and judge line endings and error replies.
"""

from __future__ import annotations

import re

from smtpwarden.protocol.errors import RemoteProtocolError


class InvariantBroken(Exception):
    """A property the code under test promises did not hold for this input."""


def check(condition: bool, what: str) -> None:
    """Raise ``InvariantBroken`` with ``what`` unless ``condition`` holds."""
    if not condition:
        raise InvariantBroken(what)


# A CR not followed by LF, or an LF not preceded by CR (RFC 5321 2.3.8).
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# What an error's reply_bytes() must look like: one reply line, no control bytes.
_ERROR_REPLY = re.compile(rb"[45][0-9][0-9] [245]\.[0-9]{1,3}\.[0-9]{1,3} [\x20-\x7e]+\r\n\Z")

# Inputs up to this long are also fed octet by octet.
BYTE_BY_BYTE_MAX = 256
# The AUTH mechanisms, in the order the bits of a settings octet pick them.
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")


def has_bare(data: bytes) -> bool:
    """True if ``data`` holds a CR or LF that is not part of a CRLF pair."""
    return _BARE.search(data) is not None


def u16(data: bytes) -> int:
    """Big-endian value of up to two octets (0 for none)."""
    return int.from_bytes(data[:2], "big")


def check_error_reply(error: RemoteProtocolError) -> None:
    """The reply an error sends is one well-formed 4xx or 5xx line."""
    reply = error.reply_bytes()
    check(_ERROR_REPLY.match(reply) is not None, f"bad error reply {reply!r}")


# README, "EHLO reconciliation": the keywords the relay may pass on to the
# client as the upstream offered them (CHUNKING and BINARYMIME, AUTH and
# STARTTLS depend on the session). The fuzz target and the property test
# both judge reconcile by it, not by the code's own list.
RELAYED_KEYWORDS = frozenset(
    {
        "SIZE",
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "VRFY",
        "EXPN",
        "HELP",
        "ETRN",
        "DELIVERBY",
        "MT-PRIORITY",
        "FUTURERELEASE",
        "NO-SOLICITING",
        "LIMITS",
        "RRVS",
    }
)
