"""What the relay tells its HTTP endpoint: metrics, liveness and readiness.

``Telemetry`` ties ``observe.metrics.RelayMetrics`` to a running relay: the
readings taken at each scrape (open sessions, upstream health, dropped
records, the spool), and the three handlers ``net.control`` serves:

- ``/metrics``: the text exposition. The spool is counted at each scrape,
  in a worker thread, as reading its envelopes blocks;
- ``/healthz``: 200 "ok" while the process serves at all;
- ``/readyz``: 200 while every listener accepts connections and at least
  one upstream is usable (``Health``), else 503 with the reason, so that a
  load balancer stops sending clients to a relay that would only answer
  421 or that is shutting down.

Rule: nothing here runs per session or per record; the records reach the
metrics through the ``RecordLog`` observer the relay registers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from smtpwarden.config import Config
from smtpwarden.net.control import ControlServer, Response, open_endpoint
from smtpwarden.net.upstream import Health
from smtpwarden.observe.metrics import CONTENT_TYPE, QUEUE_STATES, LabelValues, RelayMetrics
from smtpwarden.observe.txlog import RecordLog
from smtpwarden.spool import EntryState, Spool, SpoolError

log = logging.getLogger("smtpwarden.telemetry")

_OK: Final = Response(200, b"ok\n")


class Telemetry:
    """The relay's metrics and its HTTP endpoint.

    ``sessions`` is read for the listener names of the open sessions,
    ``servers`` for whether each listener accepts connections, and
    ``draining`` says whether the relay is shutting down.
    """

    def __init__(
        self,
        config: Config,
        metrics: RelayMetrics,
        *,
        health: Health,
        records: RecordLog,
        open_sessions: Callable[[], Iterable[str]],
        servers: Mapping[str, asyncio.Server],
        spool: Spool | None,
        draining: Callable[[], bool],
    ) -> None:
        self._config = config
        self.metrics = metrics
        self._health = health
        self._servers = servers
        self._spool = spool
        self._draining = draining
        self._scan: asyncio.Task[tuple[dict[str, int], float] | None] | None = None
        self.server: ControlServer | None = None

        def sessions() -> list[tuple[LabelValues, float]]:
            counts = Counter(open_sessions())
            return [((item.name,), float(counts[item.name])) for item in self._config.listeners]

        def health_now() -> list[tuple[LabelValues, float]]:
            return [
                ((item.name,), 0.0 if health.is_down(item.name) else 1.0)
                for item in self._config.upstreams
            ]

        metrics.sessions_active.read_from(sessions)
        metrics.upstream_up.read_from(health_now)
        metrics.records_dropped.read_from(lambda: [((), float(records.dropped))])

    def configure(self, config: Config) -> None:
        """A reload: the upstreams and listeners to report on (``http`` cannot change)."""
        self._config = config

    async def start(self) -> None:
        """Open the endpoint; an address that cannot be bound is logged, not raised.

        Metrics must not keep the relay from relaying mail.
        """
        http = self._config.http
        routes = {"/metrics": self._scrape, "/healthz": self._alive, "/readyz": self._ready}
        self.server = await open_endpoint(
            http.host,
            http.port,
            routes,
            serving="metrics",
            without="the relay",
            wait_if_busy=self._config.reuse_port,
        )

    async def stop(self) -> None:
        if self._scan is not None:
            self._scan.cancel()
        if self.server is not None:
            await self.server.close()
            self.server = None

    def readiness(self) -> str | None:
        """Why the relay is not ready, or None when it is."""
        if self._draining():
            return "shutting down"
        for listener in self._config.listeners:
            server = self._servers.get(listener.name)
            if server is None or not server.is_serving():
                return f"listener {listener.name} is not accepting connections"
        names = [upstream.name for upstream in self._config.upstreams]
        if all(self._health.is_down(name) for name in names):
            return "no usable upstream: " + ", ".join(names) + " marked down"
        return None

    async def _alive(self) -> Response:
        return _OK

    async def _ready(self) -> Response:
        reason = self.readiness()
        if reason is None:
            return _OK
        return Response(503, f"not ready: {reason}\n".encode())

    async def _scrape(self) -> Response:
        if self._spool is not None:
            await self._count_spool(self._spool)
        return Response(200, self.metrics.registry.exposition(), CONTENT_TYPE)

    async def _count_spool(self, spool: Spool) -> None:
        # Concurrent scrapes share one scan.
        if self._scan is None or self._scan.done():
            self._scan = asyncio.get_running_loop().create_task(
                asyncio.to_thread(_spool_counts, spool, time.time())
            )
        found = await asyncio.shield(self._scan)
        metrics = self.metrics
        if found is None:
            metrics.queue.clear()
            metrics.queue_oldest.clear()
            return
        counts, oldest = found
        for state in QUEUE_STATES:
            metrics.queue.set(counts.get(state, 0), state)
        metrics.queue_oldest.set(oldest)


def _spool_counts(spool: Spool, now: float) -> tuple[dict[str, int], float] | None:
    """Entries per state and the age of the oldest one not dead; None if unreadable."""
    counts: dict[str, int] = {}
    oldest = now
    try:
        for entry in spool.look().values():
            counts[entry.state.value] = counts.get(entry.state.value, 0) + 1
            if entry.state is not EntryState.DEAD:
                oldest = min(oldest, entry.created)
    except SpoolError as error:
        log.warning("metrics: cannot read the spool: %s", error)
        return None
    return counts, max(0.0, now - oldest)
