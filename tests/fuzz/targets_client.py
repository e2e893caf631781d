"""Fuzz targets over the client's stream: ``server`` and ``body``.

``server`` feeds a stream to ``ServerConnection`` whole and cut in two and
checks every event on the way; ``body`` checks DATA framing and
dot-stuffing on one message cut into chunks, and sends it through
``run_server`` as DATA and as BDAT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from targets_common import InvariantBroken, check, check_error_reply, has_bare, u16

from smtpwarden.protocol import grammar
from smtpwarden.protocol.auth import RESPONSE_LINE, parse_auth_command
from smtpwarden.protocol.body import END_OF_DATA, DataReader
from smtpwarden.protocol.errors import BareLineEnding, RemoteProtocolError
from smtpwarden.protocol.events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthResponse,
    BadCommand,
    Bdat,
    Body,
    Command,
    Signal,
    Verb,
)
from smtpwarden.protocol.server import MAX_AUTH_LINE_BYTES, ServerConnection
from smtpwarden.protocol.state import ServerState
from smtpwarden.protocol.stuffing import stuff

# A bound on events per input octet, so that a reader that stops consuming is
# reported instead of spinning.
_EVENTS_PER_OCTET = 4
_EVENTS_SLACK = 64


# ---------------------------------------------------------------------------
# server: ServerConnection, the reader of the client's stream
# ---------------------------------------------------------------------------

# (max_line_bytes, max_auth_line_bytes): the defaults, the configuration's
# smallest command line, and two tiny ones that reach the limits quickly.
_SERVER_LIMITS = ((2048, MAX_AUTH_LINE_BYTES), (512, MAX_AUTH_LINE_BYTES), (24, 48), (16, 16))

TraceItem = tuple[object, ...]


@dataclass(slots=True)
class _ServerRun:
    """One feeding of a stream to a ``ServerConnection``, described as a trace."""

    stream: bytes
    max_line: int
    max_auth: int
    tape: int
    trace: list[TraceItem]
    conn: ServerConnection
    fed: bytes = b""
    decisions: int = 0
    section: bytes = b""  # the DATA body or BDAT chunk read so far
    chunk_size: int = 0  # size of the BDAT chunk being read
    events: int = 0
    stopped: bool = False

    def decide(self) -> bool:
        bit = (self.tape >> (self.decisions % 16)) & 1
        self.decisions += 1
        return bool(bit)

    def unread(self) -> bytes:
        """The octets received and not yet turned into events.

        ``buffered`` always counts a suffix of what was fed: the reader
        only ever drops octets from the front of its buffer.
        """
        left = self.conn.buffered
        return self.fed[len(self.fed) - left :] if left else b""

    def add_body(self, data: bytes, done: bool) -> None:
        last = self.trace[-1] if self.trace else None
        if last is not None and last[0] == "body" and last[2] is False:
            previous = last[1]
            assert isinstance(previous, bytes)
            self.trace[-1] = ("body", previous + data, done)
        else:
            self.trace.append(("body", data, done))


def _server_pause(run: _ServerRun) -> None:
    conn = run.conn
    state = conn.state
    choice = run.decide()
    run.trace.append(("decision", state, choice))
    if state is ServerState.AWAIT_DATA:
        if choice:
            conn.start_data()
            run.section = b""
            check(conn.state is ServerState.DATA, "start_data did not enter DATA")
        else:
            conn.refuse_data()
            check(conn.state is ServerState.COMMAND, "refuse_data did not return to commands")
    elif state is ServerState.AWAIT_AUTH:
        if choice:
            conn.expect_auth_response()
            check(conn.state is ServerState.AUTH_RESPONSE, "334 did not expect a response")
        else:
            conn.auth_done()
            check(conn.state is ServerState.COMMAND, "auth_done did not return to commands")
    elif state is ServerState.AWAIT_TLS:
        if choice:
            conn.refuse_tls()
            check(conn.state is ServerState.COMMAND, "refuse_tls did not return to commands")
        else:
            # What follows would come over TLS: the comparison stops here.
            buffered = conn.buffered
            check(conn.discard() == buffered, "discard did not report what it dropped")
            check(conn.buffered == 0, "octets left after discard")
            check(conn.reset_after_tls() == 0, "octets left after discard and TLS")
            check(conn.state is ServerState.COMMAND, "TLS did not start a fresh session")
            run.trace.append(("tls",))
            run.stopped = True
    else:
        raise InvariantBroken(f"PAUSED in state {state}")


def _server_command(run: _ServerRun, event: Command, before: ServerState) -> None:
    conn = run.conn
    line = event.line
    check(before is ServerState.COMMAND, f"command event in state {before}")
    check(line.endswith(b"\r\n"), "command line without CRLF")
    check(line.count(b"\r") == 1 and line.count(b"\n") == 1, "bare CR or LF in a command")
    limit = run.max_auth if line[:5].upper() == b"AUTH " else run.max_line
    check(len(line) <= limit, f"command line of {len(line)} octets past {limit}")
    check(grammar.COMMAND_CONTROL.search(line[:-2]) is None, "control octet in a command")
    check(line[: len(event.verb.value)].upper() == event.verb.value.encode(), "verb mismatch")
    expected = {
        Verb.DATA: ServerState.AWAIT_DATA,
        Verb.BDAT: ServerState.CHUNK,
        Verb.AUTH: ServerState.AWAIT_AUTH,
        Verb.STARTTLS: ServerState.AWAIT_TLS,
    }.get(event.verb, ServerState.COMMAND)
    check(conn.state is expected, f"{event.verb} left the reader in {conn.state}")
    if isinstance(event, Bdat):
        check(event.verb is Verb.BDAT, "Bdat event for another verb")
        run.chunk_size = event.size
        run.section = b""
    if isinstance(event, Auth):
        start = parse_auth_command(line)
        mechanism = "" if start is None else start.mechanism
        initial = None if start is None else start.initial
        check(event.mechanism == mechanism, "AUTH mechanism differs from parse_auth_command")
        check(event.initial == initial, "AUTH initial response differs")
    run.trace.append(("command", event))


def _server_bad(run: _ServerRun, event: BadCommand, before: ServerState) -> None:
    conn = run.conn
    error = event.error
    check(isinstance(error, RemoteProtocolError), "BadCommand without a protocol error")
    check_error_reply(error)
    too_long = type(error).__name__ in ("LineTooLong", "AuthLineTooLong")
    if before is ServerState.AUTH_RESPONSE:
        check(event.line == b"", "a refused AUTH response kept its octets")
        check(event.verb is Verb.AUTH, "refused AUTH response without verb AUTH")
        check(conn.state is ServerState.COMMAND, "refused AUTH response did not end AUTH")
    elif event.verb is Verb.BDAT and error.code == 552:
        check(conn.state is ServerState.CHUNK, "refused BDAT chunk is not read and dropped")
    else:
        check(before is ServerState.COMMAND, f"BadCommand in state {before}")
        check(conn.state is ServerState.COMMAND, f"BadCommand left the reader in {conn.state}")
    check(event.line.endswith(b"\n") or event.line == b"", "BadCommand line cut short")
    # A line too long is kept only from where buffering stopped, which
    # depends on how the stream was cut: compare everything but that.
    line = None if too_long else event.line
    run.trace.append(("bad", line, event.verb, type(error), error.code, error.enhanced, error.text))


def _server_body(run: _ServerRun, event: Body, before: ServerState) -> None:
    conn = run.conn
    data = bytes(event.data)
    run.section += data
    run.add_body(data, event.done)
    if before is ServerState.DATA:
        check(bool(data), "empty DATA body event")
        if not event.done:
            return
        section = run.section
        # The body ends at the first "<CRLF>.<CRLF>", counting the CRLF
        # that ended the DATA line, and holds no bare CR or LF (smuggling).
        check(section.endswith(END_OF_DATA[2:]), "DATA ended without <CRLF>.<CRLF>")
        first = (b"\r\n" + section).find(END_OF_DATA)
        check(first == len(section) - 3, "DATA ended past the first end marker")
        check(not has_bare(section), "DATA body with a bare CR or LF was released")
        check(conn.state is ServerState.COMMAND, "end of DATA did not return to commands")
    elif before is ServerState.CHUNK:
        check(len(run.section) <= run.chunk_size, "BDAT chunk longer than its size")
        if event.done:
            check(len(run.section) == run.chunk_size, "BDAT chunk shorter than its size")
            check(conn.state is ServerState.COMMAND, "end of chunk did not return to commands")
    else:
        raise InvariantBroken(f"Body event in state {before}")


def _server_error(run: _ServerRun, error: RemoteProtocolError, before: ServerState) -> None:
    # server.py: next_event raises only BareLineEnding, only in DATA, and
    # the reader is then in ERROR. The octets judged must hold the bare CR or
    # LF: the body so far and what is buffered, up to the first end marker,
    # less a final CR that is still waiting for its LF.
    check(isinstance(error, BareLineEnding), f"next_event raised {type(error).__name__}")
    check(before is ServerState.DATA, f"BareLineEnding raised in state {before}")
    check(run.conn.state is ServerState.ERROR, "reader not in ERROR after BareLineEnding")
    check_error_reply(error)
    region = run.section + run.unread()
    end = (b"\r\n" + region).find(END_OF_DATA)
    judged = region[: end + 3] if end >= 0 else region.removesuffix(b"\r")
    check(has_bare(judged), "BareLineEnding raised for a body without a bare CR or LF")
    run.trace.append(("error", type(error), error.code, error.enhanced, error.text))
    run.stopped = True


def _server_need_data(run: _ServerRun, state: ServerState) -> None:
    unread = run.unread()
    if state is ServerState.DATA:
        check(unread in (b"", b"\r"), f"DATA holds back {len(unread)} octets")
    elif state is ServerState.CHUNK:
        check(unread == b"", "BDAT holds back octets")
    else:
        check(b"\n" not in unread, "a complete line is left unread")


def _server_drain(run: _ServerRun) -> None:
    conn = run.conn
    budget = _EVENTS_PER_OCTET * len(run.stream) + _EVENTS_SLACK
    while not run.stopped:
        run.events += 1
        check(run.events <= budget, "the reader makes no progress")
        before = conn.state
        try:
            event = conn.next_event()
        except RemoteProtocolError as error:
            _server_error(run, error, before)
            return
        if event is NEED_DATA:
            _server_need_data(run, before)
            return
        if event is PAUSED:
            _server_pause(run)
        elif isinstance(event, Signal):
            raise InvariantBroken(f"unknown signal {event}")
        elif isinstance(event, Command):
            _server_command(run, event, before)
        elif isinstance(event, BadCommand):
            _server_bad(run, event, before)
        elif isinstance(event, AuthResponse):
            check(before is ServerState.AUTH_RESPONSE, f"AuthResponse in state {before}")
            check(RESPONSE_LINE.match(event.line) is not None, "AuthResponse not base64 or *")
            check(conn.state is ServerState.AWAIT_AUTH, "AuthResponse did not pause")
            run.trace.append(("response", event.line))
        else:
            _server_body(run, event, before)


def run_server(
    stream: bytes, chunks: list[bytes], *, limits: int = 0, tape: int = 0
) -> list[TraceItem]:
    """Feed ``chunks`` (which join to ``stream``) to a ServerConnection.

    Returns the trace: commands, refusals, merged bodies, the shell's
    decisions at each pause (bits of ``tape``), an error or TLS, and the
    final state. Every event is checked on the way.
    """
    max_line, max_auth = _SERVER_LIMITS[limits % len(_SERVER_LIMITS)]
    conn = ServerConnection(max_line_bytes=max_line, max_auth_line_bytes=max_auth)
    run = _ServerRun(stream, max_line, max_auth, tape, [], conn)
    for chunk in chunks:
        if run.stopped:
            break
        if not chunk:
            continue
        run.fed += chunk
        conn.receive_data(chunk)
        _server_drain(run)
    # A split may release the clean part of a body before the chunk that
    # holds a bare CR or LF; whole, nothing of it comes out.
    trace = run.trace
    if len(trace) > 1 and trace[-1][0] == "error" and trace[-2][0] == "body" and not trace[-2][2]:
        del trace[-2]
    run.trace.append(("state", conn.state))
    return run.trace


def fuzz_server(data: bytes) -> None:
    """ServerConnection, fed a stream whole and cut in two: same events.

    Layout: octet 0 picks the line limits, octets 1-2 the cut offset, octets
    3-4 the shell's answers at each pause (bit i: accept DATA, answer AUTH
    with 334, refuse STARTTLS; cycled), the rest is the client's stream.
    """
    if len(data) < 5:
        return
    limits, cut, tape, stream = data[0], u16(data[1:3]), u16(data[3:5]), data[5:]
    cut %= len(stream) + 1
    whole = run_server(stream, [stream], limits=limits, tape=tape)
    split = run_server(stream, [stream[:cut], stream[cut:]], limits=limits, tape=tape)
    check(whole == split, f"events differ when the stream is cut at {cut}")


# ---------------------------------------------------------------------------
# body: DataReader, stuff, and both through ServerConnection (DATA and BDAT)
# ---------------------------------------------------------------------------


def _cuts(data: bytes, count: int) -> list[int]:
    """``count`` cut offsets read as big-endian u16 from ``data``."""
    return [u16(data[2 * i : 2 * i + 2]) for i in range(count)]


def _pieces(message: bytes, offsets: list[int]) -> list[bytes]:
    """``message`` cut at ``offsets`` (each taken modulo the length), in order."""
    points = sorted({o % (len(message) + 1) for o in offsets})
    pieces: list[bytes] = []
    last = 0
    for point in points:
        pieces.append(message[last:point])
        last = point
    pieces.append(message[last:])
    return pieces


def unstuff(section: bytes) -> bytes:
    """What a receiver keeps of a DATA section: terminator and stuffing removed."""
    check(section.endswith(b".\r\n"), "DATA section without its terminator")
    return re.sub(rb"(?m)^\.", b"", section[:-3])


def scan_data(chunks: list[bytes]) -> tuple[bytes, bool, bool]:
    """Run a DataReader over ``chunks`` as ServerConnection does.

    Returns (octets released, whether the end marker was found, whether
    BareLineEnding was raised). Held-back octets are offered again with the
    next chunk.
    """
    reader = DataReader()
    released = b""
    pending = b""
    for chunk in chunks:
        buf = pending + chunk
        if not buf:
            continue
        try:
            stop, done = reader.scan(buf, 0)
        except BareLineEnding as error:
            check(error.code == 521, "DATA refusal is not 521")
            check_error_reply(error)
            return released, False, True
        check(0 <= stop <= len(buf), "scan stopped outside the buffer")
        released += buf[:stop]
        if done:
            return released, True, False
        check(len(buf) - stop <= 1, "scan held back more than a CR")
        pending = buf[stop:]
    return released, False, False


def _check_data_reader(message: bytes, pieces: list[bytes]) -> None:
    released, done, refused = scan_data(pieces)
    end = (b"\r\n" + message).find(END_OF_DATA)
    if end >= 0:
        region, ends = message[: end + 3], True
    else:
        region, ends = (message[:-1] if message.endswith(b"\r") else message), False
    if has_bare(region):
        check(refused, "DataReader let a bare CR or LF through")
        check(region.startswith(released), "DataReader released octets it then refused")
        check(not has_bare(released), "DataReader released a bare CR or LF")
        return
    check(not refused, "DataReader refused clean data")
    check(done == ends, "DataReader found the end marker in the wrong place")
    check(released == region, "DataReader released other octets than the body")


def _check_stuffing(message: bytes, pieces: list[bytes]) -> bytes | None:
    out: list[bytes] = []
    try:
        for part in stuff(pieces):
            out.append(part)
    except BareLineEnding as error:
        check(has_bare(message), "stuff refused a message without bare CR or LF")
        check(error.code == 554, "stuffing refusal is not 554")
        check_error_reply(error)
        check(not has_bare(b"".join(out)), "stuff yielded a bare CR or LF before refusing")
        return None
    section = b"".join(out)
    check(not has_bare(message), "stuff accepted a bare CR or LF")
    check(section == b"".join(stuff([message])), "stuffing depends on the chunks")
    expected = message if not message or message.endswith(b"\r\n") else message + b"\r\n"
    check(unstuff(section) == expected, "unstuffing the section does not give the message")
    first = (b"\r\n" + section).find(END_OF_DATA)
    check(first == len(section) - 3, "the section ends before its terminator")
    released, done, refused = scan_data([section])
    check(done and not refused and released == section, "DataReader misreads a stuffed section")
    return section


def _check_bdat_session(pieces: list[bytes], cut: int) -> None:
    wire = b""
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        wire += b"BDAT %d%s\r\n" % (len(piece), b" LAST" if last else b"") + piece
    wire += b"QUIT\r\n"
    cut %= len(wire) + 1
    for chunks in ([wire], [wire[:cut], wire[cut:]]):
        trace = run_server(wire, chunks)
        bodies = [item[1] for item in trace if item[0] == "body"]
        check(bodies == pieces, "BDAT chunks read back differently")
        check(trace[-2][0] == "command", "BDAT octets taken for commands")
        quit_event = trace[-2][1]
        check(isinstance(quit_event, Command) and quit_event.verb is Verb.QUIT, "QUIT not read")


def _check_data_session(section: bytes, cut: int) -> None:
    wire = b"DATA\r\n" + section + b"QUIT\r\n"
    cut %= len(wire) + 1
    for chunks in ([wire], [wire[:cut], wire[cut:]]):
        trace = run_server(wire, chunks, tape=1)
        kinds = [item[0] for item in trace]
        check(kinds == ["command", "decision", "body", "command", "state"], f"trace {kinds}")
        check(trace[2] == ("body", section, True), "DATA section read back differently")


def fuzz_body(data: bytes) -> None:
    """DATA framing and dot-stuffing, on one message cut into chunks.

    Layout: octet 0 (mod 8) is how many cut offsets follow, as u16 pairs;
    the rest is the message. Checks: DataReader against a plain reading of
    RFC 5321; stuff then unstuff is the identity; a stuffed section read by
    ServerConnection as DATA, and the chunks sent as BDAT, come back whole.
    """
    if not data:
        return
    count = data[0] % 8
    offsets = _cuts(data[1:], count)
    message = data[1 + 2 * count :]
    pieces = _pieces(message, offsets)
    _check_data_reader(message, pieces)
    section = _check_stuffing(message, pieces)
    cut = offsets[0] if offsets else len(message) // 2
    _check_bdat_session(pieces, cut)
    if section is not None:
        _check_data_session(section, cut)
