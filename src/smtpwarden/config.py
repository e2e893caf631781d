"""Configuration: load, validate and default smtpwarden's settings.

A configuration comes from one of three places: a YAML file (`load_config`),
the `run --listen/--upstream` shorthand (`simple_config`) or the embedded
default (`default_config`). All three produce the same frozen `Config`.
Each also has a `Document` form (`read_document`, `simple_document`,
`default_document`): the mapping as loaded, before validation, with its
source name; `config_of` validates it. Worker processes (`workers`) are
handed that document, so that they parse exactly what the supervisor did.

Validation is strict and reports every problem at once: unknown keys (with a
suggestion), wrong types, values out of range, missing required keys,
duplicate names, references to unknown listeners or upstreams, and listeners
matched by no route or by two. Each problem names its key path, what was
expected and what was found, shown as it was written:
`listeners[0].port: expected an integer 0-65535, got "abc"`. This module
says what each setting must be, except the sections it re-exports:
`smtpwarden.configendpoints` defines and reads listeners and upstreams
(with `smtpwarden.configtls` for their TLS, AUTH, PROXY protocol and
access), `smtpwarden.configroutes` routes, `smtpwarden.configdelivery`
retry, health and spool, `smtpwarden.configobserve` the HTTP endpoint,
`smtpwarden.configtranscripts` transcript capture and retention, and
`smtpwarden.configworkers` the number of relay processes.
`smtpwarden.configcheck` holds the machinery that checks values and words
the problems.

Rule 1: this module never prints and never exits the process. It raises
`ConfigError`; only `smtpwarden.cli.main` reports it and picks an exit code.

Rule 2: it describes settings and nothing else. It opens no socket and knows
nothing of the protocol; the modules that act on a `Config` read it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

import yaml

from smtpwarden.configcheck import (
    Checker,
    Choice,
    Flag,
    Integer,
    Rule,
    Seconds,
    Text,
    duplicate_keys,
    is_domain,
    is_path,
    show,
    yaml_problem,
)
from smtpwarden.configdelivery import LOST_OUTCOMES as LOST_OUTCOMES
from smtpwarden.configdelivery import BackoffConfig as BackoffConfig
from smtpwarden.configdelivery import HealthConfig as HealthConfig
from smtpwarden.configdelivery import LostOutcome as LostOutcome
from smtpwarden.configdelivery import RetryConfig as RetryConfig
from smtpwarden.configdelivery import SpoolConfig as SpoolConfig
from smtpwarden.configdelivery import read_health, read_retry, read_spool
from smtpwarden.configendpoints import DEFAULT_SINK_FOLDER as DEFAULT_SINK_FOLDER
from smtpwarden.configendpoints import UPSTREAM_KINDS as UPSTREAM_KINDS
from smtpwarden.configendpoints import ListenerConfig as ListenerConfig
from smtpwarden.configendpoints import UpstreamConfig as UpstreamConfig
from smtpwarden.configendpoints import UpstreamKind as UpstreamKind
from smtpwarden.configendpoints import read_listeners, read_upstreams
from smtpwarden.configobserve import HttpConfig as HttpConfig
from smtpwarden.configobserve import read_http
from smtpwarden.configroutes import POLICIES as POLICIES
from smtpwarden.configroutes import Policy as Policy
from smtpwarden.configroutes import RouteConfig as RouteConfig
from smtpwarden.configroutes import find_route, read_routes
from smtpwarden.configtranscripts import CAPTURE_MODES as CAPTURE_MODES
from smtpwarden.configtranscripts import CaptureMode as CaptureMode
from smtpwarden.configtranscripts import ListenerTranscripts as ListenerTranscripts
from smtpwarden.configtranscripts import TranscriptMatch as TranscriptMatch
from smtpwarden.configtranscripts import TranscriptsConfig as TranscriptsConfig
from smtpwarden.configtranscripts import read_transcripts
from smtpwarden.configworkers import AUTO_WORKERS as AUTO_WORKERS
from smtpwarden.configworkers import MAX_WORKERS as MAX_WORKERS
from smtpwarden.configworkers import available_cpus as available_cpus
from smtpwarden.configworkers import read_workers

EventLoop = Literal["auto", "uvloop", "asyncio"]
LogLevel = Literal["debug", "info", "warning", "error"]

EVENT_LOOPS: Final[tuple[EventLoop, ...]] = ("auto", "uvloop", "asyncio")
LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error")

# 2525 is the customary unprivileged stand-in for port 25, so the default
# configuration runs without root.
DEFAULT_LISTEN_PORT: Final = 2525
CLI_SOURCE: Final = "<cli>"
DEFAULT_SOURCE: Final = "<default>"


class ConfigError(Exception):
    """Every problem found in one configuration source, reported at once.

    `source` is the file name, "<cli>" or "<default>"; `problems` holds one
    line per problem, each starting with its key path (or option name).
    """

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__(source, self.problems)

    def __str__(self) -> str:
        count = len(self.problems)
        head = f"{self.source}: {count} problem{'' if count == 1 else 's'}"
        return "\n".join([head, *(f"  {problem}" for problem in self.problems)])


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    # Past it, new clients get 421 4.7.0 and are disconnected.
    max_connections: int = 1000
    # RFC 5321 4.5.3.1.4 allows 512 octets, but extension parameters (RFC 1869,
    # 1870, 3461, 6531) need more; 2048 is Postfix's line_length_limit.
    max_command_line_bytes: int = 2048
    # RFC 5321 4.5.3.1.5 allows 512 octets; real servers exceed it.
    max_reply_line_bytes: int = 2048
    # Bounds one multi-line reply (an EHLO reply is the longest in practice).
    max_reply_lines: int = 128
    # Commands awaiting upstream replies before reading from the client pauses.
    max_pipelined_commands: int = 100
    # Recipients per message; more get 452 4.5.3. RFC 5321 4.5.3.1.8 asks
    # for at least 100; 1000 is Postfix's smtpd_recipient_limit.
    max_recipients: int = 1000
    # Commands smtpwarden refuses itself before it closes the session with
    # 421 4.7.0; 20 is Postfix's smtpd_hard_error_limit.
    max_errors: int = 20
    # Open connections from one client address; more get 421 4.7.0. 50 is
    # Postfix's smtpd_client_connection_count_limit. 0: no limit.
    max_connections_per_client: int = 50
    # New connections from one client address per minute; more get 421
    # 4.7.0. 0 (Postfix's smtpd_client_connection_rate_limit default): no limit.
    connection_rate_per_minute: int = 0
    # Largest message, from MAIL's SIZE and while it streams: 552 5.3.4.
    # 10240000 is Postfix's message_size_limit. 0: no limit.
    max_message_bytes: int = 10240000
    # Octets per second a client must keep up while a command line or a
    # message is only partly received; each octet buys 1/rate s against
    # the command or data_block timeout, so a client dripping a byte at a
    # time runs out of time. 500 is Postfix's smtpd_min_data_rate. 0: any
    # octet restarts the timeout.
    min_data_rate: int = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    """Seconds. Defaults are the minimums of RFC 5321 4.5.3.2."""

    connect: float = 30.0
    banner: float = 300.0  # 4.5.3.2.1, initial 220 message
    command: float = 300.0  # 4.5.3.2.7, server timeout for the client's next command
    mail: float = 300.0  # 4.5.3.2.2, MAIL command
    rcpt: float = 300.0  # 4.5.3.2.3, RCPT command
    data_init: float = 120.0  # 4.5.3.2.4, DATA initiation
    data_block: float = 180.0  # 4.5.3.2.5, each data block
    data_end: float = 600.0  # 4.5.3.2.6, DATA termination
    reply: float = 300.0  # any other command's reply


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownConfig:
    grace: float = 30.0  # seconds sessions may take to finish after SIGTERM
    fast: float = 2.0  # the same after SIGINT


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    transactions: str = "-"  # "-" is standard output, anything else a file appended to
    sessions: bool = True  # also write one line per session
    level: LogLevel = "info"  # diagnostics, to standard error


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    event_loop: EventLoop = "auto"
    hostname: str  # used in locally generated replies
    # Relay processes sharing the listeners (SO_REUSEPORT); "auto" is
    # resolved when the configuration is read. 1: the relay runs alone.
    workers: int = 1
    # Listeners bind with SO_REUSEPORT, so that a new relay can start on the
    # same ports while the old one drains (Linux). Off: a port in use is an error.
    reuse_port: bool = False
    listeners: tuple[ListenerConfig, ...]
    upstreams: tuple[UpstreamConfig, ...]
    routes: tuple[RouteConfig, ...]  # every listener is matched by exactly one
    retry: RetryConfig
    health: HealthConfig
    spool: SpoolConfig
    limits: LimitsConfig
    timeouts: TimeoutsConfig
    shutdown: ShutdownConfig
    log: LogConfig
    http: HttpConfig
    transcripts: TranscriptsConfig
    source: str


@dataclass(frozen=True, slots=True)
class Document:
    """A configuration as loaded, before validation.

    `data` is what `parse_config` reads (plain YAML data), `source` the
    name problems are reported under, and `problems` what was found while
    reading it that validation cannot see (keys repeated in one mapping).
    """

    data: object
    source: str
    problems: tuple[str, ...] = ()


# --- What each setting must be ---------------------------------------------

_DOMAIN: Final = Text("a domain name", is_domain)
_LOG_TARGET: Final = Text('"-" (standard output) or a file path', is_path)
_EVENT_LOOP: Final = Choice(EVENT_LOOPS)
_LEVEL: Final = Choice(LOG_LEVELS)
_FLAG: Final = Flag()

# The YAML keys of each section are the fields of its dataclass.
_LOG_KEYS: Final = tuple(field.name for field in dataclasses.fields(LogConfig))
_TOP_KEYS: Final = tuple(
    field.name for field in dataclasses.fields(Config) if field.name != "source"
)

# Line limits start at 512: RFC 5321 4.5.3.1.4 and 4.5.3.1.5 require that
# lines of 512 octets be accepted.
_LIMIT_RULES: Final[Mapping[str, Rule[int]]] = {
    "max_connections": Integer(1),
    "max_command_line_bytes": Integer(512),
    "max_reply_line_bytes": Integer(512),
    "max_reply_lines": Integer(1),
    "max_pipelined_commands": Integer(1),
    "max_recipients": Integer(100),
    "max_errors": Integer(1),
    "max_connections_per_client": Integer(0),
    "connection_rate_per_minute": Integer(0),
    "max_message_bytes": Integer(0),
    "min_data_rate": Integer(0),
}
_TIMEOUT_RULES: Final[Mapping[str, Rule[float]]] = {
    field.name: Seconds(allow_zero=False) for field in dataclasses.fields(TimeoutsConfig)
}
# A grace of 0 closes sessions at once, which is a legitimate choice.
_SHUTDOWN_RULES: Final[Mapping[str, Rule[float]]] = {
    field.name: Seconds(allow_zero=True) for field in dataclasses.fields(ShutdownConfig)
}


# --- Sections --------------------------------------------------------------


def _implicit_routes(listeners: Iterable[ListenerConfig]) -> tuple[RouteConfig, ...]:
    """Without routes, each listener passes its sessions through to its own upstream."""
    return tuple(
        RouteConfig(
            name=listener.name,
            listeners=(listener.name,),
            policy="passthrough",
            upstreams=(listener.upstream,),
        )
        for listener in listeners
    )


def _log(check: Checker, top: Mapping[str, object]) -> LogConfig:
    default = LogConfig()
    raw = top.get("log")
    if raw is None:
        return default
    section = check.mapping(raw, "log", _LOG_KEYS)
    return LogConfig(
        transactions=check.value(section, "transactions", "log", _LOG_TARGET, default.transactions),
        sessions=check.value(section, "sessions", "log", _FLAG, default.sessions),
        level=check.value(section, "level", "log", _LEVEL, default.level),
    )


def parse_config(data: object, *, source: str) -> Config:
    """Validate an already-loaded YAML document and return its `Config`.

    Raises ConfigError(source, problems) listing every problem found.
    """
    check = Checker()
    if data is None:
        check.report("", "expected a mapping of settings, got an empty document")
        raise ConfigError(source, check.problems)
    top = check.mapping(data, "", _TOP_KEYS)
    if not isinstance(data, dict):
        raise ConfigError(source, check.problems)
    event_loop: EventLoop = check.value(top, "event_loop", "", _EVENT_LOOP, "auto")
    hostname = check.value(top, "hostname", "", _DOMAIN, "") or socket.getfqdn()
    workers = read_workers(check, top)
    reuse_port = check.value(top, "reuse_port", "", _FLAG, False)
    upstreams, upstream_names = read_upstreams(check, top)
    listeners, listener_names = read_listeners(check, top, upstream_names)
    routes = read_routes(check, top, listener_names, upstream_names)
    retry = read_retry(check, top)
    health = read_health(check, top)
    spool = read_spool(check, top)
    limits = LimitsConfig(**check.section(top, "limits", _LIMIT_RULES))
    timeouts = TimeoutsConfig(**check.section(top, "timeouts", _TIMEOUT_RULES))
    shutdown = ShutdownConfig(**check.section(top, "shutdown", _SHUTDOWN_RULES))
    log = _log(check, top)
    listening = [(f"listeners[{i}]", item.host, item.port) for i, item in enumerate(listeners)]
    http = read_http(check, top, listening)
    transcripts = read_transcripts(check, top)
    if check.problems:
        # Sections are checked in dependency order; report them in reading
        # order, then missing keys in the order of _TOP_KEYS.
        raise ConfigError(source, check.in_document_order([*data, *_TOP_KEYS]))
    return Config(
        event_loop=event_loop,
        hostname=hostname,
        workers=workers,
        reuse_port=reuse_port,
        listeners=listeners,
        upstreams=upstreams,
        routes=routes or _implicit_routes(listeners),
        retry=retry,
        health=health,
        spool=spool,
        limits=limits,
        timeouts=timeouts,
        shutdown=shutdown,
        log=log,
        http=http,
        transcripts=transcripts,
        source=source,
    )


def route_for(config: Config, listener: str) -> RouteConfig:
    """Return the listener route for sessions accepted by the listener named `listener`.

    That is the listener route naming the listener, else the one listener
    route that leaves its listeners empty; validation guarantees exactly one
    of them matches. A route with `recipient_domains` is never returned: it
    takes only some transactions of a session (see `find_route`).
    Raises KeyError if `config` has no listener of that name.
    """
    if not any(candidate.name == listener for candidate in config.listeners):
        raise KeyError(listener)
    route = find_route(config.routes, listener)
    if route is None:  # only a Config built by hand, without validation, lacks one
        raise KeyError(listener)
    return route


# --- Sources ---------------------------------------------------------------


def read_document(path: str | os.PathLike[str]) -> Document:
    """Read a YAML file into a `Document`, not yet validated.

    The file is parsed with PyYAML's safe loader (plain data only, no Python
    objects). Keys repeated within one mapping become the document's
    `problems`. Raises ConfigError (source: the path as given) if the file
    cannot be read or is not valid YAML.
    """
    source = os.fspath(path)
    try:
        with open(path, "rb") as stream:
            content = stream.read()
    except OSError as err:
        raise ConfigError(source, [f"cannot read the file: {err.strerror or err}"]) from err
    try:
        loader = yaml.SafeLoader(content)  # reads ahead: can already fail
        try:
            root = loader.get_single_node()
            duplicates = duplicate_keys(root) if root is not None else []
            data: object = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise ConfigError(source, [yaml_problem(err)]) from err
    except ValueError as err:  # a value the loader cannot build: a date like 2024-02-30
        raise ConfigError(source, [f"invalid YAML value: {err}"]) from err
    except RecursionError as err:
        raise ConfigError(source, ["invalid YAML: nested too deeply"]) from err
    return Document(data, source, tuple(duplicates))


def config_of(document: Document) -> Config:
    """Validate a `Document` and return its `Config`.

    Raises ConfigError (source: the document's) listing the document's own
    problems, then every validation problem.
    """
    try:
        config = parse_config(document.data, source=document.source)
    except ConfigError as err:
        raise ConfigError(document.source, [*document.problems, *err.problems]) from None
    if document.problems:
        raise ConfigError(document.source, document.problems)
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a YAML file and return its validated `Config`.

    Keys repeated within one mapping are problems too (see `read_document`).
    Raises ConfigError (source: the path as given) if the file cannot be read,
    is not valid YAML, or fails validation; all problems are listed at once.
    """
    return config_of(read_document(path))


def parse_hostport(text: str, *, what: str, allow_zero: bool = False) -> tuple[str, int]:
    """Parse "HOST:PORT" or "[IPV6]:PORT" given on the command line.

    Returns (host, port) with any IPv6 brackets removed. The port must be
    1-65535, or 0-65535 with `allow_zero` (0 asks for an ephemeral port).
    Raises ConfigError (source "<cli>") with one problem naming `what`,
    e.g. "--listen".
    """
    check = Checker()
    result = check.hostport(text, what, allow_zero)
    if check.problems:
        raise ConfigError(CLI_SOURCE, check.problems)
    return result


_SINK_PREFIX: Final = "sink:"


def simple_document(*, listen: str, upstream: str) -> Document:
    """The `Document` of `run --listen HOST:PORT --upstream HOST:PORT`.

    `upstream` may also be "sink:FOLDER": an upstream of kind sink that writes
    captured mail to FOLDER. Everything else takes its default.

    Raises ConfigError (source "<cli>") naming "--listen" and/or "--upstream".
    """
    check = Checker()
    listen_host, listen_port = check.hostport(listen, "--listen", allow_zero=True)
    upstream_section: dict[str, object]
    if upstream.startswith(_SINK_PREFIX):
        folder = upstream.removeprefix(_SINK_PREFIX)
        if not is_path(folder):
            check.report("--upstream", f"expected sink:FOLDER, got {show(upstream)}")
        upstream_section = {"kind": "sink", "path": folder}
    else:
        upstream_host, upstream_port = check.hostport(upstream, "--upstream", allow_zero=False)
        upstream_section = {"kind": "smtp", "host": upstream_host, "port": upstream_port}
    if check.problems:
        raise ConfigError(CLI_SOURCE, check.problems)
    data = {
        "listeners": [{"host": listen_host, "port": listen_port}],
        "upstreams": [upstream_section],
    }
    return Document(data, CLI_SOURCE)


def simple_config(*, listen: str, upstream: str) -> Config:
    """Build the `Config` for `run --listen HOST:PORT --upstream HOST:PORT`.

    See `simple_document`; raises ConfigError (source "<cli>") naming
    "--listen" and/or "--upstream".
    """
    return config_of(simple_document(listen=listen, upstream=upstream))


def default_document() -> Document:
    """The `Document` of the embedded default (see `default_config`)."""
    data = {
        "listeners": [{"host": "127.0.0.1", "port": DEFAULT_LISTEN_PORT}],
        "upstreams": [{"kind": "sink", "path": DEFAULT_SINK_FOLDER}],
    }
    return Document(data, DEFAULT_SOURCE)


def default_config() -> Config:
    """Return the embedded default: 127.0.0.1:2525 in front of a sink writing to ./mail."""
    return config_of(default_document())
