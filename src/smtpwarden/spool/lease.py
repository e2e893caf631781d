"""Changing one entry while holding its lock.

A ``Lease`` is an exclusive ``flock`` on the entry's message file
(``queue/ID.msg``), taken by ``Spool.lease``. The message file is the lock
because it is written once and never replaced: its inode lives exactly as
long as the entry, whereas the envelope file is replaced by every update (a
lock on it would stay behind on the old inode).

The locking rule: whoever changes an entry (rewrites its envelope, moves it
to another state, removes it) holds its lease, and reads the envelope only
after taking it. A delivery worker holds the lease for the whole delivery,
so ``smtpwarden queue delete`` waits for (or gives up on) the delivery
instead of racing it. Readers (``get``, ``entries``, ``open_message``)
take no lock: envelopes are replaced by rename, so a reader sees the old
file or the new one, never a mix.

Removal order: the envelope goes first, then the folder is fsynced, then
the message file. A crash in between leaves a message without envelope,
which ``recover`` knows to be no entry at all and removes.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import replace
from types import TracebackType
from typing import BinaryIO

from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.spool import codec
from smtpwarden.spool.errors import NoSuchEntry, SpoolError, spool_error
from smtpwarden.spool.files import Layout, fsync_dir, remove_quietly, write_durably
from smtpwarden.spool.model import (
    Change,
    Entry,
    EntryState,
    RecipientState,
    check_update,
    transition,
)


class Lease:
    """Exclusive hold of one entry, across threads and processes, until closed.

    ``entry`` is the entry as stored, read under the lock and kept current
    by every change made through the lease. Every method blocks on file
    I/O; raises NoSuchEntry once the entry was removed or the lease closed,
    SpoolError (or SpoolFull) when a write fails, and InvalidTransition when
    the entry's state does not allow the change. A failed write leaves the
    stored entry as it was.
    """

    def __init__(self, layout: Layout, entry: Entry, fd: int, clock: Callable[[], float]) -> None:
        self.entry = entry
        self._layout = layout
        self._fd = fd
        self._clock = clock

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def active(self) -> bool:
        """True until the lease is closed or its entry removed."""
        return self._fd >= 0

    def close(self) -> None:
        """Release the lock; idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # closing the description drops its flock

    def _check(self) -> Entry:
        if self._fd < 0:
            raise NoSuchEntry(f"{self.entry.queue_id}: the lease is closed or the entry removed")
        return self.entry

    def open_message(self) -> BinaryIO:
        """The message octets, as stored (see ``BodyKind``), opened for reading."""
        entry = self._check()
        try:
            return open(self._layout.message(entry.queue_id), "rb")
        except OSError as error:
            raise spool_error(f"cannot open message {entry.queue_id}", error) from error

    def update(self, entry: Entry) -> Entry:
        """Store ``entry`` in place of the current one and return it.

        The envelope is rewritten atomically (temporary file, fsync, rename,
        folder fsync). An entry with no recipient left pending is removed
        instead, and the lease ends; the returned entry is then the caller's
        record of it. Raises ValueError if ``entry`` changes what identifies
        the message or clears its duplicate risk, InvalidTransition if it
        changes a settled recipient.
        """
        check_update(self._check(), entry)
        if entry.finished:
            self._remove()
        else:
            self._write(entry)
        self.entry = entry
        return entry

    def mark_delivered(self, indexes: int | Iterable[int], reply: ReplyInfo) -> Entry:
        """Record that the upstream accepted the message for these recipients."""
        return self._settle(indexes, RecipientState.DELIVERED, reply)

    def mark_failed(self, indexes: int | Iterable[int], reply: ReplyInfo) -> Entry:
        """Record a permanent refusal (5xx) for these recipients: no more attempts."""
        return self._settle(indexes, RecipientState.FAILED, reply)

    def _settle(
        self, indexes: int | Iterable[int], state: RecipientState, reply: ReplyInfo
    ) -> Entry:
        chosen = (indexes,) if isinstance(indexes, int) else tuple(indexes)
        return self.update(self._check().settle(chosen, state, reply))

    def defer(self, error: str, next_attempt: float, *, duplicate_risk: bool = False) -> Entry:
        """Count a failed attempt and wait until ``next_attempt`` (see ``schedule``).

        ``duplicate_risk`` marks an attempt that may have delivered without
        saying so; an entry already marked stays marked either way.
        """
        entry = self._check()
        return self.update(
            replace(
                entry,
                state=transition(entry.state, Change.DEFER),
                attempts=entry.attempts + 1,
                next_attempt=next_attempt,
                last_error=error,
                duplicate_risk=entry.duplicate_risk or duplicate_risk,
            )
        )

    def hold(self) -> Entry:
        """Stop delivery until ``release``; holding a held entry changes nothing."""
        entry = self._check()
        return self.update(replace(entry, state=transition(entry.state, Change.HOLD)))

    def release(self) -> Entry:
        """End a hold: back to queued, or to deferred if it was tried before.

        ``next_attempt`` is kept; ``retry_now`` makes it due at once.
        """
        entry = self._check()
        state = transition(entry.state, Change.RELEASE)
        if entry.attempts:
            state = EntryState.DEFERRED
        return self.update(replace(entry, state=state))

    def retry_now(self) -> Entry:
        """Make a queued, deferred or dead entry due now (a dead one comes back)."""
        entry = self._check()
        state = transition(entry.state, Change.RETRY)
        return self.update(replace(entry, state=state, next_attempt=self._clock()))

    def to_dead(self, reason: str, *, duplicate_risk: bool = False) -> Entry:
        """Give up: the entry stays, as dead, until an operator deletes or retries it.

        ``duplicate_risk`` as for ``defer``.
        """
        entry = self._check()
        state = transition(entry.state, Change.BURY)
        risk = entry.duplicate_risk or duplicate_risk
        return self.update(replace(entry, state=state, last_error=reason, duplicate_risk=risk))

    def delete(self) -> Entry:
        """Remove the entry whatever its state; the lease ends. Returns the entry."""
        entry = self._check()
        self._remove()
        return entry

    def _write(self, entry: Entry) -> None:
        queue_id = entry.queue_id
        tmp = self._layout.tmp / f"{queue_id}.env.{secrets.token_hex(4)}"
        try:
            write_durably(tmp, codec.encode(entry))
            try:
                os.replace(tmp, self._layout.envelope(queue_id))
            except OSError:
                remove_quietly(tmp)
                raise
            fsync_dir(self._layout.queue)
        except OSError as error:
            raise spool_error(f"cannot update {queue_id}", error) from error

    def _remove(self) -> None:
        queue_id = self.entry.queue_id
        try:
            self._layout.envelope(queue_id).unlink()
            fsync_dir(self._layout.queue)
        except FileNotFoundError:
            pass  # a failed put already took it back
        except OSError as error:
            raise spool_error(f"cannot remove {queue_id}", error) from error
        # The entry is gone once its envelope is; a message file left behind
        # by a failure here is an orphan that ``recover`` removes.
        remove_quietly(self._layout.message(queue_id))
        self.close()


def checked_lease(layout: Layout, queue_id: str, fd: int, clock: Callable[[], float]) -> Lease:
    """Wrap a locked message file descriptor in a Lease, reading the envelope.

    Raises NoSuchEntry if the envelope is gone (the entry was removed while
    the lock was awaited), CorruptEntry or SpoolError; the descriptor is
    closed on any error.
    """
    try:
        raw = layout.envelope(queue_id).read_bytes()
        return Lease(layout, codec.decode(raw, queue_id), fd, clock)
    except FileNotFoundError:
        os.close(fd)
        raise NoSuchEntry(f"{queue_id}: no such entry") from None
    except OSError as error:
        os.close(fd)
        raise spool_error(f"cannot read {queue_id}", error) from error
    except SpoolError:
        os.close(fd)
        raise
