"""The client-facing reader: command lines, DATA bodies and BDAT chunks.

``ServerConnection`` turns the client's bytes into events (h11 style):
``receive_data`` adds bytes, ``next_event`` returns the next event,
``NEED_DATA`` or ``PAUSED``. It never writes: replies are the relay's
business, because most of them come from the upstream.

After DATA the reader pauses: only the upstream's answer says whether the
next bytes are a message body (354) or more commands, so the shell calls
``start_data`` or ``refuse_data``. A BDAT chunk needs no such wait: its size
says where it ends (RFC 3030 2).

AUTH (RFC 4954 4) pauses the same way, after the command and after each
response line: on a 334 the next line is a response, not a command, so the
shell calls ``expect_auth_response`` and the next event is an
``AuthResponse``; on any other reply (or its own refusal) it calls
``auth_done``. STARTTLS (RFC 3207) pauses too: nothing the client pipelined
after it is parsed until the shell either calls ``discard`` (section 5: such
octets are never executed), does the handshake and calls
``reset_after_tls`` (section 4.2: a fresh session), or calls ``refuse_tls``.

Hot path: in DATA and BDAT each received chunk is handed on as the same
object, or a memoryview of it, never joined or copied.
"""

from __future__ import annotations

import enum

from smtpwarden.protocol.auth import RESPONSE_LINE, parse_auth_command
from smtpwarden.protocol.body import DataReader
from smtpwarden.protocol.commands import parse_command
from smtpwarden.protocol.errors import (
    AuthLineTooLong,
    BadAuthResponse,
    BareLineEnding,
    LineTooLong,
    LocalProtocolError,
    RemoteProtocolError,
)
from smtpwarden.protocol.errors import BadCommand as BadCommandError
from smtpwarden.protocol.events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthResponse,
    BadCommand,
    Bdat,
    Body,
    Command,
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

# RFC 4954 4: every party must handle the largest base64 response of the
# mechanisms it supports, "12288 octets for all IETF approved mechanisms" at
# the time of writing. That much base64, plus the CRLF.
MAX_AUTH_LINE_BYTES = 12288 + 2


class _Flaw(enum.Enum):
    """Why a complete line cannot be read as one."""

    TOO_LONG = "too long"
    BARE_LINE_ENDING = "bare CR or LF"


class ServerConnection:
    """Reads one client's byte stream. See the module docstring."""

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_data",
        "_discarding",
        "_dropping_chunk",
        "_machine",
        "_max_auth_line",
        "_max_line",
        "_pos",
    )

    def __init__(
        self,
        *,
        max_line_bytes: int = MAX_COMMAND_LINE_BYTES,
        max_auth_line_bytes: int = MAX_AUTH_LINE_BYTES,
    ) -> None:
        self._buf = b""
        self._pos = 0
        self._machine = ServerMachine()
        self._data = DataReader()
        self._chunk_left = 0
        self._max_line = max_line_bytes
        self._max_auth_line = max_auth_line_bytes
        self._discarding = False  # dropping an overlong line
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

        ``PAUSED`` comes after DATA, AUTH (and each AUTH response) and
        STARTTLS, until the shell says what the upstream's reply (or its own
        decision) means; see the module docstring.

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
            case ServerState.AUTH_RESPONSE:
                return self._next_auth_response()
            case ServerState.AWAIT_DATA | ServerState.AWAIT_AUTH | ServerState.AWAIT_TLS:
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

    def expect_auth_response(self) -> None:
        """The upstream answered AUTH, or a response, with 334.

        The next line is the client's response: the next event is an
        ``AuthResponse`` (or a ``BadCommand`` with ``verb`` AUTH, after
        which the reader is back to commands and the shell cancels the
        exchange upstream).
        """
        self._machine.move(ServerInput.AUTH_CHALLENGE)

    def auth_done(self) -> None:
        """The AUTH exchange ended (any reply but 334): commands follow."""
        self._machine.move(ServerInput.AUTH_ENDED)

    def discard(self) -> int:
        """Drop every buffered, unparsed octet after STARTTLS; return how many.

        RFC 3207 5: what the client pipelined after STARTTLS must never be
        executed. The reader stays paused until ``reset_after_tls``.
        """
        self._machine.move(ServerInput.DISCARD)
        return self._drop()

    def reset_after_tls(self) -> int:
        """The TLS handshake is done: start again as a fresh session.

        RFC 3207 4.2: nothing learnt before TLS is kept. Octets still
        buffered (received in the clear after ``discard``) are dropped too;
        returns how many.
        """
        self._machine.move(ServerInput.TLS_STARTED)
        self._data.reset()
        self._chunk_left = 0
        self._discarding = False
        self._dropping_chunk = False
        return self._drop()

    def refuse_tls(self) -> None:
        """STARTTLS was refused: the session goes on in the clear."""
        self._machine.move(ServerInput.TLS_REFUSED)

    def _drop(self) -> int:
        dropped = len(self._buf) - self._pos
        self._buf = b""
        self._pos = 0
        return dropped

    def _take_line(self, limit: int) -> tuple[bytes, _Flaw | None] | None:
        """Take the next complete line, CRLF included; None until there is one.

        A line longer than ``limit`` is not buffered past it: its octets are
        dropped up to its LF, and what is left of it comes back as TOO_LONG.
        """
        buf = self._buf
        pos = self._pos
        end = buf.find(b"\n", pos)
        if end < 0:
            if len(buf) - pos > limit:
                # Stop buffering; drop octets up to the next LF, then reply.
                self._discarding = True
                self._buf = b""
                self._pos = 0
            return None
        end += 1
        self._pos = end
        line = buf[pos:end]
        if self._discarding or end - pos > limit:
            self._discarding = False
            return line, _Flaw.TOO_LONG
        if end - pos < 2 or buf[end - 2] != 13 or line.count(b"\r") != 1:  # 13 is CR
            # RFC 5321 2.3.8: a bare LF or CR is never a line ending here.
            return line, _Flaw.BARE_LINE_ENDING
        return line, None

    def _next_command(self) -> Event | Signal:
        # RFC 4954 4: an AUTH line with its initial response may be as long
        # as a response line (OAuth tokens pass 2 KiB).
        head = self._buf[self._pos : self._pos + 5]
        limit = self._max_auth_line if head.upper() == b"AUTH " else self._max_line
        taken = self._take_line(limit)
        if taken is None:
            return NEED_DATA
        line, flaw = taken
        if flaw is _Flaw.TOO_LONG:
            error = LineTooLong(f"command line longer than {limit} octets")
            return BadCommand(line=line, verb=None, error=error)
        if flaw is _Flaw.BARE_LINE_ENDING:
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
        elif isinstance(event, Command):
            match event.verb:
                case Verb.DATA:
                    self._machine.move(ServerInput.DATA_COMMAND)
                case Verb.AUTH:
                    self._machine.move(ServerInput.AUTH_COMMAND)
                    return _auth_event(event)
                case Verb.STARTTLS:
                    self._machine.move(ServerInput.STARTTLS_COMMAND)
                case _:
                    pass
        return event

    def _next_auth_response(self) -> Event | Signal:
        taken = self._take_line(self._max_auth_line)
        if taken is None:
            return NEED_DATA
        line, flaw = taken
        error: RemoteProtocolError | None = None
        if flaw is _Flaw.TOO_LONG:
            error = AuthLineTooLong(f"AUTH response longer than {self._max_auth_line} octets")
        elif flaw is _Flaw.BARE_LINE_ENDING:
            error = BareLineEnding("bare CR or LF in AUTH response")
        elif not RESPONSE_LINE.match(line):
            error = BadAuthResponse("AUTH response is neither base64 nor *")
        if error is not None:
            # The line may hold a credential: none of it is kept.
            self._machine.move(ServerInput.AUTH_RESPONSE_REFUSED)
            return BadCommand(line=b"", verb=Verb.AUTH, error=error)
        self._machine.move(ServerInput.END_OF_AUTH_RESPONSE)
        return AuthResponse(line=line)

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


def _auth_event(command: Command) -> Auth:
    start = parse_auth_command(command.line)
    return Auth(
        verb=command.verb,
        argument=command.argument,
        line=command.line,
        mechanism="" if start is None else start.mechanism,
        initial=None if start is None else start.initial,
    )
