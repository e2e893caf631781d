"""The sink's folder: messages streamed to disk, then made durable.

A ``Draft`` takes a message as it arrives and writes it to a temporary file
in the folder, so the sink's memory stays flat whatever the message size
and its cap bounds disk use instead. Past the cap, or after a write error,
the draft stops writing and deletes what it wrote; the caller keeps reading
to the end of the message and only then answers.

``Mailbox.commit`` keeps the sink's promise: fsync the message, rename it to
``ID.eml``, write ``ID.json`` (the envelope) the same way, fsync the folder.
Only after it returns may the message be answered 250.

Rules kept here:
- ``commit`` blocks on three fsyncs: callers on an event loop run it in a
  worker thread, and must not touch the draft until it returns.
- No sockets, no event loop: this is plain file I/O.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import time
from pathlib import Path

import orjson

from smtpwarden.spool.files import write_all

# The DATA terminator, once unstuffed, leaves its CRLF; it is not message.
_CRLF = 2


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Draft:
    """One message on its way to disk.

    With ``unstuff`` set, the input is a DATA section as the client sent it
    (terminator included) and the file gets the message with RFC 5321 4.5.2
    dot-stuffing removed; otherwise (BDAT) octets are written as received.
    ``size`` counts message octets written; ``over`` says the cap was
    passed, ``error`` holds the first write error. Either way nothing is
    kept on disk.
    """

    __slots__ = (
        "_fd",
        "_lag",
        "_line_start",
        "_unstuff",
        "error",
        "max_bytes",
        "over",
        "path",
        "size",
    )

    def __init__(self, path: Path, max_bytes: int, *, unstuff: bool) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self.over = False
        self.error: OSError | None = None
        self._unstuff = unstuff
        self._line_start = True  # the DATA command line ended with CRLF
        self._lag = b""
        self._fd = -1
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as error:
            self.error = error

    @property
    def failed(self) -> bool:
        """True once the message can no longer be stored."""
        return self.over or self.error is not None

    def write(self, data: bytes | memoryview) -> None:
        """Add received octets; past the cap or on error, drop them."""
        if self.failed:
            return
        chunk: bytes | memoryview = data
        if self._unstuff:
            raw = bytes(data)
            if self._line_start and raw.startswith(b"."):
                raw = raw[1:]
            self._line_start = raw.endswith(b"\n")
            # The reader refuses bare LF, so every LF ends a CRLF and a line
            # that starts with "." follows "\n": remove one such dot.
            raw = self._lag + raw.replace(b"\n.", b"\n")
            chunk, self._lag = raw[:-_CRLF], raw[-_CRLF:]
        if self.size + len(chunk) > self.max_bytes:
            self.over = True
            self.discard()
            return
        self.size += len(chunk)
        try:
            write_all(self._fd, chunk)
        except OSError as error:
            self.error = error
            self.discard()

    def discard(self) -> None:
        """Close and delete the temporary file, if there is one; never raises.

        It runs on paths that already failed (a full disk, a folder gone):
        what cannot be removed is left for the operator.
        """
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)

    def commit(self, target: Path) -> None:
        """fsync the file and rename it to ``target``; raises OSError.

        Blocks; on failure the temporary file is gone.
        """
        if self.error is not None:
            raise self.error
        try:
            os.fsync(self._fd)
            fd, self._fd = self._fd, -1
            os.close(fd)
            os.replace(self.path, target)
        except OSError:
            self.discard()
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
            raise


class Mailbox:
    """The folder a sink writes to."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        """Create the folder if needed; raises OSError if it cannot."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._serial = itertools.count(1)
        self._drafts = itertools.count(1)
        # Random per process: several processes (workers) may share a folder.
        self._tag = secrets.token_hex(4)

    def draft(self, max_bytes: int, *, unstuff: bool) -> Draft:
        """Start a message; a folder that cannot be written gives a failed draft."""
        name = f".incoming-{self._tag}-{next(self._drafts):06d}.tmp"
        return Draft(self.folder / name, max_bytes, unstuff=unstuff)

    def new_id(self) -> str:
        """A fresh message id: UTC time, this mailbox's tag and a serial."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return f"{stamp}-{self._tag}{next(self._serial):06d}"

    def commit(self, draft: Draft, ident: str, envelope: dict[str, object]) -> None:
        """Store a complete draft and its envelope durably under ``ident``.

        Blocks (run it in a worker thread). Raises OSError if anything
        could not be written; then no ``ID.eml`` is left behind.
        """
        envelope["id"] = ident
        eml = self.folder / f"{ident}.eml"
        draft.commit(eml)
        try:
            _write_durably(
                self.folder / f"{ident}.json", orjson.dumps(envelope, option=orjson.OPT_INDENT_2)
            )
            _fsync_dir(self.folder)
        except OSError:
            eml.unlink(missing_ok=True)
            raise
