"""The transaction log: one JSON line per record, written in batches.

Records are serialised once, when they are complete (orjson, dataclasses as
they are), and appended to a buffer; the buffer is written when it grows past
``FLUSH_BYTES`` or when the relay's periodic tick calls ``flush``. Nothing
here formats anything per message chunk or per reply.
"""

from __future__ import annotations

import os
import sys
from typing import BinaryIO

import orjson

# Past this much buffered JSON, write at once rather than wait for the tick.
FLUSH_BYTES = 64 * 1024


class RecordLog:
    """Writes records to stdout ("-") or appends them to a file."""

    def __init__(self, target: str, *, sessions: bool = True) -> None:
        self.target = target
        self.sessions = sessions
        self._buf = bytearray()
        self._file: BinaryIO
        self._owned = target != "-"
        if self._owned:
            self._file = open(target, "ab")  # noqa: SIM115 - closed by close()
        else:
            self._file = sys.stdout.buffer

    def write(self, record: object) -> None:
        """Append one record (a dataclass or a dict)."""
        self._buf += orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if len(self._buf) >= FLUSH_BYTES:
            self.flush()

    def write_session(self, record: object) -> None:
        """Append a session record if session records are enabled."""
        if self.sessions:
            self.write(record)

    def flush(self) -> None:
        """Write what is buffered."""
        if self._buf:
            self._file.write(self._buf)
            self._file.flush()
            self._buf.clear()

    def close(self) -> None:
        """Flush and, for a file, fsync and close it."""
        self.flush()
        if self._owned:
            os.fsync(self._file.fileno())
            self._file.close()
