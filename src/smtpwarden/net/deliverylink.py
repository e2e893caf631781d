"""The upstream connection of one delivery attempt, in plaintext or over TLS.

``net.delivery`` runs its session over a ``Link``. ``connect`` opens it,
with TLS from the first octet for implicit TLS; ``secure`` upgrades it with
STARTTLS (RFC 3207) as ``protocol.preamble`` steps through it, EHLO again
after the handshake included. A link writes with backpressure and reads
every reply within its deadline through the core's ``ReplyReader``.

Rule 1: every way a link fails is a ``Stop`` whose reason becomes
``Attempt.error``; only cancellation and bugs raise anything else.

Rule 2: TLS asked for and not obtained ends the attempt before the
envelope: a failed handshake never falls back to plaintext, and neither
does a required STARTTLS that the upstream does not offer or refuses.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Protocol

from smtpwarden.config import LimitsConfig, TimeoutsConfig
from smtpwarden.configtls import UpstreamTls, UpstreamTlsMode
from smtpwarden.net.flow import WRITE_HIGH_WATER_BYTES
from smtpwarden.net.tls import (
    CountingReader,
    TlsFailure,
    describe,
    handshake_failure,
    open_stream,
    server_name,
    start_tls,
    starttls_policy,
)
from smtpwarden.net.upstream import Target
from smtpwarden.protocol.errors import MalformedReply
from smtpwarden.protocol.extensions import Extensions
from smtpwarden.protocol.preamble import Done, Fail, StartTls, StartTlsPolicy, UpstreamPreamble
from smtpwarden.protocol.replies import Reply, ReplyReader

# Octets asked of the socket per read: asyncio's own stream buffer size.
READ_BYTES = 64 * 1024


class Stop(Exception):
    """Ends an attempt early; ``reason`` becomes ``Attempt.error``.

    ``polite`` when the upstream is still in step with us (it refused
    something): the session then ends with QUIT rather than an abort.
    """

    def __init__(self, reason: str, *, polite: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.polite = polite


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsPlan:
    """The TLS of one attempt: how, with which context, checking which name."""

    mode: UpstreamTlsMode
    starttls: StartTlsPolicy
    context: ssl.SSLContext
    server_name: str

    @classmethod
    def build(
        cls, target: Target, tls: UpstreamTls | None, context: ssl.SSLContext | None
    ) -> TlsPlan | None:
        """The plan for ``target``, None without TLS.

        Raises ValueError if TLS is asked for without its context.
        """
        if tls is None or tls.mode == "none":
            return None
        if context is None:
            raise ValueError(f"TLS mode {tls.mode!r} needs a client context")
        return cls(
            mode=tls.mode,
            starttls=starttls_policy(tls),
            context=context,
            server_name=server_name(target, tls),
        )


class Noted(Protocol):
    """Where ``secure`` notes the TLS version and cipher once TLS is up."""

    tls: str | None


async def connect(
    target: Target, plan: TlsPlan | None, limits: LimitsConfig, timeout_s: float
) -> Link:
    """Open a link to ``target``, the implicit TLS handshake included.

    Raises ``Stop`` if no connection (or no handshake) within ``timeout_s``.
    """
    implicit = plan if plan is not None and plan.mode == "implicit" else None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await open_stream(
                target.host,
                target.port,
                context=None if implicit is None else implicit.context,
                server_hostname=None if implicit is None else implicit.server_name,
            )
    except TimeoutError:
        raise Stop(f"connect: no connection within {timeout_s:g} s") from None
    except ssl.SSLError as error:
        raise Stop(f"TLS handshake failed: {handshake_failure(error)}") from None
    except OSError as error:
        raise Stop(f"connect: {error.strerror or error}") from None
    return Link(reader, writer, limits)


class Link:
    """One upstream connection: writes with backpressure, replies by deadline."""

    __slots__ = ("_reader", "_replies", "_writer")

    def __init__(
        self, reader: CountingReader, writer: asyncio.StreamWriter, limits: LimitsConfig
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._replies = ReplyReader(
            max_line_bytes=limits.max_reply_line_bytes, max_lines=limits.max_reply_lines
        )
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)

    def write(self, data: bytes | memoryview) -> None:
        """Queue octets; ``drain`` applies the backpressure."""
        self._writer.write(data)

    async def drain(self, what: str, timeout_s: float) -> None:
        """Wait until the write buffer is below its high-water mark."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._writer.drain()
        except TimeoutError:
            raise Stop(f"timeout sending {what}") from None
        except OSError:
            raise Stop(f"connection lost sending {what}") from None

    async def send(self, data: bytes, what: str, timeout_s: float) -> None:
        self.write(data)
        await self.drain(what, timeout_s)

    async def reply(self, step: str, timeout_s: float) -> Reply:
        """Read the reply to ``step`` (or the banner) within ``timeout_s`` seconds.

        Raises ``Stop`` on timeout, end of stream or a malformed reply.
        """
        awaited = step if step == "banner" else f"reply to {step}"
        try:
            async with asyncio.timeout(timeout_s):
                while (reply := self._replies.next_reply()) is None:
                    data = await self._reader.read(READ_BYTES)
                    if not data:
                        raise Stop(f"connection lost waiting for {awaited}")
                    self._replies.receive_data(data)
        except TimeoutError:
            raise Stop(f"timeout waiting for {awaited}") from None
        except MalformedReply as error:
            raise Stop(f"malformed reply: {error} ({awaited})") from None
        except OSError:
            raise Stop(f"connection lost waiting for {awaited}") from None
        return reply

    def tls(self) -> str | None:
        """The TLS version and cipher in use, None in plaintext."""
        info = describe(self._writer)
        return None if info is None else info.summary

    def peer_certificate(self) -> bytes | None:
        """The upstream's certificate (DER), verified or not; None in plaintext."""
        link = self._writer.get_extra_info("ssl_object")
        if not isinstance(link, ssl.SSLObject | ssl.SSLSocket):
            return None
        return link.getpeercert(binary_form=True)

    async def start_tls(self, context: ssl.SSLContext, name: str, timeout_s: float) -> str | None:
        """Run the handshake after a 220 to STARTTLS; returns ``tls()``.

        Raises ``Stop`` (never polite: the upstream is in the handshake).
        """
        try:
            async with asyncio.timeout(timeout_s):
                await start_tls(
                    self._reader,
                    self._writer,
                    context,
                    server_hostname=name,
                    buffered=self._replies.buffered,
                )
        except TimeoutError:
            raise Stop("timeout in the TLS handshake") from None
        except TlsFailure as error:
            raise Stop(str(error)) from None
        self._writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        return self.tls()

    async def quit(self, wait_s: float) -> None:
        """Send QUIT, wait briefly for its reply and the close; never raises.

        Each wait is bounded by ``wait_s``; past it the connection is aborted.
        """
        try:
            await self.send(b"QUIT\r\n", "QUIT", wait_s)
            await self.reply("QUIT", wait_s)
            self._writer.close()
            async with asyncio.timeout(wait_s):
                await self._writer.wait_closed()
        except (Stop, OSError):  # TimeoutError is an OSError
            self.abort()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the connection at once, unsent octets included."""
        self._writer.transport.abort()


async def secure(
    link: Link,
    noted: Noted,
    banner: Reply,
    hostname: str,
    plan: TlsPlan,
    timeouts: TimeoutsConfig,
) -> Extensions | None:
    """STARTTLS as the preamble steps through it; the last EHLO's extensions.

    None when no EHLO was accepted (opportunistic TLS): the caller then
    greets in plaintext. Sets ``noted.tls`` once TLS is up. Raises ``Stop``
    on a ``Fail``.
    """
    preamble = UpstreamPreamble(hostname, plan.starttls, None)
    action = preamble.receive(banner)
    while not isinstance(action, Done):
        if isinstance(action, Fail):
            raise Stop(action.reason, polite=action.polite)
        if isinstance(action, StartTls):
            noted.tls = await link.start_tls(plan.context, plan.server_name, timeouts.connect)
            action = preamble.tls_started()
        else:
            step = action.data.split()[0].decode("ascii")
            await link.send(action.data, step, timeouts.reply)
            action = preamble.receive(await link.reply(step, timeouts.reply))
    return action.extensions
