"""The session's upstream connection: connecting, TLS, and the client's identity.

The session connects to its route's upstreams in turn (the usable ones
first) until one greets it. When an upstream is configured for TLS or
XCLIENT, ``protocol.preamble.UpstreamPreamble`` runs before the client
sees anything: STARTTLS and the handshake, then XCLIENT with the client's
real address, whose 220 becomes the greeting the client gets. A failure
there is a failure of that upstream: the next one is tried, and required
TLS never falls back to plaintext. Implicit TLS is negotiated by the event
loop as the connection opens.

XFORWARD, Postfix's per-transaction alternative, is sent before each MAIL
when the upstream offers it, it is configured, and XCLIENT was not used;
its reply is the relay's own, never the client's (but for a closing 421).

The upstream's replies are checked as they come (``_owes``) and each is
handed to the client as its command asks (``_on_reply``): the EHLO reply
reconciled, a 354 turning the client's next octets into the message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import replace

from smtpwarden.net.admission import client_address
from smtpwarden.net.flow import Hold
from smtpwarden.net.secure import SecureSession
from smtpwarden.net.tls import describe, server_name, starttls_policy
from smtpwarden.net.upstream import Target, connect
from smtpwarden.protocol.errors import MalformedReply
from smtpwarden.protocol.events import Verb
from smtpwarden.protocol.extensions import Extensions, reconcile
from smtpwarden.protocol.identity import xclient_command, xforward_command
from smtpwarden.protocol.preamble import Action, Done, Fail, Send, StartTls, UpstreamPreamble
from smtpwarden.protocol.records import Upstream
from smtpwarden.protocol.replies import Reply, ReplyReader
from smtpwarden.protocol.transaction import Awaiting

log = logging.getLogger("smtpwarden.session")

_now = time.monotonic


class UpstreamLeg(SecureSession):
    """Connecting upstream, its preamble, and XFORWARD; see the module doc."""

    reader: ReplyReader
    _preamble: UpstreamPreamble | None
    _preamble_done: asyncio.Future[str | None] | None  # the failure, or None
    _greeting: bytes  # the greeting to hand on once the preamble is done
    _xclient_sent: bool
    _xforward: bool  # send XFORWARD before each MAIL
    _esmtp: bool  # the client greeted with EHLO, not HELO
    _connecting: Target  # the upstream the preamble runs with
    _upstream_tls: asyncio.Task[None] | None  # the handshake with the upstream

    def _init_upstream_leg(self) -> None:
        self._preamble = None  # STARTTLS and XCLIENT towards the upstream, if any
        self._preamble_done = None
        self._greeting = b""
        self._xclient_sent = False
        self._xforward = False
        self._esmtp = False
        self._upstream_tls = None

    def _connect_upstream(self) -> None:
        self.gate.pause(Hold.CONNECT)
        self._connector = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        """Connect to the route's first usable upstream, failing over in order."""
        try:
            await self._connect_in_turn()
        except Exception:
            # A bug must not leave the client without a banner for ever.
            log.exception("session %s: connecting upstream failed", self.tracker.info.session_id)
            self._connector = None
            self._abort_upstream()
            self._end(self.ctx.replies.upstream_unavailable, "upstream_unreachable", failed=True)

    async def _connect_in_turn(self) -> None:
        ctx = self.ctx
        timeouts = ctx.config.timeouts
        for target in ctx.health.order(ctx.routes.default.targets):
            # Ready before connecting: the banner may arrive, and be read,
            # before this coroutine resumes.
            self.target = target
            if self._capture is not None:
                self._captured_connecting(target)
            done = self._prepare_preamble(target)
            try:
                started = _now()
                await connect(target, self, timeouts.connect)
                if ctx.metrics is not None:
                    ctx.metrics.connected(_now() - started)
                failure = None if done is None else await self._await_preamble(done)
            except (OSError, TimeoutError, ssl.SSLError) as error:
                failure = str(error) or "timeout"
            finally:
                self._preamble = None
                self._preamble_done = None
            if failure is not None:
                ctx.health.failed(target)
                log.warning(
                    "session %s: upstream %s: %s",
                    self.tracker.info.session_id,
                    target.name,
                    failure,
                )
                if self._capture is not None:
                    self._captured_event(f"upstream {target.name} failed: {failure}")
                self._abort_upstream()
                self.reader = ReplyReader(
                    max_line_bytes=ctx.config.limits.max_reply_line_bytes,
                    max_lines=ctx.config.limits.max_reply_lines,
                )
                continue
            ctx.health.succeeded(target)
            info = self.tracker.info
            if target is not ctx.target:
                upstream = Upstream(name=target.name, address=target.host, port=target.port)
                info = replace(info, upstream=upstream)
            secured = describe(self.upstream)
            if secured is not None:
                tls = replace(
                    info.tls,
                    upstream=secured.summary,
                    upstream_subject=secured.peer,
                    upstream_verified=target.tls.verify,
                )
                info = replace(info, tls=tls)
            self.tracker.info = info
            self._connector = None
            if self._capture is not None:
                self._captured_upstream(target, secured, self._greeting)
            if self._greeting:
                # The greeting the preamble kept back goes the usual way.
                greeting, self._greeting = self._greeting, b""
                self.upstream_data(greeting)
            return
        self._connector = None
        self._end(ctx.replies.upstream_unavailable, "upstream_unreachable", failed=True)

    def upstream_made(self, transport: asyncio.Transport) -> None:
        """The upstream connection is open."""
        if self._closed:
            transport.abort()
        else:
            self.upstream = transport

    def upstream_lost(self) -> None:
        """The upstream connection closed."""
        if self._preamble is not None:
            self._preamble_finished("connection lost during the greeting")
            return
        if self._closed or self.upstream is None:
            return  # ended, or dropped on purpose: the session has its answer
        if self.guard.replaying:
            self.upstream = None  # the replay answers; the session ends after it
            return
        try:
            self.reader.receive_eof()
        except MalformedReply as error:
            self._upstream_failed(f"malformed reply: {error}", "upstream_malformed")
            return
        self._upstream_failed("connection lost", "upstream_lost")

    def upstream_full(self) -> None:
        """The upstream's write buffer passed its high-water mark."""
        self._stalled_since = _now()
        self.gate.pause(Hold.FLOW)

    def upstream_drained(self) -> None:
        """The upstream's write buffer drained below its low-water mark."""
        self.gate.resume(Hold.FLOW)
        # The client waited on the upstream meanwhile: not its time.
        now = _now()
        self._last_client = min(now, self._last_client + (now - self._stalled_since))

    def _upstream_failed(self, why: str, reason: str) -> None:
        log.warning(
            "session %s: upstream %s: %s", self.tracker.info.session_id, self.target.name, why
        )
        if self._capture is not None:
            self._captured_event(f"upstream {self.target.name}: {why}")
        if self.guard.replaying:
            self._abort_upstream()  # the replay answers; the session ends after it
            return
        if self._replay_lost():
            return
        self._abort_upstream()
        self._end(self.ctx.replies.upstream_failed, reason, failed=True)

    def upstream_data(self, data: bytes) -> None:
        """Handle bytes from the upstream; see ``Session``."""
        raise NotImplementedError

    def _owes(self, replies: list[Reply]) -> bool:
        """False, with the upstream failed, if one read brings more replies than owed.

        Which of them answers what is then unknown: none is relayed (a stray
        250 just before the real 451 to a message must never pass for its
        answer). A closing 421 past the end is RFC 5321 3.8's, not a stray,
        unless the end of a message is owed: then which is its answer is
        unknown too.
        """
        owed, message_end = self.tracker.owed()
        extra = len(replies) - owed
        if extra <= 0 or (extra == 1 and replies[-1].code == 421 and not message_end):
            return True
        why = f"{extra} replies nobody asked for, with {replies[-1].raw[:80]!r}"
        self._upstream_failed(why, "upstream_unsolicited")
        return False

    def _on_reply(self, entry: Awaiting, reply: Reply) -> None:
        out = self._to_client
        if entry.hidden:
            if reply.code == 421:
                out.append(reply.raw)  # the upstream is closing: the client hears it
            if reply.code // 100 != 2:
                log.info(
                    "session %s: %s refused: %r",
                    self.tracker.info.session_id,
                    entry.name,
                    reply.raw[:80],
                )
            return
        match entry.verb:
            case Verb.EHLO:
                policy = self.extension_policy
                data, offered = reconcile(reply, policy)
                self._chunking = "CHUNKING" in offered and policy.chunking
                self._utf8 = "SMTPUTF8" in offered
                self._upstream_offers(offered)
                out.append(data)
            case Verb.DATA:
                out.append(reply.raw)
                if reply.code == 354:
                    self.core.start_data()
                else:
                    self._in_body = False
                    self.core.refuse_data()
                self.gate.resume(Hold.VERDICT)
                self._resume_pump = True
            case None if entry.name == "CONNECT":
                out.append(reply.raw)
                self.gate.resume(Hold.CONNECT)
                self._resume_pump = True
            case Verb.AUTH:
                out.append(reply.raw)
                self._auth_reply(reply)
                self.gate.resume(Hold.VERDICT)
                self._resume_pump = True
            case Verb.RCPT if entry.takes_over:
                out.append(self.ctx.replies.taken_over.raw)
            case _:
                out.append(self.ctx.replies.contradicted.raw if entry.contradicted else reply.raw)
                if entry.body is not None:
                    self._release_held()
                elif entry.verb is Verb.BDAT and reply.code // 100 != 2:
                    self.guard.release()  # RFC 3030 4.2: the transaction failed

    # -- the preamble ------------------------------------------------------------

    def _prepare_preamble(self, target: Target) -> asyncio.Future[str | None] | None:
        """Set up STARTTLS and XCLIENT for ``target``, if configured.

        Returns the future that gets the preamble's failure (or None once it
        is done); None when there is no preamble and the banner comes the
        usual way.
        """
        policy = starttls_policy(target.tls) if target.tls.mode == "starttls" else "none"
        xclient = None
        if target.xclient:
            client = self.tracker.info.client
            # An IPv4-mapped IPv6 address goes as the IPv4 address it is.
            address = client_address(client.address)
            xclient = xclient_command(
                client.address if address is None else str(address), client.port
            )
        self._xclient_sent = False
        self._connecting = target
        if policy == "none" and xclient is None:
            return None
        self._preamble = UpstreamPreamble(self.ctx.config.hostname, policy, xclient)
        done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._preamble_done = done
        return done

    async def _await_preamble(self, done: asyncio.Future[str | None]) -> str | None:
        """The preamble's failure, or None once it is done."""
        timeouts = self.ctx.config.timeouts
        try:
            async with asyncio.timeout(timeouts.banner + timeouts.connect + 3 * timeouts.reply):
                return await done
        except TimeoutError:
            return "no answer during the greeting (STARTTLS/XCLIENT)"

    def _preamble_reply(self, preamble: UpstreamPreamble) -> None:
        """Feed the preamble the replies read so far."""
        while self._preamble is preamble:
            reply = self.reader.next_reply()
            if reply is None:
                return
            if self._capture is not None:
                self._captured_reply(reply)
            self._preamble_act(preamble.receive(reply))

    def _preamble_act(self, action: Action) -> None:
        match action:
            case Send(data):
                if self.upstream is not None:
                    self.upstream.write(data)
                    self._upstream_bytes += len(data)
                    if self._capture is not None:
                        self._captured_own(data)
            case StartTls():
                loop = asyncio.get_running_loop()
                self._upstream_tls = loop.create_task(self._upstream_handshake())
            case Done(banner, _, xclient_sent):
                self._xclient_sent = xclient_sent
                self._greeting = banner.raw
                self._preamble_finished(None)
            case Fail(reason, polite):
                self._preamble_finished(reason, polite=polite)

    def _preamble_finished(self, failure: str | None, *, polite: bool = False) -> None:
        if failure is not None:
            # Given up at once, so that nothing this connection still
            # reports is taken for the next upstream's.
            self._abort_upstream(polite=polite)
        self._preamble = None
        done = self._preamble_done
        if done is not None and not done.done():
            done.set_result(failure)

    async def _upstream_handshake(self) -> None:
        preamble, upstream = self._preamble, self.upstream
        if preamble is None or upstream is None:
            return
        if self.reader.buffered:
            # RFC 3207 5: octets after the 220 would pass as encrypted ones.
            self._preamble_finished("upstream sent data after its 220 to STARTTLS")
            return
        target = self._connecting
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.ctx.config.timeouts.connect):
                secured = await loop.start_tls(
                    upstream,
                    upstream.get_protocol(),
                    target.context,  # type: ignore[arg-type] # set for mode starttls
                    server_hostname=server_name(target, target.tls),
                )
        except (OSError, ssl.SSLError, TimeoutError) as error:
            self._preamble_finished(f"TLS handshake failed: {str(error) or 'timeout'}")
            return
        if secured is None or self._preamble is not preamble:
            return
        self.upstream = secured
        self._preamble_act(preamble.tls_started())

    # -- what the upstream offers, and XFORWARD -------------------------------------

    def _upstream_offers(self, offered: Extensions) -> None:
        """The upstream's EHLO reply to the client's EHLO: what it will take."""
        self._xforward = self.target.xforward and not self._xclient_sent and "XFORWARD" in offered
        mechanisms = offered.keywords.get("AUTH", b"").upper().split()
        self._upstream_auth = frozenset(name.decode("ascii", "replace") for name in mechanisms)

    def _send_xforward(self) -> None:
        """Before a MAIL: the client's identity for this transaction."""
        upstream = self.upstream
        if upstream is None:
            return
        info = self.tracker.info
        line = xforward_command(
            info.client.address, info.client.port, self.tracker.helo, esmtp=self._esmtp
        )
        upstream.write(line)
        self._upstream_bytes += len(line)
        if self._capture is not None:
            self._captured_own(line)
        self.tracker.forwarded_hidden("XFORWARD", _now())
