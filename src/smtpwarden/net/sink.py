"""The embedded capture server: accepts every message and writes it to disk.

``smtpwarden sink`` and upstreams of kind "sink" use it, so the quick start
needs no MTA and an operator has a capture tool at hand. Each accepted
message becomes ``ID.eml`` (the message, dot-stuffing removed) and
``ID.json`` (the envelope); ``mailbox.py`` streams the message to disk as it
arrives and makes both files durable. Only then is the message answered
250: the sink keeps the promise it makes, like the relay.

It reads the client with the same ``ServerConnection`` the relay uses, so it
refuses bare CR or LF and pipelined input the same way.

Rules kept here:
- Nothing blocking on the event loop: when the sink is embedded, every
  relayed session shares it. The fsyncs run in a worker thread while
  reading from that client pauses; its reply is written when they are done,
  and the input already received is processed after it, in order.
- Messages are capped (``max_message_bytes``, advertised as SIZE). Past the
  cap the sink drops what it receives, reads to the end of the message, and
  only then answers 552 5.3.4.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from typing import cast

from smtpwarden.net.loop import LoopChoice, loop_factory
from smtpwarden.net.mailbox import Draft, Mailbox
from smtpwarden.protocol.errors import RemoteProtocolError
from smtpwarden.protocol.events import (
    AuthResponse,
    BadCommand,
    Bdat,
    Body,
    Command,
    MailFrom,
    Param,
    RcptTo,
    Signal,
    Verb,
)
from smtpwarden.protocol.records import iso_time, text_of
from smtpwarden.protocol.server import ServerConnection

log = logging.getLogger("smtpwarden.sink")

# The sink's own choice, not a standard's: a debugging tool's sane cap, so
# one runaway client cannot fill the disk, and well above what MTAs accept by
# default (Postfix's message_size_limit is 10240000 octets).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_EHLO_KEYWORDS = (
    b"PIPELINING",
    b"8BITMIME",
    b"SMTPUTF8",
    b"CHUNKING",
    b"BINARYMIME",
    b"ENHANCEDSTATUSCODES",
    b"DSN",
)

# RFC 1870 6.1 and 6.3: 552 when the declared or the received size is over
# the fixed maximum; RFC 3463 X.3.4 "Message too big for system".
_TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
# RFC 3463 X.3.0: other or undefined mail system status (the disk failed).
_NOT_STORED = b"451 4.3.0 Error: cannot store message\r\n"


def _declared_size(params: tuple[Param, ...]) -> int | None:
    """The RFC 1870 SIZE= value of MAIL, if given (the parser checked its digits)."""
    for keyword, value in params:
        if keyword == b"SIZE" and value is not None:
            return int(value)
    return None


class SinkSession(asyncio.Protocol):
    """One client of the sink."""

    transport: asyncio.Transport

    def __init__(
        self, mailbox: Mailbox, hostname: str, max_message_bytes: int = MAX_MESSAGE_BYTES
    ) -> None:
        self.mailbox = mailbox
        self.hostname = hostname.encode()
        self.max_message_bytes = max_message_bytes
        self.core = ServerConnection()
        self.helo = ""
        self.peer = ""
        self.mail_from: str | None = None
        self.rcpt_to: list[str] = []
        self.body_kind = ""  # "data", "bdat", or "refused" for BDAT out of place
        self._last = False  # the current BDAT chunk is the LAST one
        self._draft: Draft | None = None
        self._storing = False  # a message is being made durable; reading paused
        self._eof = False

    def _reset(self) -> None:
        self.mail_from = None
        self.rcpt_to = []
        self.body_kind = ""
        self._last = False
        if self._draft is not None:
            self._draft.discard()
            self._draft = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        # uvloop gives no peer name for a client that reset the connection
        # before this callback.
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.transport.write(b"220 " + self.hostname + b" ESMTP smtpwarden sink\r\n")

    def data_received(self, data: bytes) -> None:
        self.core.receive_data(data)
        if not self._storing:
            self._process()

    def eof_received(self) -> bool:
        # A pipelining client may half-close after its last command: keep
        # the connection until the reply of a store under way is written.
        self._eof = True
        return self._storing

    def connection_lost(self, exc: Exception | None) -> None:
        self._reset()

    def _process(self) -> None:
        """Answer the events the core holds, until it needs data or a store starts."""
        transport = self.transport
        out: list[bytes] = []
        while not transport.is_closing() and not self._storing:
            try:
                event = self.core.next_event()
            except RemoteProtocolError as error:
                out.append(error.reply_bytes())
                transport.write(b"".join(out))
                transport.close()
                return
            if isinstance(event, Signal):
                break
            if isinstance(event, Body):
                reply = self._body(event)
            elif isinstance(event, BadCommand):
                reply = event.error.reply_bytes()
            elif isinstance(event, AuthResponse):
                reply = b"503 5.5.1 Error: authentication not enabled\r\n"  # AUTH ended at once
            else:
                reply = self._command(event)
            if reply:
                out.append(reply)
            if isinstance(event, Command) and event.verb is Verb.QUIT:
                transport.write(b"".join(out))
                transport.close()
                return
        if out:
            transport.write(b"".join(out))
        if transport.is_closing():
            return
        if self._storing:
            transport.pause_reading()
        elif self._eof:
            transport.close()

    def _command(self, command: Command) -> bytes:
        verb = command.verb
        match verb:
            case Verb.EHLO:
                self.helo = text_of(command.argument)
                self._reset()
                size = b"SIZE " + str(self.max_message_bytes).encode()
                lines = [self.hostname, size, *_EHLO_KEYWORDS]
                return (
                    b"".join(b"250-" + line + b"\r\n" for line in lines[:-1])
                    + b"250 "
                    + lines[-1]
                    + b"\r\n"
                )
            case Verb.HELO:
                self.helo = text_of(command.argument)
                self._reset()
                return b"250 " + self.hostname + b"\r\n"
            case Verb.MAIL:
                assert isinstance(command, MailFrom)  # noqa: S101 - the parser's type for MAIL
                if self.mail_from is not None:
                    return b"503 5.5.1 Error: nested MAIL command\r\n"
                declared = _declared_size(command.params)
                if declared is not None and declared > self.max_message_bytes:
                    return _TOO_BIG
                self.mail_from = text_of(command.path)
                return b"250 2.1.0 Ok\r\n"
            case Verb.RCPT:
                assert isinstance(command, RcptTo)  # noqa: S101 - the parser's type for RCPT
                if self.mail_from is None:
                    return b"503 5.5.1 Error: need MAIL command\r\n"
                self.rcpt_to.append(text_of(command.path))
                return b"250 2.1.5 Ok\r\n"
            case Verb.DATA:
                if not self.rcpt_to or self.body_kind:
                    self.core.refuse_data()
                    return b"554 5.5.1 Error: no valid recipients\r\n"
                self.core.start_data()
                self.body_kind = "data"
                self._draft = self.mailbox.draft(self.max_message_bytes, unstuff=True)
                return b"354 End data with <CR><LF>.<CR><LF>\r\n"
            case Verb.BDAT:
                assert isinstance(command, Bdat)  # noqa: S101 - the parser's type for BDAT
                # BDAT 0 too is followed by a chunk event, an empty one: the
                # chunk is answered there, once.
                self._last = command.last
                if not self.rcpt_to or self.body_kind not in ("", "bdat"):
                    self.body_kind = "refused"
                    return b""
                self.body_kind = "bdat"
                if self._draft is None:
                    self._draft = self.mailbox.draft(self.max_message_bytes, unstuff=False)
                return b""
            case Verb.AUTH:
                self.core.auth_done()  # the sink offers no AUTH
                return b"503 5.5.1 Error: authentication not enabled\r\n"
            case Verb.STARTTLS:
                self.core.refuse_tls()  # nor STARTTLS
                return b"502 5.5.1 Error: command not implemented\r\n"
            case Verb.RSET:
                self._reset()
                return b"250 2.0.0 Ok\r\n"
            case Verb.NOOP:
                return b"250 2.0.0 Ok\r\n"
            case Verb.QUIT:
                return b"221 2.0.0 Bye\r\n"
            case Verb.VRFY:
                return b"252 2.0.0 Cannot VRFY user\r\n"
            case _:
                return b"502 5.5.1 Error: command not implemented\r\n"

    def _body(self, body: Body) -> bytes:
        # RFC 1870 6.3 and RFC 3030 2: past the cap, or when the disk fails,
        # the draft drops what it gets; the rest of the message or chunk is
        # still read, and only its end is answered.
        if self._draft is not None and self.body_kind != "refused":
            self._draft.write(body.data)
        if not body.done:
            return b""
        if self.body_kind == "data" or (self.body_kind == "bdat" and self._last):
            return self._end_message()
        if self.body_kind == "refused":
            self._reset()
            return b"503 5.5.1 Error: need MAIL and RCPT before BDAT\r\n"
        draft = self._draft
        if draft is None or draft.failed:
            return self._failed(draft)
        return f"250 2.0.0 Ok: {draft.size} octets received\r\n".encode()

    def _failed(self, draft: Draft | None) -> bytes:
        """End the transaction: the message cannot be stored."""
        self._reset()
        if draft is not None and draft.over:
            return _TOO_BIG
        return _NOT_STORED

    def _end_message(self) -> bytes:
        draft, self._draft = self._draft, None
        if draft is None or draft.failed:
            return self._failed(draft)
        envelope: dict[str, object] = {
            "received": iso_time(time.time()),
            "client": self.peer,
            "helo": self.helo,
            "mail_from": self.mail_from,
            "rcpt_to": self.rcpt_to,
            "body": self.body_kind,
            "size": draft.size,
        }
        self._reset()
        ident = self.mailbox.new_id()
        self._storing = True
        loop = asyncio.get_running_loop()
        stored = loop.run_in_executor(None, self.mailbox.commit, draft, ident, envelope)
        stored.add_done_callback(functools.partial(self._stored, ident))
        return b""

    def _stored(self, ident: str, stored: asyncio.Future[None]) -> None:
        """The store finished: answer, then go on with the input received."""
        if stored.cancelled():
            return
        error = stored.exception()
        if error is None:
            reply = f"250 2.0.0 Ok: queued as {ident}\r\n".encode()
        else:
            log.error("sink: cannot store message: %s", error)
            reply = _NOT_STORED
        self._storing = False
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(reply)
        transport.resume_reading()
        self._process()


async def start_sink(
    host: str,
    port: int,
    folder: str | os.PathLike[str],
    hostname: str,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> asyncio.Server:
    """Start a sink server; the caller owns (and closes) it.

    Raises ValueError if ``max_message_bytes`` is below 1 (RFC 1870 reads
    "SIZE 0" as no limit at all), OSError if the folder cannot be created or
    the address cannot be bound.
    """
    if max_message_bytes < 1:
        raise ValueError(f"max_message_bytes must be at least 1, got {max_message_bytes}")
    mailbox = Mailbox(folder)
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SinkSession(mailbox, hostname, max_message_bytes),
        host,
        port,
        reuse_address=True,
    )


def run_sink(
    *,
    host: str,
    port: int,
    folder: str,
    event_loop: LoopChoice = "auto",
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> int:
    """Run a sink until SIGINT or SIGTERM; return the exit code."""
    factory, name = loop_factory(event_loop)

    async def main() -> None:
        server = await start_sink(
            host, port, folder, socket.getfqdn(), max_message_bytes=max_message_bytes
        )
        bound = server.sockets[0].getsockname()
        log.warning("sink listening on %s:%s (%s), writing to %s", bound[0], bound[1], name, folder)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        await server.wait_closed()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    return 0
