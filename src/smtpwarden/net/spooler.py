"""Delivering spooled messages: the second half of the requeue policy.

``QueueRunner`` drains the spool through the upstream client that replays
use (``delivery.deliver``). Every tick (at most ``TICK_S``, sooner after
``wake``) it takes the due entries and delivers up to ``spool.workers`` of
them at once. One delivery of one entry:

1. take the entry's lease, or skip the entry (another worker, or an
   operator's command, holds it); the lease is held to the end, so nobody
   changes the entry under a delivery (the locking rule in ``spool/lease.py``);
2. an entry older than ``spool.max_age`` goes to dead letters untried;
3. otherwise its pending recipients go to the route's upstreams in order,
   moving on only while the message has not been sent: once it has, that
   upstream's answer stands, as another upstream could only duplicate it;
4. the answer is written back (``verdict.judge``): recipients accepted with
   a 2xx that does not contradict itself are delivered, 5xx refusals failed,
   the rest stay pending and the entry is deferred (``spool.schedule``) or,
   once too old, buried;
5. an entry that is finished (the spool removes it) or dead gets one record
   of type "delivery" in the transaction log (``verdict.DeliveryRecord``).

Rule 1 (PRODUCT.md invariant 7): a recipient leaves PENDING only on an
upstream's own answer, written to disk before the lease is released, and is
then never sent the message again. A lost outcome (message sent, no reply:
RFC 1047) keeps its recipients pending: delivery is at least once, and the
entry's ``duplicate_risk`` is set on disk, so that its record shows it even
after a restart.

Rule 2: spool calls block on fsync, so they run in worker threads. A call
under way is waited for even when the delivery is cancelled: a lease is
released only once nothing uses it any more.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from smtpwarden.config import Config
from smtpwarden.net.delivery import Envelope, deliver
from smtpwarden.net.held import READ_BLOCK_BYTES
from smtpwarden.net.replay import backoff_of, phrases_of
from smtpwarden.net.upstream import Target
from smtpwarden.net.verdict import DeliveryOutcome, DeliveryRecord, RecipientResult, judge, settle
from smtpwarden.observe.txlog import RecordLog
from smtpwarden.protocol.records import Upstream, iso_time
from smtpwarden.spool import BodyKind, Entry, EntryBusy, EntryState, Lease, NoSuchEntry, Spool
from smtpwarden.spool.model import RecipientState
from smtpwarden.spool.schedule import expired, next_attempt

log = logging.getLogger("smtpwarden.spooler")

T = TypeVar("T")

# The longest wait between two looks at the spool: an operator's
# ``queue retry`` or ``release`` is picked up within it. Our choice.
TICK_S = 1.0
# ``last_error`` is shown by ``smtpwarden queue``: a line, not a transcript.
ERROR_CHARS = 500
CRLF = b"\r\n"


class QueueRunner:
    """Delivers spooled messages (see the module docstring).

    ``targets`` maps a route name (``Entry.route``) to its upstreams in
    order. ``clock`` gives epoch seconds, as the spool's own clock does;
    ``rng`` draws the backoff jitter. ``lost_outcomes`` counts attempts that
    sent a message and got no reply. Records go to ``records`` and are
    flushed by its owner (the relay's tick), as the sessions' are.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        targets: Mapping[str, Sequence[Target]],
        config: Config,
        records: RecordLog | None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.configure(targets=targets, config=config)
        self._records = records
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._clock = clock
        self._woken = asyncio.Event()
        # Outcomes that could not be written back (a full disk): not before
        # when to try the entry again, and whether it risks a duplicate.
        self._unwritten: dict[str, tuple[float, bool]] = {}
        self.lost_outcomes = 0

    def configure(self, *, targets: Mapping[str, Sequence[Target]], config: Config) -> None:
        """Routes and settings for the deliveries that start from now on (a reload)."""
        self._targets = {name: tuple(route) for name, route in targets.items()}
        self._config = config
        self._backoff = backoff_of(config)
        self._phrases = phrases_of(config.retry)

    def wake(self) -> None:
        """A new entry was spooled: look at the spool now. Call it on the loop's thread."""
        self._woken.set()

    async def run(self) -> None:
        """Deliver due entries, ``spool.workers`` at most at once, until cancelled.

        Never returns on its own and raises nothing but CancelledError: a
        delivery that fails is logged and its entry tried again later. On
        cancellation the deliveries under way are cancelled (connections
        aborted, leases released) and waited for.
        """
        loop = asyncio.get_running_loop()
        backlog: deque[str] = deque()  # due at the last scan, not yet started
        running: dict[asyncio.Task[None], str] = {}
        waker: asyncio.Task[None] | None = None
        next_scan = loop.time()
        try:
            while True:
                if not backlog and (self._woken.is_set() or loop.time() >= next_scan):
                    self._woken.clear()
                    next_scan = loop.time() + TICK_S
                    busy = set(running.values())
                    backlog.extend(q for q in await self._scan() if q not in busy)
                while backlog and len(running) < self._config.spool.workers:
                    queue_id = backlog.popleft()
                    if queue_id not in running.values():
                        running[loop.create_task(self.deliver_one(queue_id))] = queue_id
                if not backlog and self._woken.is_set():
                    continue  # woken during the scan
                waiting = set(running)
                timeout = None
                if not backlog:  # otherwise every worker is busy: wait for one
                    timeout = max(0.0, next_scan - loop.time())
                    if waker is None or waker.done():
                        waker = loop.create_task(self._wait_woken())
                    waiting.add(waker)
                done, _ = await asyncio.wait(
                    waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task is not waker:
                        _report(task, running.pop(task))
        finally:
            if waker is not None:
                waker.cancel()
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _wait_woken(self) -> None:
        await self._woken.wait()

    async def _scan(self) -> list[str]:
        try:
            return await _blocking(functools.partial(self.spool.due, self._clock()))
        except Exception:
            log.exception("cannot scan the spool")
            return []

    async def deliver_one(self, queue_id: str) -> None:
        """Make one delivery run for one entry, if it is due and nobody holds it.

        Returns once the outcome is on disk, or at once for an entry that is
        held elsewhere, gone, not due or not deliverable (held, dead).
        Raises SpoolError (or another error) when the outcome cannot be
        written; it is then kept in memory, so that the entry is not tried
        again before its deferral would have ended. Cancellation aborts the
        connection and releases the lease; nothing is written then.
        """
        claim = await _blocking(
            functools.partial(_Claim.take, self.spool, queue_id), on_cancel=_release
        )
        if claim is None:
            return
        try:
            await self._attempt(claim)
        finally:
            claim.release()

    async def _attempt(self, claim: _Claim) -> None:
        entry = claim.lease.entry
        now = self._clock()
        not_before, unwritten_risk = self._unwritten.get(entry.queue_id, (0.0, False))
        deliverable = entry.state in (EntryState.QUEUED, EntryState.DEFERRED)
        if not deliverable or entry.finished or max(entry.next_attempt, not_before) > now:
            return
        risky = entry.duplicate_risk or unwritten_risk
        run = _Run(entry=entry, attempts=entry.attempts, risky=risky)
        max_age = self._backoff.max_age_s
        if expired(entry.created, now, max_age):
            run.dead = True
            run.error = f"older than max_age ({max_age:g} s); last error: {entry.last_error}"
        else:
            run.attempts += 1
            await self._send(run, claim)
            if not run.entry.finished and expired(entry.created, self._clock(), max_age):
                run.dead = True
                run.error = f"older than max_age ({max_age:g} s); last error: {run.error}"
        await self._conclude(claim, run)

    async def _send(self, run: _Run, message: _Claim) -> None:
        """Step 3: offer the pending recipients to the route's upstreams in turn."""
        config, entry = self._config, run.entry
        errors: list[str] = []
        targets = self._targets.get(entry.route, ())
        if not targets:
            errors.append(f"no upstream for route {entry.route!r}")
        for target in targets:
            pending = run.entry.pending
            try:
                envelope = Envelope(
                    mail_from=entry.mail_from + CRLF,
                    recipients=tuple(entry.recipients[i].line + CRLF for i in pending),
                    body="data" if entry.body is BodyKind.DATA else "bdat",
                )
            except ValueError as error:  # not MAIL or RCPT lines: no wait can help
                run.dead, run.error = True, f"cannot be replayed: {error}"
                return
            run.upstream = target
            try:
                attempt = await deliver(
                    target,
                    envelope,
                    message,
                    hostname=config.hostname,
                    timeouts=config.timeouts,
                    limits=config.limits,
                )
            except ValueError as error:
                # A message file that breaks its framing, or a bad hostname:
                # the connection was aborted before the end of the message.
                log.error("%s: cannot deliver to %s: %s", entry.queue_id, target.name, error)
                errors.append(f"{target.name}: {error}")
                break
            verdict = judge(attempt, self._phrases)
            run.entry = settle(run.entry, pending, verdict)
            if verdict.error is not None:
                errors.append(f"{target.name}: {verdict.error}")
            run.risky = run.risky or verdict.risky
            if attempt.sent and attempt.final is None:
                self.lost_outcomes += 1
            if attempt.sent or run.entry.finished:
                break  # once sent, another upstream could only duplicate it
        run.error = "; ".join(errors)

    async def _conclude(self, claim: _Claim, run: _Run) -> None:
        """Steps 4 and 5: write the outcome back, then the record if it is the last.

        The record is written even if the delivery is cancelled while the
        outcome is being written: once on disk, the outcome is final.
        """
        lease, settled, dead = claim.lease, run.entry, run.dead
        before = lease.entry
        text = run.error[:ERROR_CHARS]
        now = self._clock()
        when = min(
            next_attempt(max(run.attempts, 1), now, self._rng, self._backoff),
            settled.created + self._backoff.max_age_s,
        )

        def write_back() -> Entry:
            entry = lease.update(settled) if settled != lease.entry else settled
            if entry.finished:
                return entry
            # The risk goes to disk with the deferral: it must outlive a
            # restart to reach the entry's record.
            if dead:
                return lease.to_dead(text, duplicate_risk=run.risky)
            return lease.defer(text, when, duplicate_risk=run.risky)

        def written(stored: Entry) -> None:
            self._unwritten.pop(stored.queue_id, None)
            if stored.finished or dead:
                self._record(run, stored, now)
            else:
                log.info("%s deferred until %s: %s", stored.queue_id, iso_time(when), text)

        try:
            stored = await _blocking(write_back, on_cancel=written)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Not on disk: keep the deferral in memory, and whether this run
            # delivered to someone whom the next one will send it again.
            sent = any(
                new.state is RecipientState.DELIVERED and old.state is RecipientState.PENDING
                for new, old in zip(settled.recipients, before.recipients, strict=True)
            )
            self._unwritten[settled.queue_id] = (when, run.risky or sent)
            raise
        written(stored)

    def _record(self, run: _Run, entry: Entry, now: float) -> None:
        states = {r.state for r in entry.recipients}
        outcome: DeliveryOutcome = "rejected"
        if run.dead:
            outcome = "dead"
        elif RecipientState.DELIVERED in states:
            outcome = "delivered"
        log.info("%s %s after %d attempts", entry.queue_id, outcome, run.attempts)
        if self._records is None:
            return
        self._records.write(
            DeliveryRecord(
                type="delivery",
                time=iso_time(now),
                queue_id=entry.queue_id,
                transaction_id=entry.transaction_id,
                dedupe_key=entry.dedupe_key,
                route=entry.route,
                upstream=_upstream(run.upstream),
                mail_from=entry.sender,
                recipients=tuple(
                    RecipientResult(address=r.address, state=r.state.value, reply=r.reply)
                    for r in entry.recipients
                ),
                outcome=outcome,
                attempts=run.attempts,
                duplicate_risk=run.risky,
                reason=run.error[:ERROR_CHARS] if run.dead else None,
                size=entry.size,
                body_sha256=entry.sha256,
                queued_s=round(now - entry.created, 3),
            )
        )


@dataclass(slots=True, kw_only=True)
class _Run:
    """One delivery run of one entry, as it goes.

    ``entry`` has this run's answers settled; ``attempts`` counts runs, this
    one included if it tried an upstream; ``upstream`` is the last one tried.
    """

    entry: Entry
    attempts: int
    risky: bool
    error: str = ""
    upstream: Target | None = None
    dead: bool = False


@dataclass(frozen=True, slots=True)
class _Claim:
    """One entry's lease and message file, held by one delivery.

    It is the delivery's ``MessageSource``: the file is read from the top
    each time (by the event loop, as ``HeldMessage`` reads its spill file).
    """

    lease: Lease
    stream: BinaryIO

    @classmethod
    def take(cls, spool: Spool, queue_id: str) -> _Claim | None:
        """Lease the entry and open its message; None if busy or gone. Blocks."""
        try:
            lease = spool.lease(queue_id, timeout=0.0)
        except (EntryBusy, NoSuchEntry):
            return None
        try:
            return cls(lease, lease.open_message())
        except BaseException:
            lease.close()
            raise

    @property
    def size(self) -> int:
        return self.lease.entry.size

    def chunks(self) -> Iterator[bytes]:
        self.stream.seek(0)
        while block := self.stream.read(READ_BLOCK_BYTES):
            yield block

    def release(self) -> None:
        """Close the message and the lease; idempotent."""
        try:
            self.stream.close()
        finally:
            self.lease.close()


async def _blocking(call: Callable[[], T], *, on_cancel: Callable[[T], object] | None = None) -> T:
    """``call()`` in a worker thread, waited for to its end even when cancelled.

    A spool call cannot be stopped half way (its writes and fsyncs go on in
    the thread), and what it holds must not be released under it. So a
    cancellation is held back until the call returns, then raised; a
    result the call returned meanwhile goes to ``on_cancel`` first.
    """
    future = asyncio.get_running_loop().run_in_executor(None, call)
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:
            break  # future.result() raises it again below
    if cancelled:
        if on_cancel is not None and future.exception() is None:
            on_cancel(future.result())
        raise asyncio.CancelledError
    return future.result()


def _release(claim: _Claim | None) -> None:
    if claim is not None:
        claim.release()


def _report(task: asyncio.Task[None], queue_id: str) -> None:
    """Log a delivery task that failed; the entry is tried again later."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("%s: delivery failed", queue_id, exc_info=error)


def _upstream(target: Target | None) -> Upstream | None:
    if target is None:
        return None
    return Upstream(name=target.name, address=target.host, port=target.port)
