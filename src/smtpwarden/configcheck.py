"""Checking raw configuration values and wording the problems found.

`smtpwarden.config` says which settings exist and what each must be; this
module supplies the machinery it does so with: rules that accept or refuse a
loaded YAML value, the `Checker` that reads values through them and collects
every problem, host, domain and path checks, the helpers that show a value as
it was written and suggest a close key, and the wording of problems in the
YAML document itself (keys repeated in one mapping, parse errors). Each
problem names its key path, what was expected and what was found. Only
`smtpwarden.config`, `smtpwarden.configroutes`, `smtpwarden.configdelivery`,
`smtpwarden.configtls`, `smtpwarden.configendpoints`,
`smtpwarden.configobserve` and `smtpwarden.configtranscripts` import this
module; its names are not public API.

Rule 1: no I/O. It opens no file or socket and reads no environment; values
and YAML nodes arrive already loaded, problems leave as lines of text.

Rule 2: it never raises `ConfigError`, never prints and never exits. It
collects problems; `smtpwarden.config` decides when to raise them.

Rule 3: it knows no setting. It imports nothing from the project, so that
`smtpwarden.config`, `smtpwarden.configroutes`, `smtpwarden.configdelivery`,
`smtpwarden.configtls`, `smtpwarden.configendpoints`,
`smtpwarden.configobserve` and `smtpwarden.configtranscripts` can import it
without a cycle.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

import yaml
from yaml.reader import ReaderError

# --- Showing values as the user wrote them ---------------------------------

_MAX_SHOWN_CHARS: Final = 60  # keeps one problem on one terminal line


def show(value: object) -> str:
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


def suggest(word: object, choices: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for a close choice, else ""."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def join_key(path: str, key: object) -> str:
    """Return the key path of `key` inside `path`, e.g. "log.level"."""
    name = key if isinstance(key, str) else show(key)
    return f"{path}.{name}" if path else name


# --- Rules: what a value must be -------------------------------------------

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Rule(Protocol[T_co]):
    @property
    def expected(self) -> str: ...

    def convert(self, raw: object) -> T_co | None:
        """Return the value if `raw` is acceptable, else None."""
        ...


@dataclass(frozen=True, slots=True)
class Integer:
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


def _finite(raw: object) -> float | None:
    """Return an integer or decimal as a finite float, else None.

    YAML `true` loads as a bool, an int subclass: refuse it. An integer too
    big for a float is refused too, rather than raising OverflowError.
    """
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    try:
        number = float(raw)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True, slots=True)
class Seconds:
    allow_zero: bool

    @property
    def expected(self) -> str:
        return f"a number of seconds {'>=' if self.allow_zero else '>'} 0"

    def convert(self, raw: object) -> float | None:
        number = _finite(raw)
        if number is None or number < 0 or (number == 0 and not self.allow_zero):
            return None
        return number


@dataclass(frozen=True, slots=True)
class Number:
    """A finite integer or decimal that `accepts`, returned as a float."""

    expected: str
    accepts: Callable[[float], bool]

    def convert(self, raw: object) -> float | None:
        number = _finite(raw)
        return number if number is not None and self.accepts(number) else None


@dataclass(frozen=True, slots=True)
class Choice(Generic[T]):
    options: tuple[T, ...]

    @property
    def expected(self) -> str:
        return "one of " + ", ".join(show(option) for option in self.options)

    def convert(self, raw: object) -> T | None:
        for option in self.options:
            if raw == option and type(raw) is type(option):
                return option
        return None


@dataclass(frozen=True, slots=True)
class Flag:
    expected: str = "true or false"

    def convert(self, raw: object) -> bool | None:
        return raw if isinstance(raw, bool) else None


@dataclass(frozen=True, slots=True)
class Text:
    expected: str
    accepts: Callable[[str], bool]

    def convert(self, raw: object) -> str | None:
        return raw if isinstance(raw, str) and self.accepts(raw) else None


# --- Names, hosts and paths ------------------------------------------------

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# RFC 1035 labels, plus "_" which container and service names use.
_DOMAIN_RE: Final = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")


def is_name(text: str) -> bool:
    return bool(_NAME_RE.fullmatch(text))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_domain(text: str) -> bool:
    return _DOMAIN_RE.fullmatch(text) is not None


def is_host(text: str) -> bool:
    return _is_ip(text) or is_domain(text)


def is_path(text: str) -> bool:
    return text != "" and "\0" not in text


# Names of listeners, upstreams and routes, and folders, read the same way
# wherever a section refers to one.
NAME: Final = Text("a name of letters, digits, '.', '_' and '-'", is_name)
FOLDER: Final = Text("a folder path", is_path)


# --- Collecting problems ---------------------------------------------------


class Checker:
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
            position.setdefault(join_key("", key), len(position))
        self.found.sort(key=lambda found: position.get(re.split(r"[.\[]", found[0])[0], -1))
        return self.problems

    def invalid(self, path: str, rule: Rule[object], raw: object) -> None:
        hint = suggest(raw, rule.options) if isinstance(rule, Choice) else ""
        self.report(path, f"expected {rule.expected}, got {show(raw)}{hint}")

    def mapping(self, raw: object, path: str, keys: Collection[str]) -> dict[str, object]:
        """Return the known keys of `raw`, reporting unknown keys and non-mappings."""
        if not isinstance(raw, dict):
            self.report(path, f"expected a mapping, got {show(raw)}")
            return {}
        known: dict[str, object] = {}
        for key, value in raw.items():
            if isinstance(key, str) and key in keys:
                known[key] = value
                continue
            hint = suggest(key, keys) or f" (known keys: {', '.join(keys)})"
            self.report(join_key(path, key), f"unknown key{hint}")
        return known

    def value(
        self, section: Mapping[str, object], key: str, path: str, rule: Rule[T], default: T
    ) -> T:
        """Return section[key] if present and valid, else `default`."""
        if key not in section:
            return default
        converted = rule.convert(section[key])
        if converted is None:
            self.invalid(join_key(path, key), rule, section[key])
            return default
        return converted

    def required(
        self, section: Mapping[str, object], key: str, path: str, rule: Rule[T], fallback: T
    ) -> T:
        """As `value`, but a missing key is a problem. `fallback` is never kept."""
        if key not in section:
            self.report(join_key(path, key), f"missing required key ({rule.expected})")
            return fallback
        return self.value(section, key, path, rule, fallback)

    def section(
        self, top: Mapping[str, object], key: str, rules: Mapping[str, Rule[T]]
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
                self.invalid(join_key(key, name), rules[name], value)
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
            self.report(key, f"expected a list of at least one {what}, got {show(raw)}")
            return []
        found: list[tuple[int, str, dict[str, object]]] = []
        for i, item in enumerate(raw):
            path = f"{key}[{i}]"
            if isinstance(item, dict):
                found.append((i, path, self.mapping(item, path, keys)))
            else:
                self.report(path, f"expected a mapping, got {show(item)}")
        return found

    def unique(self, what: str, entries: Iterable[tuple[str, str]]) -> None:
        """Report each (path, value) whose value an earlier entry already used."""
        first: dict[str, str] = {}
        for path, value in entries:
            if value in first:
                self.report(path, f"duplicate {what} {show(value)} (first used by {first[value]})")
            else:
                first[value] = path

    def hostport(self, text: str, what: str, allow_zero: bool) -> tuple[str, int]:
        """Split HOST:PORT, reporting a problem under `what` and returning a fallback."""
        host, colon, port_text = text.rpartition(":")
        low = 0 if allow_zero else 1
        if not colon or not host:
            self.report(what, f"expected HOST:PORT, got {show(text)}")
            return "", 0
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                self.report(what, f"expected an IPv6 address inside [ ], got {show(text)}")
                return "", 0
        elif ":" in host:
            self.report(
                what, f"expected an IPv6 address in brackets, as [::1]:25, got {show(text)}"
            )
            return "", 0
        elif not is_host(host):
            self.report(what, f'expected a host name or IP address before ":", got {show(text)}')
            return "", 0
        if not _PORT_RE.fullmatch(port_text) or not low <= int(port_text) <= 65535:
            self.report(what, f'expected a port {low}-65535 after ":", got {show(text)}')
            return "", 0
        return host, int(port_text)


# --- Problems in the YAML document itself ----------------------------------

_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


def duplicate_keys(root: yaml.Node) -> list[str]:
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
                key_path = join_key(path, key_node.value)
                pending.append((value_node, key_path))
                if (key_node.tag, key_node.value) in keys:
                    mark = key_node.start_mark
                    found.append((mark.line + 1, mark.column + 1, key_path))
                keys.add((key_node.tag, key_node.value))
    return [
        f"{key_path}: duplicate key at line {line}, column {column} (YAML keeps only the last)"
        for line, column, key_path in sorted(found)
    ]


def yaml_problem(err: yaml.YAMLError) -> str:
    """Word a PyYAML error as one problem line, with its place in the file."""
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
