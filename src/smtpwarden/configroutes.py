"""Route settings: which route each listener's sessions and transactions take.

`smtpwarden.config` reads the whole file; this module defines and reads the
section that says where a message goes once a listener accepts it: which
policy and which upstreams each listener's route uses, and which routes take
the recipients of some domains instead (`routes`). What happens when a
delivery fails (`retry`, `health`, `spool`) is `smtpwarden.configdelivery`'s
part. Problems are named by key path and collected by the same `Checker` as
every other section.

Rule 1: like `smtpwarden.config`, it never prints, never exits and never
raises `ConfigError`; it reports problems to the checker it is given.

Rule 2: it imports nothing from the project but `smtpwarden.configcheck`, so
that `smtpwarden.config` can import it (and re-export its names) without a
cycle. It knows listeners and upstreams only by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from smtpwarden.configcheck import NAME, Checker, Choice, join_key, show, suggest

Policy = Literal["passthrough", "retry", "requeue"]

POLICIES: Final[tuple[Policy, ...]] = ("passthrough", "retry", "requeue")


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    """A domain route if `recipient_domains` is not empty, else a listener route.

    A listener route takes the sessions of its listeners; a domain route, on
    its listeners, the transactions whose first recipient is in its domains.
    """

    name: str  # unique; defaults to route0, route1, ... by position
    # Listener names. Empty: for a listener route, every listener no other
    # listener route names; for a domain route, every listener.
    listeners: tuple[str, ...]
    # Lowercase, without a trailing dot: "example.com" is that domain only,
    # ".example.com" any of its subdomains (a Postfix transport map's rule).
    recipient_domains: tuple[str, ...] = ()
    policy: Policy
    upstreams: tuple[str, ...]  # ordered preference, at least one, no repeats


_POLICY: Final = Choice(POLICIES)
_ROUTE_KEYS: Final = tuple(field.name for field in dataclasses.fields(RouteConfig))


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


# RFC 1035 2.3.4 allows 255 octets on the wire: 253 characters written out.
_MAX_DOMAIN_CHARS: Final = 253
_DOMAIN_EXPECTED: Final = (
    'a domain name, "example.com" (that domain) or ".example.com" (its subdomains)'
)


@dataclass(frozen=True, slots=True)
class _Read:
    """A route as read, with what the checks across routes need to know of it."""

    index: int
    route: RouteConfig
    by_domain: bool  # recipient_domains is written, even if it could not be read
    listeners_valid: bool
    upstreams_valid: bool
    domains: tuple[tuple[str, str], ...]  # (key path, entry), each entry once

    @property
    def label(self) -> str:
        return f"route {show(self.route.name)} (routes[{self.index}])"


def _domain_entry(raw: object) -> str | None:
    """Return a recipient_domains entry lowercased without its trailing dot, else None.

    Labels hold ASCII letters, digits, "-" and "_" as host names do ("*" or
    ":" would never match), or any printable character beyond ASCII: SMTPUTF8
    domains (RFC 6531) are written as they are.
    """
    if not isinstance(raw, str):
        return None
    entry = raw.lower().removesuffix(".")
    name = entry.removeprefix(".")
    if 0 < len(name) <= _MAX_DOMAIN_CHARS and all(
        label and all(c.isalnum() or c in "-_" if c.isascii() else c.isprintable() for c in label)
        for label in name.split(".")
    ):
        return entry
    return None


def _recipient_domains(
    check: Checker, section: Mapping[str, object], path: str
) -> tuple[tuple[str, str], ...]:
    """Read recipient_domains: (key path, entry) for each valid entry, the first time only."""
    key_path = join_key(path, "recipient_domains")
    raw = section["recipient_domains"]
    if not isinstance(raw, list) or not raw:
        # Null or [] must not quietly make the route take every recipient.
        check.report(
            key_path,
            "expected a list of at least one domain (omit the key for a route that takes "
            f"every recipient), got {show(raw)}",
        )
        return ()
    entries: list[tuple[str, str]] = []
    for j, item in enumerate(raw):
        item_path = f"{key_path}[{j}]"
        entry = _domain_entry(item)
        if entry is not None:
            entries.append((item_path, entry))
            continue
        wildcard = isinstance(item, str) and item.startswith("*.")
        hint = f" (write {show(item[1:])} for its subdomains)" if wildcard else ""
        check.report(item_path, f"expected {_DOMAIN_EXPECTED}, got {show(item)}{hint}")
    check.unique("domain", entries)
    first: dict[str, str] = {}
    for item_path, entry in entries:
        first.setdefault(entry, item_path)
    return tuple((item_path, entry) for entry, item_path in first.items())


def _applies(route: RouteConfig, listener: str) -> bool:
    return not route.listeners or listener in route.listeners


def _check_coverage(check: Checker, reads: Sequence[_Read], listener_names: Sequence[str]) -> None:
    """Report listeners matched by two listener routes, and listeners matched by none.

    Domain routes do not count: they take only some transactions of a session.
    """
    named: dict[str, _Read] = {}
    rest: _Read | None = None
    for read in reads:
        if read.by_domain:
            continue
        if not read.route.listeners:
            if rest is None:
                rest = read
            else:
                check.report(
                    f"routes[{read.index}]",
                    "only one route without recipient_domains may leave listeners empty; "
                    f"{rest.label} does",
                )
            continue
        for j, listener in enumerate(read.route.listeners):
            if listener in named:
                check.report(
                    f"routes[{read.index}].listeners[{j}]",
                    f"listener {show(listener)} already matched by {named[listener].label}",
                )
            else:
                named[listener] = read
    if rest is not None:
        return
    for listener in dict.fromkeys(listener_names):
        if listener not in named:
            domain_route = next(
                (read for read in reads if read.by_domain and _applies(read.route, listener)),
                None,
            )
            hint = "" if domain_route is None else f"; {domain_route.label} has recipient_domains"
            check.report(
                "routes",
                f"no route matches listener {show(listener)} (name it in a route's "
                f"listeners, or add a route that leaves listeners empty{hint})",
            )


def _shared_listener(first: RouteConfig, second: RouteConfig) -> str | None:
    """Name a listener that both domain routes apply on, or None if there is none."""
    if not first.listeners and not second.listeners:
        return "every listener"
    for listener in second.listeners or first.listeners:
        if _applies(first, listener):
            return f"listener {show(listener)}"
    return None


def _check_domain_overlap(check: Checker, reads: Sequence[_Read]) -> None:
    """Report an entry two domain routes list on one listener: their order would decide."""
    earlier: list[_Read] = []
    for read in reads:
        if not read.by_domain or not read.listeners_valid:
            continue
        for path, entry in read.domains:
            for other in earlier:
                shared = _shared_listener(other.route, read.route)
                if shared is not None and entry in other.route.recipient_domains:
                    check.report(
                        path,
                        f"domain {show(entry)} is also listed by {other.label}, "
                        f"and both apply to {shared}",
                    )
                    break
        earlier.append(read)


def _check_first_upstreams(
    check: Checker, reads: Sequence[_Read], listener_names: Sequence[str]
) -> None:
    """Report a domain route that does not start at its listeners' routes' first upstream.

    A session is connected along its listener route before any recipient is
    known: a domain route takes over that connection, it cannot choose another.
    """
    by_route = {id(read.route): read for read in reads if not read.by_domain}
    listener_routes = [read.route for read in by_route.values()]
    for read in reads:
        if not read.by_domain or not read.upstreams_valid:
            continue
        first = read.route.upstreams[0]
        seen: set[int] = set()
        for listener in read.route.listeners or dict.fromkeys(listener_names):
            found = find_route(listener_routes, listener)
            base = None if found is None else by_route[id(found)]
            if base is None or base.index in seen or not base.upstreams_valid:
                continue
            seen.add(base.index)
            if base.route.upstreams[0] != first:
                check.report(
                    f"routes[{read.index}].upstreams[0]",
                    f"expected {show(base.route.upstreams[0])}, the first upstream of "
                    f"{base.label} that listener {show(listener)} uses (a session is "
                    f"connected before its recipients are known), got {show(first)}",
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
    reads: list[_Read] = []
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
        by_domain = "recipient_domains" in section
        domains = _recipient_domains(check, section, path) if by_domain else ()
        policy: Policy = check.value(section, "policy", path, _POLICY, "passthrough")
        upstreams, upstreams_valid = _names(
            check, section, "upstreams", path, "upstream", upstream_names
        )
        route = RouteConfig(
            name=name,
            listeners=listeners,
            recipient_domains=tuple(entry for _, entry in domains),
            policy=policy,
            upstreams=upstreams,
        )
        reads.append(_Read(i, route, by_domain, listeners_valid, upstreams_valid, domains))
    check.unique("route name", names)
    _check_domain_overlap(check, reads)
    if coverage_known and listener_names is not None:
        before = len(check.found)
        _check_coverage(check, reads, listener_names)
        if len(check.found) == before:  # else which route a listener uses is unclear
            _check_first_upstreams(check, reads, listener_names)
    return tuple(read.route for read in reads)


def find_route(routes: Sequence[RouteConfig], listener: str) -> RouteConfig | None:
    """Return the listener route that names `listener`, else the one naming no listener.

    None if neither exists. Domain routes are skipped: they take only some
    transactions of a session (see `domain_routes`).
    """
    rest: RouteConfig | None = None
    for route in routes:
        if route.recipient_domains:
            continue
        if listener in route.listeners:
            return route
        if not route.listeners and rest is None:
            rest = route
    return rest


def domain_routes(routes: Sequence[RouteConfig], listener: str) -> tuple[RouteConfig, ...]:
    """Return the domain routes that apply on `listener`, in file order."""
    return tuple(route for route in routes if route.recipient_domains and _applies(route, listener))
