"""Replaying a failed transaction on fresh upstream connections.

PRODUCT.md, policy "retry": when the end of a message that followed 2xx
replies gets a transient failure (a 4xx, a 250 that contradicts itself, no
reply at all), smtpwarden replays the transaction (EHLO, MAIL with its
parameters, the recipients the upstream had accepted, the held message) on a
fresh connection, the next upstream of the route first, within a budget of
attempts and time that ends well before the client's own DATA timeout. The
client gets the first success; a permanent failure goes back unchanged;
when the budget is spent the client gets a 4xx and keeps the message.

A replay succeeds only when every recipient is accepted again and the end
of the message gets a 2xx that does not contradict itself: a partial
success would answer 2xx for recipients that never got the message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from smtpwarden.config import Config, LimitsConfig, RetryConfig, TimeoutsConfig
from smtpwarden.net.context import ListenerContext
from smtpwarden.net.delivery import Attempt, Envelope, deliver
from smtpwarden.net.held import HeldMessage
from smtpwarden.net.routing import Route
from smtpwarden.net.upstream import Health, Target
from smtpwarden.protocol.diagnosis import DEFAULT_PHRASES, contradiction
from smtpwarden.protocol.records import Outcome
from smtpwarden.protocol.replies import Reply, make_reply
from smtpwarden.protocol.transaction import Replay, dedupe_key
from smtpwarden.spool.errors import SpoolError
from smtpwarden.spool.model import BodyKind
from smtpwarden.spool.model import Envelope as SpoolEnvelope
from smtpwarden.spool.schedule import Backoff, delay

log = logging.getLogger("smtpwarden.replay")

# The configuration allows a jitter of 1 (a delay anywhere from 0 to twice
# itself); ``schedule.Backoff`` needs it below 1 so that no delay is 0.
MAX_JITTER = 0.99
_JITTER = random.Random()  # noqa: S311 - spreads deliveries, not a secret


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayResult:
    """What the client is told, and how the transaction is recorded."""

    reply: Reply
    local: bool  # smtpwarden's own reply, not an upstream's
    outcome: Outcome
    attempts: int  # upstream attempts in all, the first included
    remaining: tuple[bytes, ...] = ()  # RCPT lines no attempt delivered to
    duplicate_risk: bool = False  # an attempt sent the message and got no clean answer


def backoff_of(config: Config) -> Backoff:
    """The delays between deliveries of a spooled message, as configured."""
    settings = config.spool.backoff
    return Backoff(
        initial_s=settings.initial,
        factor=settings.factor,
        maximum_s=settings.maximum,
        jitter=min(settings.jitter, MAX_JITTER),
        max_age_s=config.spool.max_age,
    )


def phrases_of(retry: RetryConfig) -> tuple[str, ...]:
    """The contradictory-250 phrases in force: the built-in list and the configured ones."""
    return (*DEFAULT_PHRASES, *retry.phrases)


def contradicts(reply: Reply, phrases: Sequence[str] = DEFAULT_PHRASES) -> bool:
    """True if ``reply`` is a 2xx whose enhanced code or text reports a failure."""
    return contradiction(reply.code, reply.enhanced, reply.text, phrases=phrases) is not None


def transient(reply: Reply, phrases: Sequence[str] = DEFAULT_PHRASES) -> bool:
    """True if ``reply``, ending a sent message, calls for a replay."""
    if reply.code // 100 == 4:
        return True
    return reply.code // 100 == 2 and contradicts(reply, phrases)


def replay_order(targets: Sequence[Target], first: Target, attempts: int) -> list[Target]:
    """The upstreams to try, in turn: the one after ``first``, then around."""
    names = [target.name for target in targets]
    start = (names.index(first.name) + 1) if first.name in names else 0
    return [targets[(start + i) % len(targets)] for i in range(attempts)]


async def replay(
    *,
    wanted: Replay,
    held: HeldMessage,
    targets: Sequence[Target],
    first: Target,
    health: Health,
    retry: RetryConfig,
    timeouts: TimeoutsConfig,
    limits: LimitsConfig,
    hostname: str,
) -> ReplayResult:
    """Replay the transaction until every recipient has it or the budget is spent.

    A recipient an attempt delivered to (a clean 2xx to its RCPT and to the
    end of the message) is left out of later attempts, so no recipient gets
    the message twice from the replays. Upstreams marked down go last.
    """
    phrases = phrases_of(retry)
    remaining = [rcpt.line for rcpt in wanted.recipients]
    deadline = time.monotonic() + retry.budget
    made = 1
    risk = False
    order = replay_order(targets, first, retry.attempts)
    order.sort(key=lambda target: health.is_down(target.name))  # stable: usable first
    for target in order:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        made += 1
        envelope = Envelope(
            mail_from=wanted.mail.line,
            recipients=tuple(remaining),
            body="data" if held.kind == "data" else "bdat",
        )
        try:
            async with asyncio.timeout(left):
                attempt = await deliver(
                    target, envelope, held, hostname=hostname, timeouts=timeouts, limits=limits
                )
        except TimeoutError:
            log.info("replay on %s ran out of budget", target.name)
            risk = True  # it may have been sending the message
            break
        _report_health(health, target, attempt)
        log.info("replay %d on %s: %s", made - 1, target.name, attempt.error or attempt.final)
        final = attempt.final
        if final is not None and final.code // 100 == 5:
            # Permanent: back to the client unchanged.
            return ReplayResult(
                reply=final,
                local=False,
                outcome=Outcome.REJECTED,
                attempts=made,
                duplicate_risk=risk,
            )
        delivered = _delivered(attempt, phrases)
        # Sent, and no answer or a 2xx that contradicts itself: the upstream
        # may have the message. A 4xx or 5xx says it does not.
        unclear = final is None or (final.code // 100 == 2 and not delivered)
        risk = risk or (attempt.sent and unclear)
        remaining = [line for i, line in enumerate(remaining) if i not in delivered]
        if final is not None and not remaining:
            return ReplayResult(
                reply=final,
                local=False,
                outcome=Outcome.RETRIED,
                attempts=made,
                duplicate_risk=risk,
            )
    tries = "1 attempt" if made == 1 else f"{made} attempts"
    reply = make_reply(451, "4.4.0", f"{hostname} Upstream failed after {tries}, try again later")
    return ReplayResult(
        reply=reply,
        local=True,
        outcome=Outcome.DEFERRED,
        attempts=made,
        remaining=tuple(remaining),
        duplicate_risk=risk,
    )


def _delivered(attempt: Attempt, phrases: Sequence[str]) -> set[int]:
    """Indexes of the recipients this attempt delivered to, cleanly.

    Needs a 2xx to the end of the message that does not contradict itself,
    and for each recipient a 2xx to its RCPT that does not either ("250
    recipient rejected" is a refusal).
    """
    final = attempt.final
    if final is None or final.code // 100 != 2 or transient(final, phrases):
        return set()
    return {
        i
        for i, reply in enumerate(attempt.recipients)
        if reply is not None and reply.code // 100 == 2 and not transient(reply, phrases)
    }


def _report_health(health: Health, target: Target, attempt: Attempt) -> None:
    # Healthy once it answered MAIL: a greeting followed by a failed EHLO,
    # STARTTLS or handshake is an upstream that cannot take mail.
    banner = attempt.banner
    greeted = attempt.connected and banner is not None and banner.code // 100 == 2
    if greeted and attempt.mail is not None:
        health.succeeded(target)
    else:
        health.failed(target)


async def requeue(
    ctx: ListenerContext, route: Route, wanted: Replay, held: HeldMessage, spent: ReplayResult
) -> ReplayResult:
    """Spool what the replays could not deliver, then answer 250 with its id.

    The spooled recipients are those no attempt delivered to and those the
    relay took over from a 4xx (``retry.take_over_partial``).

    PRODUCT.md, invariant 1: the 250 goes out only once the message and its
    envelope are fsynced in the spool. A spool that cannot take it (a full
    disk, a broken folder) leaves the client the 4xx, never a 250; if the
    upstream had taken the message for some recipients, the client's next
    try may bring it to them twice, and the record says so.
    """
    hostname = ctx.config.hostname
    if ctx.spool is None:
        raise ValueError("policy requeue without a spool")
    backoff = backoff_of(ctx.config)
    envelope = SpoolEnvelope(
        mail_from=wanted.mail.line,
        recipients=(*spent.remaining, *(rcpt.line for rcpt in wanted.taken_over)),
        body=BodyKind.DATA if held.kind == "data" else BodyKind.BDAT,
        transaction_id=wanted.transaction_id,
        dedupe_key=dedupe_key(
            wanted.mail.line, [rcpt.line for rcpt in wanted.recipients], wanted.sent[1]
        ),
        route=route.name,
        # Also when the first upstream never answered the end of the message.
        duplicate_risk=spent.duplicate_risk or wanted.first_failure is None,
        # The upstreams just failed it: the first delivery from the spool
        # waits as a failed delivery from the spool does (Postfix defers a
        # message the same way), not at once; but well within max_age, so
        # that it is tried at least once before it expires.
        delay_s=min(delay(1, _JITTER, backoff), backoff.max_age_s / 2),
    )
    try:
        queue_id = await ctx.spool.put(envelope, held.chunks())
    except SpoolError as error:
        log.error("cannot spool %s: %s", wanted.transaction_id, error)
        reply = make_reply(451, "4.3.0", f"{hostname} Cannot queue the message, try again later")
        return ReplayResult(
            reply=reply,
            local=True,
            outcome=Outcome.DEFERRED,
            attempts=spent.attempts,
            duplicate_risk=spent.duplicate_risk or spent.outcome is not Outcome.DEFERRED,
        )
    reply = make_reply(250, "2.0.0", f"Ok: queued as {queue_id}")
    return ReplayResult(
        reply=reply,
        local=True,
        outcome=Outcome.REQUEUED,
        attempts=spent.attempts,
        duplicate_risk=spent.duplicate_risk,
    )


class Guard:
    """One session's held message and its replay, under retry or requeue.

    A transaction whose route is passthrough holds nothing and never replays.
    """

    __slots__ = ("_ctx", "held", "route", "task")

    def __init__(self, ctx: ListenerContext) -> None:
        self._ctx = ctx
        self.held: HeldMessage | None = None
        self.route = ctx.routes.default  # the held message's route
        self.task: asyncio.Task[None] | None = None

    @property
    def replaying(self) -> bool:
        """True while a replay runs."""
        return self.task is not None

    def hold(self, kind: str, route: Route) -> None:
        """A message of ``route`` starts (DATA, or a first BDAT chunk): keep a copy of it."""
        if not route.guarded:
            return
        if kind == "bdat" and self.held is not None and self.held.kind == "bdat":
            return  # a further chunk of the same message
        self.release()  # what a refused DATA or chunk left behind
        self.route = route
        self.held = HeldMessage(kind=kind, memory_limit=self._ctx.config.retry.hold_memory_bytes)

    def release(self) -> None:
        """The message has its answer: forget the copy."""
        if self.held is not None:
            self.held.close()
            self.held = None

    def start(self, wanted: Replay, first: Target, done: Callable[[ReplayResult], None]) -> None:
        """Replay in a task; ``done`` gets the result unless ``cancel`` came first."""
        held = self.held
        if held is None:
            raise ValueError("a replay with no held message")
        ctx = self._ctx
        config = ctx.config
        route = self.route

        async def run() -> None:
            try:
                if wanted.delivered and wanted.first_failure is not None:
                    # Only the taken-over recipients are left, for the spool.
                    result = ReplayResult(
                        reply=wanted.first_failure,
                        local=False,
                        outcome=Outcome.DELIVERED,
                        attempts=1,
                    )
                else:
                    result = await replay(
                        wanted=wanted,
                        held=held,
                        targets=route.targets,
                        first=first,
                        health=ctx.health,
                        retry=config.retry,
                        timeouts=config.timeouts,
                        limits=config.limits,
                        hostname=config.hostname,
                    )
                spool = result.outcome is Outcome.DEFERRED or (
                    wanted.taken_over and result.outcome is not Outcome.REJECTED
                )
                if spool and route.policy == "requeue":
                    result = await requeue(ctx, route, wanted, held, result)
            except Exception:
                # A bug must not leave the client waiting for ever: it gets
                # a 4xx and keeps the message.
                log.exception("replay of %s failed", wanted.transaction_id)
                reply = make_reply(451, "4.3.0", f"{config.hostname} Local error, try again later")
                result = ReplayResult(reply=reply, local=True, outcome=Outcome.DEFERRED, attempts=1)
            self.task = None
            done(result)

        self.task = asyncio.get_running_loop().create_task(run())

    def cancel(self) -> None:
        """The session ends: stop any replay and drop the copy."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.release()


@functools.lru_cache(maxsize=8)
def reply_checks(
    retry: RetryConfig,
) -> tuple[Callable[[Reply], bool], Callable[[Reply], bool]]:
    """Whether a reply calls for a replay, and whether a 2xx contradicts itself.

    Shared by every session of a configuration, not built for each one.
    """
    phrases = phrases_of(retry)
    return (
        functools.partial(transient, phrases=phrases),
        functools.partial(contradicts, phrases=phrases),
    )
