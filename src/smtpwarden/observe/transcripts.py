"""The transcript folder: one JSON file per captured session, and retention.

A transcript is written once, when its session ends, to a temporary name
and renamed into place: a reader never sees half a file. Its name is the
session's start (UTC, to the second) and its session id,
``20250301T091502-3e37a40000001.json``, so names sort by time and the id
finds the file. The file holds ``header`` (what ``list`` shows and filters
on), ``entries``, and the session's ``transactions`` and ``session``
records as the log has them (``transcript.document``).

Retention deletes the oldest transcripts first: those older than
``max_age``, then as many as it takes to bring the folder under
``max_total_bytes``. Age is the file's modification time, which is when
its session ended. Temporary files a crash left behind go after an hour.

Rule 1: a transcript that cannot be written (a full disk, a folder that
cannot be made) is logged and dropped; the relay goes on (PRODUCT.md,
invariant 6). Nothing here runs on the event loop: the relay calls it
through an executor.

Rule 2: nothing here knows the configuration or the session; paths and
limits are passed in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

log = logging.getLogger("smtpwarden.transcripts")

SUFFIX: Final = ".json"
TEMP_SUFFIX: Final = ".tmp"
NAME: Final = re.compile(r"(?P<time>\d{8}T\d{6})-(?P<id>[0-9A-Za-z._-]+)\.json")
# Transcripts hold addresses, and message contents with bodies on: for the
# relay's user and group only, as the record log.
FILE_MODE: Final = 0o640
FOLDER_MODE: Final = 0o750
# A temporary file older than this was left by a crash: no write takes that long.
STALE_TEMP_S: Final = 3600.0


# What ``list`` and ``show`` read from every header.
HEADER_FIELDS: Final[dict[str, type | tuple[type, ...]]] = {
    "id": str,
    "listener": str,
    "client": dict,
    "upstream": dict,
    "started": str,
    "duration_ms": (int, float),
    "end": str,
    "mode": str,
    "senders": list,
    "recipients": list,
    "outcomes": list,
}


class TranscriptError(Exception):
    """A transcript that cannot be found or read; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One transcript file."""

    path: Path
    transcript_id: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class Retention:
    """What one retention pass did."""

    removed: int
    removed_bytes: int
    kept: int
    kept_bytes: int


def file_name(session_id: str, started_epoch: float) -> str:
    """The name of a session's transcript."""
    stamp = datetime.fromtimestamp(started_epoch, UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{session_id}{SUFFIX}"


class TranscriptStore:
    """The transcripts in one folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def write(self, name: str, content: dict[str, object]) -> bool:
        """Write one transcript under ``name``; False (and logged) if it could not be.

        ``content`` is serialised here, off the event loop.
        """
        temp = self.folder / f".{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            data = orjson.dumps(content)
            self.folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with open(descriptor, "wb") as stream:
                stream.write(data)
            os.replace(temp, self.folder / name)
        except (OSError, TypeError) as error:
            log.error("transcript %s not written: %s", name, error)
            with contextlib.suppress(OSError):
                temp.unlink()
            return False
        return True

    def stored(self) -> list[Stored]:
        """Every transcript in the folder, oldest name first; [] if there is no folder."""
        found: list[Stored] = []
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        for entry in entries:
            matched = NAME.fullmatch(entry.name)
            if matched is None:
                continue
            try:
                status = entry.stat()
            except FileNotFoundError:
                continue  # removed meanwhile
            found.append(Stored(Path(entry.path), matched["id"], status.st_size, status.st_mtime))
        found.sort(key=lambda stored: stored.path.name)
        return found

    def find(self, transcript_id: str) -> Path:
        """The file of a transcript id (or a path to a transcript file).

        Raises TranscriptError if there is none.
        """
        given = Path(transcript_id)
        if given.suffix == SUFFIX and given.is_file():
            return given
        for stored in self.stored():
            if stored.transcript_id == transcript_id:
                return stored.path
        raise TranscriptError(f"{transcript_id}: no such transcript in {self.folder}")

    def load(self, transcript_id: str) -> dict[str, Any]:
        """The content of a transcript. Raises TranscriptError."""
        return read(self.find(transcript_id))

    def headers(self) -> Iterator[tuple[Stored, dict[str, Any]]]:
        """Each transcript with its header, oldest first; unreadable files are skipped."""
        for stored in self.stored():
            try:
                content = read(stored.path)
            except TranscriptError as error:
                log.warning("%s", error)
                continue
            yield stored, content["header"]

    def enforce(self, *, now: float, max_age: float, max_total_bytes: int) -> Retention:
        """Delete transcripts past ``max_age`` seconds or ``max_total_bytes`` (0: no limit).

        ``now`` is seconds since the epoch. Oldest first; a file that
        vanished meanwhile is simply gone.
        """
        stored = sorted(self.stored(), key=lambda item: (item.mtime, item.path.name))
        removed = removed_bytes = 0
        total = sum(item.size for item in stored)
        kept: list[Stored] = []
        for item in stored:
            too_old = max_age > 0 and now - item.mtime > max_age
            too_big = max_total_bytes > 0 and total > max_total_bytes
            if too_old or too_big:
                with contextlib.suppress(FileNotFoundError):
                    item.path.unlink()
                removed += 1
                removed_bytes += item.size
                total -= item.size
            else:
                kept.append(item)
        self._remove_stale_temps(now)
        return Retention(removed, removed_bytes, len(kept), total)

    def _remove_stale_temps(self, now: float) -> None:
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.name.endswith(TEMP_SUFFIX) or not entry.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime > STALE_TEMP_S:
                    os.unlink(entry.path)


def read(path: Path) -> dict[str, Any]:
    """Parse a transcript file. Raises TranscriptError naming the file."""
    try:
        content = orjson.loads(path.read_bytes())
    except OSError as error:
        raise TranscriptError(f"{path}: cannot read: {error.strerror or error}") from error
    except orjson.JSONDecodeError as error:
        raise TranscriptError(f"{path}: not a transcript: {error}") from error
    if not isinstance(content, dict) or not isinstance(content.get("header"), dict):
        raise TranscriptError(f"{path}: not a transcript: no header")
    if not isinstance(content.get("entries"), list):
        raise TranscriptError(f"{path}: not a transcript: no entries")
    header = content["header"]
    missing = [key for key, kind in HEADER_FIELDS.items() if not isinstance(header.get(key), kind)]
    if missing:
        raise TranscriptError(f"{path}: not a transcript: its header lacks {', '.join(missing)}")
    return content
