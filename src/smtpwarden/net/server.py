"""The relay process: listeners, the session registry, deadlines, shutdown.

``Relay`` builds what its configuration serves with (``net.plan``: the
upstreams, an embedded sink for each of kind "sink", TLS contexts), opens
every listener, and runs one periodic tick that checks every session's deadline
and flushes the transaction log; sessions own no timers of their own, which
keeps an idle session small and spares the hot path any timer churn.

With ``http.enabled`` it also serves metrics, liveness and readiness
(``net.telemetry``); with ``health.check_interval`` it checks its smtp
upstreams on a timer (``net.healthcheck``).

SIGHUP reloads the configuration (``net.reload``): each listener's new
sessions are made from the listener context in force when they connect,
which a reload replaces (``install``), while live sessions keep theirs.

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
import sys
import time
from collections.abc import Callable, Mapping
from types import EllipsisType

from smtpwarden.config import Config, ListenerConfig
from smtpwarden.configreload import native_tls, spool_opened
from smtpwarden.net.admission import Admission
from smtpwarden.net.context import Draining, ListenerContext
from smtpwarden.net.ending import LINGER_S
from smtpwarden.net.healthcheck import HealthChecker
from smtpwarden.net.loop import loop_factory
from smtpwarden.net.notify import Notifier
from smtpwarden.net.plan import Plan, Planner, policies, route_table
from smtpwarden.net.recording import Recording
from smtpwarden.net.reload import Reloads
from smtpwarden.net.replies import LocalReplies
from smtpwarden.net.secure import OPENING_TIMEOUT_S
from smtpwarden.net.session import Session
from smtpwarden.net.spooler import QueueRunner
from smtpwarden.net.telemetry import Telemetry
from smtpwarden.net.tls import Switchable
from smtpwarden.net.upstream import Health, Target
from smtpwarden.observe.metrics import RelayMetrics
from smtpwarden.observe.txlog import RecordLog
from smtpwarden.protocol.records import Upstream
from smtpwarden.spool.store import Spool

log = logging.getLogger("smtpwarden")

# The tick checks deadlines; RFC 5321 timeouts are minutes, so a check every
# second is ample. Shorter configured timeouts (tests) shorten the tick.
MAX_TICK_S = 1.0
MIN_TICK_S = 0.02


class Relay:
    """Everything one relay process runs.

    ``load`` reads the configuration again for a reload (SIGHUP): the file
    it came from. Without it a reload takes the running configuration
    again, which still reloads certificates and reopens the log.
    ``spool_path``: the spool to open and deliver, None for none; by
    default the one the configuration needs (a requeue route).
    """

    def __init__(
        self,
        config: Config,
        *,
        records: RecordLog | None = None,
        reuse_port: bool = False,
        recover_spool: bool = True,
        load: Callable[[], Config] | None = None,
        spool_path: str | EllipsisType | None = ...,
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
        # What each listener's new sessions get; a reload replaces it.
        self.serving: dict[str, tuple[ListenerContext, Upstream]] = {}
        # Listeners whose handshake the event loop does: their one listening
        # context, which hands each handshake to the current one.
        self.native: dict[str, Switchable] = {}
        self.targets: Mapping[str, Target] = {}
        self.planner: Planner | None = None
        self.reloads = Reloads(self, load)
        self.notifier = Notifier()  # the service manager, under systemd's Type=notify
        self.spool: Spool | None = None
        # The spool opened at start, for the life of the process: by default
        # the one the configuration's requeue routes need; a worker is told.
        self.spool_path = spool_opened(config) if spool_path is ... else spool_path
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
        self._shutdown = Draining()
        self.stopped = asyncio.Event()
        self._drained = asyncio.Event()  # no session left open
        self._gone = asyncio.Event()  # no client connection left
        # 32 random bits: worker processes draw their own, and must not meet.
        self._id_prefix = secrets.token_hex(4)
        self._serial = itertools.count(1)
        self._epoch_offset = time.time() - time.monotonic()

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
        async with self.reloads.lock:  # a reload asked for meanwhile waits for the start
            await self._start()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        if config.http.enabled:
            self.metrics = RelayMetrics()
            self.records.observers.append(self.metrics.observe)
        self.planner = Planner(self.health, self.metrics)
        plan = await self.planner.plan(config)
        for listener in config.listeners:
            if listener.tls is not None and native_tls(listener):
                self.native[listener.name] = Switchable(listener.tls)
        if self.spool_path is not None:
            self.spool = Spool(self.spool_path)
            if self.recover_spool:
                report = self.spool.recover()
                log.info("spool %s: %s", self.spool_path, report.summary())
        # Before the listeners: their log lines say the relay is up.
        self.install(plan)
        await self._start_telemetry()
        for listener in config.listeners:
            # An implicit-TLS listener lets the event loop do the handshake
            # before the session starts, unless a PROXY header comes first.
            switchable = self.native.get(listener.name)
            native = None if switchable is None else switchable.front
            self.servers[listener.name] = await loop.create_server(
                functools.partial(self._accept, listener.name),
                listener.host,
                listener.port,
                reuse_address=True,
                reuse_port=self.reuse_port,
                ssl=native,
                ssl_handshake_timeout=OPENING_TIMEOUT_S if native is not None else None,
            )
            host, port = self.address(listener.name)
            target = self.serving[listener.name][0].target
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
            self.runner = QueueRunner(
                self.spool, targets=plan.route_targets(), config=config, records=self.records
            )
            self._runner = loop.create_task(self.runner.run())

    def _accept(self, listener: str) -> Session:
        """A new connection on ``listener``: a session with what it serves now."""
        ctx, upstream = self.serving[listener]
        return Session(ctx, upstream)

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._serial):07x}"

    def install(self, plan: Plan) -> None:
        """Serve new sessions with ``plan``; live sessions keep what they have.

        Nothing here should fail: whatever could was built into the plan. The
        new listener contexts are built before anything is replaced.
        """
        config = plan.config
        self.recording.configure(config)  # the captures the contexts take
        replies = LocalReplies.for_host(config.hostname)
        serving = {}
        for listener in config.listeners:
            ctx = self._context(plan, listener, replies)
            serving[listener.name] = (ctx, ctx.upstream_record)
        self.config = config
        self.serving.update(serving)
        self.admission.configure(config.limits)
        self.health.configure(config.health)
        for name, target in plan.targets.items():
            if name in self.targets and self.targets[name] != target:
                self.health.forget(name)  # another address: what was known no longer holds
        if self.checker is not None and plan.checker is not None:
            plan.checker.carry_from(self.checker)
        self.targets = plan.targets
        if self._checker is not None:
            self._checker.cancel()
            self._checker = None
        self.checker = plan.checker
        if plan.checker is not None:
            self._checker = asyncio.get_running_loop().create_task(plan.checker.run())
        if self.runner is not None:
            self.runner.configure(targets=plan.route_targets(), config=config)
        if self.telemetry is not None:
            self.telemetry.configure(config)

    def _context(
        self, plan: Plan, listener: ListenerConfig, replies: LocalReplies
    ) -> ListenerContext:
        """What the new sessions of ``listener`` share under ``plan``."""
        config = plan.config
        routes = route_table(config, listener.name, plan.targets)
        switchable = self.native.get(listener.name)
        tls_context = plan.tls.get(listener.name) if switchable is None else switchable.front
        plain, encrypted = policies(config, listener, tls_context is not None)
        return ListenerContext(
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
            epoch_offset=self._epoch_offset,
            next_id=self._next_id,
            on_end=self._session_ended,
            capture=self.recording.listeners[listener.name],
            shutdown=self._shutdown,
            metrics=self.metrics,
        )

    async def _start_telemetry(self) -> None:
        """Start the HTTP endpoint, as configured."""
        if self.metrics is not None:
            self.telemetry = Telemetry(
                self.config,
                self.metrics,
                health=self.health,
                records=self.records,
                open_sessions=self._open_session_listeners,
                servers=self.servers,
                spool=self.spool,
                draining=lambda: self._shutdown.on,
            )
            await self.telemetry.start()

    def _open_session_listeners(self) -> list[str]:
        return [session.ctx.name for session in self.sessions if not session.closed]

    async def _run_tick(self) -> None:
        while True:
            timeouts = self.config.timeouts  # read each time: a reload may change them
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
            await asyncio.sleep(min(MAX_TICK_S, max(MIN_TICK_S, shortest / 4)))
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
        self._shutdown.on = True  # every context ever installed says so
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
        if self.planner is not None:
            self.planner.close()
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
        self.notifier.stopping()
        self._stopping = asyncio.get_running_loop().create_task(self.stop(grace))

    def _open_sessions(self) -> bool:
        return any(not session.closed for session in self.sessions)

    def _session_ended(self) -> None:
        if self._shutdown.on:
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
    config: Config,
    *,
    worker: bool = False,
    ready: Callable[[Relay], None] | None = None,
    load: Callable[[], Config] | None = None,
    spool_path: str | EllipsisType | None = ...,
) -> int:
    """Run the relay until a signal stops it; return the exit code.

    ``worker``: one of several relay processes (``net.worker``): listeners
    bind with SO_REUSEPORT and the spool is not recovered. ``ready`` is
    called on the event loop once the listeners are up and the signals
    handled. ``load`` reads the configuration again on SIGHUP, and
    ``spool_path`` is the spool to open (``Relay``).
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
        relay = Relay(
            config,
            reuse_port=reuse_port,
            recover_spool=not worker,
            load=load,
            spool_path=spool_path,
        )
        loop = asyncio.get_running_loop()
        # Before the listeners log that they are up: SIGHUP's default action
        # would end the process. A reload asked for during the start waits
        # for it to end.
        loop.add_signal_handler(signal.SIGHUP, relay.reloads.request)
        try:
            await relay.start()
        except OSError as error:
            log.error("cannot start: %s", error)
            return 1
        log.info("smtpwarden running on %s", loop_name)
        if not worker:
            relay.notifier.ready(f"running on {loop_name}")

        def stop(fast: bool) -> None:
            # The grace in force when the signal comes: a reload may change it.
            shutdown = relay.config.shutdown
            grace = shutdown.fast if fast else shutdown.grace
            if worker and relay.stopping:
                # A worker's stop requests come from its supervisor
                # (net.worker), and so does "no more grace": a signal of its
                # own (pkill, a signal to every process) only starts a
                # graceful stop, whichever of the two reaches it first.
                return
            relay.request_stop(grace)

        loop.add_signal_handler(signal.SIGTERM, stop, False)
        loop.add_signal_handler(signal.SIGINT, stop, True)
        if ready is not None:
            ready(relay)
        await relay.stopped.wait()
        relay.close_log()
        return 0

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())
