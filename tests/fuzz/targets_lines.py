"""Fuzz targets over single replies and lines: ``replies``, ``commands``, ``extensions``.

``replies`` feeds the upstream's stream to ``ReplyReader`` whole, cut in two
and octet by octet; ``commands`` parses one command line; ``extensions``
runs ``parse_ehlo`` and ``reconcile`` on an EHLO reply under a policy.
"""

from __future__ import annotations

import re

from targets_common import (
    BYTE_BY_BYTE_MAX,
    MECHANISMS,
    RELAYED_KEYWORDS,
    InvariantBroken,
    check,
    check_error_reply,
    u16,
)

from smtpwarden.protocol import grammar
from smtpwarden.protocol.auth import parse_auth_command
from smtpwarden.protocol.commands import parse_command
from smtpwarden.protocol.errors import MalformedReply, RemoteProtocolError
from smtpwarden.protocol.events import BadCommand, Bdat, Command, MailFrom, RcptTo, Verb
from smtpwarden.protocol.extensions import ExtensionPolicy, parse_ehlo, reconcile
from smtpwarden.protocol.replies import Reply, ReplyReader, parse_reply
from smtpwarden.protocol.server import MAX_AUTH_LINE_BYTES

# ---------------------------------------------------------------------------
# replies: ReplyReader, the reader of the upstream's stream
# ---------------------------------------------------------------------------


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
    if len(stream) <= BYTE_BY_BYTE_MAX:
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
        check_error_reply(event.error)
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

_MAX_SIZES = (0, 1000, 10485760, 35882577)
_CODE_PREFIX = re.compile(rb"[0-9]{3}[ -]?")
# Parses what reconcile writes: no cap on lines, STARTTLS may add one.
_UNCAPPED_LINES = 1 << 20


def _policy(flags: int) -> ExtensionPolicy:
    auth = tuple(name for bit, name in enumerate(MECHANISMS) if flags >> (2 + bit) & 1)
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
    allowed = set(RELAYED_KEYWORDS)
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
