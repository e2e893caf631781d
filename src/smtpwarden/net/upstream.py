"""The upstream leg: where a listener relays to, and its connection.

The upstream connection's protocol object only hands its callbacks to the
session; all decisions stay in ``session.py``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

from smtpwarden.config import HealthConfig, TimeoutsConfig
from smtpwarden.configtls import UpstreamTls
from smtpwarden.net.flow import WRITE_HIGH_WATER_BYTES
from smtpwarden.protocol.transaction import Awaiting


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Where a listener relays to, and how."""

    name: str
    host: str
    port: int
    tls: UpstreamTls = field(default_factory=UpstreamTls)
    # Built once from ``tls`` (``net.tls.client_context``); None without TLS.
    context: ssl.SSLContext | None = field(default=None, compare=False)
    xclient: bool = False  # send XCLIENT when the upstream offers it
    xforward: bool = False  # else XFORWARD before each MAIL, when offered


class UpstreamEvents(Protocol):
    """What a session does with its upstream connection's callbacks."""

    def upstream_made(self, transport: asyncio.Transport) -> None: ...
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_lost(self) -> None: ...
    def upstream_full(self) -> None: ...
    def upstream_drained(self) -> None: ...


class _Detached:
    """Where the callbacks of a connection the session gave up on go: nowhere."""

    def upstream_made(self, transport: asyncio.Transport) -> None:
        transport.abort()

    def upstream_data(self, data: bytes) -> None:
        pass

    def upstream_lost(self) -> None:
        pass

    def upstream_full(self) -> None:
        pass

    def upstream_drained(self) -> None:
        pass


_DETACHED: Final = _Detached()


class UpstreamProtocol(asyncio.Protocol):
    """Hands the upstream connection's callbacks to its session."""

    __slots__ = ("events",)

    def __init__(self, events: UpstreamEvents) -> None:
        self.events: UpstreamEvents = events

    def detach(self) -> None:
        """The session is done with this connection: ignore what it still reports.

        A session that drops one upstream connection and opens another must
        not take the old one's late "connection lost" for the new one's.
        """
        self.events = _DETACHED

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Handed over here, not when the connecting coroutine resumes: the
        # banner may be read, and the client resumed, before it does.
        upstream = cast(asyncio.Transport, transport)
        upstream.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        self.events.upstream_made(upstream)

    def data_received(self, data: bytes) -> None:
        self.events.upstream_data(data)

    def eof_received(self) -> bool:
        return False  # a half-closed upstream is a closed upstream

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.upstream_lost()

    def pause_writing(self) -> None:
        self.events.upstream_full()

    def resume_writing(self) -> None:
        self.events.upstream_drained()


async def connect(target: Target, events: UpstreamEvents, timeout_s: float) -> None:
    """Open a connection to ``target``; ``events.upstream_made`` receives it.

    Raises OSError or TimeoutError.
    """
    loop = asyncio.get_running_loop()
    implicit = target.context if target.tls.mode == "implicit" else None
    async with asyncio.timeout(timeout_s):
        await loop.create_connection(
            lambda: UpstreamProtocol(events),
            target.host,
            target.port,
            ssl=implicit,
            server_hostname=(target.tls.server_name or target.host) if implicit else None,
        )


class Health:
    """Which upstreams to skip: a circuit breaker per upstream name.

    ``health.failures`` failures in a row mark an upstream down for
    ``health.cooldown`` seconds; after that one session may probe it (the
    next one waits another cool-down unless the probe succeeds). A success
    clears the count. Shared by every session of the process.
    """

    def __init__(self, config: HealthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._down_until: dict[str, float] = {}

    def configure(self, config: HealthConfig) -> None:
        """New thresholds (a reload); the state of each upstream is kept."""
        self._config = config

    def forget(self, name: str) -> None:
        """Clear what is known of ``name`` (a reload gave it another address)."""
        self._failures.pop(name, None)
        self._down_until.pop(name, None)

    def order(self, targets: Sequence[Target]) -> list[Target]:
        """``targets`` to try, in order: usable ones first, then the rest.

        An upstream past its cool-down is taken as a probe: others that ask
        meanwhile find it down again.
        """
        now = self._clock()
        usable: list[Target] = []
        down: list[Target] = []
        for target in targets:
            until = self._down_until.get(target.name)
            if until is None:
                usable.append(target)
            elif until <= now:
                self._down_until[target.name] = now + self._config.cooldown
                usable.append(target)
            else:
                down.append(target)
        return usable + down

    def failed(self, target: Target) -> None:
        """A connection or an attempt to ``target`` failed."""
        count = self._failures.get(target.name, 0) + 1
        self._failures[target.name] = count
        if count >= self._config.failures:
            self._down_until[target.name] = self._clock() + self._config.cooldown

    def succeeded(self, target: Target) -> None:
        """``target`` answered: it is healthy again."""
        self._failures.pop(target.name, None)
        self._down_until.pop(target.name, None)

    def is_down(self, name: str) -> bool:
        """True while ``name`` is marked down."""
        return self._down_until.get(name, 0.0) > self._clock()


def reply_timeout(entry: Awaiting, timeouts: TimeoutsConfig) -> float:
    """How long the upstream may take to answer ``entry`` (RFC 5321 4.5.3.2)."""
    match entry.name:
        case "CONNECT":
            return timeouts.banner  # 4.5.3.2.1
        case "MAIL":
            return timeouts.mail  # 4.5.3.2.2
        case "RCPT":
            return timeouts.rcpt  # 4.5.3.2.3
        case "DATA":
            return timeouts.data_init  # 4.5.3.2.4
        case "." | "BDAT LAST":
            return timeouts.data_end  # 4.5.3.2.6
        case "BDAT":
            return timeouts.data_block  # 4.5.3.2.5
        case _:
            return timeouts.reply
