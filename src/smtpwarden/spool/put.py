"""Putting a message into the spool durably (steps 1 to 4 in ``store.py``).

``Writer.put`` writes the message and its envelope to tmp/ and fsyncs both
in the caller's thread, then has them renamed into queue/ (message first,
folder fsync, envelope, folder fsync), by the group committer or, with group
commit off, by itself. It returns only after that.

Rules kept here:
- Nothing half-written reaches queue/: a file is renamed there only after
  its fsync, and a put that fails at any step takes back what it renamed,
  envelope first.
- A DATA section is stored only with its terminator; command lines only
  without CR or LF inside (PRODUCT.md invariant 3).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from smtpwarden.spool import codec
from smtpwarden.spool.commit import Committer
from smtpwarden.spool.errors import spool_error
from smtpwarden.spool.files import (
    FILE_MODE,
    Layout,
    fsync_dir,
    remove_quietly,
    write_all,
    write_durably,
)
from smtpwarden.spool.model import BodyKind, Entry, EntryState, Envelope, Recipient, command_line

# RFC 5321 4.1.1.4: the mail data ends with "<CRLF>.<CRLF>"; an empty
# message is just ".<CRLF>" after the CRLF of the DATA line itself.
_END_OF_DATA = b"\r\n.\r\n"
_EMPTY_DATA = b".\r\n"

Chunks = Iterable[bytes | bytearray | memoryview]
"""Message octets in pieces, e.g. a list, or a file read block by block."""


class QueueIds:
    """Queue ids: time-sortable, unique, safe as file names (``model.QUEUE_ID``).

    The microsecond stamp never repeats or goes back within one source, and
    the random 32-bit tag tells sources (processes) apart.
    """

    def __init__(self) -> None:
        self._tag = secrets.token_hex(4)
        self._last_us = 0
        self._lock = threading.Lock()

    def new(self, now: float) -> str:
        with self._lock:
            micros = max(int(now * 1_000_000), self._last_us + 1)
            self._last_us = micros
        seconds, fraction = divmod(micros, 1_000_000)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds))
        return f"{stamp}.{fraction:06d}-{self._tag}"


class _FromChunks(Exception):
    """Carries an error raised by the caller's chunks past the OSError handler.

    A socket error while the chunks are read is the caller's, not the
    spool's: it must come out as it was, not as SpoolError.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True)
class Staged:
    """A put whose files are written and fsynced in tmp/, not yet in queue/."""

    queue_id: str
    message_tmp: Path
    envelope_tmp: Path

    def discard(self) -> None:
        remove_quietly(self.message_tmp)
        remove_quietly(self.envelope_tmp)


class Writer:
    """Writes new entries; shared by the threads of one Spool.

    ``committer`` is None when group commit is off; otherwise its counters
    say how many batches the puts needed.
    """

    def __init__(self, layout: Layout, clock: Callable[[], float], *, group_commit: bool) -> None:
        self.layout = layout
        self._clock = clock
        self._ids = QueueIds()
        self.committer: Committer[Staged] | None = (
            Committer(self.commit_batch) if group_commit else None
        )

    def close(self) -> None:
        """Finish the commits under way and stop the committer."""
        if self.committer is not None:
            self.committer.close()

    def put(self, envelope: Envelope, chunks: Chunks) -> str:
        """See ``Spool.put_sync``."""
        mail_from = command_line(envelope.mail_from)
        recipients = tuple(Recipient(line=command_line(line)) for line in envelope.recipients)
        if not recipients:
            raise ValueError("an entry needs at least one recipient")
        staged = self._stage(envelope, mail_from, recipients, chunks)
        if self.committer is None:
            error = self.commit_batch([staged])[0]
            if error is not None:
                raise error
        else:
            try:
                done = self.committer.submit(staged)
            except BaseException:
                staged.discard()
                raise
            done.result()
        return staged.queue_id

    def _stage(
        self,
        envelope: Envelope,
        mail_from: bytes,
        recipients: tuple[Recipient, ...],
        chunks: Chunks,
    ) -> Staged:
        """Step 1: both files written and fsynced in tmp/."""
        now = self._clock()
        queue_id = self._ids.new(now)
        tmp = self.layout.tmp
        staged = Staged(queue_id, tmp / f"{queue_id}.msg", tmp / f"{queue_id}.env")
        try:
            size, digest = _write_message(staged.message_tmp, chunks, envelope.body)
            entry = Entry(
                queue_id=queue_id,
                state=EntryState.QUEUED,
                created=now,
                attempts=0,
                next_attempt=now + envelope.delay_s,
                last_error=None,
                mail_from=mail_from,
                recipients=recipients,
                body=envelope.body,
                size=size,
                sha256=digest,
                transaction_id=envelope.transaction_id,
                dedupe_key=envelope.dedupe_key,
                route=envelope.route,
                duplicate_risk=envelope.duplicate_risk,
            )
            write_durably(staged.envelope_tmp, codec.encode(entry))
        except _FromChunks as wrapped:
            staged.discard()
            raise wrapped.error from None
        except OSError as error:
            staged.discard()
            raise spool_error(f"cannot write {queue_id}", error) from error
        except BaseException:
            staged.discard()
            raise
        return staged

    def commit_batch(self, batch: Sequence[Staged]) -> list[BaseException | None]:
        """Steps 2 and 3 for a whole batch; returns one error (or None) per item."""
        layout = self.layout
        errors: list[BaseException | None] = [None] * len(batch)

        def each(step: Callable[[Staged], None]) -> None:
            for index, staged in enumerate(batch):
                if errors[index] is None:
                    try:
                        step(staged)
                    except OSError as error:
                        errors[index] = spool_error(f"cannot commit {staged.queue_id}", error)

        def fsync_queue() -> None:
            if any(error is None for error in errors):
                try:
                    fsync_dir(layout.queue)
                except OSError as error:
                    failure = spool_error("cannot fsync the queue folder", error)
                    errors[:] = [e if e is not None else failure for e in errors]

        each(lambda s: os.rename(s.message_tmp, layout.message(s.queue_id)))
        fsync_queue()  # every message durable before any envelope appears
        each(lambda s: os.rename(s.envelope_tmp, layout.envelope(s.queue_id)))
        fsync_queue()
        for staged, error in zip(batch, errors, strict=True):
            if error is not None:
                # Envelope first: without it the message file is no entry.
                remove_quietly(layout.envelope(staged.queue_id))
                remove_quietly(layout.message(staged.queue_id))
                staged.discard()
        return errors


def _write_message(path: Path, chunks: Chunks, body: BodyKind) -> tuple[int, str]:
    """Write the message to a new file and fsync it; returns size and sha256.

    Raises OSError, ValueError for a DATA section without its terminator,
    or _FromChunks; the caller removes the file.
    """
    digest = hashlib.sha256()
    size = 0
    tail = b""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    source = iter(chunks)
    try:
        while True:
            try:
                chunk = next(source, None)
            except Exception as error:
                raise _FromChunks(error) from error
            if chunk is None:
                break
            digest.update(chunk)
            write_all(fd, chunk)
            size += len(chunk)
            tail = (tail + bytes(chunk[-len(_END_OF_DATA) :]))[-len(_END_OF_DATA) :]
        if body is BodyKind.DATA and not (tail.endswith(_END_OF_DATA) or tail == _EMPTY_DATA):
            # Stored without it, the section would end wherever the octets
            # the upstream reads next say: never store that.
            raise ValueError("a DATA section must end with <CRLF>.<CRLF>")
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, digest.hexdigest()
