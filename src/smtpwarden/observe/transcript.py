"""A session's transcript while it runs: entries, the size cap, redaction.

``Recorder`` keeps one session's entries: when (milliseconds since the
session started), which way (``Direction``: the client leg, the upstream
leg, or an event of the relay's own) and what, as text. Wire octets are
kept as latin-1 text, one character per octet, so that nothing is lost and
``text.encode("latin-1")`` gives the octets back; readers show that text as
UTF-8. Entries may carry a ``tag``:

- ``own``: a line the relay sent upstream on its own behalf (STARTTLS and
  XCLIENT before the greeting, XFORWARD, the QUIT or ``*`` it closes with);
- ``auth``: an AUTH command or response line, redacted;
- ``data``, ``end``: message content of DATA as relayed, dot-stuffing kept;
  ``end`` marks the entry that completes the message (its ``.<CRLF>`` in
  it). Without bodies one ``end`` entry gives the message's size and
  SHA-256 instead, counted as the transaction record counts them;
- ``chunk``: BDAT chunk content, or its size and SHA-256 without bodies.

Rule 1: credentials never enter a recorder. The redaction functions here
turn AUTH lines, AUTH responses and XCLIENT ``LOGIN=`` values into what a
transcript may show; the session records through them (PRODUCT.md,
invariant 5).

Rule 2: sans-I/O, as the protocol core: no clock, no file, no socket. Times
are passed in; ``transcripts`` writes what this module builds.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from smtpwarden.protocol.auth import RESPONSE_LINE, parse_auth_command
from smtpwarden.protocol.transaction import MessageDigest

# What the JSON around an entry's text costs (keys, time, direction): the
# size cap counts it, so that many small entries cannot pass the cap.
ENTRY_OVERHEAD_BYTES: Final = 48

REDACTED: Final = "[redacted]"
CRLF: Final = "\r\n"

OWN: Final = "own"
AUTH: Final = "auth"
DATA: Final = "data"
END: Final = "end"
CHUNK: Final = "chunk"

# XCLIENT's LOGIN attribute (Postfix XCLIENT_README) names a SASL login;
# its value is redacted as AUTH's are. Attribute names are case-insensitive.
_XCLIENT_LOGIN = re.compile(rb"(?i)(?<![A-Za-z])(LOGIN=)[^ \t\r\n]*")


class Direction(enum.Enum):
    """Which way an entry went; the values are the transcript's strings."""

    CLIENT_IN = "client>relay"
    CLIENT_OUT = "relay>client"
    UPSTREAM_OUT = "relay>upstream"
    UPSTREAM_IN = "upstream>relay"
    EVENT = "event"


DIRECTIONS: Final = {direction.value: direction for direction in Direction}


@dataclass(frozen=True, slots=True)
class Entry:
    """One step of a transcript."""

    at_ms: float  # since the session started
    direction: Direction
    text: str  # octets as latin-1, or an event's words
    tag: str | None = None

    def to_json(self) -> dict[str, object]:
        """The entry as the transcript file holds it."""
        out: dict[str, object] = {
            "at_ms": self.at_ms,
            "dir": self.direction.value,
            "text": self.text,
        }
        if self.tag is not None:
            out["tag"] = self.tag
        return out


def octets(data: bytes | memoryview) -> str:
    """Wire octets as transcript text: latin-1, one character per octet."""
    return bytes(data).decode("latin-1")


def _has_verb(line: bytes, verb: bytes) -> bool:
    head = line.lstrip(b" \t")
    size = len(verb)
    return head[:size].upper() == verb and head[size : size + 1] in (b"", b" ", b"\t", b"\r", b"\n")


def redact_line(line: bytes) -> tuple[str, str | None]:
    """The text and tag a transcript keeps of a command line (CRLF kept).

    AUTH keeps its mechanism only, with ``[redacted]`` in place of an
    initial response; XCLIENT keeps every attribute but ``LOGIN``'s value.
    A lone base64 token is redacted too: after an AUTH the relay refused, a
    pipelining client's response arrives as a line of its own.
    """
    if _has_verb(line, b"AUTH"):
        start = parse_auth_command(line.lstrip(b" \t"))
        if start is None:
            return f"AUTH {REDACTED}{CRLF}", AUTH
        initial = f" {REDACTED}" if start.initial is not None else ""
        return f"AUTH {start.mechanism}{initial}{CRLF}", AUTH
    if _has_verb(line, b"XCLIENT"):
        return octets(_XCLIENT_LOGIN.sub(rb"\1" + REDACTED.encode(), line)), None
    return octets(line), None


def redact_refused(line: bytes) -> tuple[str, str | None]:
    """As ``redact_line``, for a line the reader refused as a command."""
    if RESPONSE_LINE.match(line) and line != b"\r\n":
        return REDACTED + CRLF, AUTH
    return redact_line(line)


def redact_response(line: bytes) -> str:
    """What a transcript keeps of an AUTH response line: ``*`` or ``[redacted]``."""
    return "*" + CRLF if line == b"*\r\n" else REDACTED + CRLF


def summary(kind: str, digest: MessageDigest) -> str:
    """A message's (or chunk's) size and SHA-256, for a transcript without bodies."""
    size, sha256 = digest.result()
    return f"[{kind}: {size} octets, sha256 {sha256}]"


class Recorder:
    """One session's entries, within a size cap.

    ``ring``: past ``max_bytes`` the oldest entries are dropped (mode
    failure, where the end explains the failure); else later entries are
    left out. ``left_out`` counts either, entries and bytes.
    """

    __slots__ = ("_entries", "_max_bytes", "_ring", "_size", "left_out", "left_out_bytes", "start")

    def __init__(self, *, start: float, max_bytes: int, ring: bool) -> None:
        self.start = start
        self._max_bytes = max_bytes
        self._ring = ring
        self._entries: deque[Entry] = deque()
        self._size = 0
        self.left_out = 0
        self.left_out_bytes = 0

    @property
    def size(self) -> int:
        """Bytes the kept entries count for."""
        return self._size

    @property
    def truncated(self) -> bool:
        """True if entries were dropped or left out for the cap."""
        return self.left_out > 0

    def add(self, now: float, direction: Direction, text: str, tag: str | None = None) -> None:
        """Record one entry at ``now`` (the session's clock)."""
        cost = len(text) + ENTRY_OVERHEAD_BYTES
        if not self._ring and self._size + cost > self._max_bytes:
            self.left_out += 1
            self.left_out_bytes += cost
            return
        at_ms = round((now - self.start) * 1000, 3)
        self._entries.append(Entry(at_ms, direction, text, tag))
        self._size += cost
        entries = self._entries
        while self._size > self._max_bytes and entries:
            dropped = entries.popleft()
            size = len(dropped.text) + ENTRY_OVERHEAD_BYTES
            self._size -= size
            self.left_out += 1
            self.left_out_bytes += size

    def entries(self) -> list[Entry]:
        """The kept entries, with a note where some were dropped or left out."""
        kept = list(self._entries)
        if not self.left_out:
            return kept
        note = (
            f"[{self.left_out} entries ({self.left_out_bytes} bytes) "
            f"{'dropped' if self._ring else 'left out'}: past max_bytes {self._max_bytes}]"
        )
        if self._ring:
            at = kept[0].at_ms if kept else 0.0
            return [Entry(at, Direction.EVENT, note), *kept]
        at = kept[-1].at_ms if kept else 0.0
        return [*kept, Entry(at, Direction.EVENT, note)]

    def truncation(self) -> dict[str, object] | None:
        """The header's ``truncated`` field: what the cap cost, or None."""
        if not self.left_out:
            return None
        return {
            "entries": self.left_out,
            "bytes": self.left_out_bytes,
            "kept": "end" if self._ring else "start",
        }


def document(
    header: dict[str, object],
    recorder: Recorder,
    transactions: Iterable[object],
    session: object,
) -> dict[str, object]:
    """The transcript file's content: header, entries, then the session's records.

    ``transactions`` and ``session`` are the records as the log has them
    (dataclasses, which orjson writes as they are).
    """
    return {
        "header": {**header, "truncated": recorder.truncation()},
        "entries": [entry.to_json() for entry in recorder.entries()],
        "transactions": list(transactions),
        "session": session,
    }


def address_matches(address: str, patterns: Iterable[str]) -> bool:
    """True if ``address`` is one of ``patterns`` (lower-cased ``user@domain``
    or ``@domain``), without regard to case."""
    lowered = address.lower()
    domain = "@" + lowered.rpartition("@")[2] if "@" in lowered else None
    return any(pattern in (lowered, domain) for pattern in patterns)
