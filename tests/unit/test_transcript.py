"""The transcript recorder, its redaction, and reading transcripts back."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from smtpwarden.observe.dialogue import (
    NotReplayable,
    answers,
    entries_of,
    latencies,
    replay_script,
)
from smtpwarden.observe.transcript import (
    ENTRY_OVERHEAD_BYTES,
    Direction,
    Entry,
    Recorder,
    address_matches,
    document,
    octets,
    redact_line,
    redact_refused,
    redact_response,
    summary,
)
from smtpwarden.observe.transcripts import TranscriptError
from smtpwarden.protocol.transaction import MessageDigest

C_IN, C_OUT = Direction.CLIENT_IN, Direction.CLIENT_OUT
U_OUT, U_IN, EVENT = Direction.UPSTREAM_OUT, Direction.UPSTREAM_IN, Direction.EVENT


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


# -- redaction -------------------------------------------------------------------------

HIDDEN = "S3cret-pw"
PLAIN = b64(f"\0alice\0{HIDDEN}")
XOAUTH2 = b64(f"user=dave\x01auth=Bearer {HIDDEN}\x01\x01")


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b"AUTH PLAIN " + PLAIN + b"\r\n", "AUTH PLAIN [redacted]\r\n"),
        (b"AUTH PLAIN\r\n", "AUTH PLAIN\r\n"),
        (b"AUTH PLAIN =\r\n", "AUTH PLAIN [redacted]\r\n"),
        (b"auth plain " + PLAIN + b"\r\n", "AUTH PLAIN [redacted]\r\n"),
        (b"  AUTH\tPLAIN " + PLAIN + b"\r\n", "AUTH PLAIN [redacted]\r\n"),
        (b"AUTH LOGIN " + b64("alice") + b"\r\n", "AUTH LOGIN [redacted]\r\n"),
        (b"AUTH LOGIN\r\n", "AUTH LOGIN\r\n"),
        (b"AUTH CRAM-MD5\r\n", "AUTH CRAM-MD5\r\n"),
        (b"AUTH CRAM-MD5 " + b64("bob 0123") + b"\r\n", "AUTH CRAM-MD5 [redacted]\r\n"),
        (b"AUTH XOAUTH2 " + XOAUTH2 + b"\r\n", "AUTH XOAUTH2 [redacted]\r\n"),
        (b"AUTH XOAUTH2\r\n", "AUTH XOAUTH2\r\n"),
        (b"AUTH " + PLAIN + b" " + PLAIN + b" x\r\n", "AUTH [redacted]\r\n"),
        (b"AUTH\r\n", "AUTH [redacted]\r\n"),
        (b"AUTH PLAIN " + HIDDEN.encode() + b"\x00\r\n", "AUTH [redacted]\r\n"),
    ],
    ids=[
        "plain-initial",
        "plain",
        "plain-empty-initial",
        "lower-case",
        "blanks",
        "login-initial",
        "login",
        "cram-md5",
        "cram-md5-initial",
        "xoauth2-initial",
        "xoauth2",
        "malformed",
        "bare",
        "control",
    ],
)
def test_auth_lines_keep_only_the_mechanism(line: bytes, text: str) -> None:
    assert redact_line(line) == (text, "auth")


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b"XCLIENT LOGIN=alice ADDR=192.0.2.1\r\n", "XCLIENT LOGIN=[redacted] ADDR=192.0.2.1\r\n"),
        (b"xclient addr=192.0.2.1 login=alice\r\n", "xclient addr=192.0.2.1 login=[redacted]\r\n"),
        (b"XCLIENT ADDR=192.0.2.1 PORT=25\r\n", "XCLIENT ADDR=192.0.2.1 PORT=25\r\n"),
        (b"MAIL FROM:<a@example.org> AUTH=<>\r\n", "MAIL FROM:<a@example.org> AUTH=<>\r\n"),
        (b"AUTHX\r\n", "AUTHX\r\n"),
        (b"MAIL FROM:<\xc3\xa9@example.org>\r\n", "MAIL FROM:<\xc3\xa9@example.org>\r\n"),
    ],
    ids=["xclient-login", "xclient-lower", "xclient-no-login", "mail-auth", "authx", "utf8"],
)
def test_other_lines(line: bytes, text: str) -> None:
    assert redact_line(line)[0] == text


@pytest.mark.parametrize(
    ("line", "redacted"),
    [
        (PLAIN + b"\r\n", True),  # an AUTH response after a refused AUTH
        (b"*\r\n", True),
        (b"NOOPX\r\n", True),  # a lone word could be base64: the price of never leaking
        (b"HELO\r\n", True),
        (b"what is this\r\n", False),
        (b"\r\n", False),
        (b"AUTH PLAIN " + PLAIN + b"\r\n", True),
    ],
)
def test_refused_lines(line: bytes, redacted: bool) -> None:
    text, _ = redact_refused(line)
    assert HIDDEN not in text
    assert (text != octets(line)) is redacted


def test_responses() -> None:
    assert redact_response(PLAIN + b"\r\n") == "[redacted]\r\n"
    assert redact_response(b"\r\n") == "[redacted]\r\n"
    assert redact_response(b"*\r\n") == "*\r\n"


def test_summary_counts_as_the_transaction_record() -> None:
    data = MessageDigest(data=True)
    data.update(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    expected = hashlib.sha256(b"Subject: x\r\n\r\nbody\r\n").hexdigest()
    assert summary("message", data) == f"[message: 20 octets, sha256 {expected}]"
    chunk = MessageDigest(data=False)
    chunk.update(b"12345")
    assert summary("chunk", chunk).startswith("[chunk: 5 octets, sha256 5994471a")


def test_octets_round_trip() -> None:
    every = bytes(range(256))
    assert octets(every).encode("latin-1") == every
    assert octets(memoryview(every)) == octets(every)


# -- the recorder ----------------------------------------------------------------------


def test_recorder_times_and_entries() -> None:
    recorder = Recorder(start=100.0, max_bytes=10_000, ring=False)
    recorder.add(100.0, EVENT, "start")
    recorder.add(100.0012345, C_IN, "EHLO x\r\n")
    recorder.add(100.5, U_OUT, "QUIT\r\n", "own")
    assert recorder.entries() == [
        Entry(0.0, EVENT, "start"),
        Entry(1.234, C_IN, "EHLO x\r\n"),
        Entry(500.0, U_OUT, "QUIT\r\n", "own"),
    ]
    texts = ("start", "EHLO x\r\n", "QUIT\r\n")
    assert recorder.size == sum(len(text) + ENTRY_OVERHEAD_BYTES for text in texts)
    assert recorder.truncation() is None
    assert not recorder.truncated


def cost(text: str) -> int:
    return len(text) + ENTRY_OVERHEAD_BYTES


def test_recorder_leaves_out_what_passes_the_cap() -> None:
    recorder = Recorder(start=0.0, max_bytes=cost("a" * 10) * 3, ring=False)
    for i in range(5):
        recorder.add(float(i), C_IN, str(i) * 10)
    kept = recorder.entries()
    assert [entry.text for entry in kept[:3]] == ["0" * 10, "1" * 10, "2" * 10]
    assert kept[-1].direction is EVENT
    assert (
        kept[-1].text
        == f"[2 entries ({2 * cost('x' * 10)} bytes) left out: past max_bytes {3 * cost('a' * 10)}]"
    )
    assert recorder.truncation() == {"entries": 2, "bytes": 2 * cost("x" * 10), "kept": "start"}
    assert recorder.size <= 3 * cost("a" * 10)


def test_the_ring_drops_the_oldest() -> None:
    recorder = Recorder(start=0.0, max_bytes=cost("a" * 10) * 3, ring=True)
    for i in range(5):
        recorder.add(float(i), C_IN, str(i) * 10)
    kept = recorder.entries()
    assert [entry.text for entry in kept[1:]] == ["2" * 10, "3" * 10, "4" * 10]
    assert kept[0].direction is EVENT
    assert "2 entries" in kept[0].text
    assert "dropped" in kept[0].text
    assert kept[0].at_ms == kept[1].at_ms
    assert recorder.truncation() == {"entries": 2, "bytes": 2 * cost("x" * 10), "kept": "end"}


def test_an_entry_larger_than_the_cap() -> None:
    ring = Recorder(start=0.0, max_bytes=100, ring=True)
    ring.add(0.0, C_IN, "x" * 500)
    assert [entry.direction for entry in ring.entries()] == [EVENT]
    plain = Recorder(start=0.0, max_bytes=100, ring=False)
    plain.add(0.0, C_IN, "x" * 500)
    plain.add(0.0, C_IN, "small")
    assert next(entry.text for entry in plain.entries()) == "small"


def test_document() -> None:
    recorder = Recorder(start=0.0, max_bytes=1000, ring=False)
    recorder.add(0.0, C_IN, "x", "end")
    content = document({"id": "a"}, recorder, [{"type": "transaction"}], {"type": "session"})
    assert content == {
        "header": {"id": "a", "truncated": None},
        "entries": [{"at_ms": 0.0, "dir": "client>relay", "text": "x", "tag": "end"}],
        "transactions": [{"type": "transaction"}],
        "session": {"type": "session"},
    }


@pytest.mark.parametrize(
    ("address", "patterns", "matches"),
    [
        ("alice@example.org", ("alice@example.org",), True),
        ("Alice@Example.ORG", ("alice@example.org",), True),
        ("alice@example.org", ("@example.org",), True),
        ("alice@sub.example.org", ("@example.org",), False),
        ("alice@example.org", ("bob@example.org", "@example.net"), False),
        ("", ("@example.org",), False),
        ("postmaster", ("@example.org",), False),
    ],
)
def test_address_matches(address: str, patterns: tuple[str, ...], matches: bool) -> None:
    assert address_matches(address, patterns) is matches


# -- reading back ----------------------------------------------------------------------


def entry(at: float, direction: Direction, text: str, tag: str | None = None) -> dict[str, Any]:
    return Entry(at, direction, text, tag).to_json()


def session(*, bodies: bool = True, truncated: object = None) -> dict[str, Any]:
    """A pipelined session: DATA and BDAT messages, AUTH, the relay's own lines."""
    entries = [
        entry(0, EVENT, "connection from 127.0.0.1:5000 to listener main"),
        entry(1, EVENT, "connecting to upstream up (127.0.0.1:25)"),
        entry(2, U_IN, "220 up\r\n"),
        entry(3, U_OUT, "EHLO relay.test\r\n", "own"),
        entry(4, U_IN, "250 up\r\n"),
        entry(5, EVENT, "relaying to upstream up (127.0.0.1:25)"),
        entry(6, C_OUT, "220 up\r\n"),
        entry(7, C_IN, "EHLO c\r\n"),
        entry(8, U_OUT, "EHLO c\r\n"),
        entry(9, U_IN, "250-up\r\n250 CHUNKING\r\n"),
        entry(10, C_OUT, "250-up\r\n250 CHUNKING\r\n"),
        entry(11, C_IN, "AUTH PLAIN [redacted]\r\n", "auth"),
        entry(12, U_OUT, "AUTH PLAIN [redacted]\r\n", "auth"),
        entry(13, U_IN, "235 ok\r\n"),
        entry(14, C_OUT, "235 ok\r\n"),
        entry(15, C_IN, "MAIL FROM:<a@b>\r\n"),
        entry(16, U_OUT, "MAIL FROM:<a@b>\r\n"),
        entry(17, C_IN, "RCPT TO:<c@d>\r\n"),
        entry(18, U_OUT, "RCPT TO:<c@d>\r\n"),
        entry(19, C_IN, "DATA\r\n"),
        entry(20, U_OUT, "DATA\r\n"),
        entry(21, U_IN, "250 sender ok\r\n"),
        entry(22, U_IN, "250 rcpt ok\r\n"),
        entry(23, U_IN, "354 go\r\n"),
        entry(24, C_OUT, "250 sender ok\r\n250 rcpt ok\r\n354 go\r\n"),
        entry(25, C_IN, "line\r\n", "data"),
        entry(26, C_IN, "..dot\r\n.\r\n", "end"),
        entry(30, U_IN, "250 queued\r\n"),
        entry(31, C_OUT, "250 queued\r\n"),
        entry(32, C_IN, "BDAT 3 LAST\r\n"),
        entry(33, U_OUT, "BDAT 3 LAST\r\n"),
        entry(34, C_IN, "ab", "chunk"),
        entry(35, C_IN, "c", "chunk"),
        entry(36, U_IN, "451 later\r\n"),
        entry(37, C_OUT, "451 later\r\n"),
        entry(38, U_OUT, "QUIT\r\n", "own"),
        entry(39, EVENT, "session end: client_closed"),
    ]
    return {"header": {"id": "x", "bodies": bodies, "truncated": truncated}, "entries": entries}


def test_answers_pair_each_leg_in_order() -> None:
    entries = entries_of(session())
    upstream = answers(entries, "upstream")
    assert upstream[1] == 2  # the greeting answers the connection
    assert upstream[3] == 4
    assert [upstream[i] for i in (16, 18, 20)] == [21, 22, 23]  # pipelined
    assert upstream[26] == 27  # the end of the message
    assert upstream[30] == 33
    assert 35 not in upstream  # the relay's closing QUIT got no recorded reply
    client = answers(entries, "client")
    assert client[0] == 6
    assert [client[i] for i in (15, 17, 19)] == [24, 24, 24]  # one write, three replies
    assert client[26] == 28
    assert client[29] == 34
    waits = latencies(entries)
    assert waits[24] == 9.0  # from the oldest step it answers
    assert waits[27] == 4.0
    assert waits[28] == 5.0
    assert waits[2] == 1.0
    assert 25 not in waits


def test_replay_script() -> None:
    script = replay_script(session())
    assert [(step.kind, step.line) for step in script.steps] == [
        ("command", b"EHLO c\r\n"),
        ("command", b"MAIL FROM:<a@b>\r\n"),
        ("command", b"RCPT TO:<c@d>\r\n"),
        ("data", b"DATA\r\n"),
        ("bdat", b"BDAT 3 LAST\r\n"),
    ]
    ehlo, mail, rcpt, data, bdat = script.steps
    assert ehlo.original == "250-up"
    assert (mail.original, rcpt.original, data.original) == (
        "250 sender ok",
        "250 rcpt ok",
        "354 go",
    )
    assert data.body == b"line\r\n..dot\r\n.\r\n"
    assert data.complete
    assert data.original_end == "250 queued"
    assert (bdat.body, bdat.complete, bdat.original) == (b"abc", True, "451 later")
    assert script.notes == (
        "AUTH PLAIN not replayed: its credentials were never kept; "
        "the target sees the session unauthenticated",
    )


def test_replay_script_of_an_unfinished_message() -> None:
    content = session()
    content["entries"] = content["entries"][:26] + content["entries"][-2:]
    data = replay_script(content).steps[-1]
    assert (data.kind, data.complete, data.body) == ("data", False, b"line\r\n")
    content = session()
    content["entries"] = content["entries"][:32]
    bdat = replay_script(content).steps[-1]
    assert (bdat.kind, bdat.complete, bdat.body) == ("bdat", False, b"ab")


def test_replay_script_refusals() -> None:
    with pytest.raises(NotReplayable, match="captured without bodies"):
        replay_script(session(bodies=False))
    with pytest.raises(NotReplayable, match="cut at its listener's max_bytes"):
        replay_script(session(truncated={"entries": 1}))
    content = session(bodies=False)
    content["entries"] = content["entries"][:24]  # no message: nothing to refuse
    assert len(replay_script(content).steps) == 4


@pytest.mark.parametrize(
    "bad",
    [
        {"at_ms": 0, "dir": "sideways", "text": ""},
        {"at_ms": "soon", "dir": "event", "text": ""},
        {"dir": "event", "text": ""},
        {"at_ms": 0, "dir": "event", "text": 7},
        {"at_ms": 0, "dir": "event", "text": "", "tag": 1},
        "not an entry",
    ],
)
def test_malformed_entries(bad: object) -> None:
    with pytest.raises(TranscriptError, match="entry 0 is malformed"):
        entries_of({"entries": [bad]})
