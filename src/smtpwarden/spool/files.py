"""The spool's folders and the few file operations it builds on.

``Layout`` names every path; the helpers write a file durably, fsync a
folder and take an exclusive ``flock``. Everything here blocks: callers on an
event loop run it in a worker thread.

Rules kept here:
- A file is durable once its data and its folder entry are: ``write_durably``
  fsyncs the file, and the caller fsyncs the folder after the rename.
- ``flock`` locks belong to an open file description, not to a path or a
  process, so two opens in one process exclude each other like two
  processes do, and closing another descriptor of the same file (as POSIX
  ``fcntl`` locks would) never drops the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

# Messages are mail: readable by the spool's user and its group (an operator
# running ``smtpwarden queue``), nobody else.
FILE_MODE = 0o640
DIR_MODE = 0o750

# How often a bounded wait for a lock tries again. flock has no timeout; 10
# ms keeps an operator's wait short without spinning.
LOCK_POLL_S = 0.01


@dataclass(frozen=True, slots=True)
class Layout:
    """The paths of a spool folder (see ``store.py`` for what each holds)."""

    root: Path

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def lock(self) -> Path:
        return self.root / "spool.lock"

    def message(self, queue_id: str) -> Path:
        return self.queue / f"{queue_id}.msg"

    def envelope(self, queue_id: str) -> Path:
        return self.queue / f"{queue_id}.env"

    def create(self) -> None:
        """Create the folders that are missing, durably; raises OSError."""
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        made = False
        for folder in (self.tmp, self.queue, self.quarantine):
            if not folder.is_dir():
                folder.mkdir(mode=DIR_MODE)
                made = True
        if made:
            # A folder whose own entry is lost in a crash takes every file
            # fsynced into it along.
            fsync_dir(self.root)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every octet of ``data``; os.write may write fewer than asked."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_durably(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data``, fsync, close.

    Raises OSError; then ``path`` is removed.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        remove_quietly(path)
        raise


def fsync_dir(folder: Path) -> None:
    """fsync a folder, making the renames and removals in it durable; raises OSError."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    """Remove ``path`` if it is there; never raises.

    Runs on paths that already failed (a full disk, a folder gone): what
    cannot be removed is left for ``recover``.
    """
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def lock_exclusive(fd: int, timeout: float | None) -> bool:
    """Take an exclusive flock on ``fd``; True when held.

    ``timeout`` None waits as long as it takes, 0 tries once, otherwise the
    wait ends after ``timeout`` seconds and False is returned. Raises OSError
    for anything other than a lock held elsewhere.
    """
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL_S)
        else:
            return True
