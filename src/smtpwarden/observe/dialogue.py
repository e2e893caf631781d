"""Reading a transcript back: its entries, which reply answers which step, and
what a replay sends.

``answers`` pairs each reply with the steps it answers, leg by leg, the way
SMTP does (RFC 2920 3.1: replies come in the order of the commands): on
the client leg every line the client sent and the end of each DATA message
awaits one reply, and the relay's writes to the client may carry several;
on the upstream leg every line sent upstream and the end of each DATA
message awaits one reply, and each recorded upstream reply is one. A
connection's greeting answers its start. ``latencies`` turns that into
milliseconds per reply, as ``smtpwarden transcript show`` prints them.

``replay_script`` gives the client side as the upstream got it: every line
relayed upstream for the client (never the relay's own, never AUTH, whose
secrets were never kept), and each message's octets from the client leg.
The original upstream's replies come along for comparison.

Rule: nothing here does I/O; a transcript arrives as the loaded JSON.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from smtpwarden.observe.transcript import (
    AUTH,
    CHUNK,
    DATA,
    DIRECTIONS,
    END,
    OWN,
    Direction,
    Entry,
)
from smtpwarden.observe.transcripts import TranscriptError

# An entry that starts a connection to an upstream: its greeting answers it.
CONNECTING: Final = "connecting to upstream "
# The last line of a reply: code, then a space or the line's end (RFC 5321 4.2).
_LAST_LINE = re.compile(r"^[2-5][0-9][0-9](?: |\r?$)", re.MULTILINE)
_LEGS: Final = {
    Direction.CLIENT_IN: "client",
    Direction.CLIENT_OUT: "client",
    Direction.UPSTREAM_OUT: "upstream",
    Direction.UPSTREAM_IN: "upstream",
}


class NotReplayable(Exception):
    """A transcript that cannot be replayed; the message says why."""


def entries_of(content: Mapping[str, Any]) -> list[Entry]:
    """The entries of a loaded transcript. Raises TranscriptError for a bad one."""
    found: list[Entry] = []
    for index, raw in enumerate(content.get("entries", ())):
        try:
            direction = DIRECTIONS[raw["dir"]]
            at_ms = float(raw["at_ms"])
            text = raw["text"]
            tag = raw.get("tag")
        except (KeyError, TypeError, ValueError) as error:
            raise TranscriptError(f"entry {index} is malformed: {error!r}") from None
        if not isinstance(text, str) or not (tag is None or isinstance(tag, str)):
            raise TranscriptError(f"entry {index} is malformed")
        found.append(Entry(at_ms, direction, text, tag))
    return found


def _awaits(entry: Entry) -> tuple[str, ...]:
    """The legs on which ``entry`` awaits a reply."""
    match entry.direction:
        case Direction.CLIENT_IN if entry.tag == END:
            return ("client", "upstream")  # the end of a DATA message
        case Direction.CLIENT_IN if entry.tag in (None, AUTH):
            return ("client",)
        case Direction.UPSTREAM_OUT:
            return ("upstream",)
        case _:
            return ()


def _replies_in(entry: Entry) -> int:
    """How many replies ``entry`` carries, if it is a reply."""
    if entry.direction is Direction.UPSTREAM_IN:
        return 1
    if entry.direction is Direction.CLIENT_OUT:
        return len(_LAST_LINE.findall(entry.text))
    return 0


def _pairs(entries: Sequence[Entry]) -> Iterator[tuple[str, int, int]]:
    """(leg, step index, reply index) for each step a reply answers."""
    pending: dict[str, deque[int]] = {"client": deque(), "upstream": deque()}
    for index, entry in enumerate(entries):
        if index == 0 and entry.direction is Direction.EVENT:
            pending["client"].append(index)  # the connection: the greeting answers it
        if entry.direction is Direction.EVENT and entry.text.startswith(CONNECTING):
            pending["upstream"] = deque([index])
        for leg in _awaits(entry):
            pending[leg].append(index)
        count = _replies_in(entry)
        if count:
            leg = _LEGS[entry.direction]
            waiting = pending[leg]
            for _ in range(count):
                if not waiting:
                    break
                yield leg, waiting.popleft(), index


def answers(entries: Sequence[Entry], leg: str) -> dict[int, int]:
    """Map the index of each step of ``leg`` ("client", "upstream") to its reply's."""
    return {step: reply for found, step, reply in _pairs(entries) if found == leg}


def latencies(entries: Sequence[Entry]) -> dict[int, float]:
    """Milliseconds from the oldest step a reply answers to the reply, by reply index."""
    found: dict[int, float] = {}
    for _, step, reply in _pairs(entries):
        if reply not in found:
            found[reply] = round(entries[reply].at_ms - entries[step].at_ms, 3)
    return found


@dataclass(slots=True)
class Step:
    """One command a replay sends, and what the original upstream answered.

    ``kind`` is "command", "data" (DATA, then after a 354 ``body``: the
    message as sent, dot-stuffing and ``.<CRLF>`` included) or "bdat" (the
    line and ``body``, its chunk, in one go). ``complete`` is False for a
    message whose end the capture does not hold. ``original`` and
    ``original_end`` are the original upstream's replies, first line only.
    """

    kind: str
    line: bytes
    body: bytes = b""
    complete: bool = True
    original: str | None = None
    original_end: str | None = None
    size: int = 0  # BDAT: the chunk's size


@dataclass(frozen=True, slots=True)
class Script:
    """What a replay sends, with notes on what it leaves out."""

    steps: tuple[Step, ...]
    notes: tuple[str, ...]


def _first_line(entry: Entry) -> str:
    return entry.text.split("\r\n", 1)[0]


def replay_script(content: Mapping[str, Any]) -> Script:
    """The client side of a transcript as the upstream got it.

    Raises NotReplayable if the transcript lacks what a replay needs: its
    message octets (captured without bodies) or entries cut at max_bytes.
    Raises TranscriptError for a malformed transcript.
    """
    header = content.get("header", {})
    if header.get("truncated"):
        raise NotReplayable(
            "the transcript was cut at its listener's max_bytes: entries are missing"
        )
    entries = entries_of(content)
    paired = answers(entries, "upstream")
    steps: list[Step] = []
    notes: list[str] = []
    current: Step | None = None  # the DATA or BDAT step whose octets come next
    for index, entry in enumerate(entries):
        direction, tag = entry.direction, entry.tag
        if direction is Direction.CLIENT_IN and tag in (DATA, END, CHUNK):
            if not header.get("bodies"):
                raise NotReplayable(
                    "the transcript was captured without bodies: only the size and hash of "
                    "each message were kept; capture with bodies (transcript capture "
                    "--bodies, or bodies: true) to replay it"
                )
            if current is None:
                continue  # content the upstream never got
            current.body += entry.text.encode("latin-1")
            if tag == END and current.kind == "data":
                current.complete = True
                answer = paired.get(index)
                current.original_end = None if answer is None else _first_line(entries[answer])
                current = None
            elif current.kind == "bdat" and len(current.body) >= current.size:
                current = None
            continue
        if direction is not Direction.UPSTREAM_OUT or tag == OWN:
            continue
        if tag == AUTH:
            if entry.text.upper().startswith("AUTH"):
                mechanism = _first_line(entry).split(" ")[1:2] or ["?"]
                notes.append(
                    f"AUTH {mechanism[0]} not replayed: its credentials were never kept; "
                    "the target sees the session unauthenticated"
                )
            continue
        line = entry.text.encode("latin-1")
        answer = paired.get(index)
        original = None if answer is None else _first_line(entries[answer])
        words = line.split()
        verb = words[0].upper() if words else b""
        if verb == b"DATA":
            step = current = Step("data", line, complete=False, original=original)
        elif verb == b"BDAT" and len(words) > 1 and words[1].isdigit():
            step = Step("bdat", line, original=original, size=int(words[1]))
            current = step if step.size else None
        else:
            step, current = Step("command", line, original=original), None
        steps.append(step)
    for step in steps:
        if step.kind == "bdat" and len(step.body) < step.size:
            step.complete = False
    return Script(tuple(steps), tuple(notes))
