"""The client-facing reader: command lines, DATA bodies and BDAT chunks.

``ServerConnection`` turns the client's bytes into events (h11 style):
``receive_data`` adds bytes, ``next_event`` returns the next event,
``NEED_DATA`` or ``PAUSED``. It never writes: replies are the relay's
business, because most of them come from the upstream.

After DATA the reader pauses: only the upstream's answer says whether the
next bytes are a message body (354) or more commands, so the shell calls
``start_data`` or ``refuse_data``. A BDAT chunk needs no such wait: its size
says where it ends (RFC 3030 2).

Hot path: in DATA and BDAT each received chunk is handed on as the same
object, or a memoryview of it, never joined or copied.
"""

from __future__ import annotations

from smtpwarden.protocol.body import DataReader
from smtpwarden.protocol.commands import parse_command
from smtpwarden.protocol.errors import BadCommand as BadCommandError
from smtpwarden.protocol.errors import BareLineEnding, LineTooLong, LocalProtocolError
from smtpwarden.protocol.events import (
    NEED_DATA,
    PAUSED,
    BadCommand,
    Bdat,
    Body,
    Event,
    Signal,
    Verb,
)
from smtpwarden.protocol.state import ServerInput, ServerMachine, ServerState

# RFC 3030 sets no bound on a chunk. This one fits a signed 32-bit integer,
# so that every upstream counts the chunk the same way smtpwarden does.
MAX_CHUNK_BYTES = 2**31 - 1

# RFC 5321 4.5.3.1.4 sets 512 octets for a command line, CRLF included, and
# lets extensions raise it (RFC 1870 SIZE, RFC 3461 DSN and RFC 6531 SMTPUTF8
# parameters all lengthen MAIL and RCPT). 2048 is Postfix's line_length_limit.
MAX_COMMAND_LINE_BYTES = 2048


class ServerConnection:
    """Reads one client's byte stream. See the module docstring."""

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_data",
        "_discarding",
        "_dropping_chunk",
        "_machine",
        "_max_line",
        "_pos",
    )

    def __init__(self, *, max_line_bytes: int = MAX_COMMAND_LINE_BYTES) -> None:
        self._buf = b""
        self._pos = 0
        self._machine = ServerMachine()
        self._data = DataReader()
        self._chunk_left = 0
        self._max_line = max_line_bytes
        self._discarding = False  # dropping an overlong command line
        self._dropping_chunk = False  # dropping a refused BDAT chunk

    @property
    def state(self) -> ServerState:
        """The reader's current state."""
        return self._machine.state

    @property
    def buffered(self) -> int:
        """Received octets not yet turned into events."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the client."""
        if self._pos >= len(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos :] + data
        self._pos = 0

    def next_event(self) -> Event | Signal:
        """Return the next event, ``NEED_DATA`` or ``PAUSED``.

        Raises ``BareLineEnding`` (a ``RemoteProtocolError``) when message
        data holds a bare CR or LF; the connection is then in ERROR and must
        be closed after sending ``error.reply_bytes()``. Raises
        ``LocalProtocolError`` if called in ERROR.
        """
        match self._machine.state:
            case ServerState.COMMAND:
                return self._next_command()
            case ServerState.DATA:
                return self._next_body()
            case ServerState.CHUNK:
                return self._next_chunk()
            case ServerState.AWAIT_DATA:
                return PAUSED
            case ServerState.ERROR:
                raise LocalProtocolError("the connection is in ERROR")

    def start_data(self) -> None:
        """The upstream answered DATA with 354: what follows is the body."""
        self._machine.move(ServerInput.DATA_ACCEPTED)
        self._data.reset()

    def refuse_data(self) -> None:
        """DATA was refused: what follows are commands again."""
        self._machine.move(ServerInput.DATA_REFUSED)

    def _next_command(self) -> Event | Signal:
        buf = self._buf
        pos = self._pos
        end = buf.find(b"\n", pos)
        if end < 0:
            if len(buf) - pos > self._max_line:
                # Stop buffering; drop octets up to the next LF, then reply.
                self._discarding = True
                self._buf = b""
                self._pos = 0
            return NEED_DATA
        end += 1
        self._pos = end
        line = buf[pos:end]
        if self._discarding or end - pos > self._max_line:
            self._discarding = False
            error = LineTooLong(f"command line longer than {self._max_line} octets")
            return BadCommand(line=line, verb=None, error=error)
        if end - pos < 2 or buf[end - 2] != 13 or line.count(b"\r") != 1:  # 13 is CR
            # RFC 5321 2.3.8: a bare LF or CR is never a line ending here.
            return BadCommand(
                line=line, verb=None, error=BareLineEnding("bare CR or LF in command")
            )
        event = parse_command(line)
        if isinstance(event, Bdat):
            self._machine.move(ServerInput.BDAT_COMMAND)
            self._chunk_left = event.size
            if event.size > MAX_CHUNK_BYTES:
                # RFC 3030 2: a refused chunk is still read and discarded,
                # so that its octets are never taken for commands.
                self._dropping_chunk = True
                refused = BadCommandError(
                    "BDAT chunk too large", code=552, enhanced="5.3.4", text="Chunk too large"
                )
                return BadCommand(line=line, verb=Verb.BDAT, error=refused)
        elif not isinstance(event, BadCommand) and event.verb is Verb.DATA:
            self._machine.move(ServerInput.DATA_COMMAND)
        return event

    def _next_body(self) -> Event | Signal:
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            return NEED_DATA
        try:
            stop, done = self._data.scan(buf, pos)
        except BareLineEnding:
            self._machine.fail()
            raise
        if stop == pos:
            return NEED_DATA  # only a CR, held until its LF arrives
        self._pos = stop
        if done:
            self._machine.move(ServerInput.END_OF_DATA)
        whole = pos == 0 and stop == len(buf)
        return Body(data=buf if whole else memoryview(buf)[pos:stop], done=done)

    def _next_chunk(self) -> Event | Signal:
        buf = self._buf
        pos = self._pos
        size = min(len(buf) - pos, self._chunk_left)
        if size == 0 and self._chunk_left:
            return NEED_DATA
        self._chunk_left -= size
        self._pos = pos + size
        done = self._chunk_left == 0
        if done:
            self._machine.move(ServerInput.END_OF_CHUNK)
        if self._dropping_chunk:
            self._dropping_chunk = not done
            return self.next_event()
        whole = pos == 0 and size == len(buf)
        return Body(data=buf if whole else memoryview(buf)[pos : pos + size], done=done)
