"""The held copy of a message, kept while a replay may still need it.

Under the retry and requeue policies every octet sent upstream is also kept
here: in memory up to a threshold, then in an unnamed temporary file, so a
large message costs disk, not memory. The copy is exactly what the upstream
was sent: for DATA the section after the 354, dot-stuffing and terminator
included; for BDAT the chunk octets joined.

Passthrough holds nothing: the hot path pays for a copy only when the
policy asks for one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import BinaryIO

# How much of a spilled copy one read brings back for a replay.
READ_BLOCK_BYTES = 64 * 1024


class HeldMessage:
    """Message octets kept for a replay. ``close`` frees them."""

    def __init__(self, *, kind: str, memory_limit: int, folder: str | None = None) -> None:
        self.kind = kind  # "data" or "bdat"
        self.size = 0
        self._memory_limit = memory_limit
        self._folder = folder
        self._parts: list[bytes] = []
        self._file: BinaryIO | None = None

    @property
    def spilled(self) -> bool:
        """True once the copy lives in a temporary file."""
        return self._file is not None

    def append(self, data: bytes | memoryview) -> None:
        """Keep a copy of ``data``. Raises OSError if the spill file fails."""
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
        elif self.size > self._memory_limit:
            # An unnamed file: it disappears with the process, whatever happens.
            spill = tempfile.TemporaryFile(dir=self._folder)  # noqa: SIM115 - closed by close()
            for part in self._parts:
                spill.write(part)
            spill.write(data)
            self._parts = []
            self._file = spill
        else:
            self._parts.append(bytes(data))

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The octets in order, for a replay."""
        if self._file is None:
            yield from self._parts
            return
        self._file.flush()
        self._file.seek(0)
        while block := self._file.read(READ_BLOCK_BYTES):
            yield block

    def close(self) -> None:
        """Forget the copy (and remove a spill file)."""
        self._parts = []
        if self._file is not None:
            self._file.close()
            self._file = None
