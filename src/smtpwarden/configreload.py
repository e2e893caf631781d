"""What a reload (SIGHUP) may change in a running relay, and what needs a restart.

A relay reloads its configuration file on SIGHUP. Most settings apply to
the sessions that start afterwards; the ones below are fixed for the life
of the process, because sockets, processes or open files were made from
them at start:

- ``event_loop``, ``workers`` and ``reuse_port``;
- the listeners' names, and each listener's ``host`` and ``port``;
- for a listener whose TLS the event loop itself does (implicit TLS without
  a PROXY header), whether it does, and its ``min_version`` and
  ``ciphers`` (its certificate and key do reload);
- the ``http`` section;
- ``spool.path`` once a requeue route has opened the spool at start, and
  any requeue route where none had (the spool stays open for the life of
  the process, even when a reload leaves no route that requeues);
- ``transcripts.path``.

``restart_changes`` names each of those that differs; a reload that has
any is refused whole, so that a process always runs one version of its file.

Rule: like `smtpwarden.config`, this module only compares settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from smtpwarden.config import Config, ListenerConfig
from smtpwarden.configcheck import show


def native_tls(listener: ListenerConfig) -> bool:
    """True when the event loop does the listener's handshake (implicit TLS, no PROXY)."""
    tls = listener.tls
    return tls is not None and tls.mode == "implicit" and listener.proxy_protocol is None


def has_spool(config: Config) -> bool:
    """True when a route requeues, so the relay opens the spool."""
    return any(route.policy == "requeue" for route in config.routes)


def restart_changes(old: Config, new: Config, *, spool: str | None) -> list[str]:
    """Each setting that differs between ``old`` and ``new`` and needs a restart.

    ``spool``: the path of the spool the process opened at start, None if
    it opened none. Each item names the key and shows both values:
    ``listeners[main].port: 2525, now 2526``. Empty when ``new`` can be
    applied by a reload.
    """
    return list(_restart_changes(old, new, spool))


def spool_opened(config: Config) -> str | None:
    """The spool a process started with ``config`` opens; None if it opens none."""
    return config.spool.path if has_spool(config) else None


def _restart_changes(old: Config, new: Config, spool: str | None) -> Iterator[str]:
    for key in ("event_loop", "workers", "reuse_port"):
        before, after = getattr(old, key), getattr(new, key)
        if before != after:
            yield _change(key, before, after)
    before_names = [listener.name for listener in old.listeners]
    after_names = [listener.name for listener in new.listeners]
    if before_names != after_names:
        yield f"listeners: {', '.join(before_names)}, now {', '.join(after_names)}"
    by_name = {listener.name: listener for listener in new.listeners}
    for listener in old.listeners:
        other = by_name.get(listener.name)
        if other is not None:
            yield from _listener_changes(listener, other)
    if old.http != new.http:
        for field in dataclasses.fields(old.http):
            before, after = getattr(old.http, field.name), getattr(new.http, field.name)
            if before != after:
                yield _change(f"http.{field.name}", before, after)
    if spool is not None and new.spool.path != spool:
        yield _change("spool.path", spool, new.spool.path) + " (the spool opened at start)"
    if spool is None and has_spool(new):
        yield "routes: a requeue route, where none opened the spool at start"
    if old.transcripts.path != new.transcripts.path:
        yield _change("transcripts.path", old.transcripts.path, new.transcripts.path)


def _listener_changes(old: ListenerConfig, new: ListenerConfig) -> Iterator[str]:
    key = f"listeners[{old.name}]"
    if old.host != new.host:
        yield _change(f"{key}.host", old.host, new.host)
    if old.port != new.port:
        yield _change(f"{key}.port", old.port, new.port)
    if native_tls(old) != native_tls(new):
        yield (
            f"{key}: implicit TLS done by the listener itself "
            f"({'on' if native_tls(old) else 'off'}, now {'on' if native_tls(new) else 'off'})"
        )
    elif native_tls(old) and old.tls is not None and new.tls is not None:
        for name in ("min_version", "ciphers"):
            before, after = getattr(old.tls, name), getattr(new.tls, name)
            if before != after:
                yield _change(f"{key}.tls.{name}", before, after)


def changed_sections(old: Config, new: Config) -> list[str]:
    """The top-level keys whose settings differ, in the file's order."""
    return [
        field.name
        for field in dataclasses.fields(old)
        if field.name != "source" and getattr(old, field.name) != getattr(new, field.name)
    ]


def _change(key: str, before: object, after: object) -> str:
    return f"{key}: {show(before)}, now {show(after)}"
