"""What a configuration serves with, built before any of it is used.

``Planner.plan`` turns a ``Config`` into a ``Plan``: a ``Target`` for every
upstream (with its TLS client context, and an embedded sink started for
each upstream of kind "sink"), the server TLS context of every listener
that has TLS, and the health checker. The relay builds one at start and
one on each reload (SIGHUP); whatever fails here (a CA file or a
certificate that no longer loads) fails before the running configuration
was touched, so that the reload can be refused whole.

A listener whose handshake the event loop does itself (``configreload.
native_tls``) keeps the context it was started with for the life of the
process: a plan leaves it out, and the relay loads the renewed certificate
into a context that context hands its handshakes to (``tls.Switchable``).

When a file that loaded before no longer does (a CA file being replaced
as the reload comes), an upstream or listener whose settings did not change
keeps the context it has, and the failure is logged; only a new setting
that cannot be built fails the plan.

``route_table`` and ``policies`` say what a listener's sessions follow and
offer under a configuration; the relay builds each listener's context from
them.

Rule: a plan opens no listener and changes no state of the relay; the sinks
it starts are kept by the planner, one per upstream name and folder, until
the relay stops (a session or a replay from before a reload may still use
one), and keep the hostname they started with.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from smtpwarden.config import Config, ListenerConfig, RouteConfig, UpstreamConfig, route_for
from smtpwarden.configreload import native_tls
from smtpwarden.configroutes import domain_routes
from smtpwarden.configtls import ListenerTls
from smtpwarden.net.healthcheck import HealthChecker
from smtpwarden.net.routing import Route, RouteTable
from smtpwarden.net.sink import start_sink
from smtpwarden.net.tls import client_context, server_context
from smtpwarden.net.upstream import Health, Target
from smtpwarden.observe.metrics import RelayMetrics
from smtpwarden.protocol.extensions import ExtensionPolicy

log = logging.getLogger("smtpwarden")


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A configuration, and what its sessions use (see the module docstring)."""

    config: Config
    targets: Mapping[str, Target]  # by upstream name
    tls: Mapping[str, ssl.SSLContext]  # by listener name; native and plaintext ones left out
    checker: HealthChecker | None  # None without checks or smtp upstreams

    def route_targets(self) -> dict[str, tuple[Target, ...]]:
        """Each route's upstreams in order, by route name (for the spool's deliveries)."""
        return {
            route.name: tuple(self.targets[name] for name in route.upstreams)
            for route in self.config.routes
        }


class Planner:
    """Builds plans, and keeps the embedded sinks they started."""

    def __init__(self, health: Health, metrics: RelayMetrics | None) -> None:
        self._health = health
        self._metrics = metrics
        self.sinks: dict[tuple[str, str], asyncio.Server] = {}
        self._closed = False

    async def plan(
        self,
        config: Config,
        *,
        kept: Mapping[str, tuple[ssl.SSLContext, ListenerTls]] | None = None,
        targets: Mapping[str, Target] | None = None,
    ) -> Plan:
        """Build the plan of ``config``; raises OSError naming what failed.

        ``kept``: the listeners' contexts in use with their settings, and
        ``targets`` the upstreams: one whose files no longer load keeps its
        own (logged) when its settings are unchanged, rather than fail the
        plan.
        """
        built = {
            item.name: await self._target(item, config, (targets or {}).get(item.name))
            for item in config.upstreams
        }
        contexts: dict[str, ssl.SSLContext] = {}
        for listener in config.listeners:
            if listener.tls is None or native_tls(listener):
                continue
            try:
                contexts[listener.name] = server_context(listener.tls)
            except OSError as error:  # ssl.SSLError is one too
                previous = None if kept is None else kept.get(listener.name)
                if previous is None or previous[1] != listener.tls:
                    raise OSError(f"listener {listener.name}: {error}") from error
                log.error(
                    "listener %s: certificate not reloaded, the one loaded before is kept: %s",
                    listener.name,
                    error,
                )
                contexts[listener.name] = previous[0]
        checker = None
        smtp = [built[item.name] for item in config.upstreams if item.kind == "smtp"]
        if config.health.check_interval > 0 and smtp:
            try:
                checker = HealthChecker(smtp, self._health, config, self._metrics)
            except OSError as error:
                raise OSError(f"health checks: {error}") from error
        return Plan(config=config, targets=built, tls=contexts, checker=checker)

    async def _target(
        self, upstream: UpstreamConfig, config: Config, previous: Target | None
    ) -> Target:
        if upstream.kind == "sink":
            folder = upstream.path or "mail"
            key = (upstream.name, folder)
            server = self.sinks.get(key)
            if server is None:
                self._check_open()
                server = await start_sink("127.0.0.1", 0, folder, config.hostname)
                self._check_open(server)  # the relay may have stopped meanwhile
                self.sinks[key] = server
                log.info(
                    "upstream %s is the embedded sink on 127.0.0.1:%s writing to %s",
                    upstream.name,
                    server.sockets[0].getsockname()[1],
                    folder,
                )
            port = server.sockets[0].getsockname()[1]
            return Target(name=upstream.name, host="127.0.0.1", port=port)
        if upstream.tls.mode != "none" and not upstream.tls.verify:
            log.warning(
                "upstream %s: TLS certificate verification is off (tls.verify: false): "
                "anyone between here and it can read and change the mail",
                upstream.name,
            )
        try:
            context = client_context(upstream.tls)
        except OSError as error:
            if previous is None or previous.tls != upstream.tls:
                raise OSError(f"upstream {upstream.name}: {error}") from error
            log.error(
                "upstream %s: TLS files not reloaded, the ones loaded before are kept: %s",
                upstream.name,
                error,
            )
            context = previous.context
        return Target(
            name=upstream.name,
            host=upstream.host,
            port=upstream.port,
            tls=upstream.tls,
            context=context,
            xclient=upstream.xclient,
            xforward=upstream.xforward,
        )

    def _check_open(self, started: asyncio.Server | None = None) -> None:
        """Raise OSError once the relay is stopping; close ``started`` then."""
        if self._closed:
            if started is not None:
                started.close()
            raise OSError("the relay is stopping")

    def close(self) -> None:
        """Close every sink started; plans made afterwards start none."""
        self._closed = True
        for server in self.sinks.values():
            server.close()
        self.sinks.clear()


def route_table(config: Config, listener: str, targets: Mapping[str, Target]) -> RouteTable:
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


def policies(
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
