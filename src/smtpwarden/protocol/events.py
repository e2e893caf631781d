"""Events produced by the client-facing reader (``ServerConnection``).

Events name what the client did. Each command event keeps ``line``, the
exact bytes received (CRLF included), because the relay forwards those bytes
unchanged; parsed fields are for decisions and records only.

A field that may hold a credential (an AUTH line, an AUTH response, a refused
line) is left out of ``repr()``, so that no log line or exception message
built from an event shows a secret.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from smtpwarden.protocol.errors import RemoteProtocolError


class Verb(enum.Enum):
    """SMTP commands the core understands (RFC 5321 4.1 plus extensions)."""

    # Members are singletons: hashed by identity in C (Enum's own hash
    # is a Python call), as dict keys on the hot path.
    __hash__ = object.__hash__

    HELO = "HELO"
    EHLO = "EHLO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT"  # RFC 3030
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"
    VRFY = "VRFY"
    EXPN = "EXPN"
    HELP = "HELP"
    ETRN = "ETRN"  # RFC 1985
    STARTTLS = "STARTTLS"  # RFC 3207
    AUTH = "AUTH"  # RFC 4954
    XCLIENT = "XCLIENT"
    XFORWARD = "XFORWARD"


Param = tuple[bytes, bytes | None]
"""One ESMTP parameter: upper-cased keyword and its value (None if bare)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A command line the client sent, parsed as far as its verb needs."""

    verb: Verb
    argument: bytes
    line: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class MailFrom(Command):
    """``MAIL FROM:<path> [params]``; ``path`` is without angle brackets."""

    path: bytes
    params: tuple[Param, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RcptTo(Command):
    """``RCPT TO:<path> [params]``; ``path`` is without angle brackets."""

    path: bytes
    params: tuple[Param, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Bdat(Command):
    """``BDAT size [LAST]``: exactly ``size`` octets of chunk follow."""

    size: int
    last: bool

    @property
    def wire(self) -> bytes:
        """The line to send upstream, rebuilt in canonical form (RFC 3030 2)."""
        return b"BDAT %d LAST\r\n" % self.size if self.last else b"BDAT %d\r\n" % self.size


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth(Command):
    """``AUTH mechanism [initial-response]`` (RFC 4954 4).

    ``mechanism`` is the SASL mechanism name upper-cased, or "" when the
    argument is not ``mechanism [initial-response]``; ``initial`` is the
    initial response as sent (base64 text, ``b"="`` for an empty one), or
    None. ``line``, ``argument`` and ``initial`` may hold a credential and
    are kept out of ``repr()``.
    """

    argument: bytes = field(repr=False)
    line: bytes = field(repr=False)
    mechanism: str
    initial: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthResponse:
    """One line the client sent in answer to a 334 challenge (RFC 4954 4).

    ``line`` is exactly what was received, CRLF included (base64 text, or
    ``*`` to cancel), to be forwarded unchanged. It is a credential more
    often than not: it never appears in ``repr()``.
    """

    line: bytes = field(repr=False)

    @property
    def cancelled(self) -> bool:
        """True if the client cancelled the exchange with ``*``."""
        return self.line == b"*\r\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class BadCommand:
    """A line the core refused; the client should get ``error.reply_bytes()``.

    Nothing of it may be forwarded. ``verb`` is set when the verb itself was
    recognised (for records), and is ``Verb.AUTH`` for a refused AUTH
    response line. ``line`` is capped to what was buffered, empty for an AUTH
    response line, and kept out of ``repr()``: a malformed AUTH line may
    still hold a credential.
    """

    line: bytes = field(repr=False)
    verb: Verb | None
    error: RemoteProtocolError


@dataclass(frozen=True, slots=True, kw_only=True)
class Body:
    """Message content, forwarded as received.

    In DATA, ``data`` is the client's bytes (dot-stuffing kept) and the event
    with ``done`` set ends with the ``<CRLF>.<CRLF>`` terminator. In BDAT it
    is chunk content, and ``done`` marks the last octet of the chunk. ``data``
    is the received object itself or a memoryview of it: never a copy.
    """

    data: bytes | memoryview
    done: bool


Event = Command | AuthResponse | BadCommand | Body


class Signal(enum.Enum):
    """Answers of ``next_event`` that are not events (h11 style)."""

    # Members are singletons: hashed by identity in C (Enum's own hash
    # is a Python call), as dict keys on the hot path.
    __hash__ = object.__hash__

    NEED_DATA = "need data"
    PAUSED = "paused"


NEED_DATA = Signal.NEED_DATA
PAUSED = Signal.PAUSED
