"""How a relayed session ends: the closing half of ``Session``.

Every way out goes through ``_end``: the closing reply (if any) is written,
the upstream connection is closed politely between transactions (every path
that ends a session mid-message has aborted it already), the tracker writes
the open transaction's record and the session's, and the client connection
is half-closed and drained for a moment so the reply is read, not reset.
Shutdown asks sessions to end between transactions (``drain``) and, past
its grace, ends them wherever they are (``force_close``); the relay's tick
asks each session whether its current phase has run out of time
(``check_deadline``).
"""

from __future__ import annotations

import asyncio
import time

from smtpwarden.net.capture import CapturingSession
from smtpwarden.net.context import ListenerContext
from smtpwarden.net.flow import Hold, ReadGate
from smtpwarden.net.replay import Guard
from smtpwarden.net.upstream import UpstreamProtocol, reply_timeout
from smtpwarden.protocol.events import Command, Verb
from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.protocol.replies import Reply
from smtpwarden.protocol.server import ServerConnection
from smtpwarden.protocol.state import ServerState
from smtpwarden.protocol.tracker import SessionTracker

# After a closing reply, how long to keep reading (and dropping) what the
# client still sends, so that the reply is read rather than lost to a reset.
LINGER_S = 2.0

_now = time.monotonic


class SessionEnd(CapturingSession):
    """The state every ending needs, and the ways to end. See the module doc."""

    ctx: ListenerContext
    client: asyncio.Transport
    gate: ReadGate
    tracker: SessionTracker
    guard: Guard
    upstream: asyncio.Transport | None
    _connector: asyncio.Task[None] | None
    _handshake: asyncio.Task[None] | None  # a TLS handshake with the client
    _closed: bool
    _to_client: list[bytes]
    _in_body: bool
    _quitting: bool
    _lingering: bool
    _client_bytes: int
    _upstream_bytes: int
    core: ServerConnection
    _last_client: float
    _stalled_since: float
    _errors: int  # commands refused locally (limits.max_errors)
    _awaiting_end: bool  # a held message awaits its answer (or a replay)
    _client_eof: bool  # the client half-closed

    def _replay_lost(self) -> bool:
        """Replay a sent message whose reply will not come; see ``Session``."""
        raise NotImplementedError

    def opening_expired(self, now: float) -> bool:
        """End a session whose PROXY header or TLS handshake is late; see ``SecureSession``."""
        raise NotImplementedError

    def _forget(self) -> None:
        """Stop counting the session once its client connection is gone; see ``SecureSession``."""
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        """True once the session has ended (records written, sockets closing)."""
        return self._closed

    def _has_ended(self) -> bool:
        # The same as ``closed``, as a call: mypy keeps an attribute it has
        # narrowed narrowed across calls that change it, and loops here call
        # handlers that may end the session.
        return self._closed

    def check_deadline(self, now: float) -> None:
        """Close the session if the phase it is in has run out of time.

        The client's time runs from its last answer, or from the first
        octet of a command or message it has not finished; each octet
        after that first one buys only 1/limits.min_data_rate s, so a
        client that drips a byte at a time is closed after about one
        command or data_block timeout however many it sends.

        A side whose write buffer stays full is the side that is late: an
        upstream that stops reading the message is timed as an upstream,
        not blamed on the client whose reading was paused for it.
        """
        if self._closed or self._connector is not None or self.guard.replaying:
            return  # connecting and replays have deadlines of their own
        if self.opening_expired(now):
            return
        timeouts = self.ctx.config.timeouts
        gate = self.gate
        replies = self.ctx.replies
        if gate.holds(Hold.FLOW) and now - self._stalled_since > timeouts.data_block:
            self._abort_upstream()
            self._end(replies.upstream_timeout, "upstream_timeout", failed=True)
            return
        if gate.holds(Hold.CLIENT) and now - self._stalled_since > timeouts.command:
            self._client_gone("client_timeout")
            return
        entry = self.tracker.oldest()
        if (
            entry is not None
            and entry.local is None
            # A BDAT whose chunk is still arriving waits on the client.
            and not (self.core.state is ServerState.CHUNK and entry is self.tracker.newest())
        ):
            limit = reply_timeout(entry, timeouts)
            if entry.body is not None and self.guard.held is not None:
                # A held message's lost outcome is replayed: wait no longer
                # than the replays' own budget, so that both fit well inside
                # the client's 10 minutes (RFC 5321 4.5.3.2.6).
                limit = min(limit, self.ctx.config.retry.budget)
            if now - entry.sent_at > limit:
                if self._replay_lost():
                    return
                self._abort_upstream()
                self._end(replies.upstream_timeout, "upstream_timeout", failed=True)
            return
        reading_body = self.core.state in (ServerState.DATA, ServerState.CHUNK)
        idle = timeouts.data_block if reading_body else timeouts.command
        if now - self._last_client > idle and not gate.holds(Hold.FLOW | Hold.CLIENT):
            if self._in_body:
                self._abort_upstream()
            self._end(replies.client_timeout, "client_timeout")

    def drain(self) -> None:
        """Close now if between transactions; the relay is shutting down."""
        if self._closed or self.tracker.awaiting or self.tracker.in_transaction or self._in_body:
            return
        self._end(self.ctx.replies.shutting_down, "shutdown")

    def force_close(self) -> None:
        """Close now whatever the phase: the shutdown deadline has passed."""
        if self._closed:
            return
        if self._in_body:
            self._abort_upstream()
        self._end(self.ctx.replies.shutting_down, "shutdown", failed=True)

    def abandon(self) -> None:
        """Close the client connection now, lingering or not (process exit)."""
        self.client.close()

    # -- the client closing its side ---------------------------------------------

    def eof_received(self) -> bool:
        # A client may half-close after its last pipelined command and still
        # read the replies: keep writing until they have all been relayed.
        if self._closed:
            return False
        self._client_eof = True
        waiting = self.tracker.awaiting or self._awaiting_end
        if waiting and not self._in_body and (self.upstream is not None or self.guard.replaying):
            return True
        self._client_gone("client_closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._client_gone("client_lost")
        self._forget()

    # -- closing ---------------------------------------------------------------

    def _client_gone(self, reason: str) -> None:
        if self._in_body:
            self._abort_upstream()
        self._end(None, reason)

    def _answer(self, command: Command | None, verb: Verb | None, reply: Reply) -> None:
        out = self.tracker.answered_locally(command, verb, reply, _now())
        if out:
            self._to_client.append(out)

    def _refuse(self, command: Command | None, verb: Verb | None, reply: Reply) -> None:
        """Answer an error locally; past limits.max_errors, end the session."""
        self._errors += 1
        if self._errors > self.ctx.config.limits.max_errors:
            self._end(self.ctx.replies.too_many_errors, "too_many_errors")
        else:
            self._answer(command, verb, reply)

    def _abort_upstream(self, *, polite: bool = False) -> None:
        """Drop the upstream connection; ``polite``: with a QUIT, it is still in step."""
        upstream = self.upstream
        if upstream is None:
            return
        self.upstream = None
        if self._capture is not None:
            self._captured_event("upstream connection closed by the relay")
        protocol = upstream.get_protocol()
        if isinstance(protocol, UpstreamProtocol):
            protocol.detach()
        if polite and not upstream.is_closing():
            upstream.write(b"QUIT\r\n")
            upstream.close()
        else:
            upstream.abort()

    def _end(
        self,
        reply: Reply | None,
        reason: str,
        *,
        failed: bool = False,
        upstream_failure: Reply | None = None,
    ) -> None:
        """Finish the session: optional closing reply, records, both sockets.

        ``failed`` says the closing reply reports an upstream failure, and
        ``upstream_failure`` is the upstream's own closing reply: either way
        an open transaction is recorded as deferred rather than aborted.
        """
        if self._closed:
            return
        self._closed = True
        if reply is not None:
            self._to_client.append(reply.raw)
        self._flush()
        failure = None
        if upstream_failure is not None:
            failure = ReplyInfo.of(upstream_failure, local=False)
        elif failed and reply is not None:
            failure = ReplyInfo.of(reply, local=True)
        upstream = self.upstream
        if upstream is not None:
            # Between transactions: take leave politely. Every path that
            # ends a session mid-message has aborted the upstream already.
            if self.core.state in (ServerState.AWAIT_AUTH, ServerState.AUTH_RESPONSE):
                # Mid-AUTH a QUIT would be read as the client's response
                # (it is valid base64): cancel the exchange first.
                upstream.write(b"*\r\n")
                if self._capture is not None:
                    self._captured_own(b"*\r\n")
            if not self._quitting:
                upstream.write(b"QUIT\r\n")
                if self._capture is not None:
                    self._captured_own(b"QUIT\r\n")
            upstream.close()
            self.upstream = None
        if self._connector is not None:
            self._connector.cancel()
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None
        self.guard.cancel()
        record = self.tracker.close(
            reason=reason,
            now=_now(),
            client_bytes=self._client_bytes,
            upstream_bytes=self._upstream_bytes,
            failure=failure,
        )
        self._write_records()
        self.ctx.records.write_session(record)
        if self._capture is not None:
            self._captured_end(record)
        self.ctx.on_end()
        self._close_client(lingering=reply is not None)

    def _close_client(self, *, lingering: bool) -> None:
        client = self.client
        if client.is_closing():
            return
        if lingering and client.can_write_eof():
            # Half-close, then drop what still arrives for a moment: closing
            # with unread input would reset the connection and could destroy
            # the reply before the client reads it.
            try:
                client.write_eof()
            except OSError:
                client.close()  # the client is gone already
                return
            self._lingering = True
            self.gate.release()
            asyncio.get_running_loop().call_later(LINGER_S, client.close)
        else:
            client.close()

    def _flush(self) -> None:
        out = self._to_client
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if data and not self.client.is_closing():
                self.client.write(data)
                if self._capture is not None:
                    self._captured_to_client(data)
                if not self.tracker.awaiting:
                    # Every command is answered: the client's turn, and its
                    # timeout, start now (see ``check_deadline``).
                    self._last_client = _now()

    def _write_records(self) -> None:
        records = self.ctx.records
        for record in self.tracker.records:
            records.write(record)
        if self._capture is not None:
            self._captured_records(self.tracker.records)
        self.tracker.records.clear()
