"""Listeners and upstreams: where smtpwarden listens and where it relays.

`smtpwarden.config` reads the whole file (and re-exports `ListenerConfig`,
`UpstreamConfig` and the names they use); this module defines and reads its
two lists:

- ``listeners``: the address each binds, its default upstream, and who may
  connect and how (``tls``, ``auth``, ``proxy_protocol`` and ``allow``);
- ``upstreams``: an SMTP server or a sink folder, with ``tls`` towards it
  and ``xclient``/``xforward`` (how the client's real address is passed on).

Each name is checked to be unique, each listener's upstream to exist and
each listening address to be bound once. The settings that protect each leg
(TLS, AUTH, PROXY protocol, networks) are read by `smtpwarden.configtls`,
and each listener's transcript capture by `smtpwarden.configtranscripts`.

Rule 1: like `smtpwarden.config`, it never prints, never exits and never
raises `ConfigError`; it reports problems to the checker it is given. It
does no I/O itself: the certificate, key and CA files are read by the
`smtpwarden.configtls` readers it calls.

Rule 2: it imports nothing from the project but `smtpwarden.configcheck`,
`smtpwarden.configtls` and `smtpwarden.configtranscripts`, so that
`smtpwarden.config` can import it (and re-export its names) without a cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from smtpwarden.configcheck import (
    FOLDER,
    NAME,
    Checker,
    Choice,
    Flag,
    Integer,
    Text,
    is_host,
    join_key,
    show,
    suggest,
)
from smtpwarden.configtls import (
    ListenerAuth,
    ListenerTls,
    Network,
    ProxyProtocol,
    UpstreamTls,
    read_listener_auth,
    read_listener_tls,
    read_networks,
    read_proxy_protocol,
    read_upstream_tls,
)
from smtpwarden.configtranscripts import ListenerTranscripts, read_listener_transcripts

UpstreamKind = Literal["smtp", "sink"]

UPSTREAM_KINDS: Final[tuple[UpstreamKind, ...]] = ("smtp", "sink")
DEFAULT_SINK_FOLDER: Final = "./mail"


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    name: str
    host: str
    port: int  # 0 asks the OS for an ephemeral port (tests)
    # The name of an entry in Config.upstreams. Routing uses it only when the
    # file has no routes: each listener then gets a passthrough route to it.
    upstream: str
    tls: ListenerTls | None = None  # None: no STARTTLS offered, no implicit TLS
    auth: ListenerAuth | None = None  # None: AUTH is neither offered nor relayed
    proxy_protocol: ProxyProtocol | None = None  # None: no PROXY header expected
    # Client networks allowed to connect (the real address, after PROXY);
    # others get 554 5.7.1 and are disconnected. Empty: everyone.
    allow: tuple[Network, ...] = ()
    # Transcript capture of this listener's sessions; off by default.
    transcripts: ListenerTranscripts = dataclasses.field(default_factory=ListenerTranscripts)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    name: str
    kind: UpstreamKind
    host: str  # "127.0.0.1" for kind sink, which opens no connection
    port: int  # 0 for kind sink
    path: str | None  # kind sink: folder where captured mail is written; kind smtp: None
    tls: UpstreamTls = dataclasses.field(default_factory=UpstreamTls)
    # Postfix's XCLIENT (ADDR, PORT, NAME), sent once at the start of each
    # session when the upstream advertises it.
    xclient: bool = False
    # Postfix's XFORWARD (ADDR, PORT, NAME, PROTO, HELO), sent before each MAIL
    # when the upstream advertises it; not sent when XCLIENT was.
    xforward: bool = False


# --- What each setting must be ---------------------------------------------

_HOST: Final = Text("a host name or IP address (IPv6 without brackets)", is_host)
_LISTEN_PORT: Final = Integer(0, 65535)
_UPSTREAM_PORT: Final = Integer(1, 65535)
_KIND: Final = Choice(UPSTREAM_KINDS)
_FLAG: Final = Flag()

# The YAML keys of each section are the fields of its dataclass.
_LISTENER_KEYS: Final = tuple(field.name for field in dataclasses.fields(ListenerConfig))
_UPSTREAM_KEYS: Final = tuple(field.name for field in dataclasses.fields(UpstreamConfig))

_SINK_PROBLEM: Final = 'only allowed when kind is "smtp" (a sink opens no connection)'


# --- The two lists -----------------------------------------------------------


def read_upstreams(
    check: Checker, top: Mapping[str, object]
) -> tuple[tuple[UpstreamConfig, ...], list[str] | None]:
    """Return the upstreams, and every upstream name if all of them could be read.

    Listeners are checked against those names only when they are all known, so
    that one broken upstream does not also make every reference look wrong.
    """
    before = len(check.found)
    items = check.items(top, "upstreams", "upstream", _UPSTREAM_KEYS)
    names_known = len(check.found) == before
    names: list[tuple[str, str]] = []
    upstreams: list[UpstreamConfig] = []
    for i, path, section in items:
        before = len(check.found)
        name = check.value(section, "name", path, NAME, f"upstream{i}")
        names_known = names_known and len(check.found) == before
        names.append((join_key(path, "name") if "name" in section else path, name))
        # None when kind is given but invalid, so that nothing else is required.
        kind = check.value(section, "kind", path, _KIND, None) if "kind" in section else "smtp"
        host, port, folder = "127.0.0.1", 0, None
        if kind == "sink":  # host and port mean nothing to a sink and are ignored
            folder = check.value(section, "path", path, FOLDER, DEFAULT_SINK_FOLDER)
        elif kind == "smtp":
            host = check.required(section, "host", path, _HOST, "")
            port = check.required(section, "port", path, _UPSTREAM_PORT, 0)
            if "path" in section:
                check.report(join_key(path, "path"), 'only allowed when kind is "sink"')
        else:  # kind already reported: check what is there, require nothing
            check.value(section, "host", path, _HOST, "")
            check.value(section, "port", path, _UPSTREAM_PORT, 0)
            check.value(section, "path", path, FOLDER, "")
        tls = read_upstream_tls(check, section, path)
        xclient = check.value(section, "xclient", path, _FLAG, False)
        xforward = check.value(section, "xforward", path, _FLAG, False)
        if kind == "sink":  # it opens no connection for them to act on
            for key, used in (
                ("tls", tls.mode != "none"),
                ("xclient", xclient),
                ("xforward", xforward),
            ):
                if used:
                    check.report(join_key(path, key), _SINK_PROBLEM)
        if kind is not None:
            upstreams.append(
                UpstreamConfig(
                    name=name,
                    kind=kind,
                    host=host,
                    port=port,
                    path=folder,
                    tls=tls,
                    xclient=xclient,
                    xforward=xforward,
                )
            )
    check.unique("upstream name", names)
    return tuple(upstreams), [name for _, name in names] if names_known else None


def read_listeners(
    check: Checker, top: Mapping[str, object], upstream_names: list[str] | None
) -> tuple[tuple[ListenerConfig, ...], list[str] | None]:
    """Return the listeners, and every listener name if all of them could be read.

    Routes are checked against those names only when they are all known.
    """
    default_upstream = upstream_names[0] if upstream_names else ""
    listeners: list[ListenerConfig] = []
    names: list[tuple[str, str]] = []
    addresses: list[tuple[str, str]] = []
    items = check.items(top, "listeners", "listener", _LISTENER_KEYS)
    raw = top.get("listeners")
    names_known = isinstance(raw, list) and len(items) == len(raw)  # every one a mapping
    for i, path, section in items:
        before = len(check.found)
        name = check.value(section, "name", path, NAME, f"listener{i}")
        names_known = names_known and len(check.found) == before
        host = check.value(section, "host", path, _HOST, "127.0.0.1")
        port = check.required(section, "port", path, _LISTEN_PORT, 0)
        upstream = check.value(section, "upstream", path, NAME, default_upstream)
        if upstream_names is not None and upstream not in upstream_names:
            hint = suggest(upstream, upstream_names)
            check.report(join_key(path, "upstream"), f"no upstream named {show(upstream)}{hint}")
        names.append((join_key(path, "name") if "name" in section else path, name))
        if port != 0:  # port 0 binds a fresh ephemeral port each time
            shown_host = f"[{host}]" if ":" in host else host
            addresses.append((path, f"{shown_host}:{port}"))
        tls = read_listener_tls(check, section, path)
        auth = read_listener_auth(check, section, path, has_tls=section.get("tls") is not None)
        proxy = read_proxy_protocol(check, section, path)
        if tls is not None and tls.mode == "implicit" and proxy is not None:
            # The PROXY header and the TLS ClientHello may arrive in one
            # read, and a handshake cannot be given octets already read.
            check.report(
                join_key(path, "proxy_protocol"),
                "not supported with tls.mode implicit; use mode starttls behind a "
                "PROXY-protocol balancer, or terminate implicit TLS on the balancer",
            )
        listeners.append(
            ListenerConfig(
                name=name,
                host=host,
                port=port,
                upstream=upstream,
                tls=tls,
                auth=auth,
                proxy_protocol=proxy,
                allow=read_networks(check, section, "allow", path),
                transcripts=read_listener_transcripts(check, section, path),
            )
        )
    check.unique("listener name", names)
    check.unique("listening address", addresses)
    return tuple(listeners), [name for _, name in names] if names_known else None
