"""The relay process: listeners, the session registry, deadlines, shutdown.

``Relay`` opens every listener, starts the embedded sink for upstreams of
kind "sink", and runs one periodic tick that checks every session's deadline
and flushes the transaction log; sessions own no timers of their own, which
keeps an idle session small and spares the hot path any timer churn.

With ``http.enabled`` it also serves metrics, liveness and readiness
(``net.telemetry``); with ``health.check_interval`` it checks its smtp
upstreams on a timer (``net.healthcheck``).

Shutdown (SIGTERM, SIGINT faster): stop accepting, close sessions that sit
between transactions with 421, let the others finish their transaction up
to the grace deadline, then close what is left with 421. A second signal
skips the grace.

As one of several worker processes (``workers``, see ``net.workers``), a
relay binds its listeners with SO_REUSEPORT beside the others and leaves
spool recovery to the supervisor, which ran it before any worker started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Callable, Mapping

from smtpwarden.config import Config, ListenerConfig, RouteConfig, UpstreamConfig, route_for
from smtpwarden.configroutes import domain_routes
from smtpwarden.net.admission import Admission
from smtpwarden.net.context import ListenerContext
from smtpwarden.net.ending import LINGER_S
from smtpwarden.net.healthcheck import HealthChecker
from smtpwarden.net.loop import loop_factory
from smtpwarden.net.recording import Recording
from smtpwarden.net.replies import LocalReplies
from smtpwarden.net.routing import Route, RouteTable
from smtpwarden.net.secure import OPENING_TIMEOUT_S
from smtpwarden.net.session import Session
from smtpwarden.net.sink import start_sink
from smtpwarden.net.spooler import QueueRunner
from smtpwarden.net.telemetry import Telemetry
from smtpwarden.net.tls import client_context, reload, server_context
from smtpwarden.net.upstream import Health, Target
from smtpwarden.observe.metrics import RelayMetrics
from smtpwarden.observe.txlog import RecordLog
from smtpwarden.protocol.extensions import ExtensionPolicy
from smtpwarden.spool.store import Spool

log = logging.getLogger("smtpwarden")

# The tick checks deadlines; RFC 5321 timeouts are minutes, so a check every
# second is ample. Shorter configured timeouts (tests) shorten the tick.
MAX_TICK_S = 1.0
MIN_TICK_S = 0.02


class Relay:
    """Everything one relay process runs."""

    def __init__(
        self,
        config: Config,
        *,
        records: RecordLog | None = None,
        reuse_port: bool = False,
        recover_spool: bool = True,
    ) -> None:
        self.config = config
        # A worker shares its ports with the other workers, and must not
        # recover the spool: a put of another worker has exactly the
        # half-written files recovery removes.
        self.reuse_port = reuse_port
        self.recover_spool = recover_spool
        self.records = records or RecordLog(config.log.transactions, sessions=config.log.sessions)
        self.sessions: set[Session] = set()
        self.servers: dict[str, asyncio.Server] = {}
        self.sinks: dict[str, asyncio.Server] = {}
        self._contexts: list[ListenerContext] = []
        self.spool: Spool | None = None
        self.runner: QueueRunner | None = None
        self._runner: asyncio.Task[None] | None = None
        self.health = Health(config.health)
        self.admission = Admission(config.limits)
        self.recording = Recording(config)  # transcripts: modes, control file, retention
        self.metrics: RelayMetrics | None = None
        self.telemetry: Telemetry | None = None
        self.checker: HealthChecker | None = None
        self._checker: asyncio.Task[None] | None = None
        self._tick: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.stopped = asyncio.Event()
        self._drained = asyncio.Event()  # no session left open
        self._gone = asyncio.Event()  # no client connection left

    def address(self, listener: str) -> tuple[str, int]:
        """The address a listener is bound to (useful with port 0)."""
        sockname = self.servers[listener].sockets[0].getsockname()
        return sockname[0], sockname[1]

    def http_address(self) -> tuple[str, int] | None:
        """The address of the HTTP endpoint; None when it is off or not bound."""
        server = None if self.telemetry is None else self.telemetry.server
        if server is None or not server.bound:
            return None
        return server.address()

    async def start(self) -> None:
        """Start sinks and listeners; raises OSError if a port cannot be bound."""
        loop = asyncio.get_running_loop()
        config = self.config
        if config.http.enabled:
            self.metrics = RelayMetrics()
            self.records.observers.append(self.metrics.observe)
        targets: dict[str, Target] = {}
        for upstream in config.upstreams:
            targets[upstream.name] = await self._target(upstream)
        if any(route.policy == "requeue" for route in config.routes):
            self.spool = Spool(config.spool.path)
            if self.recover_spool:
                report = self.spool.recover()
                log.info("spool %s: %s", config.spool.path, report.summary())
        # Before the listeners: their log lines say the relay is up.
        await self._start_watching(targets)
        # 32 random bits: worker processes draw their own, and must not meet.
        prefix = secrets.token_hex(4)
        serial = itertools.count(1)

        def next_id() -> str:
            return f"{prefix}{next(serial):07x}"

        replies = LocalReplies.for_host(config.hostname)
        for listener in config.listeners:
            routes = _route_table(config, listener.name, targets)
            tls_context = None if listener.tls is None else server_context(listener.tls)
            plain, encrypted = _policies(config, listener, tls_context is not None)
            ctx = ListenerContext(
                name=listener.name,
                listener=listener,
                tls_context=tls_context,
                admission=self.admission,
                policy_plain=plain,
                policy_tls=encrypted,
                target=routes.default.targets[0],
                routes=routes,
                spool=self.spool,
                health=self.health,
                config=config,
                records=self.records,
                sessions=self.sessions,
                replies=replies,
                epoch_offset=time.time() - time.monotonic(),
                next_id=next_id,
                on_end=self._session_ended,
                capture=self.recording.listener(listener),
                metrics=self.metrics,
            )
            self._contexts.append(ctx)
            # An implicit-TLS listener lets the event loop do the handshake
            # before the session starts, unless a PROXY header comes first.
            implicit = listener.tls is not None and listener.tls.mode == "implicit"
            native = tls_context if implicit and listener.proxy_protocol is None else None
            self.servers[listener.name] = await loop.create_server(
                functools.partial(Session, ctx, ctx.upstream_record),
                listener.host,
                listener.port,
                reuse_address=True,
                reuse_port=self.reuse_port,
                ssl=native,
                ssl_handshake_timeout=OPENING_TIMEOUT_S if native is not None else None,
            )
            host, port = self.address(listener.name)
            target = ctx.target
            log.info(
                "listener %s on %s:%s relays to %s (%s:%s)",
                listener.name,
                host,
                port,
                target.name,
                target.host,
                target.port,
            )
        self._tick = loop.create_task(self._run_tick())
        if self.spool is not None:
            # The spool's workers deliver what requeue spooled, through the
            # upstreams of the route that spooled it.
            by_route = {
                route.name: tuple(targets[name] for name in route.upstreams)
                for route in config.routes
            }
            self.runner = QueueRunner(
                self.spool, targets=by_route, config=config, records=self.records
            )
            self._runner = loop.create_task(self.runner.run())

    async def _start_watching(self, targets: Mapping[str, Target]) -> None:
        """Start the health checks and the HTTP endpoint, as configured."""
        config = self.config
        if config.health.check_interval > 0:
            smtp = [targets[up.name] for up in config.upstreams if up.kind == "smtp"]
            if smtp:
                self.checker = HealthChecker(smtp, self.health, config, self.metrics)
                self._checker = asyncio.get_running_loop().create_task(self.checker.run())
        if self.metrics is not None:
            self.telemetry = Telemetry(
                config,
                self.metrics,
                health=self.health,
                records=self.records,
                open_sessions=self._open_session_listeners,
                servers=self.servers,
                spool=self.spool,
                draining=lambda: bool(self._contexts) and self._contexts[0].draining,
            )
            await self.telemetry.start()

    def _open_session_listeners(self) -> list[str]:
        return [session.ctx.name for session in self.sessions if not session.closed]

    async def _target(self, upstream: UpstreamConfig) -> Target:
        if upstream.kind == "sink":
            folder = upstream.path or "mail"
            server = await start_sink("127.0.0.1", 0, folder, self.config.hostname)
            self.sinks[upstream.name] = server
            port = server.sockets[0].getsockname()[1]
            log.info(
                "upstream %s is the embedded sink on 127.0.0.1:%s writing to %s",
                upstream.name,
                port,
                folder,
            )
            return Target(name=upstream.name, host="127.0.0.1", port=port)
        if upstream.tls.mode != "none" and not upstream.tls.verify:
            log.warning(
                "upstream %s: TLS certificate verification is off (tls.verify: false): "
                "anyone between here and it can read and change the mail",
                upstream.name,
            )
        return Target(
            name=upstream.name,
            host=upstream.host,
            port=upstream.port,
            tls=upstream.tls,
            context=client_context(upstream.tls),
            xclient=upstream.xclient,
            xforward=upstream.xforward,
        )

    async def _run_tick(self) -> None:
        timeouts = self.config.timeouts
        shortest = min(
            timeouts.banner,
            timeouts.command,
            timeouts.mail,
            timeouts.rcpt,
            timeouts.data_init,
            timeouts.data_block,
            timeouts.data_end,
            timeouts.reply,
        )
        tick = min(MAX_TICK_S, max(MIN_TICK_S, shortest / 4))
        while True:
            await asyncio.sleep(tick)
            try:
                now = time.monotonic()
                for session in list(self.sessions):
                    session.check_deadline(now)
                self.admission.prune(now)
                self.recording.tick(now)
                self.records.flush()
            except Exception:
                # The tick is what enforces every deadline: it must outlive
                # any one session's failure.
                log.exception("deadline check failed")

    async def stop(self, grace: float) -> None:
        """Stop accepting, drain sessions for up to ``grace`` seconds, close."""
        for ctx in self._contexts:
            ctx.draining = True
        for server in self.servers.values():
            server.close()
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        for session in list(self.sessions):
            session.drain()
        self._session_ended()
        await self._wait(self._drained, grace)
        for session in list(self.sessions):
            session.force_close()
        # Closed sessions linger so that clients read the closing reply; give
        # them that moment, then close what is still connected.
        await self._wait(self._gone, LINGER_S)
        for session in list(self.sessions):
            session.abandon()
        await self._wait(self._gone, LINGER_S)
        if self._tick is not None:
            self._tick.cancel()
        for sink in self.sinks.values():
            sink.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self.spool is not None:
            self.spool.close()
        if self.telemetry is not None:
            # Last: /readyz says 503 while the sessions drain.
            await self.telemetry.stop()
        self.records.flush()
        self.stopped.set()

    @property
    def stopping(self) -> bool:
        """True once ``request_stop`` began a stop."""
        return self._stopping is not None

    def request_stop(self, grace: float) -> None:
        """SIGTERM or SIGINT: stop with ``grace``; asked again, close every session now."""
        if self._stopping is not None:
            for session in list(self.sessions):
                session.force_close()
            return
        log.info("shutting down, %.1f s grace", grace)
        self._stopping = asyncio.get_running_loop().create_task(self.stop(grace))

    def reload_certificates(self) -> None:
        """SIGHUP: listeners with TLS load their certificate and key again.

        New handshakes use them; live sessions keep theirs. A file that no
        longer loads is logged and the old certificate kept.
        """
        for ctx in self._contexts:
            tls = ctx.listener.tls
            if tls is None or ctx.tls_context is None:
                continue
            try:
                reload(ctx.tls_context, tls)
            except (OSError, ssl.SSLError) as error:
                log.error("listener %s: certificate not reloaded: %s", ctx.name, error)
            else:
                log.info("listener %s: certificate reloaded", ctx.name)

    def _open_sessions(self) -> bool:
        return any(not session.closed for session in self.sessions)

    def _session_ended(self) -> None:
        if self._contexts and self._contexts[0].draining:
            if not self._open_sessions():
                self._drained.set()
            if not self.sessions:
                self._gone.set()

    @staticmethod
    async def _wait(event: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()

    def close_log(self) -> None:
        """Flush and close the transaction log."""
        self.records.close()


def run_relay(
    config: Config, *, worker: bool = False, ready: Callable[[Relay], None] | None = None
) -> int:
    """Run the relay until a signal stops it; return the exit code.

    ``worker``: one of several relay processes (``net.worker``): listeners
    bind with SO_REUSEPORT and the spool is not recovered. ``ready`` is
    called on the event loop once the listeners are up and the signals
    handled.
    """
    logging.basicConfig(
        level=config.log.level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    factory, loop_name = loop_factory(config.event_loop)

    async def main() -> int:
        # Linux's SO_REUSEPORT spreads connections over the processes bound
        # to a port; elsewhere the option means something else.
        reuse_port = worker or (config.reuse_port and sys.platform.startswith("linux"))
        relay = Relay(config, reuse_port=reuse_port, recover_spool=not worker)
        loop = asyncio.get_running_loop()
        # Before the listeners log that they are up: SIGHUP's default action
        # would end the process, and a reload then reaches every listener
        # started so far.
        loop.add_signal_handler(signal.SIGHUP, relay.reload_certificates)
        try:
            await relay.start()
        except OSError as error:
            log.error("cannot start: %s", error)
            return 1
        log.info("smtpwarden running on %s", loop_name)
        stop = relay.request_stop
        if worker:
            # A worker's stop requests come from its supervisor (net.worker),
            # and so does "no more grace": a signal of its own (pkill, a
            # signal to every process) only starts a graceful stop, whichever
            # of the two reaches it first.
            def stop(grace: float) -> None:
                if not relay.stopping:
                    relay.request_stop(grace)

        loop.add_signal_handler(signal.SIGTERM, stop, config.shutdown.grace)
        loop.add_signal_handler(signal.SIGINT, stop, config.shutdown.fast)
        if ready is not None:
            ready(relay)
        await relay.stopped.wait()
        relay.close_log()
        return 0

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def _route_table(config: Config, listener: str, targets: Mapping[str, Target]) -> RouteTable:
    """The routes a listener's sessions follow, with their upstreams resolved."""

    def resolve(route: RouteConfig) -> Route:
        # Retry without replays holds messages for nothing: passthrough
        # relays the upstream's own failure instead of a 4xx of ours.
        no_replays = route.policy == "retry" and config.retry.attempts == 0
        return Route(
            name=route.name,
            policy="passthrough" if no_replays else route.policy,
            targets=tuple(targets[name] for name in route.upstreams),
        )

    by_domain = [
        (resolve(route), route.recipient_domains)
        for route in domain_routes(config.routes, listener)
    ]
    return RouteTable(resolve(route_for(config, listener)), by_domain)


def _policies(
    config: Config, listener: ListenerConfig, tls: bool
) -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """What EHLO offers a listener's clients before TLS and once encrypted."""
    starttls = tls and listener.tls is not None and listener.tls.mode == "starttls"
    auth = listener.auth
    mechanisms = () if auth is None else auth.mechanisms
    size = config.limits.max_message_bytes
    plain = ExtensionPolicy(
        starttls=starttls,
        auth=() if auth is None or auth.require_tls else mechanisms,
        max_size=size,
    )
    return plain, ExtensionPolicy(auth=mechanisms, max_size=size)
