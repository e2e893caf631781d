"""Which route a transaction follows: its listener's, or its recipients' domain's.

A session is connected before any recipient is known, along its listener's
route. A route that matches on recipient domain (``recipient_domains``)
takes over a transaction from its first recipient: it chooses the policy
(passthrough, retry, requeue) and the upstreams that replays and the spool
use. The configuration makes its first upstream the listener route's, so
the live connection is the one it would have chosen.

One transaction follows one route. A recipient of another route gets
``452 4.5.3`` (RFC 5321 4.5.3.1.10), and the client sends it in a later
transaction, as it does for any recipient limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from smtpwarden.config import Policy
from smtpwarden.net.upstream import Target


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """What a transaction's route decides at run time."""

    name: str  # kept with spooled messages: their workers deliver along it
    policy: Policy
    targets: tuple[Target, ...]  # ordered preference; replays start after the live one

    @property
    def guarded(self) -> bool:
        """True if its messages are held for a replay (retry, requeue)."""
        return self.policy != "passthrough"


def domain_of(path: bytes) -> str:
    """The domain of a RCPT path, lowercased; "" for none (``<postmaster>``).

    A source route (``@a,@b:user@domain``, RFC 5321 C) names hops before
    the mailbox; only the mailbox counts.
    """
    mailbox = path.rpartition(b":")[2]
    domain = mailbox.rpartition(b"@")[2] if b"@" in mailbox else b""
    return domain.decode("utf-8", "replace").lower().rstrip(".")


class RouteTable:
    """A listener's route and the domain routes that apply on its listener."""

    __slots__ = ("_exact", "_parents", "by_domain", "default", "guarded")

    def __init__(
        self, default: Route, domain_routes: Sequence[tuple[Route, Sequence[str]]] = ()
    ) -> None:
        """``domain_routes`` pairs each route with its ``recipient_domains``, in file order.

        ``example.com`` matches that domain; ``.example.com`` any of its
        subdomains. The configuration refuses a domain listed by two routes
        on one listener, so order only breaks ties between an exact name and
        a parent: the most specific entry wins, as in a Postfix transport map.
        """
        self.default = default
        self._exact: dict[str, Route] = {}
        self._parents: dict[str, Route] = {}
        for route, domains in domain_routes:
            for domain in domains:
                table = self._parents if domain.startswith(".") else self._exact
                table.setdefault(domain, route)
        self.by_domain = bool(self._exact or self._parents)
        self.guarded = default.guarded or any(route.guarded for route, _ in domain_routes)

    def for_domain(self, domain: str) -> Route:
        """The route for a recipient in ``domain`` (lowercase)."""
        found = self._exact.get(domain)
        if found is not None:
            return found
        if self._parents:
            dot = domain.find(".")
            while dot != -1:
                found = self._parents.get(domain[dot:])
                if found is not None:
                    return found
                dot = domain.find(".", dot + 1)
        return self.default

    def for_recipient(self, path: bytes) -> Route:
        """The route for a RCPT path (without angle brackets)."""
        if not self.by_domain:
            return self.default
        return self.for_domain(domain_of(path))
