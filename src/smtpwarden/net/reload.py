"""Reloading a running relay's configuration (SIGHUP).

A reload reads the configuration file again (a worker is handed it by its
supervisor) and, if it is valid, changes no setting that needs a restart
(``configreload``) and can be built (``net.plan``), serves every session
that starts afterwards with it. Sessions already open keep the settings,
routes, upstreams and certificate they started with, to their end.

A file that is refused is refused whole, with every problem logged, and the
running configuration stays in force. Either way, the configuration in
force afterwards is then applied again, which reads its certificates and
CA files again and reopens the transaction log: a renewed certificate or a
rotated log never waits for a valid file. The metrics count each reload as
applied or refused.

Rule: reloads run one at a time, and never while the relay starts or stops.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from smtpwarden.config import Config, ConfigError
from smtpwarden.configreload import changed_sections, restart_changes
from smtpwarden.configtls import ListenerTls
from smtpwarden.net.tls import reload as reload_certificate

if TYPE_CHECKING:
    from smtpwarden.net.server import Relay

log = logging.getLogger("smtpwarden")

KEPT = "the running one is kept"


class Reloads:
    """The reloads of one relay (see the module docstring).

    ``load`` reads the configuration file again; None: there is no file (the
    embedded default, command-line options), and a reload takes the running
    configuration again.
    """

    def __init__(self, relay: Relay, load: Callable[[], Config] | None) -> None:
        self._relay = relay
        self._load = load
        self.lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()

    def request(self, config: Config | None = None, *, refused: bool = False) -> None:
        """SIGHUP: ``reload`` in a task of its own."""
        task = asyncio.get_running_loop().create_task(self.reload(config, refused=refused))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, config: Config | None = None, *, refused: bool = False) -> bool:
        """Apply ``config``, else the file read again; True if it was applied.

        ``refused``: a supervisor refused the file already; the running
        configuration is only applied again.
        """
        relay = self._relay
        async with self.lock:
            if relay.stopping:
                log.info("shutting down: configuration not reloaded")
                return False
            try:
                new = None if refused else self._read(config)
                applied = new is not None and await self._apply(new, again=False)
            except Exception:
                # A bug here must not leave the relay without its log reopened.
                log.exception("configuration not reloaded, %s", KEPT)
                applied = False
            if not applied and not relay.stopping:
                try:
                    await self._apply(relay.config, again=True)
                except Exception:
                    log.exception("the running configuration could not be applied again")
            if relay.metrics is not None:
                relay.metrics.reloaded(applied)
            return applied

    def _read(self, config: Config | None) -> Config | None:
        """The configuration to apply, or None (logged) when it is refused."""
        running = self._relay.config
        try:
            if config is None:
                config = self._load() if self._load is not None else running
        except ConfigError as error:
            log.error("configuration not reloaded, %s: %s", KEPT, error)
            return None
        problems = restart_changes(running, config, spool=self._relay.spool_path)
        if problems:
            log.error(
                "configuration not reloaded, %s: %s",
                KEPT,
                "\n  ".join(["these settings change only with a restart:", *problems]),
            )
            return None
        return config

    async def _apply(self, config: Config, *, again: bool) -> bool:
        """Plan ``config`` and serve new sessions with it; False (logged) if it fails.

        ``again``: the running configuration, applied again after a refusal:
        whatever fails, the log is reopened and the certificates the plan
        does not hold are reloaded.
        """
        relay = self._relay
        planner = relay.planner
        if planner is None:  # not started: nothing to reload
            return False
        kept = {
            name: ctx.tls_context
            for name, (ctx, _) in relay.serving.items()
            if ctx.tls_context is not None and name not in relay.native
        }
        plan = None
        try:
            plan = await planner.plan(config, kept=kept, targets=relay.targets)
        except OSError as error:
            what = "TLS files not reloaded" if again else "configuration not reloaded"
            log.error("%s, %s: %s", what, KEPT, error)
            if not again:
                return False
        if relay.stopping:
            return False
        path = config.log.transactions
        try:
            relay.records.reopen(path, sessions=config.log.sessions)
        except OSError as error:
            log.error("transaction log %s cannot be opened: %s", path, error)
            if not again:
                log.error("configuration not reloaded, %s", KEPT)
                return False
        by_name = {listener.name: listener for listener in config.listeners}
        for name, context in relay.native.items():
            self._reload_native(name, context, by_name[name].tls)
        if plan is None:
            return False
        before = relay.config
        relay.install(plan)
        if config.log.level != before.log.level:
            logging.getLogger().setLevel(config.log.level.upper())
        for name, context in plan.tls.items():
            if context is not kept.get(name):
                log.info("listener %s: certificate reloaded", name)
        if not again:
            changed = changed_sections(before, config)
            log.info(
                "configuration reloaded from %s: %s",
                config.source,
                "changed " + ", ".join(changed) if changed else "no setting changed",
            )
            gone = {route.name for route in before.routes} - {r.name for r in config.routes}
            if relay.spool is not None and gone:
                log.warning(
                    "routes %s are gone: messages they spooled wait for a route of that "
                    "name (until spool.max_age)",
                    ", ".join(sorted(gone)),
                )
        return True

    @staticmethod
    def _reload_native(name: str, context: ssl.SSLContext, tls: ListenerTls | None) -> None:
        """Load a native listener's certificate again into the context it serves with."""
        if tls is None:  # a native listener keeps its TLS (configreload)
            return
        try:
            reload_certificate(context, tls)
        except OSError as error:
            log.error(
                "listener %s: certificate not reloaded, the one loaded before is kept: %s",
                name,
                error,
            )
        else:
            log.info("listener %s: certificate reloaded", name)
