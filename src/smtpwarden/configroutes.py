"""Delivery settings: routes, retry, upstream health and the spool.

`smtpwarden.config` reads the whole file; this module defines and reads the
sections that say how a message is delivered once a listener accepts it:
which policy and which upstreams each listener's route uses (`routes`), how
failed transactions are replayed (`retry`), when an upstream counts as down
(`health`) and where requeued messages wait (`spool`). Problems are named by
key path and collected by the same `Checker` as every other section.

Rule 1: like `smtpwarden.config`, it never prints, never exits and never
raises `ConfigError`; it reports problems to the checker it is given.

Rule 2: it imports nothing from the project but `smtpwarden.configcheck`, so
that `smtpwarden.config` can import it (and re-export its names) without a
cycle. It knows listeners and upstreams only by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from smtpwarden.configcheck import (
    FOLDER,
    NAME,
    Checker,
    Choice,
    Flag,
    Integer,
    Number,
    Seconds,
    Text,
    join_key,
    show,
    suggest,
)

Policy = Literal["passthrough", "retry", "requeue"]
LostOutcome = Literal["retry", "defer"]

POLICIES: Final[tuple[Policy, ...]] = ("passthrough", "retry", "requeue")
LOST_OUTCOMES: Final[tuple[LostOutcome, ...]] = ("retry", "defer")

# RFC 5321 4.5.3.2.6: the client waits at least 10 minutes for the reply to
# the final dot. Every replay must end well before that, so the budget stays
# below it; the operator picks how far below.
CLIENT_DATA_END_S: Final = 600.0
# A cap on the replays of one transaction; the budget usually ends them first.
MAX_RETRY_ATTEMPTS: Final = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    name: str  # unique; defaults to route0, route1, ... by position
    listeners: tuple[str, ...]  # listener names; empty: every listener no other route names
    policy: Policy
    upstreams: tuple[str, ...]  # ordered preference, at least one, no repeats


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """How routes with policy retry or requeue replay a failed transaction."""

    attempts: int = 3  # replays after the first failure, 1..MAX_RETRY_ATTEMPTS
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
_POLICY: Final = Choice(POLICIES)
_LOST_OUTCOME: Final = Choice(LOST_OUTCOMES)
_POSITIVE_SECONDS: Final = Seconds(allow_zero=False)
_BUDGET: Final = Number(
    f"seconds greater than 0 and less than {CLIENT_DATA_END_S:g}",
    lambda seconds: 0 < seconds < CLIENT_DATA_END_S,
)
_FACTOR: Final = Number("a number >= 1", lambda factor: factor >= 1)
_FRACTION: Final = Number("a fraction 0-1", lambda fraction: 0 <= fraction <= 1)

_ROUTE_KEYS: Final = tuple(field.name for field in dataclasses.fields(RouteConfig))
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


# --- Routes ------------------------------------------------------------------


def _names(
    check: Checker,
    section: Mapping[str, object],
    key: str,
    path: str,
    what: str,
    known: Sequence[str] | None,
) -> tuple[tuple[str, ...], bool]:
    """Read a list of listener or upstream names; return them and whether all were valid.

    Names are checked against `known` when it is given. A missing or empty
    list is a problem for upstreams; for listeners it means "the rest".
    """
    key_path = join_key(path, key)
    required = what == "upstream"
    raw = section.get(key)
    if raw is None and not required:
        return (), True
    if key not in section:
        check.report(key_path, f"missing required key (a list of {what} names)")
        return (), False
    if not isinstance(raw, list) or (required and not raw):
        expected = f"at least one {what} name" if required else f"{what} names"
        check.report(key_path, f"expected a list of {expected}, got {show(raw)}")
        return (), False
    names: list[tuple[str, str]] = []
    valid = True
    for j, item in enumerate(raw):
        item_path = f"{key_path}[{j}]"
        name = NAME.convert(item)
        if name is None:
            check.invalid(item_path, NAME, item)
            valid = False
        elif known is not None and name not in known:
            check.report(item_path, f"no {what} named {show(name)}{suggest(name, known)}")
            valid = False
        else:
            names.append((item_path, name))
    check.unique(what, names)
    return tuple(dict.fromkeys(name for _, name in names)), valid


def _check_coverage(
    check: Checker, routes: Sequence[RouteConfig], listener_names: Sequence[str]
) -> None:
    """Report listeners matched by two routes, and listeners matched by none."""
    named: dict[str, int] = {}
    rest: int | None = None
    for i, route in enumerate(routes):
        if not route.listeners:
            if rest is None:
                rest = i
            else:
                first = f"route {show(routes[rest].name)} (routes[{rest}])"
                check.report(
                    f"routes[{i}]", f"only one route may leave listeners empty; {first} does"
                )
            continue
        for j, listener in enumerate(route.listeners):
            if listener in named:
                k = named[listener]
                check.report(
                    f"routes[{i}].listeners[{j}]",
                    f"listener {show(listener)} already matched by route "
                    f"{show(routes[k].name)} (routes[{k}])",
                )
            else:
                named[listener] = i
    if rest is not None:
        return
    for listener in dict.fromkeys(listener_names):
        if listener not in named:
            check.report(
                "routes",
                f"no route matches listener {show(listener)} (name it in a route's "
                "listeners, or add a route that leaves listeners empty)",
            )


def read_routes(
    check: Checker,
    top: Mapping[str, object],
    listener_names: Sequence[str] | None,
    upstream_names: Sequence[str] | None,
) -> tuple[RouteConfig, ...]:
    """Return the routes written in `top`; an empty tuple when there are none.

    `listener_names` and `upstream_names` are None when some of them could
    not be read: references to them are then not checked, and neither is
    which route matches which listener, so one broken name is reported once.
    """
    raw = top.get("routes")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        check.report("routes", f"expected a list of routes, got {show(raw)}")
        return ()
    if not raw:  # an empty list is the same as no routes
        return ()
    routes: list[RouteConfig] = []
    names: list[tuple[str, str]] = []
    coverage_known = listener_names is not None
    for i, item in enumerate(raw):
        path = f"routes[{i}]"
        if not isinstance(item, dict):
            check.report(path, f"expected a mapping, got {show(item)}")
            coverage_known = False
            continue
        section = check.mapping(item, path, _ROUTE_KEYS)
        name = check.value(section, "name", path, NAME, f"route{i}")
        names.append((join_key(path, "name") if "name" in section else path, name))
        listeners, listeners_valid = _names(
            check, section, "listeners", path, "listener", listener_names
        )
        coverage_known = coverage_known and listeners_valid
        policy: Policy = check.value(section, "policy", path, _POLICY, "passthrough")
        upstreams, _ = _names(check, section, "upstreams", path, "upstream", upstream_names)
        routes.append(
            RouteConfig(name=name, listeners=listeners, policy=policy, upstreams=upstreams)
        )
    check.unique("route name", names)
    if coverage_known and listener_names is not None:
        _check_coverage(check, routes, listener_names)
    return tuple(routes)


def find_route(routes: Sequence[RouteConfig], listener: str) -> RouteConfig | None:
    """Return the route that names `listener`, else the one naming no listener, else None."""
    rest: RouteConfig | None = None
    for route in routes:
        if listener in route.listeners:
            return route
        if not route.listeners and rest is None:
            rest = route
    return rest


# --- Retry, health and spool ----------------------------------------------------


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
            section, "attempts", "retry", Integer(1, MAX_RETRY_ATTEMPTS), default.attempts
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
