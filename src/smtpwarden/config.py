"""Configuration: load, validate and default smtpwarden's settings.

A configuration comes from one of three places: a YAML file (`load_config`),
the `run --listen/--upstream` shorthand (`simple_config`) or the embedded
default (`default_config`). All three produce the same frozen `Config`.

Validation is strict and reports every problem at once: unknown keys (with a
suggestion), wrong types, values out of range, missing required keys,
duplicate names and references to unknown upstreams. Each problem names its
key path, what was expected and what was found, shown as it was written:
`listeners[0].port: expected an integer 0-65535, got "abc"`.

Rule 1: this module never prints and never exits the process. It raises
`ConfigError`; only `smtpwarden.cli.main` reports it and picks an exit code.

Rule 2: it describes settings and nothing else. It opens no socket and knows
nothing of the protocol; the modules that act on a `Config` read it.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import ipaddress
import json
import math
import os
import re
import socket
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Generic, Literal, Protocol, TypeVar

import yaml
from yaml.reader import ReaderError

EventLoop = Literal["auto", "uvloop", "asyncio"]
UpstreamKind = Literal["smtp", "sink"]
LogLevel = Literal["debug", "info", "warning", "error"]

EVENT_LOOPS: Final[tuple[EventLoop, ...]] = ("auto", "uvloop", "asyncio")
UPSTREAM_KINDS: Final[tuple[UpstreamKind, ...]] = ("smtp", "sink")
LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error")

# 2525 is the customary unprivileged stand-in for port 25, so the default
# configuration runs without root.
DEFAULT_LISTEN_PORT: Final = 2525
DEFAULT_SINK_FOLDER: Final = "./mail"
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
class ListenerConfig:
    name: str
    host: str
    port: int  # 0 asks the OS for an ephemeral port (tests)
    upstream: str  # the name of an entry in Config.upstreams


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    name: str
    kind: UpstreamKind
    host: str  # "127.0.0.1" for kind sink, which opens no connection
    port: int  # 0 for kind sink
    path: str | None  # kind sink: folder where captured mail is written; kind smtp: None


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
    listeners: tuple[ListenerConfig, ...]
    upstreams: tuple[UpstreamConfig, ...]
    limits: LimitsConfig
    timeouts: TimeoutsConfig
    shutdown: ShutdownConfig
    log: LogConfig
    source: str


# --- Showing values as the user wrote them ---------------------------------

_MAX_SHOWN_CHARS: Final = 60  # keeps one problem on one terminal line


def _show(value: object) -> str:
    """Render a loaded YAML value the way it reads in the file."""
    match value:
        case None:
            return "null"
        case bool():
            return "true" if value else "false"
        case int():
            return str(value)
        case float() if math.isnan(value):
            return ".nan"
        case float() if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        case float():
            return repr(value)
        case str():
            text = (
                value if len(value) <= _MAX_SHOWN_CHARS else value[: _MAX_SHOWN_CHARS - 3] + "..."
            )
            return json.dumps(text, ensure_ascii=False)
        case list():
            return "a list" if value else "an empty list"
        case dict():
            return "a mapping" if value else "an empty mapping"
        case datetime.date():
            return value.isoformat()
        case bytes():
            return "binary data"
        case _:
            return type(value).__name__


def _suggest(word: object, choices: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for a close choice, else ""."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _join(path: str, key: object) -> str:
    name = key if isinstance(key, str) else _show(key)
    return f"{path}.{name}" if path else name


# --- Rules: what a value must be -------------------------------------------

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _Rule(Protocol[T_co]):
    @property
    def expected(self) -> str: ...

    def convert(self, raw: object) -> T_co | None:
        """Return the value if `raw` is acceptable, else None."""
        ...


@dataclass(frozen=True, slots=True)
class _Integer:
    low: int
    high: int | None = None

    @property
    def expected(self) -> str:
        if self.high is None:
            return f"an integer >= {self.low}"
        return f"an integer {self.low}-{self.high}"

    def convert(self, raw: object) -> int | None:
        # YAML `true` loads as a bool, and bool is an int subclass: refuse it.
        if isinstance(raw, bool) or not isinstance(raw, int):
            return None
        if raw < self.low or (self.high is not None and raw > self.high):
            return None
        return raw


@dataclass(frozen=True, slots=True)
class _Seconds:
    allow_zero: bool

    @property
    def expected(self) -> str:
        return f"a number of seconds {'>=' if self.allow_zero else '>'} 0"

    def convert(self, raw: object) -> float | None:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            return None
        if not math.isfinite(raw) or raw < 0 or (raw == 0 and not self.allow_zero):
            return None
        return float(raw)


@dataclass(frozen=True, slots=True)
class _Choice(Generic[T]):
    options: tuple[T, ...]

    @property
    def expected(self) -> str:
        return "one of " + ", ".join(_show(option) for option in self.options)

    def convert(self, raw: object) -> T | None:
        for option in self.options:
            if raw == option and type(raw) is type(option):
                return option
        return None


@dataclass(frozen=True, slots=True)
class _Flag:
    expected: str = "true or false"

    def convert(self, raw: object) -> bool | None:
        return raw if isinstance(raw, bool) else None


@dataclass(frozen=True, slots=True)
class _Text:
    expected: str
    accepts: Callable[[str], bool]

    def convert(self, raw: object) -> str | None:
        return raw if isinstance(raw, str) and self.accepts(raw) else None


_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# RFC 1035 labels, plus "_" which container and service names use.
_DOMAIN_RE: Final = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_domain(text: str) -> bool:
    return _DOMAIN_RE.fullmatch(text) is not None


def _is_host(text: str) -> bool:
    return _is_ip(text) or _is_domain(text)


def _is_path(text: str) -> bool:
    return text != "" and "\0" not in text


_NAME: Final = _Text(
    "a name of letters, digits, '.', '_' and '-'", lambda text: bool(_NAME_RE.fullmatch(text))
)
_HOST: Final = _Text("a host name or IP address (IPv6 without brackets)", _is_host)
_DOMAIN: Final = _Text("a domain name", _is_domain)
_FOLDER: Final = _Text("a folder path", _is_path)
_LOG_TARGET: Final = _Text('"-" (standard output) or a file path', _is_path)
_LISTEN_PORT: Final = _Integer(0, 65535)
_UPSTREAM_PORT: Final = _Integer(1, 65535)
_EVENT_LOOP: Final = _Choice(EVENT_LOOPS)
_KIND: Final = _Choice(UPSTREAM_KINDS)
_LEVEL: Final = _Choice(LOG_LEVELS)
_FLAG: Final = _Flag()

# The YAML keys of each section are the fields of its dataclass.
_LISTENER_KEYS: Final = tuple(field.name for field in dataclasses.fields(ListenerConfig))
_UPSTREAM_KEYS: Final = tuple(field.name for field in dataclasses.fields(UpstreamConfig))
_LOG_KEYS: Final = tuple(field.name for field in dataclasses.fields(LogConfig))
_TOP_KEYS: Final = tuple(
    field.name for field in dataclasses.fields(Config) if field.name != "source"
)

# Line limits start at 512: RFC 5321 4.5.3.1.4 and 4.5.3.1.5 require that
# lines of 512 octets be accepted.
_LIMIT_RULES: Final[Mapping[str, _Rule[int]]] = {
    "max_connections": _Integer(1),
    "max_command_line_bytes": _Integer(512),
    "max_reply_line_bytes": _Integer(512),
    "max_reply_lines": _Integer(1),
    "max_pipelined_commands": _Integer(1),
}
_TIMEOUT_RULES: Final[Mapping[str, _Rule[float]]] = {
    field.name: _Seconds(allow_zero=False) for field in dataclasses.fields(TimeoutsConfig)
}
# A grace of 0 closes sessions at once, which is a legitimate choice.
_SHUTDOWN_RULES: Final[Mapping[str, _Rule[float]]] = {
    field.name: _Seconds(allow_zero=True) for field in dataclasses.fields(ShutdownConfig)
}


# --- Collecting problems ---------------------------------------------------


class _Checker:
    """Reads raw YAML values through rules and collects every problem."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []  # (key path, message)

    @property
    def problems(self) -> list[str]:
        return [f"{path or 'top level'}: {message}" for path, message in self.found]

    def report(self, path: str, message: str) -> None:
        self.found.append((path, message))

    def in_document_order(self, keys: Iterable[object]) -> list[str]:
        """Return the problems ordered by their top-level key's first place in `keys`."""
        position: dict[str, int] = {}
        for key in keys:
            position.setdefault(_join("", key), len(position))
        self.found.sort(key=lambda found: position.get(re.split(r"[.\[]", found[0])[0], -1))
        return self.problems

    def invalid(self, path: str, rule: _Rule[object], raw: object) -> None:
        hint = _suggest(raw, rule.options) if isinstance(rule, _Choice) else ""
        self.report(path, f"expected {rule.expected}, got {_show(raw)}{hint}")

    def mapping(self, raw: object, path: str, keys: Collection[str]) -> dict[str, object]:
        """Return the known keys of `raw`, reporting unknown keys and non-mappings."""
        if not isinstance(raw, dict):
            self.report(path, f"expected a mapping, got {_show(raw)}")
            return {}
        known: dict[str, object] = {}
        for key, value in raw.items():
            if isinstance(key, str) and key in keys:
                known[key] = value
                continue
            hint = _suggest(key, keys) or f" (known keys: {', '.join(keys)})"
            self.report(_join(path, key), f"unknown key{hint}")
        return known

    def value(
        self, section: Mapping[str, object], key: str, path: str, rule: _Rule[T], default: T
    ) -> T:
        """Return section[key] if present and valid, else `default`."""
        if key not in section:
            return default
        converted = rule.convert(section[key])
        if converted is None:
            self.invalid(_join(path, key), rule, section[key])
            return default
        return converted

    def required(
        self, section: Mapping[str, object], key: str, path: str, rule: _Rule[T], fallback: T
    ) -> T:
        """As `value`, but a missing key is a problem. `fallback` is never kept."""
        if key not in section:
            self.report(_join(path, key), f"missing required key ({rule.expected})")
            return fallback
        return self.value(section, key, path, rule, fallback)

    def section(
        self, top: Mapping[str, object], key: str, rules: Mapping[str, _Rule[T]]
    ) -> dict[str, T]:
        """Return the valid entries of an optional section; absent or empty means defaults."""
        raw = top.get(key)
        if raw is None:
            return {}
        found = self.mapping(raw, key, rules.keys())
        valid: dict[str, T] = {}
        for name, value in found.items():
            converted = rules[name].convert(value)
            if converted is None:
                self.invalid(_join(key, name), rules[name], value)
            else:
                valid[name] = converted
        return valid

    def items(
        self, top: Mapping[str, object], key: str, what: str, keys: Collection[str]
    ) -> list[tuple[int, str, dict[str, object]]]:
        """Return (index, path, known keys) for each mapping in a required, non-empty list."""
        if key not in top:
            self.report(key, f"missing required key (a list of {what}s)")
            return []
        raw = top[key]
        if not isinstance(raw, list) or not raw:
            self.report(key, f"expected a list of at least one {what}, got {_show(raw)}")
            return []
        found: list[tuple[int, str, dict[str, object]]] = []
        for i, item in enumerate(raw):
            path = f"{key}[{i}]"
            if isinstance(item, dict):
                found.append((i, path, self.mapping(item, path, keys)))
            else:
                self.report(path, f"expected a mapping, got {_show(item)}")
        return found

    def unique(self, what: str, entries: Iterable[tuple[str, str]]) -> None:
        """Report each (path, value) whose value an earlier entry already used."""
        first: dict[str, str] = {}
        for path, value in entries:
            if value in first:
                self.report(path, f"duplicate {what} {_show(value)} (first used by {first[value]})")
            else:
                first[value] = path


# --- Sections --------------------------------------------------------------


def _upstreams(
    check: _Checker, top: Mapping[str, object]
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
        name = check.value(section, "name", path, _NAME, f"upstream{i}")
        names_known = names_known and len(check.found) == before
        names.append((_join(path, "name") if "name" in section else path, name))
        # None when kind is given but invalid, so that nothing else is required.
        kind = check.value(section, "kind", path, _KIND, None) if "kind" in section else "smtp"
        if kind == "sink":
            # host and port mean nothing to a sink and are ignored.
            folder = check.value(section, "path", path, _FOLDER, DEFAULT_SINK_FOLDER)
            upstreams.append(
                UpstreamConfig(name=name, kind=kind, host="127.0.0.1", port=0, path=folder)
            )
        elif kind == "smtp":
            host = check.required(section, "host", path, _HOST, "")
            port = check.required(section, "port", path, _UPSTREAM_PORT, 0)
            if "path" in section:
                check.report(_join(path, "path"), 'only allowed when kind is "sink"')
            upstreams.append(UpstreamConfig(name=name, kind=kind, host=host, port=port, path=None))
        else:  # kind already reported: check what is there, require nothing
            check.value(section, "host", path, _HOST, "")
            check.value(section, "port", path, _UPSTREAM_PORT, 0)
            check.value(section, "path", path, _FOLDER, "")
    check.unique("upstream name", names)
    return tuple(upstreams), [name for _, name in names] if names_known else None


def _listeners(
    check: _Checker, top: Mapping[str, object], upstream_names: list[str] | None
) -> tuple[ListenerConfig, ...]:
    default_upstream = upstream_names[0] if upstream_names else ""
    listeners: list[ListenerConfig] = []
    names: list[tuple[str, str]] = []
    addresses: list[tuple[str, str]] = []
    for i, path, section in check.items(top, "listeners", "listener", _LISTENER_KEYS):
        name = check.value(section, "name", path, _NAME, f"listener{i}")
        host = check.value(section, "host", path, _HOST, "127.0.0.1")
        port = check.required(section, "port", path, _LISTEN_PORT, 0)
        upstream = check.value(section, "upstream", path, _NAME, default_upstream)
        if upstream_names is not None and upstream not in upstream_names:
            hint = _suggest(upstream, upstream_names)
            check.report(_join(path, "upstream"), f"no upstream named {_show(upstream)}{hint}")
        names.append((_join(path, "name") if "name" in section else path, name))
        if port != 0:  # port 0 binds a fresh ephemeral port each time
            shown_host = f"[{host}]" if ":" in host else host
            addresses.append((path, f"{shown_host}:{port}"))
        listeners.append(ListenerConfig(name=name, host=host, port=port, upstream=upstream))
    check.unique("listener name", names)
    check.unique("listening address", addresses)
    return tuple(listeners)


def _log(check: _Checker, top: Mapping[str, object]) -> LogConfig:
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
    check = _Checker()
    if data is None:
        check.report("", "expected a mapping of settings, got an empty document")
        raise ConfigError(source, check.problems)
    top = check.mapping(data, "", _TOP_KEYS)
    if not isinstance(data, dict):
        raise ConfigError(source, check.problems)
    event_loop: EventLoop = check.value(top, "event_loop", "", _EVENT_LOOP, "auto")
    hostname = check.value(top, "hostname", "", _DOMAIN, "") or socket.getfqdn()
    upstreams, upstream_names = _upstreams(check, top)
    listeners = _listeners(check, top, upstream_names)
    limits = LimitsConfig(**check.section(top, "limits", _LIMIT_RULES))
    timeouts = TimeoutsConfig(**check.section(top, "timeouts", _TIMEOUT_RULES))
    shutdown = ShutdownConfig(**check.section(top, "shutdown", _SHUTDOWN_RULES))
    log = _log(check, top)
    if check.problems:
        # Sections are checked in dependency order; report them in reading
        # order, then missing keys in the order of _TOP_KEYS.
        raise ConfigError(source, check.in_document_order([*data, *_TOP_KEYS]))
    return Config(
        event_loop=event_loop,
        hostname=hostname,
        listeners=listeners,
        upstreams=upstreams,
        limits=limits,
        timeouts=timeouts,
        shutdown=shutdown,
        log=log,
        source=source,
    )


# --- Sources ---------------------------------------------------------------

_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


def _duplicate_keys(root: yaml.Node) -> list[str]:
    """Find keys repeated within one mapping, which YAML loaders silently drop."""
    found: list[tuple[int, int, str]] = []
    seen_nodes: set[int] = set()
    pending: list[tuple[yaml.Node, str]] = [(root, "")]
    while pending:
        node, path = pending.pop()
        if id(node) in seen_nodes:  # aliases can make the graph cyclic
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            pending.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                key_path = _join(path, key_node.value)
                pending.append((value_node, key_path))
                if (key_node.tag, key_node.value) in keys:
                    mark = key_node.start_mark
                    found.append((mark.line + 1, mark.column + 1, key_path))
                keys.add((key_node.tag, key_node.value))
    return [
        f"{key_path}: duplicate key at line {line}, column {column} (YAML keeps only the last)"
        for line, column, key_path in sorted(found)
    ]


def _yaml_problem(err: yaml.YAMLError) -> str:
    if isinstance(err, ReaderError):  # PyYAML says "unicode" for a control character
        if err.encoding == "unicode":
            where = f"character #x{err.character:04x} at position {err.position}"
            return f"invalid YAML: {where}: {err.reason}"
        return f"not valid {err.encoding} text at byte {err.position}: {err.reason}"
    if not isinstance(err, yaml.MarkedYAMLError):
        return "invalid YAML: " + " ".join(str(err).split())
    mark = err.problem_mark or err.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = ", ".join(part for part in (err.context, err.problem) if part)
    return f"{where}invalid YAML: {what or 'unreadable document'}"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a YAML file and return its validated `Config`.

    The file is parsed with PyYAML's safe loader (plain data only, no Python
    objects). Keys repeated within one mapping are problems too.

    Raises ConfigError (source: the path as given) if the file cannot be read,
    is not valid YAML, or fails validation; all problems are listed at once.
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
            duplicates = _duplicate_keys(root) if root is not None else []
            data: object = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise ConfigError(source, [_yaml_problem(err)]) from err
    try:
        config = parse_config(data, source=source)
    except ConfigError as err:
        raise ConfigError(source, [*duplicates, *err.problems]) from None
    if duplicates:
        raise ConfigError(source, duplicates)
    return config


_PORT_RE: Final = re.compile(r"[0-9]{1,5}")


def _hostport(check: _Checker, text: str, what: str, allow_zero: bool) -> tuple[str, int]:
    """Split HOST:PORT, reporting a problem under `what` and returning a fallback."""
    host, colon, port_text = text.rpartition(":")
    low = 0 if allow_zero else 1
    if not colon or not host:
        check.report(what, f"expected HOST:PORT, got {_show(text)}")
        return "", 0
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            check.report(what, f"expected an IPv6 address inside [ ], got {_show(text)}")
            return "", 0
    elif ":" in host:
        check.report(what, f"expected an IPv6 address in brackets, as [::1]:25, got {_show(text)}")
        return "", 0
    elif not _is_host(host):
        check.report(what, f'expected a host name or IP address before ":", got {_show(text)}')
        return "", 0
    if not _PORT_RE.fullmatch(port_text) or not low <= int(port_text) <= 65535:
        check.report(what, f'expected a port {low}-65535 after ":", got {_show(text)}')
        return "", 0
    return host, int(port_text)


def parse_hostport(text: str, *, what: str, allow_zero: bool = False) -> tuple[str, int]:
    """Parse "HOST:PORT" or "[IPV6]:PORT" given on the command line.

    Returns (host, port) with any IPv6 brackets removed. The port must be
    1-65535, or 0-65535 with `allow_zero` (0 asks for an ephemeral port).
    Raises ConfigError (source "<cli>") with one problem naming `what`,
    e.g. "--listen".
    """
    check = _Checker()
    result = _hostport(check, text, what, allow_zero)
    if check.problems:
        raise ConfigError(CLI_SOURCE, check.problems)
    return result


_SINK_PREFIX: Final = "sink:"


def simple_config(*, listen: str, upstream: str) -> Config:
    """Build the `Config` for `run --listen HOST:PORT --upstream HOST:PORT`.

    `upstream` may also be "sink:FOLDER": an upstream of kind sink that writes
    captured mail to FOLDER. Everything else takes its default.

    Raises ConfigError (source "<cli>") naming "--listen" and/or "--upstream".
    """
    check = _Checker()
    listen_host, listen_port = _hostport(check, listen, "--listen", allow_zero=True)
    upstream_section: dict[str, object]
    if upstream.startswith(_SINK_PREFIX):
        folder = upstream.removeprefix(_SINK_PREFIX)
        if not _is_path(folder):
            check.report("--upstream", f"expected sink:FOLDER, got {_show(upstream)}")
        upstream_section = {"kind": "sink", "path": folder}
    else:
        upstream_host, upstream_port = _hostport(check, upstream, "--upstream", allow_zero=False)
        upstream_section = {"kind": "smtp", "host": upstream_host, "port": upstream_port}
    if check.problems:
        raise ConfigError(CLI_SOURCE, check.problems)
    data = {
        "listeners": [{"host": listen_host, "port": listen_port}],
        "upstreams": [upstream_section],
    }
    return parse_config(data, source=CLI_SOURCE)


def default_config() -> Config:
    """Return the embedded default: 127.0.0.1:2525 in front of a sink writing to ./mail."""
    data = {
        "listeners": [{"host": "127.0.0.1", "port": DEFAULT_LISTEN_PORT}],
        "upstreams": [{"kind": "sink", "path": DEFAULT_SINK_FOLDER}],
    }
    return parse_config(data, source=DEFAULT_SOURCE)
