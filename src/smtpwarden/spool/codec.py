"""Envelope files: an ``Entry`` as JSON, and back.

One JSON object per file (``queue/ID.env``), format version 1::

    {"version": 1, "id": "20250102T030405.123456-1a2b3c4d", "state": "deferred",
     "created": 1735787045.123, "attempts": 2, "next_attempt": 1735788245.5,
     "last_error": "451 4.3.0 upstream busy", "transaction_id": "...",
     "dedupe_key": "...", "route": "default", "duplicate_risk": false,
     "mail_from": "MAIL FROM:<a@example.org> SIZE=1234",
     "recipients": [{"line": "RCPT TO:<b@example.net>", "state": "delivered",
                     "reply": {"code": 250, "enhanced": "2.0.0", "text": "Ok",
                               "local": false}}],
     "body": "data", "size": 1234, "sha256": "..."}

A command line that is not valid UTF-8 (an 8-bit parameter value the grammar
lets through) is written as ``{"base64": "..."}`` instead of a string, so
every octet survives. ``decode`` checks every field's type and raises
``CorruptEntry``, never KeyError or TypeError, on a damaged file.

``duplicate_risk`` came after the first spools were written: a file without
it reads as false, so those spools still load (and are still version 1).
"""

from __future__ import annotations

import base64
import enum
from typing import TypeVar

import orjson

from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.spool.errors import CorruptEntry
from smtpwarden.spool.model import BodyKind, Entry, EntryState, Recipient, RecipientState

FORMAT_VERSION = 1

_E = TypeVar("_E", bound=enum.Enum)


def _line_out(line: bytes) -> object:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(line).decode("ascii")}


def reply_json(reply: ReplyInfo | None) -> dict[str, object] | None:
    """A recipient's last reply as the envelope file (and ``queue --json``) shows it."""
    if reply is None:
        return None
    return {
        "code": reply.code,
        "enhanced": reply.enhanced,
        "text": reply.text,
        "local": reply.local,
    }


def encode(entry: Entry) -> bytes:
    """The envelope file's bytes for ``entry``."""
    document = {
        "version": FORMAT_VERSION,
        "id": entry.queue_id,
        "state": entry.state.value,
        "created": entry.created,
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt,
        "last_error": entry.last_error,
        "transaction_id": entry.transaction_id,
        "dedupe_key": entry.dedupe_key,
        "route": entry.route,
        "duplicate_risk": entry.duplicate_risk,
        "mail_from": _line_out(entry.mail_from),
        "recipients": [
            {"line": _line_out(r.line), "state": r.state.value, "reply": reply_json(r.reply)}
            for r in entry.recipients
        ],
        "body": entry.body.value,
        "size": entry.size,
        "sha256": entry.sha256,
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


class _Reader:
    """Typed access to a decoded envelope; any mismatch raises CorruptEntry."""

    def __init__(self, where: str, data: object) -> None:
        if not isinstance(data, dict):
            raise CorruptEntry(f"{where}: expected an object")
        self.where = where
        self.data: dict[str, object] = data

    def _get(self, key: str) -> object:
        if key not in self.data:
            raise CorruptEntry(f"{self.where}: {key} is missing")
        return self.data[key]

    def _bad(self, key: str, expected: str) -> CorruptEntry:
        return CorruptEntry(f"{self.where}: {key} should be {expected}")

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def optional_text(self, key: str) -> str | None:
        value = self._get(key)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string or null")
        return value

    def integer(self, key: str) -> int:
        value = self._get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self._bad(key, "a non-negative integer")
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._bad(key, "a number")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def optional_flag(self, key: str) -> bool:
        """A flag added after the format's first files: missing reads as False."""
        return self.flag(key) if key in self.data else False

    def line(self, key: str) -> bytes:
        value = self._get(key)
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, dict) and isinstance(value.get("base64"), str):
            try:
                return base64.b64decode(value["base64"], validate=True)
            except ValueError:  # binascii.Error, or a non-ASCII string
                pass
        raise self._bad(key, "a string or {base64: ...}")

    def choice(self, key: str, kind: type[_E]) -> _E:
        value = self._get(key)
        try:
            return kind(value)
        except ValueError:
            raise self._bad(key, "one of " + ", ".join(str(m.value) for m in kind)) from None

    def items(self, key: str) -> list[object]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._bad(key, "a list")
        return value

    def child(self, key: str) -> _Reader | None:
        value = self._get(key)
        return None if value is None else _Reader(f"{self.where}.{key}", value)


def _reply_in(reader: _Reader | None) -> ReplyInfo | None:
    if reader is None:
        return None
    return ReplyInfo(
        code=reader.integer("code"),
        enhanced=reader.optional_text("enhanced"),
        text=reader.text("text"),
        local=reader.flag("local"),
    )


def decode(raw: bytes, queue_id: str) -> Entry:
    """Parse an envelope file written by ``encode``; raises CorruptEntry."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise CorruptEntry(f"{queue_id}: envelope is not JSON ({error})") from None
    doc = _Reader(queue_id, data)
    if doc.integer("version") != FORMAT_VERSION:
        raise CorruptEntry(f"{queue_id}: unknown envelope version")
    if doc.text("id") != queue_id:
        raise CorruptEntry(f"{queue_id}: envelope names another id")
    recipients = []
    for index, item in enumerate(doc.items("recipients")):
        rcpt = _Reader(f"{queue_id}.recipients[{index}]", item)
        recipients.append(
            Recipient(
                line=rcpt.line("line"),
                state=rcpt.choice("state", RecipientState),
                reply=_reply_in(rcpt.child("reply")),
            )
        )
    return Entry(
        queue_id=queue_id,
        state=doc.choice("state", EntryState),
        created=doc.number("created"),
        attempts=doc.integer("attempts"),
        next_attempt=doc.number("next_attempt"),
        last_error=doc.optional_text("last_error"),
        mail_from=doc.line("mail_from"),
        recipients=tuple(recipients),
        body=doc.choice("body", BodyKind),
        size=doc.integer("size"),
        sha256=doc.text("sha256"),
        transaction_id=doc.text("transaction_id"),
        dedupe_key=doc.text("dedupe_key"),
        route=doc.text("route"),
        duplicate_risk=doc.optional_flag("duplicate_risk"),
    )
