"""Delivery settings: retry, upstream health and the spool.

`smtpwarden.config` reads the whole file; this module defines and reads the
sections that say what happens when a delivery fails: how failed
transactions are replayed (`retry`), when an upstream counts as down
(`health`) and where requeued messages wait (`spool`). Which route a
transaction takes is `smtpwarden.configroutes`'s part. Problems are named by
key path and collected by the same `Checker` as every other section.

Rule 1: like `smtpwarden.config`, it never prints, never exits and never
raises `ConfigError`; it reports problems to the checker it is given.

Rule 2: it imports nothing from the project but `smtpwarden.configcheck`, so
that `smtpwarden.config` can import it (and re-export its names) without a
cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from smtpwarden.configcheck import (
    FOLDER,
    Checker,
    Choice,
    Flag,
    Integer,
    Number,
    Seconds,
    Text,
    join_key,
    show,
)

LostOutcome = Literal["retry", "defer"]

LOST_OUTCOMES: Final[tuple[LostOutcome, ...]] = ("retry", "defer")

# RFC 5321 4.5.3.2.6: the client waits at least 10 minutes for the reply to
# the final dot. Every replay must end well before that, so the budget stays
# below it; the operator picks how far below.
CLIENT_DATA_END_S: Final = 600.0
# A cap on the replays of one transaction; the budget usually ends them first.
MAX_RETRY_ATTEMPTS: Final = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """How routes with policy retry or requeue replay a failed transaction."""

    attempts: int = 3  # replays after the first failure, 0..MAX_RETRY_ATTEMPTS
    # Seconds for all replays, 0 < budget < CLIENT_DATA_END_S; 120 leaves the
    # client most of its 10 minutes, and room for the upstream's own reply.
    budget: float = 120.0
    # 1 MiB keeps a typical message in memory; a larger one is spilled to a
    # temporary file so that held copies do not grow the process without bound.
    hold_memory_bytes: int = 1048576
    # No reply after the final dot: "retry" replays (at-least-once, the record
    # flagged as a duplicate risk) or "defer" answers the client with a 4xx.
    lost_outcome: LostOutcome = "retry"
    phrases: tuple[str, ...] = ()  # contradictory-250 phrases added to the built-in list
    take_over_partial: bool = False  # requeue: spool the recipients that got a 4xx


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    """When an upstream is skipped. No RFC sets these; they are a circuit breaker's."""

    # Consecutive failed connections or attempts that mark an upstream down:
    # 3 so that one dropped connection does not take an upstream out.
    failures: int = 3
    # Seconds down before one session probes it again: short next to the
    # retry budget, so that an upstream that recovers is tried again within one.
    cooldown: float = 30.0
    # Seconds between active checks of each smtp upstream (connect, banner,
    # EHLO, and TLS as sessions use it); 0 turns them off. As long as the
    # cool-down, so a recovered upstream is seen about as soon as a session
    # would probe it.
    check_interval: float = 30.0
    # Also try STARTTLS on upstreams without tls, to watch their certificate;
    # a failure there is logged, never counted against the upstream.
    check_starttls: bool = False
    # A certificate that expires within this many days is logged as a
    # warning at each check that sees it change. Two weeks leaves time to
    # renew by hand; automated renewal (ACME clients) starts at 30 days.
    certificate_warning_days: int = 14


@dataclass(frozen=True, slots=True, kw_only=True)
class BackoffConfig:
    """Delays between deliveries of a spooled message, in seconds."""

    initial: float = 300.0  # Postfix minimal_backoff_time
    factor: float = 2.0  # each delay is the previous one times this
    maximum: float = 4000.0  # Postfix maximal_backoff_time
    jitter: float = 0.2  # each delay moves at random by up to this fraction of itself


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolConfig:
    path: str = "spool"  # folder; relative paths start from the working directory
    # 5 days: Postfix maximal_queue_lifetime, and RFC 5321 4.5.4.1's "at
    # least 4-5 days" before giving up. Older messages go to dead letters.
    max_age: float = 432000.0
    workers: int = 4  # concurrent deliveries from the spool
    backoff: BackoffConfig


# A blank phrase would match every reply and make every 250 a failure.
_PHRASE: Final = Text("a phrase that is not blank", lambda text: text.strip() != "")
_LOST_OUTCOME: Final = Choice(LOST_OUTCOMES)
_POSITIVE_SECONDS: Final = Seconds(allow_zero=False)
_BUDGET: Final = Number(
    f"seconds greater than 0 and less than {CLIENT_DATA_END_S:g}",
    lambda seconds: 0 < seconds < CLIENT_DATA_END_S,
)
_FACTOR: Final = Number("a number >= 1", lambda factor: factor >= 1)
_FRACTION: Final = Number("a fraction 0-1", lambda fraction: 0 <= fraction <= 1)

_RETRY_KEYS: Final = tuple(field.name for field in dataclasses.fields(RetryConfig))
_HEALTH_KEYS: Final = tuple(field.name for field in dataclasses.fields(HealthConfig))
_BACKOFF_KEYS: Final = tuple(field.name for field in dataclasses.fields(BackoffConfig))
_SPOOL_KEYS: Final = tuple(field.name for field in dataclasses.fields(SpoolConfig))


def _section(
    check: Checker, parent: Mapping[str, object], key: str, path: str, keys: Collection[str]
) -> dict[str, object]:
    """Return the known keys of an optional section; absent or null means defaults."""
    raw = parent.get(key)
    return {} if raw is None else check.mapping(raw, join_key(path, key), keys)


def _show_number(number: float) -> str:
    return show(int(number)) if number.is_integer() else show(number)


def _phrases(check: Checker, section: Mapping[str, object], path: str) -> tuple[str, ...]:
    key_path = join_key(path, "phrases")
    raw = section.get("phrases")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        check.report(key_path, f"expected a list of phrases, got {show(raw)}")
        return ()
    phrases: list[str] = []
    for j, item in enumerate(raw):
        phrase = _PHRASE.convert(item)
        if phrase is None:
            check.invalid(f"{key_path}[{j}]", _PHRASE, item)
        else:
            phrases.append(phrase)
    return tuple(phrases)


def read_retry(check: Checker, top: Mapping[str, object]) -> RetryConfig:
    default = RetryConfig()
    section = _section(check, top, "retry", "", _RETRY_KEYS)
    return RetryConfig(
        attempts=check.value(
            section, "attempts", "retry", Integer(0, MAX_RETRY_ATTEMPTS), default.attempts
        ),
        budget=check.value(section, "budget", "retry", _BUDGET, default.budget),
        hold_memory_bytes=check.value(
            section, "hold_memory_bytes", "retry", Integer(0), default.hold_memory_bytes
        ),
        lost_outcome=check.value(
            section, "lost_outcome", "retry", _LOST_OUTCOME, default.lost_outcome
        ),
        phrases=_phrases(check, section, "retry"),
        take_over_partial=check.value(
            section, "take_over_partial", "retry", Flag(), default.take_over_partial
        ),
    )


def read_health(check: Checker, top: Mapping[str, object]) -> HealthConfig:
    default = HealthConfig()
    section = _section(check, top, "health", "", _HEALTH_KEYS)
    return HealthConfig(
        failures=check.value(section, "failures", "health", Integer(1), default.failures),
        cooldown=check.value(section, "cooldown", "health", _POSITIVE_SECONDS, default.cooldown),
        check_interval=check.value(
            section, "check_interval", "health", Seconds(allow_zero=True), default.check_interval
        ),
        check_starttls=check.value(
            section, "check_starttls", "health", Flag(), default.check_starttls
        ),
        certificate_warning_days=check.value(
            section,
            "certificate_warning_days",
            "health",
            Integer(0),
            default.certificate_warning_days,
        ),
    )


def _backoff(check: Checker, spool: Mapping[str, object]) -> BackoffConfig:
    default = BackoffConfig()
    path = "spool.backoff"
    section = _section(check, spool, "backoff", "spool", _BACKOFF_KEYS)
    before = len(check.found)
    initial = check.value(section, "initial", path, _POSITIVE_SECONDS, default.initial)
    maximum = check.value(section, "maximum", path, _POSITIVE_SECONDS, default.maximum)
    if len(check.found) == before and maximum < initial:
        # Report it at the key that was written; at maximum if both were.
        if "maximum" in section:
            bound = f"initial ({_show_number(initial)})"
            check.report(
                join_key(path, "maximum"),
                f"expected a number of seconds >= {bound}, got {show(section['maximum'])}",
            )
        else:
            bound = f"maximum ({_show_number(maximum)})"
            check.report(
                join_key(path, "initial"),
                f"expected a number of seconds <= {bound}, got {show(section['initial'])}",
            )
    return BackoffConfig(
        initial=initial,
        factor=check.value(section, "factor", path, _FACTOR, default.factor),
        maximum=maximum,
        jitter=check.value(section, "jitter", path, _FRACTION, default.jitter),
    )


def read_spool(check: Checker, top: Mapping[str, object]) -> SpoolConfig:
    default = SpoolConfig(backoff=BackoffConfig())
    section = _section(check, top, "spool", "", _SPOOL_KEYS)
    return SpoolConfig(
        path=check.value(section, "path", "spool", FOLDER, default.path),
        max_age=check.value(section, "max_age", "spool", _POSITIVE_SECONDS, default.max_age),
        workers=check.value(section, "workers", "spool", Integer(1), default.workers),
        backoff=_backoff(check, section),
    )
