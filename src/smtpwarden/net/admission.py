"""Who may open a session: allowed networks, and limits per client address.

Checked once per connection, on the client's real address (the one a PROXY
header gave, if any). Like Postfix's anvil, the limits are per address:
``limits.max_connections_per_client`` open sessions, and
``limits.connection_rate_per_minute`` new connections in any 60 seconds.
One ``Admission`` serves every listener of the process.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from collections.abc import Sequence
from typing import Final

from smtpwarden.config import LimitsConfig
from smtpwarden.configtls import Network

# The window of limits.connection_rate_per_minute, in seconds.
RATE_WINDOW_S: Final = 60.0

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refusal(enum.Enum):
    """Why ``Admission.admit`` turns a connection away."""

    TOO_MANY = "too many open sessions from the address"
    TOO_FAST = "too many new connections from the address in the last minute"


def client_address(host: str) -> Address | None:
    """The address as limits count it: an IPv4-mapped IPv6 address as IPv4."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None  # not an IP address (a UNIX socket, a PROXY LOCAL header)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def allowed(address: Address | None, networks: Sequence[Network]) -> bool:
    """True if ``networks`` is empty or holds ``address``."""
    if not networks:
        return True
    return address is not None and any(address in network for network in networks)


class Admission:
    """Open sessions and recent connections per client address."""

    __slots__ = ("_limits", "_open", "_recent")

    def __init__(self, limits: LimitsConfig) -> None:
        self._limits = limits
        self._open: dict[Address, int] = {}
        self._recent: dict[Address, deque[float]] = {}

    def configure(self, limits: LimitsConfig) -> None:
        """New limits (a reload): they apply to the next connections; counts are kept."""
        self._limits = limits
        for address, recent in list(self._recent.items()):
            if recent.maxlen != limits.connection_rate_per_minute:
                self._recent[address] = deque(recent, maxlen=limits.connection_rate_per_minute)

    def admit(self, address: Address | None, now: float) -> Refusal | None:
        """Count a new session from ``address``; None if admitted.

        An admitted session must be given back with ``release``.
        """
        if address is None:
            return None
        limits = self._limits
        rate = limits.connection_rate_per_minute
        if rate:
            recent = self._recent.get(address)
            if recent is None:
                recent = self._recent[address] = deque(maxlen=rate)
            while recent and now - recent[0] >= RATE_WINDOW_S:
                recent.popleft()
            if len(recent) >= rate:
                return Refusal.TOO_FAST
            recent.append(now)
        count = self._open.get(address, 0)
        if limits.max_connections_per_client and count >= limits.max_connections_per_client:
            return Refusal.TOO_MANY
        self._open[address] = count + 1
        return None

    def release(self, address: Address | None) -> None:
        """An admitted session from ``address`` has ended."""
        if address is None:
            return
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)

    def prune(self, now: float) -> None:
        """Forget addresses with no connection in the last window (bounds memory)."""
        stale = [
            address
            for address, recent in self._recent.items()
            if not recent or now - recent[-1] >= RATE_WINDOW_S
        ]
        for address in stale:
            del self._recent[address]

    def open_sessions(self, address: Address) -> int:
        """Sessions admitted from ``address`` and not yet released."""
        return self._open.get(address, 0)
