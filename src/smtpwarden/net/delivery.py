"""One delivery attempt of a held message on a fresh upstream connection.

The retry policy replays a transaction this way, and the spool's delivery
workers drain queued messages through the same client (PRODUCT.md,
"Delivery policies"). ``deliver`` connects, reads the banner, greets with
EHLO (HELO when EHLO gets a 5xx), sends MAIL and the RCPTs (in one write
when the upstream offers PIPELINING, RFC 2920), then the message by DATA or
``BDAT <size> LAST`` (RFC 3030), reads the final reply, and ends with QUIT.
With TLS the connection (``net.deliverylink``) is TLS from the first octet
(implicit TLS) or secured by STARTTLS before the envelope, the EHLO after
the handshake being the one the session relies on.

Rule 1: ``deliver`` never raises for network or peer trouble: every early
stop is an ``Attempt`` whose ``error`` says why. Only bugs raise (an
envelope that does not parse, a message source whose octets do not match
its framing), and cancellation propagates; the connection is aborted then.

Rule 2: it decides nothing. Whether a reply is a failure worth a retry is
``protocol.diagnosis``'s call, which upstream to try next the caller's.

Every reply goes through the core's ``ReplyReader`` within its RFC 5321
4.5.3.2 deadline. This is not the client-facing hot path, so plain asyncio
streams serve.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from smtpwarden.config import LimitsConfig, TimeoutsConfig
from smtpwarden.configtls import UpstreamTls
from smtpwarden.net.deliverylink import Link, Stop, TlsPlan, connect, secure
from smtpwarden.net.upstream import Target
from smtpwarden.protocol.commands import parse_command
from smtpwarden.protocol.errors import BareLineEnding
from smtpwarden.protocol.events import BadCommand, Command, MailFrom, RcptTo
from smtpwarden.protocol.extensions import Extensions, parse_ehlo
from smtpwarden.protocol.replies import Reply
from smtpwarden.protocol.stuffing import stuff

# The outcome is known before QUIT, so its 221 is waited for only briefly.
# RFC 5321 4.1.1.10 asks the client to wait for it, and sets no bound.
QUIT_WAIT_S = 5.0
# Reply text quoted in ``Attempt.error``: a line of a log, not a transcript.
ERROR_TEXT_CHARS = 200
END_OF_DATA = b"\r\n.\r\n"
# RFC 5321 4.1.1.1: EHLO takes a domain or an address literal.
_HOST_NAME = re.compile(rb"[A-Za-z0-9_][A-Za-z0-9_.-]*|\[(?:IPv6:)?[0-9A-Fa-f:.]+\]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """What to replay: the client's own command lines, CRLF included.

    ``mail_from`` is the MAIL line with its ESMTP parameters, sent unchanged;
    ``recipients`` holds the RCPT lines of the recipients to deliver to;
    ``body`` says how the message is framed (see ``MessageSource``).
    Raises ValueError if a line is not a MAIL or RCPT command.
    """

    mail_from: bytes
    recipients: tuple[bytes, ...]
    body: Literal["data", "bdat"]

    def __post_init__(self) -> None:
        if not isinstance(_parse_line(self.mail_from), MailFrom):
            raise ValueError(f"not a MAIL command line: {self.mail_from!r}")
        if not self.recipients:
            raise ValueError("an envelope needs at least one recipient")
        for line in self.recipients:
            if not isinstance(_parse_line(line), RcptTo):
                raise ValueError(f"not a RCPT command line: {line!r}")
        if self.body not in ("data", "bdat"):
            raise ValueError(f"body must be 'data' or 'bdat', not {self.body!r}")


class MessageSource(Protocol):
    """The held message; ``chunks`` starts again from the top on each call.

    For body "data": the DATA section exactly as the client sent it after
    the 354, dot-stuffed and ending with "<CRLF>.<CRLF>" (just ".<CRLF>" for
    an empty message). For body "bdat": the message octets, all chunks
    joined, with no stuffing and no terminator. ``size`` counts the octets
    ``chunks`` yields.
    """

    @property
    def size(self) -> int: ...

    def chunks(self) -> Iterator[bytes | memoryview]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """How far one attempt got, and every reply on the way.

    ``recipients`` has one reply per envelope recipient (None if never
    answered). ``data`` is the reply to the DATA command (None with BDAT or
    if not reached). ``final`` is the reply to the end of the message (the
    DATA terminator or ``BDAT LAST``). ``sent`` says the whole message, end
    marker or last chunk included, was written: ``final`` missing then means
    the outcome is lost (RFC 1047). ``error`` says why the attempt stopped
    early, None when it reached its final reply. ``tls`` is the TLS version
    and cipher once TLS is up ("TLSv1.3 TLS_AES_256_GCM_SHA384").
    """

    upstream: str
    connected: bool
    banner: Reply | None
    mail: Reply | None
    recipients: tuple[Reply | None, ...]
    data: Reply | None
    final: Reply | None
    sent: bool
    error: str | None
    tls: str | None = None

    @property
    def accepted(self) -> tuple[int, ...]:
        """Indexes of the recipients that got a 2xx."""
        return tuple(i for i, reply in enumerate(self.recipients) if _ok(reply))

    @property
    def succeeded(self) -> bool:
        """True if the end of the message got a 2xx."""
        return _ok(self.final)


async def deliver(
    target: Target,
    envelope: Envelope,
    message: MessageSource,
    *,
    hostname: str,
    timeouts: TimeoutsConfig,
    limits: LimitsConfig,
    tls: UpstreamTls | None = None,
    context: ssl.SSLContext | None = None,
) -> Attempt:
    """Deliver ``message`` to ``target`` on a fresh connection.

    ``tls`` is the upstream's TLS setting and ``context`` the one built from
    it by ``net.tls.client_context``, needed unless the mode is "none";
    both default to the target's own.
    Returns the ``Attempt``. Never raises for network or peer trouble;
    raises ValueError for a bad ``hostname``, a missing ``context`` or a
    message source that breaks its framing. Cancellation propagates, with
    the connection aborted.
    """
    greeting = hostname.encode("utf-8")
    if not _HOST_NAME.fullmatch(greeting):
        raise ValueError(f"not a host name: {hostname!r}")
    if tls is None:
        tls, context = target.tls, target.context
    plan = TlsPlan.build(target, tls, context)
    progress = _Progress(upstream=target.name, recipients=[None] * len(envelope.recipients))
    try:
        link = await connect(target, plan, limits, timeouts.connect)
    except Stop as stop:
        return progress.stop(stop.reason)
    progress.connected = True
    progress.tls = link.tls()
    try:
        await _transaction(link, progress, envelope, message, hostname, timeouts, plan)
    except Stop as stop:
        progress.error = stop.reason
        if not stop.polite:
            link.abort()
            return progress.attempt()
    except BaseException:
        link.abort()
        raise
    await link.quit(min(QUIT_WAIT_S, timeouts.reply))
    return progress.attempt()


@dataclass(slots=True, kw_only=True)
class _Progress:
    """The attempt as it goes; frozen into an ``Attempt`` at the end."""

    upstream: str
    recipients: list[Reply | None]
    connected: bool = False
    banner: Reply | None = None
    mail: Reply | None = None
    data: Reply | None = None
    final: Reply | None = None
    sent: bool = False
    error: str | None = None
    tls: str | None = None

    def stop(self, error: str) -> Attempt:
        self.error = error
        return self.attempt()

    def attempt(self) -> Attempt:
        return Attempt(
            upstream=self.upstream,
            connected=self.connected,
            banner=self.banner,
            mail=self.mail,
            recipients=tuple(self.recipients),
            data=self.data,
            final=self.final,
            sent=self.sent,
            error=self.error,
            tls=self.tls,
        )


async def _transaction(
    link: Link,
    progress: _Progress,
    envelope: Envelope,
    message: MessageSource,
    hostname: str,
    timeouts: TimeoutsConfig,
    plan: TlsPlan | None,
) -> None:
    """Run the session up to the final reply; raises ``Stop`` to end early."""
    progress.banner = banner = await link.reply("banner", timeouts.banner)
    if not _ok(banner):
        # RFC 5321 3.1: a server that greets with 554 "MUST still wait for
        # the client to send a QUIT" before it closes the connection.
        raise Stop(f"banner {_brief(banner)}", polite=True)
    offered = None
    if plan is not None and plan.starttls != "none":
        offered = await secure(link, progress, banner, hostname, plan, timeouts)
    if offered is None:
        offered = await _greet(link, hostname.encode("ascii"), timeouts)
    mail = _parse_line(envelope.mail_from)
    assert isinstance(mail, MailFrom)  # noqa: S101 - Envelope checked it
    lacking = _lacking(mail, offered)
    if lacking is not None:
        raise Stop(f"upstream lacks {lacking}", polite=True)
    chunking = envelope.body == "bdat" and "CHUNKING" in offered
    await _envelope(
        link, progress, envelope, timeouts, pipelining="PIPELINING" in offered, data=not chunking
    )
    if chunking:
        await _send_bdat(link, progress, message, timeouts)
        step = "BDAT LAST"
    else:
        await _send_data(link, progress, envelope, message, timeouts)
        step = "end of data"
    progress.final = await link.reply(step, timeouts.data_end)


async def _greet(link: Link, greeting: bytes, timeouts: TimeoutsConfig) -> Extensions:
    """EHLO, or HELO if EHLO gets a 5xx (RFC 5321 3.2); returns the extensions."""
    await link.send(b"EHLO " + greeting + b"\r\n", "EHLO", timeouts.reply)
    reply = await link.reply("EHLO", timeouts.reply)
    if _ok(reply):
        return parse_ehlo(reply)
    if reply.code // 100 != 5:
        raise Stop(f"EHLO {_brief(reply)}", polite=True)
    await link.send(b"HELO " + greeting + b"\r\n", "HELO", timeouts.reply)
    reply = await link.reply("HELO", timeouts.reply)
    if not _ok(reply):
        raise Stop(f"HELO {_brief(reply)}", polite=True)
    return Extensions(keywords={})


def _lacking(mail: MailFrom, offered: Extensions) -> str | None:
    """The extension MAIL's parameters need that the upstream does not offer.

    RFC 6531 3.4, RFC 6152 3 and RFC 3030 3: a client must not use these
    parameters with a server that did not announce them, and the message
    cannot be carried without them.
    """
    params = dict(mail.params)
    if b"SMTPUTF8" in params and "SMTPUTF8" not in offered:
        return "SMTPUTF8"
    match (params.get(b"BODY") or b"").upper():
        case b"BINARYMIME" if "CHUNKING" not in offered:
            # DATA cannot carry it: binary content has no lines to stuff.
            return "CHUNKING for a BINARYMIME message"
        case b"BINARYMIME" if "BINARYMIME" not in offered:
            return "BINARYMIME"
        case b"8BITMIME" if "8BITMIME" not in offered:
            return "8BITMIME"
        case _:
            return None


async def _envelope(
    link: Link,
    progress: _Progress,
    envelope: Envelope,
    timeouts: TimeoutsConfig,
    *,
    pipelining: bool,
    data: bool,
) -> None:
    """MAIL, the RCPTs and, if ``data``, DATA up to its 354.

    With PIPELINING they go in one write and every reply is then read in
    order: RFC 2920 3.1, the client "MUST check all statuses associated with
    each command in a group". Raises ``Stop`` unless MAIL, at least one
    RCPT and DATA (if sent) were accepted.
    """
    if pipelining:
        group = [envelope.mail_from, *envelope.recipients, b"DATA\r\n" if data else b""]
        await link.send(b"".join(group), "MAIL and RCPT", timeouts.mail)
    else:
        await link.send(envelope.mail_from, "MAIL", timeouts.mail)
    progress.mail = await link.reply("MAIL", timeouts.mail)
    _closing(progress.mail, "MAIL")
    if not pipelining and not _ok(progress.mail):
        raise Stop(f"MAIL {_brief(progress.mail)}", polite=True)
    for i, line in enumerate(envelope.recipients):
        if not pipelining:
            await link.send(line, "RCPT", timeouts.rcpt)
        progress.recipients[i] = reply = await link.reply("RCPT", timeouts.rcpt)
        _closing(reply, "RCPT")
    refused = None
    if not _ok(progress.mail):
        refused = f"MAIL {_brief(progress.mail)}"
    elif not any(_ok(reply) for reply in progress.recipients):
        refused = "no recipient accepted"
    if not data or (refused is not None and not pipelining):
        if refused is not None:
            raise Stop(refused, polite=True)
        return
    if not pipelining:
        await link.send(b"DATA\r\n", "DATA", timeouts.data_init)
    progress.data = reply = await link.reply("DATA", timeouts.data_init)
    _closing(reply, "DATA")
    if refused is not None:
        if reply.code == 354:
            # RFC 2920 3.1: "if the DATA command was accepted the client
            # SMTP should send a single dot", ending an empty message that
            # has no recipient to go to.
            await link.send(b".\r\n", "end of data", timeouts.data_block)
            await link.reply("end of data", timeouts.data_end)
        raise Stop(refused, polite=True)
    if reply.code != 354:
        raise Stop(f"DATA {_brief(reply)}", polite=True)


def _closing(reply: Reply, step: str) -> None:
    """A 421 ends the attempt: the upstream is closing (RFC 5321 3.8)."""
    if reply.code == 421:
        raise Stop(f"{step} {_brief(reply)}", polite=True)


async def _send_data(
    link: Link,
    progress: _Progress,
    envelope: Envelope,
    message: MessageSource,
    timeouts: TimeoutsConfig,
) -> None:
    """Write the DATA section: the client's own, or the BDAT octets stuffed."""
    if envelope.body == "data":
        tail = b"\r\n"  # the DATA line ended with CRLF
        for chunk in message.chunks():
            tail = (tail + bytes(chunk[-len(END_OF_DATA) :]))[-len(END_OF_DATA) :]
            await _write(link, chunk, timeouts)
        if tail != END_OF_DATA:
            raise ValueError("the DATA section does not end with <CRLF>.<CRLF>")
    else:
        try:
            for piece in stuff(message.chunks()):
                await _write(link, piece, timeouts)
        except BareLineEnding as error:
            # No terminator was sent: the upstream drops what it got.
            raise Stop(f"message holds a bare CR or LF; DATA cannot carry it ({error})") from None
    progress.sent = True
    await link.drain("message data", timeouts.data_block)


async def _send_bdat(
    link: Link, progress: _Progress, message: MessageSource, timeouts: TimeoutsConfig
) -> None:
    """Write ``BDAT <size> LAST`` and the message as its one chunk (RFC 3030 2)."""
    size = message.size
    link.write(b"BDAT %d LAST\r\n" % size)
    written = 0
    for chunk in message.chunks():
        written += len(chunk)
        if written > size:
            # More octets than announced would be read as commands upstream.
            raise ValueError(f"the message source yields more than its size, {size} octets")
        await _write(link, chunk, timeouts)
    if written != size:
        raise ValueError(f"the message source yields {written} octets, not its size {size}")
    progress.sent = True
    await link.drain("message data", timeouts.data_block)


async def _write(link: Link, chunk: bytes | memoryview, timeouts: TimeoutsConfig) -> None:
    """Write one piece of the message once the buffer has room for it.

    The wait comes before the write, so that once the last piece is written
    the message counts as sent (``Attempt.sent``) even if its drain fails:
    the upstream may have it all. RFC 5321 4.5.3.2.5 bounds each wait.
    """
    if chunk:
        await link.drain("message data", timeouts.data_block)
        link.write(chunk)


def _parse_line(line: bytes) -> Command | BadCommand | None:
    """The command event for one complete line, or None if it is not one."""
    if not line.endswith(b"\r\n") or line.count(b"\r") != 1 or line.count(b"\n") != 1:
        return None
    return parse_command(line)


def _ok(reply: Reply | None) -> bool:
    return reply is not None and reply.code // 100 == 2


def _brief(reply: Reply) -> str:
    """The reply's code and first line, for ``Attempt.error``."""
    text = reply.lines[0].decode("utf-8", "replace")
    return f"{reply.code} {text}"[:ERROR_TEXT_CHARS].rstrip()
