"""The spool: messages the relay answered 250 for and still has to deliver.

Layout of a spool folder::

    spool.lock   every process that opens the spool holds a shared flock on
                 it; ``recover`` cleans up only under an exclusive one
    tmp/         files being written: ID.msg, ID.env (a put), ID.env.XXXX
                 (an update); anything here after a crash is garbage
    queue/       one entry per message: ID.msg (the octets) and ID.env (the
                 envelope JSON, see ``codec.py``), the state inside ID.env
    quarantine/  what ``recover`` found damaged: an envelope without its
                 message, or one that does not parse or match its message

The state (queued, deferred, held, dead) lives in the envelope, so every
change of state is one atomic rename, and an entry never has to move
between folders as a pair.

``put`` keeps PRODUCT.md invariant 1 (no 250 before the message is
durable) and invariant 7 (a SIGKILL loses nothing acknowledged):

1. write tmp/ID.msg and tmp/ID.env, fsync each (in the writer's thread);
2. rename tmp/ID.msg to queue/ID.msg, fsync queue/;
3. rename tmp/ID.env to queue/ID.env, fsync queue/;
4. return the queue id: only now may the caller answer 250.

Steps 2 and 3 run on the committer's thread for every put that arrived
meanwhile, so the batch shares the two folder fsyncs (``put.py``,
``commit.py``).

The envelope is the commit record: an entry exists exactly when queue/ID.env
does, and queue/ID.msg is durable before queue/ID.env can appear (the fsync
in step 2; removal takes the envelope first too, see ``lease.py``). So
``recover`` can always decide:
- a message file alone is a put that never returned, or a removal half
  done: nobody was told 250 for it, or it is finished; it is removed;
- an envelope alone cannot come from this code: the disk or a person lost
  the message; it may have been acknowledged, so it goes to quarantine/ for
  an operator, never silently away;
- anything in tmp/ was never renamed into place: removed.

Per-entry changes take the entry's lock (``lease.py``, the locking rule).

Rules kept here:
- No sockets, no upstream: delivery lives in ``net`` and drives the spool
  through ``entries``, ``lease`` and the ``Lease`` methods.
- Every OS error becomes SpoolError (SpoolFull when out of space); a failed
  put leaves nothing in queue/.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.spool import codec
from smtpwarden.spool.errors import CorruptEntry, EntryBusy, NoSuchEntry, SpoolError, spool_error
from smtpwarden.spool.files import FILE_MODE, Layout, lock_exclusive
from smtpwarden.spool.lease import Lease, checked_lease
from smtpwarden.spool.model import Entry, EntryState, Envelope, check_queue_id
from smtpwarden.spool.put import Chunks, Writer
from smtpwarden.spool.recovery import RecoveryReport, clean_up

# How long an operator's command waits for an entry that a delivery holds.
# Our choice: long enough for most deliveries to end, short enough that a
# stuck one is reported (EntryBusy) instead of hanging the command.
LOCK_WAIT_S = 30.0
# How long ``recover`` waits for other processes (an operator's command) to
# close the spool before it gives up cleaning and only lists entries.
RECOVER_WAIT_S = 5.0
# Threads that run ``put`` for the event loop. Each waits on its own file
# fsyncs and then on the group commit; more threads, bigger batches. Our
# choice; the benchmark (benchmarks/spool_commit.py) shows the effect.
PUT_THREADS = 16


@dataclass(frozen=True, slots=True)
class Seen:
    """What ``Spool.look`` knows of one entry, and of which version of its envelope."""

    version: tuple[int, int, int]  # the envelope file's inode, size and modification time
    state: EntryState
    next_attempt: float
    created: float


_DELIVERABLE = (EntryState.QUEUED, EntryState.DEFERRED)


class Spool:
    """A spool folder, opened by one process (the relay, or an operator's command).

    Safe to share between threads. Raises SpoolError if the folder cannot be
    created or opened. ``group_commit`` off makes every put commit alone
    (for comparison in benchmarks). ``clock`` gives epoch seconds.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        group_commit: bool = True,
        put_threads: int = PUT_THREADS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.layout = Layout(Path(folder))
        self._clock = clock
        self._put_threads = put_threads
        self._executor: ThreadPoolExecutor | None = None
        self._state_lock = threading.Lock()
        self._idle = threading.Condition(self._state_lock)  # notified when _puts drops
        self._puts = 0  # puts under way: ``close`` waits for them, ``recover`` refuses
        self._closed = False
        self.writer = Writer(self.layout, clock, group_commit=group_commit)
        self._seen: dict[str, Seen] = {}  # ``look``'s memory
        self._look_lock = threading.Lock()
        try:
            self.layout.create()
            self._lock_fd = os.open(
                self.layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE
            )
        except OSError as error:
            raise spool_error(f"cannot open spool {folder}", error) from error
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        except OSError as error:
            os.close(self._lock_fd)
            raise spool_error(f"cannot lock spool {folder}", error) from error

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Let the puts under way finish, stop the threads, release the spool lock.

        Idempotent; puts that start afterwards raise SpoolError.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            while self._puts:
                self._idle.wait()
            executor = self._executor
        if executor is not None:
            executor.shutdown(wait=True)
        self.writer.close()
        os.close(self._lock_fd)

    async def put(self, envelope: Envelope, chunks: Chunks) -> str:
        """``put_sync`` in one of the spool's threads, for the event loop.

        ``chunks`` is consumed in that thread. If the awaiting task is
        cancelled, the put still completes: the message may then be spooled
        without the client having been told (a duplicate risk, never a loss).
        """
        with self._state_lock:
            if self._closed:
                raise SpoolError("the spool is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self._put_threads, thread_name_prefix="spool-put"
                )
            executor = self._executor
        loop = asyncio.get_running_loop()
        call = functools.partial(self.put_sync, envelope, chunks)
        return await loop.run_in_executor(executor, call)

    def put_sync(self, envelope: Envelope, chunks: Chunks) -> str:
        """Store a message durably and return its queue id.

        Returns only once the message and its envelope are fsynced and
        renamed into queue/ and the folder is fsynced: then, and only then,
        may the client be answered 250. Blocks. Raises SpoolFull or
        SpoolError when anything could not be written (then nothing of the
        message is in queue/), ValueError for an envelope without recipients,
        with CR or LF inside a line, or a DATA section without its
        terminator. An exception raised by ``chunks`` propagates, with the
        same guarantee.
        """
        with self._state_lock:
            if self._closed:
                raise SpoolError("the spool is closed")
            self._puts += 1
        try:
            return self.writer.put(envelope, chunks)
        finally:
            with self._state_lock:
                self._puts -= 1
                self._idle.notify_all()

    def get(self, queue_id: str) -> Entry:
        """The entry as stored; raises NoSuchEntry, CorruptEntry or SpoolError."""
        check_queue_id(queue_id)
        try:
            raw = self.layout.envelope(queue_id).read_bytes()
        except FileNotFoundError:
            raise NoSuchEntry(f"{queue_id}: no such entry") from None
        except OSError as error:
            raise spool_error(f"cannot read {queue_id}", error) from error
        return codec.decode(raw, queue_id)

    def entries(self, state: EntryState | None = None) -> Iterator[Entry]:
        """Entries oldest first, all or in ``state``, reading envelopes only.

        Entries removed during the scan are skipped, and so are damaged
        envelopes (``recover`` quarantines those; ``get`` raises for them).
        Raises SpoolError if the queue folder cannot be read.
        """
        for queue_id in self._queue_ids():
            try:
                entry = self.get(queue_id)
            except (NoSuchEntry, CorruptEntry):
                continue
            if state is None or entry.state is state:
                yield entry

    def due(self, now: float) -> list[str]:
        """Queued and deferred entries whose next attempt is at or before ``now``, oldest first.

        Raises SpoolError if the queue folder cannot be read.
        """
        return [
            queue_id
            for queue_id, seen in self.look().items()
            if seen.state in _DELIVERABLE and seen.next_attempt <= now
        ]

    def look(self) -> dict[str, Seen]:
        """What each entry's envelope says of its state and times, oldest entry first.

        The delivery workers ask every second and the metrics at each
        scrape, and a spool may hold tens of thousands of entries: an
        envelope is read again only when its file changed (another inode,
        size or modification time); otherwise what it said last time is
        reused. Raises SpoolError if the queue folder cannot be read.
        """
        with self._look_lock:
            known = self._seen
            seen: dict[str, Seen] = {}
            for queue_id in self._queue_ids():
                try:
                    stat = os.stat(self.layout.envelope(queue_id))
                except OSError:
                    continue  # removed meanwhile; a folder error shows in the listing
                version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
                entry = known.get(queue_id)
                if entry is None or entry.version != version:
                    try:
                        stored = self.get(queue_id)
                    except (NoSuchEntry, CorruptEntry):
                        continue
                    entry = Seen(version, stored.state, stored.next_attempt, stored.created)
                seen[queue_id] = entry
            self._seen = seen  # entries gone since the last look are forgotten
            return seen

    def _queue_ids(self) -> list[str]:
        try:
            names = os.listdir(self.layout.queue)
        except OSError as error:
            raise spool_error("cannot list the queue", error) from error
        ids = [name[:-4] for name in names if name.endswith(".env")]
        return sorted(i for i in ids if _is_queue_id(i))

    def open_message(self, queue_id: str) -> BinaryIO:
        """The message octets of an entry, opened for reading; the caller closes it.

        Raises NoSuchEntry or SpoolError. The file stays readable even if the
        entry is removed meanwhile.
        """
        check_queue_id(queue_id)
        try:
            stream = open(self.layout.message(queue_id), "rb")  # noqa: SIM115 - caller closes
        except FileNotFoundError:
            raise NoSuchEntry(f"{queue_id}: no such entry") from None
        except OSError as error:
            raise spool_error(f"cannot open message {queue_id}", error) from error
        if not self.layout.envelope(queue_id).exists():
            stream.close()  # a put not yet committed, or a removal under way
            raise NoSuchEntry(f"{queue_id}: no such entry")
        return stream

    def lease(self, queue_id: str, *, timeout: float | None = 0.0) -> Lease:
        """Lock an entry for changes (the locking rule in ``lease.py``).

        ``timeout``: 0 tries once (a delivery worker skips busy entries),
        None waits for ever, otherwise seconds. Raises EntryBusy when the
        wait runs out, NoSuchEntry, CorruptEntry or SpoolError.
        """
        check_queue_id(queue_id)
        try:
            fd = os.open(self.layout.message(queue_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchEntry(f"{queue_id}: no such entry") from None
        except OSError as error:
            raise spool_error(f"cannot open {queue_id}", error) from error
        try:
            locked = lock_exclusive(fd, timeout)
        except OSError as error:
            os.close(fd)
            raise spool_error(f"cannot lock {queue_id}", error) from error
        if not locked:
            os.close(fd)
            raise EntryBusy(f"{queue_id} is locked by another process (a delivery?)")
        return checked_lease(self.layout, queue_id, fd, self._clock)

    def _change(
        self, queue_id: str, timeout: float | None, change: Callable[[Lease], Entry]
    ) -> Entry:
        with self.lease(queue_id, timeout=timeout) as lease:
            return change(lease)

    def update(self, entry: Entry, *, timeout: float | None = LOCK_WAIT_S) -> Entry:
        """``Lease.update`` under a lease of its own (see there)."""
        return self._change(entry.queue_id, timeout, lambda lease: lease.update(entry))

    def mark_delivered(
        self,
        queue_id: str,
        indexes: int | Iterable[int],
        reply: ReplyInfo,
        *,
        timeout: float | None = LOCK_WAIT_S,
    ) -> Entry:
        """``Lease.mark_delivered`` under a lease of its own."""
        return self._change(queue_id, timeout, lambda lease: lease.mark_delivered(indexes, reply))

    def mark_failed(
        self,
        queue_id: str,
        indexes: int | Iterable[int],
        reply: ReplyInfo,
        *,
        timeout: float | None = LOCK_WAIT_S,
    ) -> Entry:
        """``Lease.mark_failed`` under a lease of its own."""
        return self._change(queue_id, timeout, lambda lease: lease.mark_failed(indexes, reply))

    def defer(
        self,
        queue_id: str,
        error: str,
        next_attempt: float,
        *,
        duplicate_risk: bool = False,
        timeout: float | None = LOCK_WAIT_S,
    ) -> Entry:
        """``Lease.defer`` under a lease of its own."""
        return self._change(
            queue_id,
            timeout,
            lambda lease: lease.defer(error, next_attempt, duplicate_risk=duplicate_risk),
        )

    def hold(self, queue_id: str, *, timeout: float | None = LOCK_WAIT_S) -> Entry:
        """``Lease.hold`` under a lease of its own."""
        return self._change(queue_id, timeout, Lease.hold)

    def release(self, queue_id: str, *, timeout: float | None = LOCK_WAIT_S) -> Entry:
        """``Lease.release`` under a lease of its own."""
        return self._change(queue_id, timeout, Lease.release)

    def retry_now(self, queue_id: str, *, timeout: float | None = LOCK_WAIT_S) -> Entry:
        """``Lease.retry_now`` under a lease of its own."""
        return self._change(queue_id, timeout, Lease.retry_now)

    def to_dead(
        self,
        queue_id: str,
        reason: str,
        *,
        duplicate_risk: bool = False,
        timeout: float | None = LOCK_WAIT_S,
    ) -> Entry:
        """``Lease.to_dead`` under a lease of its own."""
        return self._change(
            queue_id, timeout, lambda lease: lease.to_dead(reason, duplicate_risk=duplicate_risk)
        )

    def delete(self, queue_id: str, *, timeout: float | None = LOCK_WAIT_S) -> Entry:
        """``Lease.delete`` under a lease of its own; returns the removed entry."""
        return self._change(queue_id, timeout, Lease.delete)

    def recover(self, *, wait: float = RECOVER_WAIT_S) -> RecoveryReport:
        """Clean up after a crash and list what to resume. Call it at start.

        Needs the spool to itself: it takes the exclusive spool lock, waiting
        up to ``wait`` seconds for other processes to close the spool; if
        they do not, nothing is cleaned (``cleaned`` is False) and the
        entries are listed all the same. Raises SpoolError if a put is under
        way in this Spool or a cleanup step fails.
        """
        with self._state_lock:
            if self._puts:
                raise SpoolError("recover() must not run beside a put")
            if self._closed:
                raise SpoolError("the spool is closed")
            exclusive = lock_exclusive(self._lock_fd, wait)
            try:
                cleanup = clean_up(self.layout) if exclusive else None
            finally:
                # From exclusive (or from nothing, if a failed try dropped
                # the shared lock) back to shared.
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        entries = list(self.entries())
        resume = tuple(e for e in entries if e.state in (EntryState.QUEUED, EntryState.DEFERRED))
        return RecoveryReport(
            cleaned=cleanup is not None,
            temp_removed=cleanup.temp_removed if cleanup else 0,
            orphans_removed=cleanup.orphans_removed if cleanup else 0,
            quarantined=cleanup.quarantined if cleanup else (),
            resume=resume,
            held=sum(e.state is EntryState.HELD for e in entries),
            dead=sum(e.state is EntryState.DEAD for e in entries),
        )


def _is_queue_id(name: str) -> bool:
    try:
        check_queue_id(name)
    except NoSuchEntry:
        return False
    return True
