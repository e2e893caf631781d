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
from collections.abc import Callable
from typing import TYPE_CHECKING

from smtpwarden.config import Config, ConfigError
from smtpwarden.configreload import changed_sections, restart_changes
from smtpwarden.net.tls import server_context

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
            relay.notifier.reloading()
            applied = await self._reload(config, refused=refused)
            if not relay.stopping:  # a stop begun meanwhile has said STOPPING
                relay.notifier.ready(
                    "running; configuration reloaded"
                    if applied
                    else "running; the last reload was refused, see the log"
                )
            return applied

    async def _reload(self, config: Config | None, *, refused: bool) -> bool:
        relay = self._relay
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
        the log is reopened and the certificates of native listeners taken
        first, whatever fails afterwards.
        """
        relay = self._relay
        planner = relay.planner
        if planner is None:  # not started: nothing to reload
            return False
        if again:
            self._reopen(config)
            self._reload_native(config)
        kept = {
            name: (ctx.tls_context, ctx.listener.tls)
            for name, (ctx, _) in relay.serving.items()
            if ctx.tls_context is not None and ctx.listener.tls is not None
            if name not in relay.native
        }
        try:
            plan = await planner.plan(config, kept=kept, targets=relay.targets)
        except OSError as error:
            what = "TLS files not reloaded" if again else "configuration not reloaded"
            log.error("%s, %s: %s", what, KEPT, error)
            return False
        if relay.stopping:
            return False
        if not again and not self._reopen(config):
            log.error("configuration not reloaded, %s", KEPT)
            return False
        before = relay.config
        relay.install(plan)
        if not again:
            self._reload_native(config)
        if config.log.level != before.log.level:
            logging.getLogger().setLevel(config.log.level.upper())
        for name, context in plan.tls.items():
            if name not in kept or context is not kept[name][0]:
                log.info("listener %s: certificate reloaded", name)
        if not again:
            changed = changed_sections(before, config)
            log.info(
                "configuration reloaded from %s: %s",
                config.source,
                "changed " + ", ".join(changed) if changed else "no setting changed",
            )
            self._warn_of_gone_routes(before, config)
        return True

    def _reopen(self, config: Config) -> bool:
        """Open the transaction log again at ``config``'s name; False (logged) if it fails."""
        path = config.log.transactions
        try:
            self._relay.records.reopen(path, sessions=config.log.sessions)
        except OSError as error:
            log.error("transaction log %s cannot be opened: %s", path, error)
            return False
        return True

    def _reload_native(self, config: Config) -> None:
        """Native listeners: new handshakes get ``config``'s certificate, read again."""
        relay = self._relay
        for listener in config.listeners:
            switchable = relay.native.get(listener.name)
            if switchable is None or listener.tls is None:
                continue
            try:
                switchable.current = server_context(listener.tls)
            except OSError as error:
                log.error(
                    "listener %s: certificate not reloaded, the one loaded before is kept: %s",
                    listener.name,
                    error,
                )
            else:
                log.info("listener %s: certificate reloaded", listener.name)

    def _warn_of_gone_routes(self, before: Config, after: Config) -> None:
        """Requeue routes gone while the spool is open: what they spooled waits."""
        names = {route.name for route in after.routes}
        gone = [r.name for r in before.routes if r.policy == "requeue" and r.name not in names]
        if self._relay.spool is not None and gone:
            log.warning(
                "requeue routes %s are gone: messages they spooled wait for a route of "
                "that name (until spool.max_age)",
                ", ".join(gone),
            )
