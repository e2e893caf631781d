"""What the relay says to a fresh upstream before the client's session is relayed.

On a new upstream connection the relay may first secure the link with
STARTTLS (RFC 3207) and pass the client's real address with Postfix's
XCLIENT; only then does it hand the upstream's greeting to the client.
``UpstreamPreamble`` is that exchange as a sans-I/O state machine: the
caller feeds it each upstream ``Reply`` (``receive``) and the end of a TLS
handshake (``tls_started``), and carries out the one ``Action`` each call
returns:

- ``Send(data)``: write ``data`` to the upstream and feed its reply;
- ``StartTls()``: run the TLS handshake, then call ``tls_started``;
- ``Done(banner, extensions, xclient_sent)``: relay ``banner`` to the client
  as the greeting and start relaying the session;
- ``Fail(reason)``: give up on this upstream (``polite``: it is still in
  step, so QUIT rather than an abort).

The sequence: the banner (a 4xx or 5xx one is the answer at once, relayed as
is); EHLO if there is anything to do; STARTTLS if wanted and offered, and
after the handshake EHLO again (RFC 3207 4.2); XCLIENT if given and offered,
whose 220 is the greeting of the new session.

Rule 1: nothing the upstream said is trusted beyond the step it answers.
What was learnt before TLS is forgotten once TLS is up (RFC 3207 4.2), and a
reply in the wrong place, or with a code the step does not allow, is a
``Fail``.

Rule 2: the caller feeds a reply only when one was read after the last
``Send`` was written. Before ``StartTls`` is carried out, the caller checks
that no octet follows the 220 to STARTTLS, received or buffered: such octets
would be read as if they came over TLS (STARTTLS command injection, RFC 3207
5 and CVE-2011-0411), so they end the attempt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from smtpwarden.protocol.extensions import Extensions, parse_ehlo
from smtpwarden.protocol.grammar import COMMAND_CONTROL
from smtpwarden.protocol.replies import Reply

StartTlsPolicy = Literal["none", "opportunistic", "required"]
STARTTLS_POLICIES: Final[tuple[StartTlsPolicy, ...]] = ("none", "opportunistic", "required")
# Reply text quoted in a ``Fail`` reason: a line of a log, not a transcript.
REASON_TEXT_CHARS: Final = 200
# RFC 5321 4.1.1.1: EHLO takes a domain or an address literal.
# Underscores too: the configuration accepts them, as real host names have them.
_HOST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*|\[(?:IPv6:)?[0-9A-Fa-f:.]+\]", re.ASCII)

_State = Literal["banner", "ehlo", "starttls", "handshake", "ehlo_tls", "xclient", "ended"]


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` (one command line, CRLF included) to the upstream."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """The upstream said 220 to STARTTLS: run the client handshake now."""


@dataclass(frozen=True, slots=True)
class Done:
    """The preamble is over; the session may be relayed.

    ``banner`` is the greeting to relay to the client: the upstream's banner,
    or the 220 that answered XCLIENT. ``extensions`` are those of the last
    EHLO the upstream accepted (None if none did); after XCLIENT they
    describe the session before it, as the upstream starts a new one.
    """

    banner: Reply
    extensions: Extensions | None
    xclient_sent: bool


@dataclass(frozen=True, slots=True)
class Fail:
    """Give up on this upstream; ``reason`` says why.

    ``polite`` when the upstream is still in step (it refused something):
    the connection may end with QUIT rather than an abort.
    """

    reason: str
    polite: bool = False


Action = Send | StartTls | Done | Fail


class UpstreamPreamble:
    """The exchange with one fresh upstream connection, up to the greeting.

    ``hostname`` is the relay's EHLO name; ``starttls`` says whether TLS is
    wanted ("opportunistic": if offered, else plaintext) or a must
    ("required": no TLS, no session); ``xclient`` is the complete XCLIENT
    command line, CRLF included, sent if the upstream offers XCLIENT.
    Raises ValueError for a bad ``hostname``, policy or XCLIENT line.
    """

    __slots__ = ("_banner", "_ehlo", "_extensions", "_starttls", "_state", "_xclient")

    def __init__(self, hostname: str, starttls: StartTlsPolicy, xclient: bytes | None) -> None:
        if not _HOST_NAME.fullmatch(hostname):
            raise ValueError(f"not a host name: {hostname!r}")
        if starttls not in STARTTLS_POLICIES:
            raise ValueError(f"starttls must be one of {STARTTLS_POLICIES}, not {starttls!r}")
        if xclient is not None:
            _check_xclient(xclient)
        self._ehlo = b"EHLO " + hostname.encode("ascii") + b"\r\n"
        self._starttls: StartTlsPolicy = starttls
        self._xclient = xclient
        self._state: _State = "banner"
        self._banner: Reply | None = None
        self._extensions: Extensions | None = None

    @property
    def ended(self) -> bool:
        """True once a ``Done`` or a ``Fail`` was returned."""
        return self._state == "ended"

    def receive(self, reply: Reply) -> Action:
        """Take the upstream's next reply; return what to do.

        Raises RuntimeError if the preamble has ended.
        """
        match self._state:
            case "banner":
                return self._on_banner(reply)
            case "ehlo" | "ehlo_tls":
                return self._on_ehlo(reply)
            case "starttls":
                return self._on_starttls(reply)
            case "xclient":
                return self._on_xclient(reply)
            case "handshake":
                return self._fail(f"reply before the TLS handshake: {_brief(reply)}")
            case _:
                raise RuntimeError("the preamble has ended")

    def tls_started(self) -> Action:
        """The TLS handshake after STARTTLS succeeded; return what to do.

        Raises RuntimeError unless ``StartTls`` was the last action.
        """
        if self._state != "handshake":
            raise RuntimeError("no TLS handshake was asked for")
        # RFC 3207 4.2: discard what the server said before TLS, EHLO again.
        self._extensions = None
        return self._send("ehlo_tls", self._ehlo)

    def _on_banner(self, reply: Reply) -> Action:
        self._banner = reply
        if reply.code // 100 in (4, 5):
            if self._starttls == "required":
                # A banner that refuses is not relayed to a client whose
                # session must go over TLS: anyone on the path could send
                # it, and what followed would go in plaintext.
                return self._fail(f"banner {_brief(reply)}", polite=True)
            return self._done(reply, xclient_sent=False)  # the client gets it as is
        if reply.code != 220:
            return self._fail(f"unexpected banner {_brief(reply)}")
        if self._starttls == "none" and self._xclient is None:
            return self._done(reply, xclient_sent=False)
        return self._send("ehlo", self._ehlo)

    def _on_ehlo(self, reply: Reply) -> Action:
        after_tls = self._state == "ehlo_tls"
        step = "EHLO after STARTTLS" if after_tls else "EHLO"
        if reply.code == 250:
            self._extensions = parse_ehlo(reply)
            if after_tls or self._starttls == "none":
                return self._after_tls()
            if "STARTTLS" in self._extensions:
                return self._send("starttls", b"STARTTLS\r\n")
            if self._starttls == "required":
                return self._fail("upstream does not offer STARTTLS", polite=True)
            return self._after_tls()
        if reply.code == 421:
            return self._fail(f"{step} {_brief(reply)}", polite=True)  # RFC 5321 3.8
        if reply.code // 100 in (4, 5):
            if self._starttls == "required":
                return self._fail(f"{step} refused: {_brief(reply)}", polite=True)
            return self._done(self._greeting(), xclient_sent=False)
        return self._fail(f"unexpected reply to {step}: {_brief(reply)}")

    def _on_starttls(self, reply: Reply) -> Action:
        if reply.code == 220:
            self._state = "handshake"
            return StartTls()
        if reply.code == 421:
            return self._fail(f"STARTTLS {_brief(reply)}", polite=True)
        if reply.code // 100 in (4, 5):
            if self._starttls == "required":
                return self._fail(f"STARTTLS refused: {_brief(reply)}", polite=True)
            return self._after_tls()  # the session goes on in plaintext
        return self._fail(f"unexpected reply to STARTTLS: {_brief(reply)}")

    def _after_tls(self) -> Action:
        """XCLIENT if given and offered by the last EHLO; else the end."""
        offered = self._extensions
        if self._xclient is not None and offered is not None and "XCLIENT" in offered:
            return self._send("xclient", self._xclient)
        return self._done(self._greeting(), xclient_sent=False)

    def _on_xclient(self, reply: Reply) -> Action:
        if reply.code == 220:
            return self._done(reply, xclient_sent=True)
        if reply.code == 421:
            return self._fail(f"XCLIENT {_brief(reply)}", polite=True)
        if reply.code // 100 in (4, 5):
            return self._done(self._greeting(), xclient_sent=False)
        return self._fail(f"unexpected reply to XCLIENT: {_brief(reply)}")

    def _greeting(self) -> Reply:
        assert self._banner is not None  # noqa: S101 - every later state follows the banner
        return self._banner

    def _send(self, state: _State, data: bytes) -> Send:
        self._state = state
        return Send(data)

    def _done(self, banner: Reply, *, xclient_sent: bool) -> Done:
        self._state = "ended"
        return Done(banner, self._extensions, xclient_sent)

    def _fail(self, reason: str, *, polite: bool = False) -> Fail:
        self._state = "ended"
        return Fail(reason, polite)


def _check_xclient(line: bytes) -> None:
    """Raise ValueError unless ``line`` is one XCLIENT command line."""
    if (
        not line.endswith(b"\r\n")
        or COMMAND_CONTROL.search(line[:-2])
        or line[:8].upper() != b"XCLIENT "
    ):
        raise ValueError(f"not an XCLIENT command line: {line!r}")


def _brief(reply: Reply) -> str:
    """The reply's code and first line, for a ``Fail`` reason."""
    text = reply.lines[0].decode("utf-8", "replace")
    return f"{reply.code} {text}"[:REASON_TEXT_CHARS].rstrip()
