"""Passing the workers' standard output on, a whole line at a time.

With ``log.transactions: "-"`` each worker of ``workers`` writes its
records to its standard output, a pipe to the supervisor. Were the workers
to share the supervisor's standard output instead, a batch of records
larger than PIPE_BUF (4096 octets) written to a pipe or a socket (a
journal) could be split and mixed with another worker's. ``LineForwarder``
reads each worker's pipe and writes only whole lines, each batch with
``os.write`` calls that nothing else interleaves: the supervisor's loop is
one thread and a batch is written to its end before the next is looked at.

A line a worker leaves unfinished (it was killed while writing) is ended
with a line feed, so that the next one starts on a line of its own.

Rule: a target that cannot be written (a closed pipe, a full disk) drops
what it could not take and says so once per streak; the workers go on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Final

log = logging.getLogger("smtpwarden.workers")

# One read from a worker's pipe; a pipe holds 64 KiB on Linux.
READ_BYTES: Final = 64 * 1024
# A line this long without its end is written as it is, ended: records are
# far shorter (a transaction of 1000 recipients is well under 1 MiB), and
# the supervisor must not hold unbounded memory for a worker. Our choice.
MAX_LINE_BYTES: Final = 16 * 1024 * 1024


class LineForwarder:
    """Writes whole lines read from the workers to one file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dropped_bytes = 0
        self._failing = False

    async def forward(self, stream: asyncio.StreamReader) -> None:
        """Pass ``stream`` on until its end; whole lines only."""
        pending = bytearray()
        while chunk := await stream.read(READ_BYTES):
            pending += chunk
            end = pending.rfind(b"\n") + 1
            if end:
                self.write(pending[:end])
                del pending[:end]
            elif len(pending) > MAX_LINE_BYTES:
                self.write(pending + b"\n")
                pending.clear()
        if pending:
            self.write(pending + b"\n")

    def write(self, data: bytes | bytearray) -> None:
        """Write all of ``data``, blocking; on failure drop the rest and log once."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as error:
            self.dropped_bytes += len(view)
            if not self._failing:
                log.error("cannot pass worker output on: %s; dropping it", error)
            self._failing = True
        else:
            self._failing = False
        finally:
            view.release()
