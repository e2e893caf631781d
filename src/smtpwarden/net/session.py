"""One relayed session: a client connection and its upstream connection.

The session feeds the client's bytes to ``ServerConnection`` and the
upstream's to ``ReplyReader``, forwards what they yield, and lets
``SessionTracker`` pair commands with replies and write the records. It adds
only what needs I/O: connecting, writing, flow control, deadlines, closing.

Rules kept here:
- Command lines and message bytes go upstream exactly as the client sent
  them; body chunks are written as received, never joined or copied.
- A client that goes away before its message is complete leaves the upstream
  with an incomplete DATA or BDAT: the upstream connection is aborted, so no
  end of data can follow.
- A 2xx to the end of a message is the upstream's reply to that message
  (or, under retry, a replay's), or, under requeue, comes only once the
  message is fsynced in the spool (PRODUCT.md, invariant 1).
- Reading from the client pauses while the upstream's write buffer is full
  and while too many pipelined commands await replies; while DATA awaits
  the upstream's verdict, or the upstream is not ready yet, the client's
  input is not taken, and the socket is paused once some arrives
  (``flow.Hold``, ``flow.SOFT_HOLDS``); reading from the upstream pauses
  while the client's write buffer is full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from smtpwarden.net.context import ListenerContext
from smtpwarden.net.flow import WRITE_HIGH_WATER_BYTES, Hold, ReadGate
from smtpwarden.net.guarded import asks_utf8
from smtpwarden.net.replay import Guard, reply_checks
from smtpwarden.net.routing import Route
from smtpwarden.net.upstreamleg import UpstreamLeg
from smtpwarden.protocol.errors import LocalProtocolError, MalformedReply, RemoteProtocolError
from smtpwarden.protocol.events import (
    PAUSED,
    AuthResponse,
    BadCommand,
    Bdat,
    Body,
    Command,
    Signal,
    Verb,
)
from smtpwarden.protocol.records import Peer, SessionInfo, Tls, Upstream
from smtpwarden.protocol.replies import Reply, ReplyReader, reply_for
from smtpwarden.protocol.sequence import reply_fits
from smtpwarden.protocol.server import ServerConnection
from smtpwarden.protocol.state import ServerState
from smtpwarden.protocol.tracker import SessionTracker

log = logging.getLogger("smtpwarden.session")

# One monotonic clock for latencies and deadlines, with microsecond
# resolution (uvloop's loop.time() counts whole milliseconds).
_now = time.monotonic

# While a held message awaits its answer, input the client pipelined after it
# is kept, unread by the pump, up to this much; past it reading pauses.
# Pausing costs two system calls per message, so it is kept for clients that
# will not wait. (An EOF read meanwhile waits for the answer: see
# ``eof_received``.)
AWAITING_END_BUFFER_BYTES = 64 * 1024

_NO_TLS = Tls()
_READING_BODY = frozenset((ServerState.DATA, ServerState.CHUNK))


class Session(UpstreamLeg):
    """One client connection relayed to one upstream connection."""

    def __init__(self, ctx: ListenerContext, upstream: Upstream) -> None:
        self.ctx = ctx
        self._upstream_record = upstream
        limits = ctx.config.limits
        self.core = ServerConnection(max_line_bytes=limits.max_command_line_bytes)
        self.reader = ReplyReader(
            max_line_bytes=limits.max_reply_line_bytes, max_lines=limits.max_reply_lines
        )
        self.upstream: asyncio.Transport | None = None
        self.target = ctx.target  # the upstream this session is relayed to
        self._connector: asyncio.Task[None] | None = None
        self._closed = False
        self._to_client: list[bytes] = []
        self._chunking = False  # the upstream offered CHUNKING
        self._utf8 = False  # and SMTPUTF8
        self._utf8_mail = False
        self._mail_open = False  # the client sent MAIL and has not ended its message
        self._in_body = False  # a message is on its way upstream, not yet ended
        self._body_kind = ""  # "data" or "bdat" for the message being sent
        self._chunk_last = False  # the current BDAT chunk is the LAST one
        self._chunk_dropped = False  # the current BDAT chunk was refused locally
        self._quitting = False
        self._client_eof = False
        self._errors = 0  # commands refused locally (limits.max_errors)
        self._resume_pump = False  # buffered client input waits for the reply loop
        self.guard = Guard(ctx)  # the held message and its replay
        # A held message awaits its answer (or a replay): what the client
        # sends meanwhile waits in the core, unread by the pump.
        self._awaiting_end = False
        self._recipients = 0  # RCPTs sent in the current transaction
        self._route: Route | None = None  # the current transaction's, once it has a RCPT
        self._stalled_since = 0.0  # when a full write buffer last paused a side
        self._lingering = False
        self._last_client = _now()
        self._client_bytes = 0
        self._upstream_bytes = 0
        self._message_bytes = 0  # octets of the current message so far
        self._message_failed = False  # a BDAT chunk was refused: so is the rest
        self._capture = None  # the transcript, when the listener records this session
        self._init_secure()
        self._init_upstream_leg()

    # -- the client's connection ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement the interface without subclassing it.
        client = self.client = cast(asyncio.Transport, transport)
        client.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        self.gate = ReadGate(client)
        ctx = self.ctx
        # uvloop gives no peer name for a client that reset the connection
        # before this callback; the session still ends with its record.
        peer = client.get_extra_info("peername") or ("", 0)
        host, port = peer[0], peer[1]
        info = SessionInfo(
            session_id=ctx.next_id(),
            listener=ctx.name,
            client=Peer(address=host, port=port),
            upstream=self._upstream_record,
            tls=_NO_TLS,
        )
        replays, contradicted = reply_checks(ctx.config.retry)
        self.tracker = SessionTracker(
            info=info,
            now=_now(),
            epoch_offset=ctx.epoch_offset,
            replays=replays if ctx.routes.guarded else None,
            contradicts=contradicted,
        )
        self._start_capture()
        ctx.sessions.add(self)
        if len(ctx.sessions) > ctx.config.limits.max_connections:
            # RFC 5321 3.8 allows 421 at connection time.
            self._end(ctx.replies.too_many_connections, "connection_limit")
            return
        if ctx.draining:
            self._end(ctx.replies.shutting_down, "shutdown")
            return
        if client.get_extra_info("ssl_object") is not None:
            self._now_encrypted()
        self._open(host)

    def data_received(self, data: bytes) -> None:
        self._client_bytes += len(data)
        now = _now()
        rate = self.ctx.config.limits.min_data_rate
        core = self.core
        if rate and (core.buffered or core.state in _READING_BODY):
            # The rest of a line or of a message: each octet buys 1/rate s
            # against the timeout, so a client dripping bytes runs out.
            self._last_client = min(now, self._last_client + len(data) / rate)
        else:
            self._last_client = now
        if self._lingering or self._closed:
            return
        if self._proxy is not None:
            self._proxy_data(data)
            return
        if self._handshake is not None:
            # Decrypted data before the handshake coroutine resumed: the
            # client's first commands over TLS, kept for after the reset.
            self._early.append(data)
            return
        core.receive_data(data)
        self._pump_client()
        if core.buffered:
            # Input the pump could not take: a client that did not wait for
            # its replies.
            if not self._awaiting_end:
                self.gate.overflowing()
            elif core.buffered > AWAITING_END_BUFFER_BYTES:
                self.gate.pause(Hold.REPLAY)
        self._flush()

    def pause_writing(self) -> None:
        # The client is not reading what it is sent: stop producing more,
        # from the upstream's replies and from local ones alike.
        self._stalled_since = _now()
        self.gate.pause(Hold.CLIENT)
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.gate.resume(Hold.CLIENT)
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.resume_reading()

    # -- what the client sends -------------------------------------------------

    def _pump_client(self) -> None:
        core = self.core
        limit = self.ctx.config.limits.max_pipelined_commands
        # Input that arrives while the upstream is not ready yet waits in
        # the core (CONNECT is a soft hold: see flow.SOFT_HOLDS).
        while (
            not self._has_ended() and not self._awaiting_end and not self.gate.holds(Hold.CONNECT)
        ):
            try:
                event = core.next_event()
            except RemoteProtocolError as refused:
                # A bare CR or LF inside DATA: the message must never be
                # completed upstream, so that connection is aborted.
                log.info("session %s: %s", self.tracker.info.session_id, refused)
                self._abort_upstream()
                self._end(reply_for(refused), "bare_line_ending")
                return
            if isinstance(event, Signal):
                if event is PAUSED and core.state is not ServerState.AWAIT_TLS:
                    # DATA or AUTH awaits the upstream's reply (STARTTLS
                    # holds reading until its handshake on its own).
                    self.gate.pause(Hold.VERDICT)
                return
            if self._capture is not None:
                self._captured_client(event)
            if isinstance(event, Body):
                self._on_body(event)
            elif isinstance(event, AuthResponse):
                self._on_auth_response(event.line)
            elif isinstance(event, BadCommand) and event.verb is Verb.AUTH and self._auth:
                # A response line the core refused: the exchange is
                # cancelled upstream, whose reply the client gets.
                self._on_auth_response(b"*\r\n")
            elif isinstance(event, BadCommand):
                self._refuse(None, event.verb, reply_for(event.error))
            else:
                self._on_command(event)
            if self.tracker.awaiting >= limit and core.state is ServerState.COMMAND:
                # Never between BDAT and its chunk: the chunk must go first.
                self.gate.pause(Hold.QUEUE)
                return

    def _on_command(self, command: Command) -> None:
        upstream = self.upstream
        if upstream is None:
            raise LocalProtocolError("a command to relay with no upstream connection")
        verb = command.verb
        replies = self.ctx.replies
        line = command.line
        takes_over = False
        refusal = self._command_refusal(command)
        if refusal is None:
            if verb is Verb.AUTH:
                refusal = self._tls_refusal(command) or self._auth_refusal(command)
            elif verb is Verb.STARTTLS:
                refusal = self._tls_refusal(command)
            elif verb is Verb.XCLIENT or verb is Verb.XFORWARD:
                refusal = replies.not_implemented  # smtpwarden's own to send upstream
        if refusal is not None:
            # The core moved on reading DATA, AUTH or STARTTLS: back to commands.
            if verb is Verb.DATA:
                self.core.refuse_data()
            elif verb is Verb.AUTH:
                self.core.auth_done()
            elif verb is Verb.STARTTLS:
                self.core.refuse_tls()
            self._refuse(command, verb, refusal)
            return
        match verb:
            case Verb.STARTTLS:
                self._starttls(command)
                return
            case Verb.MAIL:
                if self.ctx.draining and not self.tracker.in_transaction:
                    self._end(replies.shutting_down, "shutdown")
                    return
                refusal = self._tls_refusal(command)
                if refusal is None and self._too_big(command):
                    refusal = replies.message_too_big
                if refusal is not None:
                    self._answer(command, verb, refusal)
                    return
                self._new_transaction()
                self._mail_open = True
                self._utf8_mail = asks_utf8(command) and self._utf8
                if self._xforward:
                    self._send_xforward()
            case Verb.RCPT:
                if self._recipients >= self.ctx.config.limits.max_recipients:
                    self._answer(command, verb, replies.too_many_recipients)
                    return
                if not self._same_route(command):
                    self._answer(command, verb, replies.other_route)
                    return
                self._recipients += 1
                route = self._route or self.ctx.routes.default
                takes_over = route.policy == "requeue" and self.ctx.config.retry.take_over_partial
            case Verb.BDAT:
                assert isinstance(command, Bdat)  # noqa: S101 - the parser's type for BDAT
                if not self._start_chunk(command):
                    return
                line = command.wire
            case Verb.DATA:
                self._in_body = True
                self._message_bytes = 0
                self._body_kind = "data"
                self.guard.hold("data", self._message_route())
            case Verb.HELO:
                self._chunking = False  # HELO offers no extensions (RFC 5321 4.1.1.1)
                self._utf8 = False
                self._xforward = False
                self._esmtp = False
                self._needs_ehlo = False
                self._new_transaction()
            case Verb.EHLO:
                self._esmtp = True
                self._needs_ehlo = False
                self._new_transaction()
            case Verb.RSET:
                self._new_transaction()
            case Verb.QUIT:
                self._quitting = True
            case _:
                pass
        upstream.write(line)
        self._upstream_bytes += len(line)
        if self._capture is not None:
            self._captured_relayed(line)
        self.tracker.forwarded(command, _now(), takes_over=takes_over)

    def _on_body(self, body: Body) -> None:
        upstream = self.upstream
        if self._chunk_dropped:
            self._chunk_dropped = not body.done
            return
        data = body.data
        if self._body_kind == "data" and self._past_size_limit(len(data), body.done):
            return
        if upstream is None:
            raise LocalProtocolError("message data to relay with no upstream connection")
        upstream.write(data)
        self._upstream_bytes += len(data)
        if self._capture is not None:
            self._captured_body(data, kind=self._body_kind, done=body.done)
        self.tracker.body(data)
        held = self.guard.held
        if held is not None:
            try:
                held.append(data)
            except OSError as error:
                # No room for the held copy: this message goes on unguarded
                # rather than fail; the upstream's verdict is relayed as is.
                log.error(
                    "session %s: cannot hold the message: %s", self.tracker.info.session_id, error
                )
                self.guard.release()
                self.tracker.stop_replays()
                held = None
        if body.done and self._body_kind == "bdat":
            self.tracker.chunk_sent(_now())
        if body.done and (self._body_kind == "data" or self._chunk_last):
            self._in_body = False
            self._mail_open = False  # another message needs another MAIL
            self._recipients = 0
            self.tracker.end_of_body(_now(), replayable=held is not None)
            if held is not None:
                # Nothing more is relayed until this message's end is
                # answered: a replay's reply must reach the client before
                # the replies to whatever it pipelined after the message.
                self._awaiting_end = True

    # -- what the upstream sends -----------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        """Handle bytes from the upstream: replies, paired and forwarded."""
        if self._closed:
            return
        reader = self.reader
        tracker = self.tracker
        reader.receive_data(data)
        preamble = self._preamble
        if preamble is not None:
            try:
                self._preamble_reply(preamble)
            except MalformedReply as error:
                self._preamble_finished(f"malformed reply: {error}")
            return
        now = _now()
        replies: list[Reply] = []
        try:
            while (reply := reader.next_reply()) is not None:
                replies.append(reply)
        except MalformedReply as error:
            # Nothing of this read is trusted: a 250 just before garbage may
            # be garbage too. A message awaiting its answer is a lost outcome.
            self._upstream_failed(f"malformed reply: {error}", "upstream_malformed")
            return
        if len(replies) > 1 and not self._owes(replies):
            return
        for reply in replies:
            if self._capture is not None:
                self._captured_reply(reply)
            oldest = tracker.oldest()
            if oldest is not None and not reply_fits(oldest.verb, oldest.name, reply.code):
                why = f"reply {reply.raw[:80]!r} to {oldest.name}"
                self._upstream_failed(why, "upstream_malformed")
                return
            entry = tracker.upstream_reply(reply, now)
            if entry is None and reply.code == 421 and not self.guard.replaying:
                # RFC 5321 3.8: the upstream is closing, owing nothing more.
                self._to_client.append(reply.raw)
                self._abort_upstream()
                self._end(None, "upstream_421", upstream_failure=reply)
                return
            if entry is None:
                why = f"reply nobody asked for: {reply.raw[:80]!r}"
                self._upstream_failed(why, "upstream_unsolicited")
                return
            if tracker.replay is not None and not self.guard.replaying:
                self._start_replay()  # the failure is not relayed: a replay answers
            else:
                self._on_reply(entry, reply)
            ready = tracker.ready_replies(now)
            if ready:
                self._to_client.append(ready)
            if self._has_ended():
                return
            if reply.code == 421 and self.guard.replaying:
                self._abort_upstream()  # the replay answers; the session ends after it
                return
            if reply.code == 421:
                # RFC 5321 3.8: the upstream is closing. Its reply reached
                # the client; the session ends with it.
                self._abort_upstream()
                self._end(None, "upstream_421", upstream_failure=reply)
                return
        self._flush()
        if tracker.records:
            self._write_records()
        if self._all_answered():
            self._end(None, "quit" if self._quitting else "client_closed")
            return
        # Read the client again only now that every reply of this read has
        # been paired: a reply already here must never be taken for the
        # answer to a command the client sends next.
        gate = self.gate
        limit = self.ctx.config.limits.max_pipelined_commands
        if gate.holds(Hold.QUEUE) and tracker.awaiting < limit:
            gate.resume(Hold.QUEUE)
            self._resume_pump = True
        if self._resume_pump:
            self._resume_pump = False
            self._pump_client()
            self._flush()
        if self.ctx.draining:
            self.drain()
