"""The HTTP endpoint of the supervisor of ``workers``: every worker as one.

The supervisor serves the configured ``http`` address with ``net.control``;
each worker serves its own endpoint on 127.0.0.1, port 0, and reports the
address it got (``net.worker``). The supervisor answers:

- ``/metrics``: every ready worker's ``/metrics``, fetched concurrently
  within ``FETCH_TIMEOUT_S`` and merged (``net.metricsmerge``: a
  ``worker="I"`` label on every sample, each family once), after the
  supervisor's own families: ``smtpwarden_workers`` by state,
  ``smtpwarden_worker_restarts_total`` and ``smtpwarden_worker_up`` (0 for
  a worker whose metrics are missing from this scrape);
- ``/healthz``: 200 while at least one worker is ready, else 503;
- ``/readyz``: 200 while at least one worker is ready and its own
  ``/readyz`` answers 200 (the body says how many), else 503 with the
  first reason; 503 while shutting down.

Rule 1: a worker that does not answer, or answers nonsense, costs its part
of the answer, never the whole; nothing here waits longer than
``FETCH_TIMEOUT_S``.

Rule 2: like ``net.control``'s handlers, what it says is built from the
workers' state and answers, never from the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from smtpwarden.config import HttpConfig
from smtpwarden.net.control import ControlServer, Response, open_endpoint
from smtpwarden.net.metricsmerge import merge
from smtpwarden.observe.metrics import CONTENT_TYPE, Counter, Gauge, LabelValues, Registry

log = logging.getLogger("smtpwarden.workers")

# A scrape waits at most this for the workers: Prometheus gives up after its
# default scrape_timeout, 10 s, and the merged answer must reach it first.
FETCH_TIMEOUT_S: Final = 5.0
# A worker's /metrics is a few hundred KiB with many upstreams and
# listeners; past this it is not an answer. Our choice.
MAX_FETCH_BYTES: Final = 32 * 1024 * 1024
WORKER_STATES: Final = ("ready", "starting", "down")


class WorkerView(Protocol):
    """What the endpoint reads of one worker (``net.workers.WorkerSlot``)."""

    @property
    def index(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def http(self) -> tuple[str, int] | None: ...
    @property
    def restarts(self) -> int: ...


class FetchError(Exception):
    """A worker's endpoint did not give a readable HTTP answer."""


async def fetch(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    """GET ``path`` from a worker's endpoint: the status code and the body.

    Raises FetchError, OSError or TimeoutError (after ``FETCH_TIMEOUT_S``).
    """
    host, port = address
    async with asyncio.timeout(FETCH_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode("ascii"))
            await writer.drain()
            answer = bytearray()
            while chunk := await reader.read(65536):
                answer += chunk
                if len(answer) > MAX_FETCH_BYTES:
                    raise FetchError(f"answer over {MAX_FETCH_BYTES} bytes")
        finally:
            writer.close()
    head, separator, body = bytes(answer).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ")
    if not separator or len(status) < 2 or not status[0].startswith(b"HTTP/1."):
        raise FetchError("not an HTTP answer")
    try:
        return int(status[1]), body
    except ValueError:
        raise FetchError("not an HTTP status") from None


class SupervisorEndpoint:
    """Serves /metrics, /healthz and /readyz for ``workers`` (see the module docstring).

    ``stopping`` says whether the supervisor is shutting down.
    """

    def __init__(
        self,
        http: HttpConfig,
        workers: Sequence[WorkerView],
        stopping: Callable[[], bool],
        *,
        reuse_port: bool = False,
    ) -> None:
        self._http = http
        self._reuse_port = reuse_port
        self._workers = workers
        self._stopping = stopping
        self.server: ControlServer | None = None
        registry = self.registry = Registry()
        self.states = registry.register(
            Gauge(
                "smtpwarden_workers",
                "Relay worker processes by state: ready, starting (not ready yet) "
                "or down (waiting to be started again).",
                ("state",),
            )
        )
        self.restarts = registry.register(
            Counter(
                "smtpwarden_worker_restarts_total",
                "Worker processes started again after one exited while the supervisor "
                "was not stopping, by worker.",
                ("worker",),
            )
        )
        self.up = registry.register(
            Gauge(
                "smtpwarden_worker_up",
                "1 when the worker's metrics are part of this scrape, 0 when it is not "
                "ready or did not answer in time.",
                ("worker",),
            )
        )
        self.states.read_from(self._count_states)
        self.restarts.read_from(
            lambda: [((str(worker.index),), float(worker.restarts)) for worker in workers]
        )

    def _count_states(self) -> list[tuple[LabelValues, float]]:
        states = [worker.state for worker in self._workers]
        return [((state,), float(states.count(state))) for state in WORKER_STATES]

    async def start(self) -> None:
        """Open the endpoint; an address that cannot be bound is logged, not raised.

        As for a lone relay: metrics never keep mail from being relayed.
        """
        http = self._http
        routes = {"/metrics": self._scrape, "/healthz": self._alive, "/readyz": self._ready}
        self.server = await open_endpoint(
            http.host,
            http.port,
            routes,
            serving="HTTP endpoint for every worker",
            without="each worker",
            wait_if_busy=self._reuse_port,
        )

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    def _ready_workers(self) -> list[WorkerView]:
        return [worker for worker in self._workers if worker.state == "ready"]

    async def _alive(self) -> Response:
        ready, total = len(self._ready_workers()), len(self._workers)
        if ready:
            return Response(200, f"ok: {ready} of {total} workers ready\n".encode())
        return Response(503, f"not alive: 0 of {total} workers ready\n".encode())

    async def _ready(self) -> Response:
        total = len(self._workers)
        if self._stopping():
            return Response(503, b"not ready: shutting down\n")
        answers = await asyncio.gather(*(self._ask(worker, "/readyz") for worker in self._workers))
        reasons = [reason for _, reason in answers if reason is not None]
        ready = total - len(reasons)
        # Ready while any worker serves: a worker being restarted must not
        # take the whole instance out of a load balancer's rotation.
        if ready:
            return Response(200, f"ok: {ready} of {total} workers ready\n".encode())
        text = f"not ready: 0 of {total} workers ready; {reasons[0]}\n"
        return Response(503, text.encode())

    async def _ask(self, worker: WorkerView, path: str) -> tuple[bytes | None, str | None]:
        """A worker's answer to ``path``: its body, or why there is none (its reason)."""
        if worker.state != "ready":
            return None, f"worker {worker.index}: {worker.state}"
        if worker.http is None:  # its endpoint could not be bound (it logged why)
            return None, f"worker {worker.index}: no HTTP endpoint"
        try:
            status, body = await fetch(worker.http, path)
        except (OSError, TimeoutError, FetchError) as error:
            said = str(error) or type(error).__name__
            return None, f"worker {worker.index}: no answer ({said})"
        if status != 200:
            said = body.decode("utf-8", "replace").strip()[:200]
            return None, f"worker {worker.index}: {said or status}"
        return body, None

    async def _scrape(self) -> Response:
        workers = list(self._workers)
        answers = await asyncio.gather(*(self._ask(worker, "/metrics") for worker in workers))
        parts: list[tuple[str, bytes]] = []
        for worker, (body, reason) in zip(workers, answers, strict=True):
            label = str(worker.index)
            self.up.set(0.0 if body is None else 1.0, label)
            if body is not None:
                parts.append((label, body))
            elif worker.state == "ready":
                log.warning("metrics: %s", reason)
        own = self.registry.exposition()
        return Response(200, own + merge(parts), CONTENT_TYPE)
