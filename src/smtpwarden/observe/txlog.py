"""The transaction log: one JSON line per record, written in batches.

Records are serialised once, when they are complete (orjson, dataclasses as
they are), and appended to a buffer; the buffer is written when it grows past
``FLUSH_BYTES`` or when the relay's periodic tick calls ``flush``. Nothing
here formats anything per message chunk or per reply.

A log that cannot be written (a full disk, a closed pipe) must not stop the
relay (PRODUCT.md, invariant 6): the records of a failed write are dropped
and counted, the failure is reported on stderr once per streak, and writing
resumes when the target accepts data again. A reload (SIGHUP) opens the
file again (``reopen``), for log rotation.

Observers (the metrics) see every record as it is written, session records
included when they are not logged; one that raises is reported once and
the record is written all the same.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import orjson

log = logging.getLogger("smtpwarden.txlog")

# Past this much buffered JSON, write at once rather than wait for the tick.
FLUSH_BYTES = 64 * 1024


class RecordLog:
    """Writes records to stdout ("-") or appends them to a file.

    Writes go straight to the file descriptor (no second buffer below this
    one), so a failed write leaves nothing behind to fail again at close.
    """

    def __init__(self, target: str, *, sessions: bool = True) -> None:
        self.target = target
        self.sessions = sessions
        self._buf = bytearray()
        self.dropped = 0  # records lost to failed writes
        self._failing = False
        # Called with every record written, before it is serialised.
        self.observers: list[Callable[[object], None]] = []
        self._observer_failed = False
        self._owned = target != "-"
        if self._owned:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        else:
            self._fd = sys.stdout.fileno()

    def write(self, record: object) -> None:
        """Append one record (a dataclass or a dict)."""
        if self.observers:
            self._notify(record)
        self._append(record)

    def write_session(self, record: object) -> None:
        """Append a session record if session records are enabled.

        Observers see it either way.
        """
        if self.observers:
            self._notify(record)
        if self.sessions:
            self._append(record)

    def _append(self, record: object) -> None:
        self._buf += orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if len(self._buf) >= FLUSH_BYTES:
            self.flush()

    def _notify(self, record: object) -> None:
        for observer in self.observers:
            try:
                observer(record)
            except Exception:
                # Counting must never cost a record (PRODUCT.md, invariant 6).
                if not self._observer_failed:
                    log.exception("a record observer failed; records are still written")
                self._observer_failed = True

    def flush(self) -> None:
        """Write what is buffered; on failure drop it and count the records."""
        if not self._buf:
            return
        view = memoryview(self._buf)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as error:
            self.dropped += view.tobytes().count(b"\n")
            if not self._failing:
                log.error("cannot write records to %s: %s; dropping them", self.target, error)
            self._failing = True
        else:
            if self._failing:
                log.error("writing records to %s again; %d dropped", self.target, self.dropped)
            self._failing = False
        finally:
            view.release()
            self._buf.clear()

    def reopen(self, target: str, *, sessions: bool) -> None:
        """Write to ``target`` from now on, opened again even if unchanged (SIGHUP).

        After a rotation has renamed the file, records go to a new one at
        the configured name. Raises OSError, with nothing changed, if
        ``target`` cannot be opened; what is buffered goes to the old file.
        """
        owned = target != "-"
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640) if owned else None
        self.flush()
        if self._owned:
            os.close(self._fd)
        self.target, self.sessions, self._owned = target, sessions, owned
        self._fd = fd if fd is not None else sys.stdout.fileno()

    def close(self) -> None:
        """Flush and, for a file, fsync and close it."""
        self.flush()
        if self._owned:
            try:
                os.fsync(self._fd)
            except OSError as error:
                log.error("cannot sync %s: %s", self.target, error)
            finally:
                os.close(self._fd)
