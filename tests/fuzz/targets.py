"""Fuzz targets over the sans-I/O core, as plain functions of one input.

Each target takes the fuzzer's bytes and returns normally when the code under
test behaved: it accepted the input, or refused it with the exception its
module documents for bad peer input (``RemoteProtocolError`` and its
subclasses, ``ProxyProtocolError``, the spool's ``CorruptEntry``). Anything
else escapes and is a crash: another exception, or ``InvariantBroken`` when a
property the module promises does not hold.

``fuzz_core.py`` hands these functions to Atheris; the unit test
``test_fuzz_regressions.py`` replays the seeds and saved crashes through them
without it. Nothing here imports Atheris.

Several targets read a few leading octets as settings (where to cut the
stream, which limits to use, how the shell answers); the layout of each is in
its docstring and in README.md.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from smtpwarden.protocol import grammar
from smtpwarden.protocol.auth import RESPONSE_LINE, AuthIdentity, identity, parse_auth_command
from smtpwarden.protocol.body import END_OF_DATA, DataReader
from smtpwarden.protocol.commands import parse_command
from smtpwarden.protocol.errors import (
    BareLineEnding,
    MalformedReply,
    ProxyProtocolError,
    RemoteProtocolError,
)
from smtpwarden.protocol.events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthResponse,
    BadCommand,
    Bdat,
    Body,
    Command,
    MailFrom,
    RcptTo,
    Signal,
    Verb,
)
from smtpwarden.protocol.extensions import ExtensionPolicy, parse_ehlo, reconcile
from smtpwarden.protocol.proxy import (
    MAX_V1_LINE_BYTES,
    V2_FIXED_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderReader,
    encode_v1,
    encode_v2,
)
from smtpwarden.protocol.replies import Reply, ReplyReader, parse_reply
from smtpwarden.protocol.server import MAX_AUTH_LINE_BYTES, ServerConnection
from smtpwarden.protocol.state import ServerState
from smtpwarden.protocol.stuffing import stuff
from smtpwarden.spool.codec import decode, encode
from smtpwarden.spool.errors import CorruptEntry

Target = Callable[[bytes], None]


class InvariantBroken(Exception):
    """A property the code under test promises did not hold for this input."""


def check(condition: bool, what: str) -> None:
    """Raise ``InvariantBroken`` with ``what`` unless ``condition`` holds."""
    if not condition:
        raise InvariantBroken(what)


# A CR not followed by LF, or an LF not preceded by CR (RFC 5321 2.3.8).
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# What an error's reply_bytes() must look like: one reply line, no control bytes.
_ERROR_REPLY = re.compile(rb"[45][0-9][0-9] [245]\.[0-9]{1,3}\.[0-9]{1,3} [\x20-\x7e]+\r\n\Z")
# A bound on events per input octet, so that a reader that stops consuming is
# reported instead of spinning.
_EVENTS_PER_OCTET = 4
_EVENTS_SLACK = 64


def has_bare(data: bytes) -> bool:
    """True if ``data`` holds a CR or LF that is not part of a CRLF pair."""
    return _BARE.search(data) is not None


def u16(data: bytes) -> int:
    """Big-endian value of up to two octets (0 for none)."""
    return int.from_bytes(data[:2], "big")


def _check_error_reply(error: RemoteProtocolError) -> None:
    reply = error.reply_bytes()
    check(_ERROR_REPLY.match(reply) is not None, f"bad error reply {reply!r}")


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
    _check_error_reply(error)
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
    _check_error_reply(error)
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
# replies: ReplyReader, the reader of the upstream's stream
# ---------------------------------------------------------------------------

_BYTE_BY_BYTE_MAX = 256


def _reply_limits(flags: int) -> tuple[int, int]:
    if not flags & 1:
        return 2048, 128
    return 8 + (flags >> 1) % 64, 1 + (flags >> 5)


def read_replies(stream: bytes, chunks: list[bytes], max_line: int, max_lines: int) -> list[object]:
    """Feed ``chunks`` to a ReplyReader; return the replies and how it ended."""
    reader = ReplyReader(max_line_bytes=max_line, max_lines=max_lines)
    out: list[object] = []
    consumed = 0
    fed = 0
    for chunk in chunks:
        if not chunk:
            continue
        reader.receive_data(chunk)
        fed += len(chunk)
        for _ in range(len(stream) + 2):
            try:
                reply = reader.next_reply()
            except MalformedReply:
                # Only that it failed, and where: the message quotes octets
                # past the line, which depend on how the stream was cut.
                out.append(("error",))
                return out
            if reply is None:
                break
            _check_reply(reply, stream, consumed, max_line, max_lines)
            consumed += len(reply.raw)
            out.append(reply)
        else:
            raise InvariantBroken("next_reply keeps returning replies")
        check(reader.buffered == fed - consumed, "buffered does not count the unread octets")
    try:
        reader.receive_eof()
    except MalformedReply:
        check(reader.buffered > 0, "receive_eof refused a stream that ended between replies")
        out.append(("eof error",))
    else:
        check(reader.buffered == 0, "receive_eof accepted a reply cut short")
        out.append(("eof",))
    return out


def _check_reply(reply: Reply, stream: bytes, consumed: int, max_line: int, limit: int) -> None:
    raw = reply.raw
    check(stream[consumed : consumed + len(raw)] == raw, "Reply.raw is not the octets received")
    check(200 <= reply.code <= 559, f"reply code {reply.code}")
    check(1 <= len(reply.lines) <= limit, f"reply of {len(reply.lines)} lines")
    lines = raw.split(b"\r\n")
    check(lines[-1] == b"" and len(lines) - 1 == len(reply.lines), "raw lines differ from lines")
    code = b"%d" % reply.code
    for index, (line, text) in enumerate(zip(lines[:-1], reply.lines, strict=True)):
        check(len(line) + 2 <= max_line, "reply line past the limit")
        check(b"\r" not in line and b"\n" not in line, "bare CR or LF in a reply")
        check(line[:3] == code, "reply code changed inside a reply")
        last = index == len(reply.lines) - 1
        check(line[3:4] in ((b" ", b"") if last else (b"-",)), "bad separator")
        check(line[4:] == text, "Reply.lines differs from the raw line")
    check(parse_reply(raw) == reply, "parse_reply reads Reply.raw differently")
    _ = (reply.text, reply.enhanced)


def fuzz_replies(data: bytes) -> None:
    """ReplyReader, fed whole, cut in two and octet by octet: same replies.

    Layout: octet 0 picks the limits (bit 0 clear: the defaults), octets 1-2
    the cut offset; the rest is the upstream's stream.
    """
    if len(data) < 3:
        return
    max_line, max_lines = _reply_limits(data[0])
    stream = data[3:]
    cut = u16(data[1:3]) % (len(stream) + 1)
    whole = read_replies(stream, [stream], max_line, max_lines)
    split = read_replies(stream, [stream[:cut], stream[cut:]], max_line, max_lines)
    check(whole == split, f"replies differ when the stream is cut at {cut}")
    if len(stream) <= _BYTE_BY_BYTE_MAX:
        octets = [stream[i : i + 1] for i in range(len(stream))]
        check(read_replies(stream, octets, max_line, max_lines) == whole, "octet by octet differs")


# ---------------------------------------------------------------------------
# commands: parse_command on one line
# ---------------------------------------------------------------------------


def command_line(data: bytes) -> bytes:
    """One command line as ServerConnection hands it on: no CR or LF but its CRLF."""
    text = data.replace(b"\r", b"").replace(b"\n", b"")
    return text[: MAX_AUTH_LINE_BYTES - 2] + b"\r\n"


def _swap_verb_case(line: bytes) -> bytes:
    word, space, rest = line.partition(b" ")
    return word.swapcase() + space + rest


def fuzz_commands(data: bytes) -> None:
    """parse_command: never raises, and what it returns is consistent.

    The input is one line; CR and LF are removed and a CRLF added, as the
    reader guarantees.
    """
    line = command_line(data)
    event = parse_command(line)
    check(event.line == line, "event line is not the line parsed")
    again = parse_command(_swap_verb_case(line))
    check(type(again) is type(event), "verb case changes the parse")
    if isinstance(event, BadCommand):
        check(isinstance(event.error, RemoteProtocolError), "BadCommand without protocol error")
        _check_error_reply(event.error)
        if isinstance(again, BadCommand):
            check(again.error.code == event.error.code, "verb case changes the refusal")
        return
    assert isinstance(again, Command)
    check(again.verb is event.verb, "verb case changes the verb")
    check(line[: len(event.verb.value)].upper() == event.verb.value.encode(), "verb mismatch")
    check(event.argument == event.argument.strip(b" \t"), "argument not stripped")
    if isinstance(event, MailFrom | RcptTo):
        check(event.verb in (Verb.MAIL, Verb.RCPT), "path event for another verb")
        check(event.path in event.argument, "path is not part of the argument")
        for keyword, value in event.params:
            check(grammar.ESMTP_KEYWORD.match(keyword) is not None, "bad keyword accepted")
            check(keyword == keyword.upper(), "keyword not upper-cased")
            check(value is None or grammar.ESMTP_VALUE.match(value) is not None, "bad value")
    if isinstance(event, Bdat):
        check(0 <= event.size < 10**10, "BDAT size outside 1*10DIGIT")
        wire = parse_command(event.wire)
        check(
            isinstance(wire, Bdat) and (wire.size, wire.last) == (event.size, event.last),
            "Bdat.wire does not parse back to the same chunk",
        )
    if event.verb in (Verb.HELO, Verb.EHLO):
        check(bool(event.argument), "HELO or EHLO without a domain accepted")
    if event.verb is Verb.AUTH:
        start = parse_auth_command(line)
        if start is not None:
            check(start.mechanism == start.mechanism.upper(), "mechanism not upper-cased")


# ---------------------------------------------------------------------------
# extensions: parse_ehlo and reconcile
# ---------------------------------------------------------------------------

_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")
_MAX_SIZES = (0, 1000, 10485760, 35882577)
_KEPT = frozenset(
    {
        "SIZE",
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "VRFY",
        "EXPN",
        "HELP",
        "ETRN",
        "DELIVERBY",
        "MT-PRIORITY",
        "FUTURERELEASE",
        "NO-SOLICITING",
        "LIMITS",
        "RRVS",
    }
)
_CODE_PREFIX = re.compile(rb"[0-9]{3}[ -]?")
# Parses what reconcile writes: no cap on lines, STARTTLS may add one.
_UNCAPPED_LINES = 1 << 20


def _policy(flags: int) -> ExtensionPolicy:
    auth = tuple(name for bit, name in enumerate(_MECHANISMS) if flags >> (2 + bit) & 1)
    return ExtensionPolicy(
        chunking=bool(flags & 1),
        starttls=bool(flags & 2),
        auth=auth,
        max_size=_MAX_SIZES[flags >> 6],
    )


def _reply_or_none(raw: bytes) -> Reply | None:
    try:
        return parse_reply(raw)
    except MalformedReply:
        return None


def _ehlo_replies(text: bytes) -> list[Reply]:
    """The reply as sent, if it is one, and the text rebuilt as a 250 reply."""
    lines = [line.replace(b"\r", b"") for line in text.split(b"\n")]
    while len(lines) > 1 and not lines[-1]:
        lines.pop()
    lines = [line[m.end() :] if (m := _CODE_PREFIX.match(line)) else line for line in lines]
    raw = b"".join(b"250-" + line + b"\r\n" for line in lines[:-1]) + b"250 " + lines[-1] + b"\r\n"
    found = (_reply_or_none(text), _reply_or_none(raw))
    return [reply for reply in found if reply is not None]


def _read_one(raw: bytes) -> Reply:
    reader = ReplyReader(max_lines=_UNCAPPED_LINES, max_line_bytes=1 << 20)
    reader.receive_data(raw)
    reply = reader.next_reply()
    check(reply is not None and reader.buffered == 0, "reconcile wrote more or less than a reply")
    assert reply is not None
    return reply


def _check_reconcile(reply: Reply, policy: ExtensionPolicy) -> None:
    parsed = parse_ehlo(reply)
    for keyword in parsed.keywords:
        check(keyword == keyword.upper() and keyword != "", "keyword not upper-cased")
    out, offered = reconcile(reply, policy)
    check(offered == parsed, "reconcile parsed the reply differently from parse_ehlo")
    if reply.code != 250:
        check(out == reply.raw, "a reply other than 250 was changed")
        return
    sent = _read_one(out)
    check(sent.code == 250, "reconcile changed the reply code")
    check(sent.lines[0] == reply.lines[0], "reconcile changed the greeting line")
    allowed = set(_KEPT)
    if policy.chunking:
        allowed |= {"CHUNKING", "BINARYMIME"}
    tls = 0
    for line in sent.lines[1:]:
        word, _, params = line.partition(b" ")
        keyword = word.decode("ascii", "replace").upper()
        if keyword == "STARTTLS":
            check(line == b"STARTTLS", "STARTTLS line with parameters")
            tls += 1
        elif keyword == "AUTH":
            names = params.split()
            check(bool(names), "AUTH offered without a mechanism")
            check(set(names) <= {n.encode() for n in policy.auth}, "AUTH mechanism not allowed")
        else:
            check(keyword in allowed, f"extension {keyword!r} offered to the client")
        if keyword == "SIZE" and policy.max_size:
            value = params.strip()
            check(value.isdigit() and 0 < int(value) <= policy.max_size, "SIZE past the limit")
    check(tls == (1 if policy.starttls else 0), "STARTTLS offered against the policy")
    again, _ = reconcile(sent, policy)
    check(again == out, "reconcile is not idempotent")


def fuzz_extensions(data: bytes) -> None:
    """parse_ehlo and reconcile on an EHLO reply, under a policy.

    Layout: octet 0 is the policy (bit 0 chunking, bit 1 STARTTLS, bits 2-5
    the AUTH mechanisms allowed, bits 6-7 the size limit); the rest is the
    reply, used as sent if it parses and also rebuilt line by line as 250.
    """
    if not data:
        return
    policy = _policy(data[0])
    for reply in _ehlo_replies(data[1:]):
        _check_reconcile(reply, policy)


# ---------------------------------------------------------------------------
# proxy: ProxyHeaderReader
# ---------------------------------------------------------------------------

ProxyOutcome = tuple[str, ProxyHeader | None, bytes]


def read_proxy(chunks: list[bytes]) -> ProxyOutcome:
    """Feed ``chunks``; return ("header", header, client octets), "error" or "short"."""
    reader = ProxyHeaderReader()
    header: ProxyHeader | None = None
    after = b""
    for chunk in chunks:
        if not chunk:
            continue
        if header is not None:
            after += chunk
            continue
        reader.receive_data(chunk)
        try:
            header = reader.next_header()
        except ProxyProtocolError:
            return ("error", None, b"")
        if header is not None:
            after = reader.rest
    if header is None:
        try:
            reader.receive_eof()
        except ProxyProtocolError:
            return ("short", None, b"")
        raise InvariantBroken("receive_eof accepted a connection without a header")
    return ("header", header, after)


def _check_proxy_header(stream: bytes, header: ProxyHeader, rest: bytes) -> None:
    check(stream.endswith(rest), "rest is not the octets after the header")
    size = len(stream) - len(rest)
    head = stream[:size]
    if header.version == 1:
        check(head.startswith(b"PROXY ") and head.endswith(b"\r\n"), "v1 header framing")
        check(len(head) <= MAX_V1_LINE_BYTES, "v1 header past 107 octets")
        check(head.count(b"\r") == 1 and head.count(b"\n") == 1, "bare CR or LF in v1 header")
    else:
        check(header.version == 2 and head.startswith(V2_SIGNATURE), "v2 header framing")
        check(size == V2_FIXED_BYTES + u16(head[14:16]), "v2 length does not match")
    check((header.source is None) == (header.destination is None), "one address without other")
    if header.local:
        local = read_proxy([encode_v2(None, None, local=True)])[1]
        check(local is not None and local.local, "LOCAL header does not round-trip")
    if header.source is None or header.destination is None:
        return
    for host, port in (header.source, header.destination):
        check(0 <= port <= 0xFFFF, "port out of range")
        check(host != "", "empty host")
    encoders = {
        "v1": encode_v1(header.source, header.destination),
        "v2": encode_v2(header.source, header.destination),
    }
    for version, encoded in encoders.items():
        again = read_proxy([encoded])[1]
        check(again is not None, f"encode_{version} output does not parse")
        assert again is not None
        check(again.source == header.source, f"{version} source does not round-trip")
        check(again.destination == header.destination, f"{version} destination differs")


def fuzz_proxy(data: bytes) -> None:
    """ProxyHeaderReader, fed whole, cut in two and octet by octet: same result.

    Layout: octets 0-1 are the cut offset; the rest is the connection's
    first octets. Addresses read are encoded again and must read back.
    """
    if len(data) < 2:
        return
    stream = data[2:]
    cut = u16(data) % (len(stream) + 1)
    whole = read_proxy([stream])
    split = read_proxy([stream[:cut], stream[cut:]])
    check(whole == split, f"PROXY header read differently when cut at {cut}")
    if len(stream) <= _BYTE_BY_BYTE_MAX:
        octets = [stream[i : i + 1] for i in range(len(stream))]
        check(read_proxy(octets) == whole, "PROXY header read differently octet by octet")
    kind, header, rest = whole
    if kind == "header":
        assert header is not None
        _check_proxy_header(stream, header, rest)


# ---------------------------------------------------------------------------
# auth: parse_auth_command, AuthIdentity, identity
# ---------------------------------------------------------------------------

_C0_C1 = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_NAME_OCTETS = 255


def _auth_lines(data: bytes) -> None:
    lines = data.split(b"\n")
    first = lines[0] + b"\n" if len(lines) > 1 else lines[0]
    start = parse_auth_command(first)
    responses = [line + b"\n" for line in lines[1:]]
    for response in responses:
        if RESPONSE_LINE.match(response):
            check(response.endswith(b"\r\n"), "AUTH response accepted without CRLF")
    mechanism = "PLAIN" if start is None else start.mechanism
    initial = None if start is None else start.initial
    if start is not None:
        check(re.fullmatch(r"[A-Z0-9_-]{1,20}", mechanism) is not None, "bad mechanism name")
        check(initial is None or b" " not in initial, "initial response with a blank")
    found = identity(mechanism, initial, responses)
    stepwise = AuthIdentity(mechanism, initial)
    for response in responses:
        stepwise.response(response)
    check(stepwise.identity == found, "AuthIdentity and identity() disagree")
    _check_name(found)
    _ = repr(stepwise)


def _check_name(found: str | None) -> None:
    if found is None:
        return
    for part in found.split(" as ", 1) if " as " in found else [found]:
        check(part != "", "empty identity")
        check(_C0_C1.search(part) is None, "control character in an identity")
    check(len(found.encode()) <= 2 * _MAX_NAME_OCTETS + 4, "identity too long")


def _clean_name(raw: bytes) -> str:
    text = raw.decode("utf-8", "ignore")
    return _C0_C1.sub("", text)


def _auth_roundtrip(flags: int, rest: bytes) -> None:
    """Encode a known identity the way a client would; it must be read back."""
    mechanism = _MECHANISMS[(flags >> 1) % 4]
    on_line = bool(flags >> 3 & 1)
    acting = bool(flags >> 4 & 1)
    lower = bool(flags >> 5 & 1)
    raw_name, _, secret = rest.partition(b"\x00")
    name = _clean_name(raw_name)
    if not name or len(name.encode()) + len(" as x") > _MAX_NAME_OCTETS:
        return
    user = name.encode()
    expected: str | None = name
    if mechanism == "PLAIN":
        authzid = user + b"x" if acting else b""
        message = authzid + b"\x00" + user + b"\x00" + secret.replace(b"\x00", b"")
        if acting:
            expected = f"{name} as {name}x"
    elif mechanism == "LOGIN":
        message = user
    elif mechanism == "CRAM-MD5":
        message = user + b" " + hashlib.md5(secret, usedforsecurity=False).hexdigest().encode()
    else:
        token = bytes(b for b in secret if 0x21 <= b <= 0x7E)
        message = b"user=" + user + b"\x01auth=Bearer " + token + b"\x01\x01"
    encoded = base64.b64encode(message)
    verb = b"auth " if lower else b"AUTH "
    name_on_line = mechanism.lower().encode() if lower else mechanism.encode()
    if on_line:
        line = verb + name_on_line + b" " + encoded + b"\r\n"
        responses: list[bytes] = []
        if mechanism == "CRAM-MD5":
            expected = None  # the server speaks first: an initial response is wrong
    else:
        line = verb + name_on_line + b"\r\n"
        responses = [encoded + b"\r\n"]
        check(RESPONSE_LINE.match(responses[0]) is not None, "base64 response refused")
    event = parse_command(line)
    check(isinstance(event, Command) and event.verb is Verb.AUTH, "AUTH line not a command")
    start = parse_auth_command(line)
    check(start is not None, "AUTH line not parsed")
    assert start is not None
    check(start.mechanism == mechanism, "mechanism read wrongly")
    check(start.initial == (encoded if on_line else None), "initial response read wrongly")
    found = identity(start.mechanism, start.initial, responses)
    check(found == expected, f"{mechanism} identity {found!r}, expected {expected!r}")


def fuzz_auth(data: bytes) -> None:
    """AUTH lines and responses: nothing raises, identities are clean.

    Layout: octet 0, bit 0 clear: the rest is an AUTH line, then response
    lines (LF-separated). Bit 0 set: a round trip; bits 1-2 pick the
    mechanism, bit 3 initial response on the line, bit 4 an authorization
    identity, bit 5 lower case; the rest is ``name NUL secret``.
    """
    if not data:
        return
    if data[0] & 1:
        _auth_roundtrip(data[0], data[1:])
    else:
        _auth_lines(data[1:])


# ---------------------------------------------------------------------------
# body: DataReader, stuff, and both through ServerConnection (DATA and BDAT)
# ---------------------------------------------------------------------------


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
            _check_error_reply(error)
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
        _check_error_reply(error)
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


# ---------------------------------------------------------------------------
# codec: the spool's envelope files
# ---------------------------------------------------------------------------

QUEUE_ID = "20250102T030405.123456-1a2b3c4d"


def fuzz_codec(data: bytes) -> None:
    """spool.codec.decode: CorruptEntry or an entry that survives a round trip.

    The input is an envelope file for queue id ``QUEUE_ID``.
    """
    try:
        entry = decode(data, QUEUE_ID)
    except CorruptEntry:
        return
    raw = encode(entry)
    check(decode(raw, QUEUE_ID) == entry, "encode then decode changes the entry")
    check(encode(decode(raw, QUEUE_ID)) == raw, "encoding is not stable")
    check(isinstance(orjson.loads(raw), dict), "encode wrote something else than an object")
    _ = (entry.sender, entry.pending, [r.address for r in entry.recipients])


TARGETS: dict[str, Target] = {
    "server": fuzz_server,
    "replies": fuzz_replies,
    "commands": fuzz_commands,
    "extensions": fuzz_extensions,
    "proxy": fuzz_proxy,
    "auth": fuzz_auth,
    "body": fuzz_body,
    "codec": fuzz_codec,
}
