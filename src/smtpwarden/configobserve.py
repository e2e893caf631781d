"""Observability settings: the HTTP endpoint for metrics, liveness and readiness.

`smtpwarden.config` reads the whole file; this module defines and reads the
`http` section: where the endpoint serving `/metrics` (Prometheus),
`/healthz` and `/readyz` listens, or that it is off. Problems are named by
key path and collected by the same `Checker` as every other section.

Rule 1: like `smtpwarden.config`, it never prints, never exits and never
raises `ConfigError`; it reports problems to the checker it is given.

Rule 2: it imports nothing from the project but `smtpwarden.configcheck`, so
that `smtpwarden.config` can import it without a cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from smtpwarden.configcheck import Checker, Flag, Integer, Text, is_host, join_key

# Our choice: a fixed, unprivileged port outside the usual ephemeral ranges,
# so that a Prometheus scrape configuration can name it.
DEFAULT_HTTP_PORT: Final = 9125


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    """The HTTP endpoint: /metrics, /healthz and /readyz."""

    enabled: bool = True
    # Loopback: the endpoint has no authentication and its metrics name
    # listeners and upstreams, so it is reachable from elsewhere only when
    # asked for.
    host: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_PORT  # 0 asks the system for a free port (tests)


_HOST: Final = Text("a host name or IP address (IPv6 without brackets)", is_host)
_PORT: Final = Integer(0, 65535)
_HTTP_KEYS: Final = tuple(field.name for field in dataclasses.fields(HttpConfig))


def read_http(
    check: Checker, top: Mapping[str, object], listening: Sequence[tuple[str, str, int]] = ()
) -> HttpConfig:
    """The `http` section; absent or null means every default.

    `listening` holds (key path, host, port) of each listener: the endpoint
    may not take a listener's address.
    """
    default = HttpConfig()
    raw = top.get("http")
    section = {} if raw is None else check.mapping(raw, "http", _HTTP_KEYS)
    before = len(check.found)
    config = HttpConfig(
        enabled=check.value(section, "enabled", "http", Flag(), default.enabled),
        host=check.value(section, "host", "http", _HOST, default.host),
        port=check.value(section, "port", "http", _PORT, default.port),
    )
    if len(check.found) == before and config.enabled and config.port != 0:
        for path, host, port in listening:
            if (host, port) == (config.host, config.port):
                shown = f"[{host}]" if ":" in host else host
                check.report(
                    join_key("http", "port"),
                    f"expected a port no listener uses, got {port} ({shown}:{port} is {path})",
                )
    return config
