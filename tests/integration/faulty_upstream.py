"""An SMTP upstream that breaks one chosen phase of each session on purpose.

``FaultyUpstream`` answers like an ordinary server (the replies of
``recording_upstreams.RawUpstream``) until the phase it is told to break;
there it plays a ``Fault`` instead of its usual reply: garbage, a reply
nobody asked for, an overlong or endless reply, a slow drip, silence, a
421, a reset or a close. Offering STARTTLS, it can break the TLS handshake
as well (the "starttls" phase: everything after the command STARTTLS).

It records what reached it (command lines, DATA sections, BDAT messages)
and whether the fault was played, so a test can tell that the case it
meant really happened and whether a message reached this upstream.

It serves on 127.0.0.1 with an ephemeral port, one thread per connection.
Every delay a fault plays is a wait on the server's stop event, so closing
the server ends every fault at once; readiness is the bound listening
socket, never a sleep.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from integration.recording_upstreams import DEFAULT_EHLO, PeerClosed, SocketUpstream, _LineReader
from integration.tls_upstreams import STARTTLS_READY

PHASES = ("banner", "ehlo", "mail", "rcpt", "data", "dot", "bdat", "bdat_last", "quit")
"""The phases of a session a fault can break, in the order a session meets them."""

BANNER = b"220 faulty.test ESMTP faulty\r\n"
QUEUED = b"250 2.0.0 Ok: queued by faulty.test\r\n"
# The usual reply at each phase (EHLO's is built from the keywords offered).
NORMAL: dict[str, bytes] = {
    "banner": BANNER,
    "mail": b"250 2.1.0 Ok\r\n",
    "rcpt": b"250 2.1.5 Ok\r\n",
    "data": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    "dot": QUEUED,
    "bdat": b"250 2.0.0 Ok\r\n",
    "bdat_last": QUEUED,
    "quit": b"221 2.0.0 Bye\r\n",
    "starttls": STARTTLS_READY,
}


@dataclass
class FaultyConnection:
    """What one connection received, and whether the fault was played on it."""

    commands: list[bytes] = field(default_factory=list)  # each line, CRLF included
    data: list[bytes] = field(default_factory=list)  # DATA sections, terminator included
    bdat_messages: list[bytes] = field(default_factory=list)  # chunks joined at LAST
    struck: bool = False  # the fault was played
    handshake_error: str | None = None  # why a TLS handshake failed, if one did
    ended: bool = False


class Wire:
    """One connection as a fault plays on it.

    Every method survives a peer that has gone: sending then returns False,
    and the fault should stop.
    """

    def __init__(
        self,
        sock: socket.socket,
        stop: threading.Event,
        context: ssl.SSLContext | None,
        record: FaultyConnection,
        changed: threading.Condition,
    ) -> None:
        self.sock = sock
        self.stop = stop
        self.context = context
        self.record = record
        self._changed = changed

    def send(self, data: bytes) -> bool:
        """Write ``data``; False if the peer is gone or the server is closing."""
        if self.stop.is_set():
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds`` (the fault's own delay); False if the server is closing."""
        return not self.stop.wait(seconds)

    def receive(self) -> bytes:
        """One read from the peer (b"" once it has closed)."""
        try:
            return self.sock.recv(65536)
        except OSError:
            return b""

    def hold(self) -> None:
        """Say nothing more; drop what arrives until the peer closes."""
        while self.receive():
            pass

    def close(self) -> None:
        """A plain close: FIN, then wait for the peer to close its side."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.hold()

    def reset(self) -> None:
        """Close with SO_LINGER 0: the peer gets a TCP reset."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def handshake(self) -> None:
        """Run the server side of a TLS handshake with the server's context."""
        if self.context is None:
            return  # nothing to serve TLS with: the connection just ends
        try:
            secure = self.context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as error:
            with self._changed:
                self.record.handshake_error = str(error) or type(error).__name__
                self._changed.notify_all()
            return
        # A handshake that succeeded against a test that expected it to fail:
        # keep the session going the only way this server knows, in silence.
        with secure:
            while True:
                try:
                    if not secure.recv(65536):
                        return
                except OSError:
                    return


Play = Callable[[Wire, bytes], None]


@dataclass(frozen=True)
class Fault:
    """What the upstream does instead of its usual reply at the broken phase.

    ``play`` gets the connection and the usual reply. ``goes_on``: after
    playing, the server goes on with the session as usual (the fault sent
    the usual reply along with something it should not have); otherwise
    the connection ends when ``play`` returns.
    """

    name: str
    play: Play
    goes_on: bool = False


# --- Fault builders -------------------------------------------------------------


def send_then_hold(data: bytes) -> Play:
    """Send ``data`` instead of the reply, then say nothing more."""

    def play(wire: Wire, normal: bytes) -> None:
        if wire.send(data):
            wire.hold()

    return play


def code_of(normal: bytes) -> bytes:
    """The three-digit code of the usual reply at a phase."""
    return normal[:3]


def cut_line(wire: Wire, normal: bytes) -> None:
    """The start of a reply line with the phase's code, never ended, then a close (FIN)."""
    if wire.send(code_of(normal) + b" cut short, no line end"):
        wire.close()


def extra_before(extra: bytes) -> Play:
    """A reply nobody asked for, then the usual one, in one write."""

    def play(wire: Wire, normal: bytes) -> None:
        wire.send(extra + normal)

    return play


def extra_after(extra: bytes) -> Play:
    """The usual reply, then one nobody asked for, in one write."""

    def play(wire: Wire, normal: bytes) -> None:
        wire.send(normal + extra)

    return play


def extra_later(extra: bytes, pause_s: float) -> Play:
    """The usual reply, then, ``pause_s`` later, one nobody asked for."""

    def play(wire: Wire, normal: bytes) -> None:
        if wire.send(normal):
            time.sleep(pause_s)  # the fault itself: a stray reply on its own, later
            wire.send(extra)

    return play


def overlong(line_bytes: int) -> Play:
    """One reply line of ``line_bytes`` octets (CRLF included), with the phase's code."""

    def play(wire: Wire, normal: bytes) -> None:
        line = code_of(normal) + b" " + b"x" * (line_bytes - 6) + b"\r\n"
        if wire.send(line):
            wire.hold()

    return play


ENDLESS_BATCH = 64  # continuation lines per write
ENDLESS_MAX_BYTES = 16 << 20  # a bound for the server's sake, far past any limit


def endless() -> Play:
    """A multi-line reply that never ends, as fast as the peer takes it."""

    def play(wire: Wire, normal: bytes) -> None:
        batch = (code_of(normal) + b"-x\r\n") * ENDLESS_BATCH
        sent = 0
        while sent < ENDLESS_MAX_BYTES and wire.send(batch):
            sent += len(batch)
        wire.hold()

    return play


def endless_drip(every_s: float, max_lines: int = 1000) -> Play:
    """A multi-line reply that never ends, one line every ``every_s`` seconds."""

    def play(wire: Wire, normal: bytes) -> None:
        line = code_of(normal) + b"-x\r\n"
        for _ in range(max_lines):
            if not wire.send(line) or not wire.pause(every_s):
                return
        wire.hold()

    return play


def drip(every_s: float) -> Play:
    """The usual reply, one octet every ``every_s`` seconds."""

    def play(wire: Wire, normal: bytes) -> None:
        for octet in normal:
            if not wire.pause(every_s) or not wire.send(bytes([octet])):
                return
        wire.hold()

    return play


def silence(wire: Wire, normal: bytes) -> None:
    """No reply at all; the connection stays open."""
    wire.hold()


def reset(wire: Wire, normal: bytes) -> None:
    """A TCP reset instead of the reply."""
    wire.reset()


def close(wire: Wire, normal: bytes) -> None:
    """A plain close (FIN) instead of the reply."""
    wire.close()


# --- TLS faults, after the command STARTTLS --------------------------------------


def after_client_hello(then: Callable[[Wire], None]) -> Play:
    """Say 220 to STARTTLS, read the client's first handshake flight, then ``then``."""

    def play(wire: Wire, normal: bytes) -> None:
        if wire.send(normal) and wire.receive():
            then(wire)

    return play


def garbage_for_handshake(wire: Wire) -> None:
    """Plain text where the server's TLS handshake should be."""
    if wire.send(b"hello, this is not TLS\r\n"):
        wire.hold()


def handshake(wire: Wire, normal: bytes) -> None:
    """Say 220 to STARTTLS and run the handshake with the server's context."""
    if wire.send(normal):
        wire.handshake()


# --- The server ------------------------------------------------------------------


class FaultyUpstream(SocketUpstream[FaultyConnection]):
    """A scripted SMTP server that plays ``fault`` at ``phase`` on every connection.

    ``phase`` is one of ``PHASES`` or "starttls". ``offer_starttls`` puts
    STARTTLS in its EHLO reply; ``context`` is the TLS context of the
    handshake faults that run one.
    """

    name = "faulty-upstream"

    def __init__(
        self,
        phase: str,
        fault: Fault,
        *,
        ehlo: tuple[str, ...] = DEFAULT_EHLO,
        offer_starttls: bool = False,
        context: ssl.SSLContext | None = None,
    ) -> None:
        assert phase in (*PHASES, "starttls"), phase
        self.phase = phase
        self.fault = fault
        self.ehlo = ehlo
        self.offer_starttls = offer_starttls
        self.context = context
        super().__init__(FaultyConnection)

    def _ehlo_reply(self) -> bytes:
        keywords = [*self.ehlo, "STARTTLS"] if self.offer_starttls else list(self.ehlo)
        lines = ["faulty.test", *keywords]
        out = [f"250-{line}\r\n" for line in lines[:-1]] + [f"250 {lines[-1]}\r\n"]
        return "".join(out).encode("ascii")

    def _keep(self, into: list[bytes], item: bytes) -> None:
        with self._changed:
            into.append(item)
            self._changed.notify_all()

    def _answer(self, wire: Wire, record: FaultyConnection, phase: str, normal: bytes) -> bool:
        """Give the usual reply, or play the fault at its phase; True: the connection ends."""
        if phase != self.phase:
            return not wire.send(normal)
        with self._changed:
            record.struck = True
            self._changed.notify_all()
        self.fault.play(wire, normal)
        return not self.fault.goes_on

    def _serve(self, sock: socket.socket, record: FaultyConnection) -> None:
        wire = Wire(sock, self._stop, self.context, record, self._changed)
        lines = _LineReader(sock)
        chunks: list[bytes] = []
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # drips go out at once
            if self._answer(wire, record, "banner", BANNER):
                return
            while True:
                line = lines.line()
                self._keep(record.commands, line)
                words = line.split()
                verb = words[0].upper() if words else b""
                if verb == b"DATA":
                    if self._answer(wire, record, "data", NORMAL["data"]):
                        return
                    section = lines.data_section()
                    self._keep(record.data, section)
                    if self._answer(wire, record, "dot", NORMAL["dot"]):
                        return
                elif verb == b"BDAT":
                    chunks.append(lines.exactly(int(words[1])))
                    last = len(words) > 2 and words[2].upper() == b"LAST"
                    if last:
                        self._keep(record.bdat_messages, b"".join(chunks))
                        chunks.clear()
                    phase = "bdat_last" if last else "bdat"
                    if self._answer(wire, record, phase, NORMAL[phase]):
                        return
                elif verb == b"STARTTLS" and self.offer_starttls:
                    # The session never goes on past STARTTLS: the faults
                    # break it, and a plain 220 is followed by a handshake
                    # with ``context`` and then silence.
                    if not self._answer(wire, record, "starttls", STARTTLS_READY):
                        wire.handshake()
                    return
                elif verb in (b"EHLO", b"HELO"):
                    if self._answer(wire, record, "ehlo", self._ehlo_reply()):
                        return
                elif verb == b"MAIL":
                    if self._answer(wire, record, "mail", NORMAL["mail"]):
                        return
                elif verb == b"RCPT":
                    if self._answer(wire, record, "rcpt", NORMAL["rcpt"]):
                        return
                elif verb == b"QUIT":
                    self._answer(wire, record, "quit", NORMAL["quit"])
                    return
                elif verb in (b"RSET", b"NOOP"):
                    if not wire.send(b"250 2.0.0 Ok\r\n"):
                        return
                elif not wire.send(b"502 5.5.2 Error: command not recognized\r\n"):
                    return
        except (PeerClosed, OSError):
            pass
        finally:
            with self._changed:
                record.ended = True
                self._changed.notify_all()
            sock.close()
