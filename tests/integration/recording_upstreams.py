"""Upstream servers for integration tests that record what reaches them.

``RawUpstream`` speaks just enough SMTP over plain blocking sockets to keep
every received byte exactly as it arrived: command lines with their CRLF,
DATA sections with their dot-stuffing and terminator, BDAT chunks. It is the
witness for PRODUCT.md invariant 2 (the bytes that reach the upstream are the
bytes the client sent) and invariant 3 (no smuggled end of data). Its
scaffolding, ``SocketUpstream`` (the listener, a thread per connection, the
waits and the close) and ``_LineReader``, serve the other scripted upstreams
too.

``AiosmtpdUpstream`` runs aiosmtpd, a real SMTP server implementation, and
records each envelope its handler is given and each connection that ends.

Both run in background threads and serve on 127.0.0.1 with an ephemeral port.
Every wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from aiosmtpd.smtp import SMTP, Envelope, Session

WAIT_S = 10.0  # how long a test waits for an upstream to see something
# A hung peer must not keep a thread alive for the rest of the run.
CONNECTION_TIMEOUT_S = 30.0
ACCEPT_POLL_S = 0.05  # how often the accept loop looks at its stop flag

DEFAULT_EHLO = (
    "PIPELINING",
    "SIZE 10240000",
    "8BITMIME",
    "SMTPUTF8",
    "CHUNKING",
    "ENHANCEDSTATUSCODES",
    "DSN",
)
END_OF_DATA = b"\r\n.\r\n"


class PeerClosed(Exception):
    """The connection ended before what the server was reading arrived."""


@dataclass
class RawConnection:
    """What one upstream connection received, byte for byte."""

    commands: list[bytes] = field(default_factory=list)  # each line, CRLF included
    # Each completed DATA section as received after the 354: body, dot-stuffing
    # and the final "<CRLF>.<CRLF>" (its leading CRLF is the body's last line end).
    data: list[bytes] = field(default_factory=list)
    bdat_chunks: list[bytes] = field(default_factory=list)
    bdat_messages: list[bytes] = field(default_factory=list)  # chunks joined at LAST
    partial: bytes = b""  # what was left unread or unfinished when the connection ended
    in_data_at_end: bool = False  # the connection ended inside a DATA section
    quit: bool = False
    ended: bool = False

    def command_text(self) -> bytes:
        return b"".join(self.commands)


class _LineReader:
    """Buffered reads of lines and counted octets from a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise PeerClosed
        self.buf += chunk

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line, self.buf = self.buf[: end + 1], self.buf[end + 1 :]
                return line
            self._more()

    def exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._more()
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def data_section(self) -> bytes:
        # The DATA line ended with CRLF, so a section that begins ".\r\n" is
        # an empty message: search as if CRLF came just before the buffer.
        while True:
            found = (b"\r\n" + self.buf).find(END_OF_DATA)
            if found >= 0:
                end = found + len(END_OF_DATA) - 2
                out, self.buf = self.buf[:end], self.buf[end:]
                return out
            self._more()


def wait_until(
    changed: threading.Condition, holds: Callable[[], bool], timeout: float, what: str
) -> None:
    """Block on ``changed`` until ``holds()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with changed:
        while not holds():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{what}: condition not met within {timeout} s")
            changed.wait(left)


class _Record(Protocol):
    ended: bool  # set when the connection is over


Record = TypeVar("Record", bound=_Record)


class SocketUpstream(Generic[Record]):
    """A server on plain blocking sockets, one thread per connection.

    A subclass sets what its ``_serve`` needs, then calls this ``__init__``
    with the record class of a connection: it binds 127.0.0.1 (``port`` 0,
    the default, an ephemeral port) and starts accepting. ``_serve`` plays
    one connection, notifies ``_changed`` whenever its record changes and
    sets ``ended`` last. ``name`` names the threads and the failures.
    """

    name = "upstream"

    def __init__(self, record: Callable[[], Record], *, port: int = 0) -> None:
        self._new_record = record
        self.connections: list[Record] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(ACCEPT_POLL_S)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name=self.name, daemon=True)
        self._acceptor.start()

    @property
    def config(self) -> dict[str, object]:
        """The relay's upstream section for this server."""
        return {"kind": "smtp", "host": "127.0.0.1", "port": self.port}

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(CONNECTION_TIMEOUT_S)
            record = self._new_record()
            with self._changed:
                self.connections.append(record)
                self._open.append(sock)
                self._changed.notify_all()
            worker = threading.Thread(
                target=self._serve, args=(sock, record), name=f"{self.name}-conn", daemon=True
            )
            self._threads.append(worker)
            worker.start()

    def _serve(self, sock: socket.socket, record: Record) -> None:
        raise NotImplementedError

    def wait_for(self, predicate: Callable[[list[Record]], bool], timeout: float = WAIT_S) -> None:
        """Block until ``predicate(connections)`` holds; fail after ``timeout``."""
        wait_until(self._changed, lambda: predicate(self.connections), timeout, self.name)

    def wait_all_ended(self, count: int = 1, timeout: float = WAIT_S) -> list[Record]:
        """Wait until at least ``count`` connections came and all of them ended."""
        self.wait_for(
            lambda conns: len(conns) >= count and all(conn.ended for conn in conns), timeout
        )
        return list(self.connections)

    def close(self) -> None:
        self._stop.set()
        # Shut down, not just closed: that wakes the accept loop at once.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(WAIT_S)
        with self._changed:
            for sock in self._open:
                with contextlib.suppress(OSError, ValueError):
                    sock.shutdown(socket.SHUT_RDWR)
        for worker in self._threads:
            worker.join(WAIT_S)
        assert not any(worker.is_alive() for worker in self._threads), "upstream thread hung"


class RawUpstream(SocketUpstream[RawConnection]):
    """A scripted SMTP server that stores exactly what it receives.

    ``ehlo`` lists the keywords it offers after the greeting line;
    ``replies`` maps an upper-cased verb (or "BANNER", or "." for the end of
    data) to raw reply bytes that replace the normal reply; "RCPT <path>"
    (the path as the client wrote it) replaces it for one recipient.
    ``port`` 0 (the default) binds an ephemeral port.
    """

    name = "raw-upstream"

    def __init__(
        self,
        *,
        ehlo: tuple[str, ...] = DEFAULT_EHLO,
        replies: dict[str, bytes] | None = None,
        port: int = 0,
    ) -> None:
        self.ehlo = ehlo
        self.replies = dict(replies or {})
        super().__init__(RawConnection, port=port)

    def _reply(self, key: str, default: bytes) -> bytes:
        return self.replies.get(key, default)

    def _ehlo_reply(self) -> bytes:
        lines = ["upstream.test", *self.ehlo]
        out = [f"250-{line}\r\n" for line in lines[:-1]]
        out.append(f"250 {lines[-1]}\r\n")
        return "".join(out).encode("ascii")

    def _serve(self, sock: socket.socket, record: RawConnection) -> None:
        reader = _LineReader(sock)
        chunks: list[bytes] = []
        try:
            sock.sendall(self._reply("BANNER", b"220 upstream.test ESMTP raw recorder\r\n"))
            while True:
                line = reader.line()
                with self._changed:
                    record.commands.append(line)
                    self._changed.notify_all()
                words = line.split()
                verb = words[0].upper().decode("ascii", "replace") if words else ""
                if verb == "DATA":
                    sock.sendall(self._reply("DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n"))
                    record.in_data_at_end = True
                    section = reader.data_section()
                    with self._changed:
                        record.in_data_at_end = False
                        record.data.append(section)
                        self._changed.notify_all()
                    sock.sendall(self._reply(".", b"250 2.0.0 Ok: queued\r\n"))
                elif verb == "BDAT":
                    size = int(words[1])
                    chunk = reader.exactly(size)
                    last = len(words) > 2 and words[2].upper() == b"LAST"
                    with self._changed:
                        record.bdat_chunks.append(chunk)
                        chunks.append(chunk)
                        if last:
                            record.bdat_messages.append(b"".join(chunks))
                            chunks.clear()
                        self._changed.notify_all()
                    default = b"250 2.0.0 Ok: queued\r\n" if last else b"250 2.0.0 Ok\r\n"
                    sock.sendall(self._reply("BDAT LAST" if last else "BDAT", default))
                elif verb == "QUIT":
                    record.quit = True
                    sock.sendall(self._reply("QUIT", b"221 2.0.0 Bye\r\n"))
                    return
                elif verb in ("EHLO", "HELO"):
                    sock.sendall(self._reply(verb, self._ehlo_reply()))
                elif verb == "MAIL":
                    sock.sendall(self._reply("MAIL", b"250 2.1.0 Ok\r\n"))
                elif verb == "RCPT":
                    path = line.partition(b":")[2].split(b" ")[0].strip().decode("ascii", "replace")
                    default = self._reply("RCPT", b"250 2.1.5 Ok\r\n")
                    sock.sendall(self._reply(f"RCPT {path}", default))
                elif verb in ("RSET", "NOOP"):
                    sock.sendall(self._reply(verb, b"250 2.0.0 Ok\r\n"))
                else:
                    sock.sendall(self._reply(verb, b"502 5.5.2 Error: command not recognized\r\n"))
        except (PeerClosed, OSError):
            pass
        finally:
            with self._changed:
                record.partial = reader.buf
                record.ended = True
                self._changed.notify_all()
            sock.close()


@dataclass
class Delivery:
    """One message aiosmtpd's handler was given."""

    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[str]
    content: bytes  # as aiosmtpd hands it over: dot-stuffing removed


class _RecordingHandler:
    def __init__(self, owner: AiosmtpdUpstream) -> None:
        self.owner = owner

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        delivery = Delivery(
            mail_from=envelope.mail_from or "",
            mail_options=list(envelope.mail_options),
            rcpt_tos=list(envelope.rcpt_tos),
            rcpt_options=list(envelope.rcpt_options),
            content=content,
        )
        self.owner.record(lambda: self.owner.deliveries.append(delivery))
        return "250 2.0.0 Ok: recorded"


class _RecordingSMTP(SMTP):
    """aiosmtpd's server, telling its owner when a connection ends."""

    def __init__(self, owner: AiosmtpdUpstream, **kwargs: Any) -> None:
        super().__init__(_RecordingHandler(owner), **kwargs)
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.owner.record(lambda: setattr(self.owner, "opened", self.owner.opened + 1))

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.owner.record(lambda: setattr(self.owner, "closed", self.owner.closed + 1))


class ThreadedServer:
    """A server on an asyncio loop of its own, in a thread, for tests that block.

    A subclass gives ``factory`` (its protocol, such as aiosmtpd's SMTP) and
    calls ``_start`` at the end of its ``__init__``. ``changed`` is notified
    by whoever changes what the test waits for (see ``wait_for``). An error
    in the server's thread is raised in the test's, at start or at close.
    """

    name = "server"

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    @property
    def config(self) -> dict[str, object]:
        return {"kind": "smtp", "host": "127.0.0.1", "port": self.port}

    def factory(self) -> asyncio.BaseProtocol:
        raise NotImplementedError

    def _start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._thread.start()
        if not self._ready.wait(WAIT_S):
            raise AssertionError(f"{self.name} did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        async def serve() -> None:
            loop = asyncio.get_running_loop()
            self._loop = loop
            self._stop = asyncio.Event()
            server = await loop.create_server(self.factory, "127.0.0.1", 0, ssl=self._ssl)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
            server.close()
            await server.wait_closed()

        try:
            asyncio.run(serve())
        except BaseException as error:  # reported to the test thread
            self._error = error
            self._ready.set()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
        wait_until(self.changed, predicate, timeout, self.name)

    def close(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), f"{self.name} did not stop"
        if self._error is not None:
            raise self._error


class AiosmtpdUpstream(ThreadedServer):
    """aiosmtpd on its own asyncio loop in a thread, recording deliveries."""

    name = "aiosmtpd upstream"

    def __init__(self) -> None:
        super().__init__()
        self.deliveries: list[Delivery] = []
        self.opened = 0
        self.closed = 0
        self._start()

    def factory(self) -> asyncio.BaseProtocol:
        return _RecordingSMTP(self, hostname="aiosmtpd.test", enable_SMTPUTF8=True)

    def record(self, change: Callable[[], object]) -> None:
        with self.changed:
            change()
            self.changed.notify_all()
