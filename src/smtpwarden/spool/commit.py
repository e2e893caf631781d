"""Group commit: one thread runs the commit step for many writers at once.

Each ``put`` writes and fsyncs its own two files in its own thread (so the
file system can merge concurrent journal commits), then hands them to the
``Committer`` and waits. The committer's thread takes everything that
arrived while its previous batch ran and commits it as one batch: the
renames of the whole batch share the folder fsyncs. A writer's future is
resolved only after the batch function returned for its item, so nobody
returns before its own data is durable.

The committer is a plain thread, not an asyncio task: the spool is used by
the relay's event loop (through ``Spool.put``, which waits in a worker
thread) and by synchronous callers alike.

Rules kept here:
- No batch waits for more work: a lone writer is committed at once, and
  batching only ever happens because writers arrived during an fsync.
- An exception from the batch function fails every item of that batch; the
  thread goes on with the next one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

from smtpwarden.spool.errors import SpoolError

T = TypeVar("T")

CommitBatch = Callable[[Sequence[T]], Sequence[BaseException | None]]
"""Commits a batch; returns, per item and in order, None or the item's error."""


class Committer(Generic[T]):
    """Batches whatever was submitted while the previous commit ran.

    ``batches`` and ``items`` count what was committed, for benchmarks and
    metrics.
    """

    def __init__(self, commit: CommitBatch[T], *, name: str = "spool-committer") -> None:
        self._commit = commit
        self._name = name
        self._cond = threading.Condition()
        self._waiting: list[tuple[T, Future[None]]] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self.batches = 0
        self.items = 0

    def submit(self, item: T) -> Future[None]:
        """Queue ``item`` for the next batch; the future ends when it is committed.

        Raises SpoolError after ``close``.
        """
        future: Future[None] = Future()
        with self._cond:
            if self._closing:
                raise SpoolError("the spool is closed")
            self._waiting.append((item, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def close(self) -> None:
        """Commit what is queued, then stop the thread. Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if not self._waiting:
                    return
                batch, self._waiting = self._waiting, []
            items = [item for item, _ in batch]
            errors: Sequence[BaseException | None]
            try:
                errors = self._commit(items)
            except Exception as error:  # every writer of the batch must hear of it
                errors = [error] * len(items)
            self.batches += 1
            self.items += len(items)
            for (_, future), failure in zip(batch, errors, strict=True):
                if failure is None:
                    future.set_result(None)
                else:
                    future.set_exception(failure)
