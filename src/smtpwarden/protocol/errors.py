"""Protocol errors, split by who is at fault.

``LocalProtocolError`` means smtpwarden misused the core (a bug); it never goes
on the wire. ``RemoteProtocolError`` means the peer misbehaved; each one
carries the SMTP reply it implies, so the shell can answer without inventing
text, and never puts exception text on the wire. ``ProxyProtocolError`` is
the peer's fault too, but implies no reply: the connection is closed.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error raised by the protocol core."""


class LocalProtocolError(ProtocolError):
    """The caller used the core in a way its state does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the core refuses.

    ``code`` and ``enhanced`` are the reply the peer should get (RFC 5321
    section 4.2, RFC 3463); ``text`` is the human part of that reply. The
    exception message may say more for logs, but only ``reply_bytes()`` goes
    on the wire.
    """

    code: int = 500
    enhanced: str = "5.5.2"
    text: str = "Syntax error"

    def __init__(
        self,
        detail: str,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        text: str | None = None,
    ) -> None:
        super().__init__(detail)
        if code is not None:
            self.code = code
        if enhanced is not None:
            self.enhanced = enhanced
        if text is not None:
            self.text = text

    def reply_bytes(self) -> bytes:
        """Return the single-line SMTP reply for this error, CRLF included."""
        return f"{self.code} {self.enhanced} {self.text}\r\n".encode("ascii")


class LineTooLong(RemoteProtocolError):
    """A command line exceeded the configured limit (RFC 5321 4.5.3.1.4)."""

    code = 500
    enhanced = "5.5.2"
    text = "Line too long"


class AuthLineTooLong(LineTooLong):
    """An AUTH response line longer than RFC 4954 4 requires anyone to read.

    The reply is RFC 4954 6's for a response past the buffer available.
    """

    code = 500
    enhanced = "5.5.6"
    text = "Authentication Exchange line is too long"


class BadAuthResponse(RemoteProtocolError):
    """An AUTH response line that is neither base64 nor ``*`` (RFC 4954 4)."""

    code = 501
    enhanced = "5.5.2"
    text = "Cannot Base64-decode Client responses"


class BareLineEnding(RemoteProtocolError):
    """A CR or LF that is not part of a CRLF pair (RFC 5321 2.3.8).

    Bare line endings are how SMTP smuggling hides a second end of data, so
    they are refused rather than passed on to be read differently upstream.
    """

    code = 500
    enhanced = "5.5.2"
    text = "Bare CR or LF is not allowed; lines must end with CRLF"


class BadCommand(RemoteProtocolError):
    """A command smtpwarden cannot parse or will not relay."""


class MalformedReply(RemoteProtocolError):
    """The upstream sent a reply that breaks RFC 5321 4.2 syntax.

    The client is told the upstream failed; it never sees the garbage.
    """

    code = 451
    enhanced = "4.4.0"
    text = "Upstream server sent a malformed reply"


class ProxyProtocolError(ProtocolError):
    """A connection did not open with a valid PROXY protocol header.

    HAProxy's proxy-protocol.txt (section 2.1) wants such a connection
    aborted at once and never guessed at. Unlike a ``RemoteProtocolError``
    it carries no SMTP reply: nothing is sent, the connection is closed.
    """
