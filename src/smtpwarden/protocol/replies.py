"""SMTP replies: the ``Reply`` value and the incremental ``ReplyReader``.

RFC 5321 4.2: a reply is one or more lines ``CODE-text`` ending with one
``CODE text`` (or bare ``CODE``) line, all with the same code. The reader
keeps the received bytes of each reply (``Reply.raw``) so the relay forwards
the upstream's own bytes; nothing is re-encoded. Parsing costs a few C-level
``bytes`` operations per line, never a Python loop per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpwarden.protocol import grammar
from smtpwarden.protocol.errors import MalformedReply, RemoteProtocolError

# RFC 5321 4.5.3.1.5: "The maximum total length of a reply line including the
# reply code and the <CRLF> is 512 octets." Real servers exceed it (long
# policy texts), so the default allows four times that.
MAX_REPLY_LINE_BYTES = 2048
# No RFC bound; a large EHLO reply has about 20 lines. The cap stops an
# endless multi-line reply from growing the buffer without end.
MAX_REPLY_LINES = 128


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """One complete reply.

    ``raw`` is the exact bytes received (CRLFs included); ``lines`` holds the
    text of each line without code, separator or CRLF.
    """

    code: int
    lines: tuple[bytes, ...]
    raw: bytes

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 status code at the start of the first line, if any."""
        found = grammar.ENHANCED_STATUS.match(self.lines[0])
        return found.group(0).decode("ascii") if found else None

    @property
    def text(self) -> str:
        """The reply's text, lines joined by newlines, enhanced codes removed.

        Decoded leniently for records: invalid UTF-8 becomes U+FFFD.
        """
        parts = []
        for line in self.lines:
            found = grammar.ENHANCED_STATUS.match(line)
            parts.append(line[found.end() :].lstrip(b" \t") if found else line)
        return b"\n".join(parts).decode("utf-8", "replace")


def make_reply(code: int, enhanced: str | None, text: str) -> Reply:
    """Build a single-line reply that smtpwarden itself sends."""
    body = f"{enhanced} {text}" if enhanced else text
    raw = f"{code} {body}\r\n".encode()
    return Reply(code=code, lines=(body.encode(),), raw=raw)


def reply_for(error: RemoteProtocolError) -> Reply:
    """The reply a peer's protocol error calls for."""
    return make_reply(error.code, error.enhanced, error.text)


class ReplyReader:
    """Reads replies from an upstream byte stream.

    Feed bytes with ``receive_data`` and take complete replies with
    ``next_reply`` until it returns None. A reply that breaks the grammar or
    a limit raises ``MalformedReply``; the reader is then unusable.
    """

    __slots__ = ("_buf", "_code", "_lines", "_max_line", "_max_lines", "_scan", "_start")

    def __init__(
        self, *, max_line_bytes: int = MAX_REPLY_LINE_BYTES, max_lines: int = MAX_REPLY_LINES
    ) -> None:
        self._buf = b""
        self._start = 0  # where the reply being read begins in _buf
        self._scan = 0  # where the next unread line begins
        self._code = b""
        self._lines: list[bytes] = []
        self._max_line = max_line_bytes
        self._max_lines = max_lines

    @property
    def buffered(self) -> int:
        """Number of received octets not yet returned in a reply."""
        return len(self._buf) - self._start

    def receive_data(self, data: bytes) -> None:
        """Add received bytes."""
        if self._start == len(self._buf):
            self._buf = data
            self._start = self._scan = 0
        else:
            if self._start:
                self._buf = self._buf[self._start :]
                self._scan -= self._start
                self._start = 0
            self._buf += data

    def receive_eof(self) -> None:
        """The upstream closed its side.

        Raises ``MalformedReply`` if a reply was cut off: a line without its
        CRLF, or a multi-line reply without its final line.
        """
        if self._lines:
            raise MalformedReply("connection closed inside a multi-line reply")
        if len(self._buf) > self._scan:
            raise MalformedReply("connection closed inside a reply line")

    def next_reply(self) -> Reply | None:
        """Return the next complete reply, or None if more bytes are needed.

        Raises ``MalformedReply`` naming the problem.
        """
        buf = self._buf
        while True:
            scan = self._scan
            end = buf.find(b"\n", scan)
            if end < 0:
                if len(buf) - scan > self._max_line:
                    raise MalformedReply(f"reply line longer than {self._max_line} octets")
                return None
            end += 1
            if end - scan > self._max_line:
                raise MalformedReply(f"reply line longer than {self._max_line} octets")
            if buf[end - 2] != 13 or buf.count(b"\r", scan, end) != 1:  # 13 is CR
                raise MalformedReply("reply line not ended by CRLF or holding a bare CR")
            code = buf[scan : scan + 3]
            sep = buf[scan + 3 : scan + 4]
            if not grammar.REPLY_CODE.match(code) or sep not in (b" ", b"-", b"\r"):
                raise MalformedReply(f"bad reply line start {buf[scan : scan + 4]!r}")
            if self._lines and code != self._code:
                raise MalformedReply("reply code changed inside a multi-line reply")
            self._code = code
            self._lines.append(buf[scan + 4 : end - 2] if sep != b"\r" else b"")
            self._scan = end
            if sep == b"-":
                if len(self._lines) >= self._max_lines:
                    raise MalformedReply(f"multi-line reply longer than {self._max_lines} lines")
                continue
            reply = Reply(code=int(code), lines=tuple(self._lines), raw=buf[self._start : end])
            self._lines.clear()
            self._start = end
            return reply


def parse_reply(data: bytes) -> Reply:
    """Parse exactly one complete reply from ``data``.

    Raises ``MalformedReply`` if ``data`` is not exactly one reply.
    """
    reader = ReplyReader()
    reader.receive_data(data)
    reply = reader.next_reply()
    if reply is None or reader.buffered:
        raise MalformedReply("not exactly one complete reply")
    return reply
