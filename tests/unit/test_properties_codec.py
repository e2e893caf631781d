"""Properties of envelope files (``spool/codec.py``)."""

from __future__ import annotations

import base64
import string
from dataclasses import replace
from typing import Any

import orjson
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.spool.codec import decode, encode
from smtpwarden.spool.errors import CorruptEntry
from smtpwarden.spool.model import (
    BodyKind,
    Entry,
    EntryState,
    Recipient,
    RecipientState,
)
from strategies import octets, scaled

# Ids of the spool's form (model.QUEUE_ID).
queue_ids = st.builds(
    "{:08d}T{:06d}.{:06d}-{:08x}".format,
    st.integers(0, 10**8 - 1),
    st.integers(0, 10**6 - 1),
    st.integers(0, 10**6 - 1),
    st.integers(0, 2**32 - 1),
)
# Text as the spool gets it: decoded wire text (never a lone surrogate).
characters = st.characters(exclude_categories=["Cs"])
texts = st.text(characters, max_size=20)
times = st.floats(allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=2**63 - 1)
# Command lines as the client sent them: UTF-8 or not (an 8-bit parameter).
command_lines = st.one_of(
    texts.map(str.encode),
    octets(min_size=1, max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
replies = st.none() | st.builds(
    ReplyInfo,
    code=st.integers(0, 999),
    enhanced=st.none() | texts,
    text=texts,
    local=st.booleans(),
)
recipients = st.builds(
    Recipient, line=command_lines, state=st.sampled_from(RecipientState), reply=replies
)
entries = st.builds(
    Entry,
    queue_id=queue_ids,
    state=st.sampled_from(EntryState),
    created=times,
    attempts=counts,
    next_attempt=times,
    last_error=st.none() | texts,
    mail_from=command_lines,
    recipients=st.lists(recipients, max_size=4).map(tuple),
    body=st.sampled_from(BodyKind),
    size=counts,
    sha256=texts,
    transaction_id=texts,
    dedupe_key=texts,
    route=texts,
    duplicate_risk=st.booleans(),
)


ENTRY = Entry(
    queue_id="20250102T030405.123456-1a2b3c4d",
    state=EntryState.QUEUED,
    created=1735787045.123,
    attempts=0,
    next_attempt=1735787045.123,
    last_error=None,
    mail_from=b"MAIL FROM:<a@example.org>",
    recipients=(Recipient(line=b"RCPT TO:<b@example.net>"),),
    body=BodyKind.DATA,
    size=10,
    sha256="0" * 64,
    transaction_id="s1.1",
    dedupe_key="1" * 64,
    route="default",
    duplicate_risk=False,
)


@scaled(0.5)
@given(entries)
def test_encode_then_decode_is_the_identity(entry: Entry) -> None:
    raw = encode(entry)
    assert decode(raw, entry.queue_id) == entry
    # Files are stable: the decoded entry writes the same bytes.
    assert encode(decode(raw, entry.queue_id)) == raw


@scaled(0.5)
@given(entries, queue_ids)
def test_an_envelope_read_under_another_id_is_refused(entry: Entry, other: str) -> None:
    assume(other != entry.queue_id)
    with pytest.raises(CorruptEntry, match="another id"):
        decode(encode(entry), other)


# -- damaged files ---------------------------------------------------------------

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),  # on either side of the smallest count
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
# The form of a line that is not UTF-8, holding base64 text or not.
_base64_forms = st.builds(
    lambda v: {"base64": v},
    st.one_of(
        st.text(st.sampled_from(string.ascii_letters + string.digits + "+/= \n*"), max_size=12),
        texts,
        st.none(),
        st.integers(-5, 5),
        st.lists(st.none(), max_size=1),
    ),
)
json_values = st.recursive(
    st.one_of(_json_scalars, _base64_forms),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(texts, inner, max_size=3),
    ),
    max_leaves=6,
)
FIELDS = [
    "version",
    "id",
    "state",
    "created",
    "attempts",
    "next_attempt",
    "last_error",
    "transaction_id",
    "dedupe_key",
    "route",
    "duplicate_risk",
    "mail_from",
    "recipients",
    "body",
    "size",
    "sha256",
]
RECIPIENT_FIELDS = ["line", "state", "reply"]
REPLY_FIELDS = ["code", "enhanced", "text", "local"]


def decodes_or_is_corrupt(raw: bytes, queue_id: str) -> None:
    """``decode`` gives a well-typed Entry that survives a round trip, or raises CorruptEntry."""
    try:
        entry = decode(raw, queue_id)
    except CorruptEntry:
        return
    assert isinstance(entry, Entry)
    assert entry.queue_id == queue_id
    # Every field has the type and range the model says.
    for name in ("attempts", "size"):
        value = getattr(entry, name)
        assert type(value) is int
        assert value >= 0
    for name in ("created", "next_attempt"):
        assert type(getattr(entry, name)) is float
    for name in ("sha256", "transaction_id", "dedupe_key", "route"):
        assert type(getattr(entry, name)) is str
    assert entry.last_error is None or type(entry.last_error) is str
    assert type(entry.mail_from) is bytes
    assert isinstance(entry.state, EntryState)
    assert isinstance(entry.body, BodyKind)
    assert type(entry.duplicate_risk) is bool
    for rcpt in entry.recipients:
        assert type(rcpt.line) is bytes
        assert isinstance(rcpt.state, RecipientState)
        if rcpt.reply is not None:
            assert type(rcpt.reply.code) is int
            assert rcpt.reply.code >= 0
            assert rcpt.reply.enhanced is None or type(rcpt.reply.enhanced) is str
            assert type(rcpt.reply.text) is str
            assert type(rcpt.reply.local) is bool
    # Whatever is read is written back, and reads the same.
    assert decode(encode(entry), queue_id) == entry


SLOTS = (
    [("doc", name) for name in FIELDS]
    + [("recipient", name) for name in RECIPIENT_FIELDS]
    + [("reply", name) for name in REPLY_FIELDS]
)
# A field's damage: deleted (None here), or any JSON value in its place.
damages = st.none() | st.builds(lambda v: [v], json_values)


@scaled(0.25, cap=1_000)
@given(
    entries.filter(lambda e: e.recipients),
    st.lists(damages, min_size=len(SLOTS), max_size=len(SLOTS)),
)
def test_a_damaged_field_is_read_or_refused_as_corrupt(
    entry: Entry, damage: list[list[object] | None]
) -> None:
    # Every field in turn, each with its own damage.
    for (where, name), change in zip(SLOTS, damage, strict=True):
        doc = orjson.loads(encode(entry))
        recipient = doc["recipients"][0]
        if recipient["reply"] is None:
            recipient["reply"] = {"code": 250, "enhanced": None, "text": "ok", "local": False}
        target = {"doc": doc, "recipient": recipient, "reply": recipient["reply"]}[where]
        if change is None:
            del target[name]
        else:
            target[name] = change[0]
        decodes_or_is_corrupt(orjson.dumps(doc), entry.queue_id)


@scaled(0.5, cap=2_000)
@given(
    entries.filter(lambda e: e.recipients),
    st.sampled_from(["mail_from", "line"]),
    json_values,
)
def test_a_command_line_field_holding_anything_is_read_or_refused_as_corrupt(
    entry: Entry, name: str, value: object
) -> None:
    # A line is a string, or {"base64": ...} when it is not UTF-8.
    doc = orjson.loads(encode(entry))
    (doc if name == "mail_from" else doc["recipients"][0])[name] = value
    decodes_or_is_corrupt(orjson.dumps(doc), entry.queue_id)


# A copy of ENTRY with a reply, so that every field has a value to damage.
REPLIED = replace(
    ENTRY,
    recipients=(
        Recipient(
            line=b"RCPT TO:<b@example.net>",
            state=RecipientState.DELIVERED,
            reply=ReplyInfo(code=250, enhanced="2.0.0", text="Ok", local=False),
        ),
    ),
)
COUNTS = [("attempts",), ("size",), ("recipients", 0, "reply", "code")]


@given(
    st.sampled_from(COUNTS),
    st.one_of(
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        texts,
        st.none(),
    ),
)
def test_a_count_is_read_only_as_a_non_negative_integer(
    path: tuple[str | int, ...], value: object
) -> None:
    doc = orjson.loads(encode(REPLIED))
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    raw = orjson.dumps(doc)
    if type(value) is int and value >= 0:
        entry = decode(raw, REPLIED.queue_id)
        got: Any = entry
        for step in path:
            got = got[step] if isinstance(step, int) else getattr(got, step)
        assert got == value
    else:
        with pytest.raises(CorruptEntry):
            decode(raw, REPLIED.queue_id)


@given(st.binary(min_size=1, max_size=40))
def test_any_command_line_octets_survive_the_file(line: bytes) -> None:
    entry = replace(ENTRY, mail_from=line)
    raw = encode(entry)
    assert decode(raw, entry.queue_id).mail_from == line
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        assert orjson.loads(raw)["mail_from"] == {"base64": base64.b64encode(line).decode()}


_BASE64ISH = string.ascii_letters + string.digits + "+/=-_ \n"


@example(text="\x80")  # once a ValueError, not CorruptEntry
@given(st.text(st.one_of(st.sampled_from(_BASE64ISH), characters), max_size=16))
def test_base64_text_is_read_when_valid_and_refused_as_corrupt_when_not(text: str) -> None:
    doc = orjson.loads(encode(ENTRY))
    doc["mail_from"] = {"base64": text}
    try:
        expected = base64.b64decode(text, validate=True)
    except ValueError:  # not base64, or not even ASCII
        with pytest.raises(CorruptEntry):
            decode(orjson.dumps(doc), ENTRY.queue_id)
    else:
        assert decode(orjson.dumps(doc), ENTRY.queue_id).mail_from == expected


@scaled(0.5)
@given(entries, st.data())
def test_damaged_bytes_are_read_or_refused_as_corrupt(entry: Entry, data: st.DataObject) -> None:
    raw = bytearray(encode(entry))
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(raw)), label="at")
        match data.draw(st.sampled_from(["set", "drop", "cut"]), label="edit"):
            case "set" if at < len(raw):
                raw[at] = data.draw(st.integers(0, 255), label="octet")
            case "drop":
                del raw[at : at + 1]
            case _:
                del raw[at:]
    decodes_or_is_corrupt(bytes(raw), entry.queue_id)


@given(octets(max_size=200), queue_ids)
def test_any_bytes_are_read_or_refused_as_corrupt(raw: bytes, queue_id: str) -> None:
    decodes_or_is_corrupt(raw, queue_id)


@scaled()
@given(json_values, queue_ids)
def test_any_json_is_read_or_refused_as_corrupt(value: object, queue_id: str) -> None:
    decodes_or_is_corrupt(orjson.dumps(value), queue_id)
