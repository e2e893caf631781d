"""The embedded capture server: accepts every message and writes it to disk.

``smtpwarden sink`` and upstreams of kind "sink" use it, so the quick start
needs no MTA and an operator has a capture tool at hand. Each accepted
message becomes ``ID.eml`` (the message, dot-stuffing removed) and
``ID.json`` (the envelope), both written to a temporary name, fsynced and
renamed, the folder fsynced, and only then answered 250: the sink keeps the
promise it makes, like the relay.

It reads the client with the same ``ServerConnection`` the relay uses, so it
refuses bare CR or LF and pipelined input the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import cast

import orjson

from smtpwarden.net.loop import LoopChoice, loop_factory
from smtpwarden.protocol.errors import RemoteProtocolError
from smtpwarden.protocol.events import (
    BadCommand,
    Bdat,
    Body,
    Command,
    MailFrom,
    RcptTo,
    Signal,
    Verb,
)
from smtpwarden.protocol.records import iso_time, text_of
from smtpwarden.protocol.server import ServerConnection

log = logging.getLogger("smtpwarden.sink")

_EHLO_KEYWORDS = (
    b"PIPELINING",
    b"8BITMIME",
    b"SMTPUTF8",
    b"CHUNKING",
    b"BINARYMIME",
    b"ENHANCEDSTATUSCODES",
    b"DSN",
)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unstuff(data: bytes) -> bytes:
    """Undo RFC 5321 4.5.2 dot-stuffing of a DATA body (terminator removed)."""
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


class Mailbox:
    """The folder a sink writes to."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._serial = itertools.count(1)
        self._tag = secrets.token_hex(2)

    def store(self, message: bytes, envelope: dict[str, object]) -> str:
        """Write a message and its envelope durably; return its id."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        ident = f"{stamp}-{self._tag}{next(self._serial):06d}"
        envelope["id"] = ident
        _write_durably(self.folder / f"{ident}.eml", message)
        _write_durably(
            self.folder / f"{ident}.json", orjson.dumps(envelope, option=orjson.OPT_INDENT_2)
        )
        _fsync_dir(self.folder)
        return ident


class SinkSession(asyncio.Protocol):
    """One client of the sink."""

    transport: asyncio.Transport

    def __init__(self, mailbox: Mailbox, hostname: str) -> None:
        self.mailbox = mailbox
        self.hostname = hostname.encode()
        self.core = ServerConnection()
        self.helo = ""
        self.peer = ""
        self._reset()

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_to: list[str] = []
        self.chunks: list[bytes] = []
        self.body_kind = ""
        self._last = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = f"{host}:{port}"
        self.transport.write(b"220 " + self.hostname + b" ESMTP smtpwarden sink\r\n")

    def data_received(self, data: bytes) -> None:
        self.core.receive_data(data)
        out: list[bytes] = []
        while not self.transport.is_closing():
            try:
                event = self.core.next_event()
            except RemoteProtocolError as error:
                out.append(error.reply_bytes())
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            if isinstance(event, Signal):
                break
            if isinstance(event, Body):
                reply = self._body(event)
            elif isinstance(event, BadCommand):
                reply = event.error.reply_bytes()
            else:
                reply = self._command(event)
            if reply:
                out.append(reply)
            if isinstance(event, Command) and event.verb is Verb.QUIT:
                self.transport.write(b"".join(out))
                self.transport.close()
                return
        if out:
            self.transport.write(b"".join(out))

    def _command(self, command: Command) -> bytes:
        verb = command.verb
        match verb:
            case Verb.EHLO:
                self.helo = text_of(command.argument)
                self._reset()
                lines = [self.hostname, *_EHLO_KEYWORDS]
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
                return b"354 End data with <CR><LF>.<CR><LF>\r\n"
            case Verb.BDAT:
                assert isinstance(command, Bdat)  # noqa: S101 - the parser's type for BDAT
                self.body_kind = "bdat" if self.rcpt_to and self.body_kind != "data" else "refused"
                self._last = command.last
                if command.size == 0:
                    return self._end_chunk()
                return b""
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
        if self.body_kind != "refused":
            self.chunks.append(bytes(body.data))
        if not body.done:
            return b""
        if self.body_kind == "data":
            return self._save(unstuff(b"".join(self.chunks)[:-3]))
        return self._end_chunk()

    def _end_chunk(self) -> bytes:
        if self.body_kind == "refused":
            self._reset()
            return b"503 5.5.1 Error: need MAIL and RCPT before BDAT\r\n"
        if not self._last:
            size = sum(len(chunk) for chunk in self.chunks)
            return f"250 2.0.0 Ok: {size} octets received\r\n".encode()
        return self._save(b"".join(self.chunks))

    def _save(self, message: bytes) -> bytes:
        envelope: dict[str, object] = {
            "received": iso_time(time.time()),
            "client": self.peer,
            "helo": self.helo,
            "mail_from": self.mail_from,
            "rcpt_to": self.rcpt_to,
            "body": self.body_kind,
            "size": len(message),
        }
        self._reset()
        try:
            ident = self.mailbox.store(message, envelope)
        except OSError as error:
            log.error("sink: cannot store message: %s", error)
            return b"451 4.3.0 Error: cannot store message\r\n"
        return f"250 2.0.0 Ok: queued as {ident}\r\n".encode()


async def start_sink(
    host: str, port: int, folder: str | os.PathLike[str], hostname: str
) -> asyncio.Server:
    """Start a sink server; the caller owns (and closes) it."""
    mailbox = Mailbox(folder)
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SinkSession(mailbox, hostname), host, port, reuse_address=True
    )


def run_sink(*, host: str, port: int, folder: str, event_loop: LoopChoice = "auto") -> int:
    """Run a sink until SIGINT or SIGTERM; return the exit code."""
    factory, name = loop_factory(event_loop)

    async def main() -> None:
        server = await start_sink(host, port, folder, socket.getfqdn())
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
