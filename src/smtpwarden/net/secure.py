"""The session's opening and its client-side TLS: PROXY header, admission, TLS.

A session starts in this order:

1. On a listener with ``proxy_protocol``, the connection must come from a
   trusted network and start with a PROXY v1 or v2 header; the address it
   carries is the client's from then on (logs, limits, XCLIENT). Anything
   else closes the connection without a word: no SMTP client is talking.
2. Admission: ``allow`` (554 5.7.1 otherwise), then the per-address limits
   (421 4.7.0), on the real address.
3. The upstream connection, and the banner.

On an implicit-TLS listener (port 465 style) the event loop completes the
handshake before any of this (such a listener takes no PROXY header).

STARTTLS (RFC 3207) is smtpwarden's own: it holds the certificate, so it
answers 220 itself once every earlier reply has gone out, discards whatever
the client pipelined after the command (section 5: it must never be
executed), and starts the handshake on the same connection. Afterwards the
client must say EHLO again, and the upstream hears that EHLO too.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import replace

from smtpwarden.net.admission import Address, Refusal, allowed, client_address
from smtpwarden.net.flow import Hold
from smtpwarden.net.guarded import GuardedSession
from smtpwarden.net.tls import describe
from smtpwarden.protocol.auth import AuthIdentity
from smtpwarden.protocol.errors import LocalProtocolError, ProxyProtocolError
from smtpwarden.protocol.events import Auth, Command, MailFrom, Verb
from smtpwarden.protocol.extensions import ExtensionPolicy
from smtpwarden.protocol.proxy import ProxyHeaderReader
from smtpwarden.protocol.records import Peer
from smtpwarden.protocol.replies import Reply
from smtpwarden.protocol.state import ServerState

log = logging.getLogger("smtpwarden.session")

# How long a connection on a PROXY listener may take to send its header,
# and a client its TLS handshake. HAProxy sends the header at once; a
# handshake takes a few round trips. Our choice.
OPENING_TIMEOUT_S = 10.0

_now = time.monotonic


class SecureSession(GuardedSession):
    """Opening and client TLS between ``GuardedSession`` and ``Session``."""

    _proxy: ProxyHeaderReader | None
    _opening_since: float
    _address: Address | None
    _admitted: bool
    _tls_pending: bool  # STARTTLS answered, handshake not started yet
    _encrypted: bool
    _message_bytes: int
    _auth: AuthIdentity | None  # the AUTH exchange under way
    _upstream_auth: frozenset[str]  # the mechanisms the upstream's EHLO offered
    _early: list[bytes]  # what the client sent over TLS before the handshake's end was seen
    _forgotten: bool  # the relay no longer counts this session
    _chunking: bool  # the upstream offered CHUNKING (to the client's last EHLO)
    _utf8: bool  # and SMTPUTF8
    _xforward: bool  # XFORWARD goes before each MAIL
    _esmtp: bool  # the client greeted with EHLO
    _needs_ehlo: bool  # TLS started and no EHLO or HELO came since

    def _init_secure(self) -> None:
        self._proxy = None  # the PROXY header reader, until the header is in
        self._opening_since = 0.0
        self._address = None  # the client's address as limits count it
        self._admitted = False
        self._tls_pending = False
        self._handshake = None
        self._encrypted = False  # TLS with the client
        self._early = []
        self._auth = None
        self._upstream_auth = frozenset()
        self._forgotten = False
        self._needs_ehlo = False

    def _connect_upstream(self) -> None:
        """Open the upstream connection; see ``Session``."""
        raise NotImplementedError

    def _flush(self) -> None:
        super()._flush()
        if self._tls_pending and not self._has_ended():
            # The 220 to STARTTLS is written: the handshake may start.
            self._tls_pending = False
            self._start_handshake()

    # -- opening -------------------------------------------------------------

    def _open(self, host: str) -> None:
        """The connection is in: wait for its PROXY header, or admit it."""
        self._opening_since = _now()
        if not host:
            # uvloop has no peer name for a client that reset before this
            # callback: it is gone already, whatever its address was.
            self._refuse_silently("client_lost")
            return
        proxy = self.ctx.listener.proxy_protocol
        if proxy is None:
            self._admit()
            return
        if not allowed(client_address(host), proxy.trusted):
            log.warning("listener %s: PROXY connection from untrusted %s", self.ctx.name, host)
            self._refuse_silently("proxy_untrusted")
            return
        self._proxy = ProxyHeaderReader()

    def _proxy_data(self, data: bytes) -> None:
        """Bytes before the PROXY header is complete."""
        reader = self._proxy
        assert reader is not None  # noqa: S101 - the caller checks
        reader.receive_data(data)
        try:
            header = reader.next_header()
        except ProxyProtocolError as error:
            log.warning("session %s: bad PROXY header: %s", self.tracker.info.session_id, error)
            self._refuse_silently("proxy_error")
            return
        if header is None:
            return
        self._proxy = None
        if header.source is not None:
            host, port = header.source
            self.tracker.info = replace(self.tracker.info, client=Peer(address=host, port=port))
        if self._capture is not None:
            client = self.tracker.info.client
            source = "LOCAL" if header.source is None else f"{client.address}:{client.port}"
            self._captured_event(f"PROXY header: client {source}")
        self._admit()
        if reader.rest and not self._has_ended():
            self.core.receive_data(reader.rest)

    def _refuse_silently(self, reason: str) -> None:
        """Close a connection that is not speaking SMTP to us."""
        self._end(None, reason)
        self.client.abort()

    def _admit(self) -> None:
        ctx = self.ctx
        address = client_address(self.tracker.info.client.address)
        if self._capture is not None:
            self._captured_admitted(address)
        if not allowed(address, ctx.listener.allow):
            self._end(ctx.replies.access_denied, "access_denied")
            return
        refusal = ctx.admission.admit(address, _now())
        if refusal is Refusal.TOO_FAST:
            self._end(ctx.replies.client_rate_limit, "client_rate_limit")
            return
        if refusal is Refusal.TOO_MANY:
            self._end(ctx.replies.client_connection_limit, "client_connection_limit")
            return
        self._address = address
        self._admitted = True
        self._connect_upstream()

    def _now_encrypted(self) -> None:
        """The client's connection is encrypted: by STARTTLS, or an implicit-TLS listener."""
        self._encrypted = True
        info = describe(self.client)
        if self._capture is not None:
            self._captured_client_tls(info)
        if info is not None:
            tls = replace(self.tracker.info.tls, client=info.summary, client_subject=info.peer)
            self.tracker.info = replace(self.tracker.info, tls=tls)

    def _forget(self) -> None:
        """The client connection is gone: the relay stops counting this session.

        Called when the connection is lost, and when a TLS handshake ends
        without one: the event loop's TLS layer owns the connection then,
        and a connection lost during the handshake is never reported.
        """
        if self._forgotten:
            return
        self._forgotten = True
        if self._admitted:
            self._admitted = False
            self.ctx.admission.release(self._address)
        self.ctx.sessions.discard(self)
        self.ctx.on_end()

    def opening_expired(self, now: float) -> bool:
        """True (and the session ended) if the PROXY header or handshake is late."""
        waiting = self._proxy is not None or self._handshake is not None
        if not waiting or now - self._opening_since <= OPENING_TIMEOUT_S:
            return False
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None
        self._refuse_silently("client_timeout")
        return True

    # -- TLS with the client ---------------------------------------------------

    @property
    def extension_policy(self) -> ExtensionPolicy:
        """What EHLO offers the client now: STARTTLS before TLS, AUTH when allowed."""
        ctx = self.ctx
        return ctx.policy_tls if self._encrypted else ctx.policy_plain

    def _tls_refusal(self, command: Command) -> Reply | None:
        """The reply to STARTTLS, MAIL or AUTH that TLS rules out; None if it may go on."""
        ctx = self.ctx
        tls = ctx.listener.tls
        replies = ctx.replies
        verb = command.verb
        if verb is Verb.STARTTLS:
            if tls is None:
                return replies.not_implemented
            if self._encrypted:
                return replies.tls_active
            if self.tracker.info.auth is not None:
                return replies.tls_after_auth
            if self.tracker.in_transaction or self.tracker.awaiting:
                # RFC 3207 4: not inside a transaction; and every reply the
                # client awaits must be read before the handshake starts.
                return replies.tls_in_transaction
            return None
        required = tls is not None and tls.require and not self._encrypted
        if required and verb in (Verb.MAIL, Verb.AUTH):
            return replies.tls_required
        if self._needs_ehlo and verb in (Verb.MAIL, Verb.AUTH):
            # RFC 3207 4.2: the upstream still holds the EHLO from before
            # TLS; the client must greet again first.
            return replies.ehlo_first
        return None

    def _starttls(self, command: Command) -> None:
        """Answer STARTTLS with 220 and start the handshake once it is written."""
        dropped = self.core.discard()
        if dropped:
            log.warning(
                "session %s: %d octets pipelined after STARTTLS discarded",
                self.tracker.info.session_id,
                dropped,
            )
            if self._capture is not None:
                self._captured_event(f"{dropped} octets pipelined after STARTTLS discarded")
        self.gate.pause(Hold.TLS)
        self.tracker.answered_locally(command, Verb.STARTTLS, self.ctx.replies.tls_ready, _now())
        self._to_client.append(self.ctx.replies.tls_ready.raw)
        self._tls_pending = True

    def _tls_started(self) -> None:
        # RFC 3207 4.2: everything learnt before TLS is forgotten; the
        # client starts again with EHLO.
        self.core.reset_after_tls()
        self.guard.release()
        self.tracker.helo = None
        self._needs_ehlo = True
        self._chunking = False
        self._utf8 = False
        self._xforward = False
        self._esmtp = False
        self._upstream_auth = frozenset()

    def _start_handshake(self) -> None:
        context = self.ctx.tls_context
        assert context is not None  # noqa: S101 - a listener with tls has one
        self.gate.pause(Hold.TLS)
        self._opening_since = _now()
        loop = asyncio.get_running_loop()
        self._handshake = loop.create_task(self._run_handshake(context))

    async def _run_handshake(self, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.client, self, context, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError, asyncio.CancelledError) as error:
            self._handshake = None
            if not self._has_ended():
                log.info(
                    "session %s: TLS handshake failed: %s",
                    self.tracker.info.session_id,
                    str(error) or type(error).__name__,
                )
                if self._capture is not None:
                    why = str(error) or type(error).__name__
                    self._captured_event(f"TLS handshake with the client failed: {why}")
                self._client_gone("tls_failed")
            self.client.abort()
            self._forget()
            return
        self._handshake = None
        if self._has_ended() or transport is None:
            if transport is not None:
                transport.abort()
            return
        self.client = transport
        self.gate.rebind(transport)
        self._now_encrypted()
        self._tls_started()
        early, self._early = self._early, []
        for data in early:
            # The client's first commands over TLS, read before this
            # coroutine resumed: they are the session's, not injected.
            self.core.receive_data(data)
        self.gate.resume(Hold.TLS)
        if early:
            self._pump_client()
            self._flush()

    # -- AUTH, passed through ----------------------------------------------------

    def _auth_refusal(self, command: Command) -> Reply | None:
        """The reply to an AUTH that may not go upstream; None if it may."""
        ctx = self.ctx
        auth = ctx.listener.auth
        replies = ctx.replies
        if auth is None:
            return replies.not_implemented  # never offered
        if auth.require_tls and not self._encrypted:
            return replies.auth_encryption  # RFC 4954 6
        if self.tracker.info.auth is not None:
            return replies.auth_already  # RFC 4954 4: one AUTH per session
        if self.tracker.in_transaction:
            return replies.auth_in_transaction  # RFC 4954 4
        if not self._upstream_auth:
            return replies.auth_unavailable  # the upstream offered none: not offered
        if (
            not isinstance(command, Auth)
            or command.mechanism not in auth.mechanisms
            or command.mechanism not in self._upstream_auth
        ):
            return replies.auth_mechanism
        self._auth = AuthIdentity(command.mechanism, command.initial)
        return None

    def _on_auth_response(self, line: bytes) -> None:
        """A line answering the upstream's 334: forwarded as it is, never logged."""
        upstream = self.upstream
        if upstream is None:
            raise LocalProtocolError("an AUTH response with no upstream connection")
        upstream.write(line)
        self._upstream_bytes += len(line)
        if self._capture is not None:
            self._captured_response(line)
        if self._auth is not None:
            self._auth.response(line)
        self.tracker.forwarded_continuation(Verb.AUTH, _now())

    def _auth_reply(self, reply: Reply) -> None:
        """The upstream answered AUTH or a response: go on, or end the exchange."""
        if reply.code == 334 and self._auth is not None:
            self.core.expect_auth_response()
            return
        if self.core.state is ServerState.AWAIT_AUTH:
            # Not after a response line the reader refused: it went back
            # to commands then, and the relay cancelled upstream.
            self.core.auth_done()
        if reply.code == 235 and self._auth is not None:
            # Only the identity is kept (RFC 4954 has the server log it);
            # what proved it never leaves the connection.
            identity = self._auth.identity or "(undecoded)"
            self.tracker.info = replace(self.tracker.info, auth=identity)
            if self._capture is not None:
                self._captured_event(f"AUTH {self._auth.mechanism}: authenticated as {identity}")
        self._auth = None

    # -- the size limit ----------------------------------------------------------

    def _past_size_limit(self, size: int, done: bool) -> bool:
        """Count DATA octets; True once past limits.max_message_bytes.

        The octets already relayed cannot be taken back, so the upstream
        connection is aborted (no end of data can follow), the rest of the
        message is read and dropped, and at its end the client gets 552
        5.3.4 and the session ends.
        """
        limit = self.ctx.config.limits.max_message_bytes
        if not limit:
            return False
        self._message_bytes += size
        if self._message_bytes <= limit:
            return False
        if self.upstream is not None:
            log.info(
                "session %s: message past %d octets, upstream connection aborted",
                self.tracker.info.session_id,
                limit,
            )
            self._abort_upstream()
            self.guard.release()
        if done:
            self._in_body = False
            self._end(self.ctx.replies.message_too_big, "message_too_big")
        return True

    def _too_big(self, command: Command) -> bool:
        """True if MAIL's SIZE parameter (RFC 1870) is past limits.max_message_bytes."""
        limit = self.ctx.config.limits.max_message_bytes
        if not limit or not isinstance(command, MailFrom):
            return False
        for key, value in command.params:
            if key.upper() == b"SIZE" and value is not None and value.isdigit():
                return int(value) > limit
        return False
