"""Events produced by the client-facing reader (``ServerConnection``).

Events name what the client did. Each command event keeps ``line``, the
exact bytes received (CRLF included), because the relay forwards those bytes
unchanged; parsed fields are for decisions and records only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from smtpwarden.protocol.errors import RemoteProtocolError


class Verb(enum.Enum):
    """SMTP commands the core understands (RFC 5321 4.1 plus extensions)."""

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
class BadCommand:
    """A line the core refused; the client should get ``error.reply_bytes()``.

    Nothing of it may be forwarded. ``verb`` is set when the verb itself was
    recognised (for records); ``line`` is capped to what was buffered.
    """

    line: bytes
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


Event = Command | BadCommand | Body


class Signal(enum.Enum):
    """Answers of ``next_event`` that are not events (h11 style)."""

    NEED_DATA = "need data"
    PAUSED = "paused"


NEED_DATA = Signal.NEED_DATA
PAUSED = Signal.PAUSED
