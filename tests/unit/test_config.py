"""Tests for smtpwarden.config: defaults, every kind of problem, sources."""

from __future__ import annotations

import dataclasses
import datetime
import pickle
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from smtpwarden.config import (
    Config,
    ConfigError,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    ShutdownConfig,
    TimeoutsConfig,
    UpstreamConfig,
    default_config,
    load_config,
    parse_config,
    parse_hostport,
    simple_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

BASE: dict[object, object] = {
    "hostname": "relay.test",
    "listeners": [{"port": 2525}],
    "upstreams": [{"host": "mta.test", "port": 25}],
}


def parse(sections: Mapping[object, object] | None = None) -> Config:
    """Parse BASE with some top-level keys replaced."""
    return parse_config({**BASE, **(sections or {})}, source="test.yaml")


def problems(sections: Mapping[object, object]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse(sections)
    assert caught.value.source == "test.yaml"
    return caught.value.problems


# --- Defaults ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        pytest.param("event_loop", "auto", id="event_loop"),
        pytest.param("limits.max_connections", 1000, id="max_connections"),
        pytest.param("limits.max_command_line_bytes", 2048, id="max_command_line_bytes"),
        pytest.param("limits.max_reply_line_bytes", 2048, id="max_reply_line_bytes"),
        pytest.param("limits.max_reply_lines", 128, id="max_reply_lines"),
        pytest.param("limits.max_pipelined_commands", 100, id="max_pipelined_commands"),
        pytest.param("limits.max_recipients", 1000, id="max_recipients"),
        pytest.param("limits.max_errors", 20, id="max_errors"),
        pytest.param("timeouts.connect", 30.0, id="connect"),
        pytest.param("timeouts.banner", 300.0, id="banner"),
        pytest.param("timeouts.command", 300.0, id="command"),
        pytest.param("timeouts.mail", 300.0, id="mail"),
        pytest.param("timeouts.rcpt", 300.0, id="rcpt"),
        pytest.param("timeouts.data_init", 120.0, id="data_init"),
        pytest.param("timeouts.data_block", 180.0, id="data_block"),
        pytest.param("timeouts.data_end", 600.0, id="data_end"),
        pytest.param("timeouts.reply", 300.0, id="reply"),
        pytest.param("shutdown.grace", 30.0, id="grace"),
        pytest.param("shutdown.fast", 2.0, id="fast"),
        pytest.param("log.transactions", "-", id="transactions"),
        pytest.param("log.sessions", True, id="sessions"),
        pytest.param("log.level", "info", id="level"),
        pytest.param("listeners.0.name", "listener0", id="listener-name"),
        pytest.param("listeners.0.host", "127.0.0.1", id="listener-host"),
        pytest.param("listeners.0.upstream", "upstream0", id="listener-upstream"),
        pytest.param("upstreams.0.name", "upstream0", id="upstream-name"),
        pytest.param("upstreams.0.kind", "smtp", id="upstream-kind"),
        pytest.param("upstreams.0.path", None, id="upstream-path"),
        pytest.param("source", "test.yaml", id="source"),
    ],
)
def test_default(attribute: str, expected: object) -> None:
    value: object = parse()
    for part in attribute.split("."):
        value = value[int(part)] if isinstance(value, tuple) else getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


def test_hostname_defaults_to_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.getfqdn", lambda: "fqdn.test")
    data = {key: value for key, value in BASE.items() if key != "hostname"}
    assert parse_config(data, source="test.yaml").hostname == "fqdn.test"


def test_empty_sections_take_defaults() -> None:
    config = parse({"limits": None, "timeouts": None, "shutdown": None, "log": None})
    assert config.limits == LimitsConfig()
    assert config.timeouts == TimeoutsConfig()
    assert config.shutdown == ShutdownConfig()
    assert config.log == LogConfig()


def test_sink_upstream_defaults_and_ignores_host_and_port() -> None:
    config = parse({"upstreams": [{"kind": "sink", "host": "ignored.test", "port": 25}]})
    assert config.upstreams == (
        UpstreamConfig(name="upstream0", kind="sink", host="127.0.0.1", port=0, path="./mail"),
    )


def test_full_values_are_kept() -> None:
    config = parse(
        {
            "event_loop": "asyncio",
            "listeners": [
                {"name": "a", "host": "::", "port": 0, "upstream": "capture"},
                {"name": "b", "host": "192.0.2.10", "port": 25},
            ],
            "upstreams": [
                {"name": "mta", "host": "192.0.2.1", "port": 587},
                {"name": "capture", "kind": "sink", "path": "out"},
            ],
            "timeouts": {"connect": 5, "data_end": 0.5},
            "shutdown": {"grace": 0},
            "log": {"transactions": "tx.jsonl", "sessions": False, "level": "debug"},
        }
    )
    assert config.event_loop == "asyncio"
    assert config.listeners == (
        ListenerConfig(name="a", host="::", port=0, upstream="capture"),
        ListenerConfig(name="b", host="192.0.2.10", port=25, upstream="mta"),
    )
    assert config.upstreams[1].path == "out"
    assert config.timeouts.connect == 5.0
    assert isinstance(config.timeouts.connect, float)
    assert config.timeouts.data_end == 0.5
    assert config.shutdown.grace == 0.0
    assert config.log == LogConfig(transactions="tx.jsonl", sessions=False, level="debug")


# --- One problem each ----------------------------------------------------------

UPSTREAM = {"host": "mta.test", "port": 25}


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        pytest.param(
            {"listeners": [{"prot": 25, "port": 25}]},
            'listeners[0].prot: unknown key (did you mean "port"?)',
            id="unknown-key-suggestion",
        ),
        pytest.param(
            {"limits": {"max_connection": 5}},
            'limits.max_connection: unknown key (did you mean "max_connections"?)',
            id="unknown-key-in-section",
        ),
        pytest.param(
            {"colour": "blue"},
            "colour: unknown key (known keys: event_loop, hostname, listeners, upstreams, "
            "limits, timeouts, shutdown, log)",
            id="unknown-key-listed",
        ),
        pytest.param(
            {7: "x"},
            "7: unknown key (known keys: event_loop, hostname, listeners, upstreams, "
            "limits, timeouts, shutdown, log)",
            id="unknown-key-not-a-string",
        ),
        pytest.param(
            {"listeners": [{"port": "abc"}]},
            'listeners[0].port: expected an integer 0-65535, got "abc"',
            id="port-string",
        ),
        pytest.param(
            {"listeners": [{"port": True}]},
            "listeners[0].port: expected an integer 0-65535, got true",
            id="port-bool",
        ),
        pytest.param(
            {"listeners": [{"port": 25.0}]},
            "listeners[0].port: expected an integer 0-65535, got 25.0",
            id="port-float",
        ),
        pytest.param(
            {"listeners": [{"port": None}]},
            "listeners[0].port: expected an integer 0-65535, got null",
            id="port-null",
        ),
        pytest.param(
            {"listeners": [{"port": 65536}]},
            "listeners[0].port: expected an integer 0-65535, got 65536",
            id="listener-port-range",
        ),
        pytest.param(
            {"upstreams": [{"host": "mta.test", "port": 0}]},
            "upstreams[0].port: expected an integer 1-65535, got 0",
            id="upstream-port-zero",
        ),
        pytest.param(
            {"listeners": [{"host": "localhost"}]},
            "listeners[0].port: missing required key (an integer 0-65535)",
            id="listener-port-missing",
        ),
        pytest.param(
            {"upstreams": [{"port": 25}]},
            "upstreams[0].host: missing required key "
            "(a host name or IP address (IPv6 without brackets))",
            id="upstream-host-missing",
        ),
        pytest.param(
            {"upstreams": [{"host": "mta.test:25", "port": 25}]},
            "upstreams[0].host: expected a host name or IP address (IPv6 without brackets), "
            'got "mta.test:25"',
            id="upstream-host-with-port",
        ),
        pytest.param(
            {"listeners": [{"host": "[::1]", "port": 25}]},
            "listeners[0].host: expected a host name or IP address (IPv6 without brackets), "
            'got "[::1]"',
            id="listener-host-brackets",
        ),
        pytest.param(
            {"upstreams": [{"host": "mta.test", "port": 25, "path": "./mail"}]},
            'upstreams[0].path: only allowed when kind is "sink"',
            id="path-on-smtp",
        ),
        pytest.param(
            {"upstreams": [{"kind": "snk"}]},
            'upstreams[0].kind: expected one of "smtp", "sink", got "snk" (did you mean "sink"?)',
            id="kind-unknown",
        ),
        pytest.param(
            {"upstreams": [{"kind": "sink", "path": ""}]},
            'upstreams[0].path: expected a folder path, got ""',
            id="sink-path-empty",
        ),
        pytest.param(
            {"listeners": [{"port": 25, "upstream": "mta"}]},
            'listeners[0].upstream: no upstream named "mta"',
            id="unknown-upstream",
        ),
        pytest.param(
            {
                "listeners": [{"port": 25, "upstream": "mian"}],
                "upstreams": [{"name": "main", **UPSTREAM}],
            },
            'listeners[0].upstream: no upstream named "mian" (did you mean "main"?)',
            id="unknown-upstream-suggestion",
        ),
        pytest.param(
            {"listeners": [{"name": "a", "port": 25}, {"name": "a", "port": 26}]},
            'listeners[1].name: duplicate listener name "a" (first used by listeners[0].name)',
            id="duplicate-listener-name",
        ),
        pytest.param(
            {"listeners": [{"name": "listener1", "port": 25}, {"port": 26}]},
            'listeners[1]: duplicate listener name "listener1" (first used by listeners[0].name)',
            id="duplicate-default-name",
        ),
        pytest.param(
            {"upstreams": [{"name": "a", **UPSTREAM}, {"name": "a", "kind": "sink"}]},
            'upstreams[1].name: duplicate upstream name "a" (first used by upstreams[0].name)',
            id="duplicate-upstream-name",
        ),
        pytest.param(
            {"listeners": [{"host": "::1", "port": 25}, {"host": "::1", "port": 25}]},
            'listeners[1]: duplicate listening address "[::1]:25" (first used by listeners[0])',
            id="duplicate-address",
        ),
        pytest.param(
            {"listeners": [{"name": "bad name", "port": 25}]},
            "listeners[0].name: expected a name of letters, digits, '.', '_' and '-', "
            'got "bad name"',
            id="name-characters",
        ),
        pytest.param(
            {"listeners": []},
            "listeners: expected a list of at least one listener, got an empty list",
            id="listeners-empty",
        ),
        pytest.param(
            {"upstreams": {"mta": UPSTREAM}},
            "upstreams: expected a list of at least one upstream, got a mapping",
            id="upstreams-mapping",
        ),
        pytest.param(
            {"listeners": ["127.0.0.1:25"]},
            'listeners[0]: expected a mapping, got "127.0.0.1:25"',
            id="listener-not-mapping",
        ),
        pytest.param(
            {"limits": [1000]},
            "limits: expected a mapping, got a list",
            id="section-not-mapping",
        ),
        pytest.param(
            {"limits": {"max_command_line_bytes": 511}},
            "limits.max_command_line_bytes: expected an integer >= 512, got 511",
            id="line-limit-below-rfc",
        ),
        pytest.param(
            {"limits": {"max_connections": 0}},
            "limits.max_connections: expected an integer >= 1, got 0",
            id="max-connections-zero",
        ),
        pytest.param(
            {"timeouts": {"data_end": 0}},
            "timeouts.data_end: expected a number of seconds > 0, got 0",
            id="timeout-zero",
        ),
        pytest.param(
            {"timeouts": {"banner": -1.5}},
            "timeouts.banner: expected a number of seconds > 0, got -1.5",
            id="timeout-negative",
        ),
        pytest.param(
            {"timeouts": {"command": "30s"}},
            'timeouts.command: expected a number of seconds > 0, got "30s"',
            id="timeout-unit",
        ),
        pytest.param(
            {"timeouts": {"command": float("inf")}},
            "timeouts.command: expected a number of seconds > 0, got .inf",
            id="timeout-infinite",
        ),
        pytest.param(
            {"timeouts": {"reply": False}},
            "timeouts.reply: expected a number of seconds > 0, got false",
            id="timeout-bool",
        ),
        pytest.param(
            {"shutdown": {"grace": -1}},
            "shutdown.grace: expected a number of seconds >= 0, got -1",
            id="grace-negative",
        ),
        pytest.param(
            {"log": {"level": "warn"}},
            'log.level: expected one of "debug", "info", "warning", "error", got "warn" '
            '(did you mean "warning"?)',
            id="level-suggestion",
        ),
        pytest.param(
            {"log": {"sessions": "yes"}},
            'log.sessions: expected true or false, got "yes"',
            id="sessions-string",
        ),
        pytest.param(
            {"log": {"transactions": ""}},
            'log.transactions: expected "-" (standard output) or a file path, got ""',
            id="transactions-empty",
        ),
        pytest.param(
            {"event_loop": "uv"},
            'event_loop: expected one of "auto", "uvloop", "asyncio", got "uv"',
            id="event-loop",
        ),
        pytest.param(
            {"hostname": "relay host"},
            'hostname: expected a domain name, got "relay host"',
            id="hostname",
        ),
        pytest.param(
            {"hostname": datetime.date(2024, 1, 31)},
            "hostname: expected a domain name, got 2024-01-31",
            id="date-shown-as-written",
        ),
        pytest.param(
            {"hostname": b"relay"},
            "hostname: expected a domain name, got binary data",
            id="binary-value",
        ),
        pytest.param(
            {"timeouts": {"connect": float("nan")}},
            "timeouts.connect: expected a number of seconds > 0, got .nan",
            id="timeout-nan",
        ),
        pytest.param(
            {"hostname": {"relay"}},
            "hostname: expected a domain name, got set",
            id="other-type",
        ),
        pytest.param(
            {"hostname": "x" * 100},
            f'hostname: expected a domain name, got "{"x" * 57}..."',
            id="long-value-shortened",
        ),
    ],
)
def test_single_problem(sections: dict[object, object], expected: str) -> None:
    assert problems(sections) == (expected,)


def test_missing_listeners_and_upstreams() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({}, source="test.yaml")
    assert caught.value.problems == (
        "listeners: missing required key (a list of listeners)",
        "upstreams: missing required key (a list of upstreams)",
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            None, "top level: expected a mapping of settings, got an empty document", id="empty"
        ),
        pytest.param([1, 2], "top level: expected a mapping, got a list", id="list"),
        pytest.param("listen: 25", 'top level: expected a mapping, got "listen: 25"', id="string"),
    ],
)
def test_top_level_not_a_mapping(data: object, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="test.yaml")
    assert caught.value.problems == (expected,)


# --- Many problems at once -------------------------------------------------------


def test_all_problems_reported_at_once_in_document_order() -> None:
    data = yaml.safe_load(
        """
        listeners:
          - prot: 25
            port: abc
            upstream: mian
        upstreams:
          - name: main
            host: mta.test
            port: 25
            path: ./mail
        timeouts: {connect: 0}
        log: {level: verbose}
        event_loop: uv
        """
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="relay.yaml")
    assert caught.value.problems == (
        'listeners[0].prot: unknown key (did you mean "port"?)',
        'listeners[0].port: expected an integer 0-65535, got "abc"',
        'listeners[0].upstream: no upstream named "mian" (did you mean "main"?)',
        'upstreams[0].path: only allowed when kind is "sink"',
        "timeouts.connect: expected a number of seconds > 0, got 0",
        'log.level: expected one of "debug", "info", "warning", "error", got "verbose"',
        'event_loop: expected one of "auto", "uvloop", "asyncio", got "uv"',
    )
    assert str(caught.value).splitlines() == [
        "relay.yaml: 7 problems",
        *(f"  {problem}" for problem in caught.value.problems),
    ]


def test_broken_upstream_does_not_flag_references() -> None:
    found = problems(
        {
            "listeners": [{"port": 25, "upstream": "main"}],
            "upstreams": [{"name": "main", "kind": "smtp"}, {"name": 5, "kind": "sink"}],
        }
    )
    assert found == (
        "upstreams[0].host: missing required key (a host name or IP address (IPv6 without "
        "brackets))",
        "upstreams[0].port: missing required key (an integer 1-65535)",
        "upstreams[1].name: expected a name of letters, digits, '.', '_' and '-', got 5",
    )


# --- ConfigError ---------------------------------------------------------------


def test_config_error_rendering_and_pickling() -> None:
    err = ConfigError("x.yaml", ["port: bad"])
    assert str(err) == "x.yaml: 1 problem\n  port: bad"
    copy = pickle.loads(pickle.dumps(err))  # noqa: S301 (our own object)
    assert (copy.source, copy.problems) == ("x.yaml", ("port: bad",))


# --- Files -----------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "listeners:\n  - port: 25\n   bad: x\n",
            "line 3, column 4: invalid YAML: while parsing a block collection, "
            "expected <block end>, but found '<block mapping start>'",
            id="indentation",
        ),
        pytest.param(
            'hostname: "relay.test\n',
            "line 2, column 1: invalid YAML: while scanning a quoted scalar, "
            "found unexpected end of stream",
            id="unterminated-string",
        ),
        pytest.param(
            "hostname: a\n---\nhostname: b\n",
            "line 2, column 1: invalid YAML: expected a single document in the stream, "
            "but found another document",
            id="two-documents",
        ),
        pytest.param(
            "hostname: !!python/object:os.getcwd x\n",
            "line 1, column 11: invalid YAML: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object:os.getcwd'",
            id="python-tag",
        ),
        pytest.param(
            "",
            "top level: expected a mapping of settings, got an empty document",
            id="empty-file",
        ),
        pytest.param(
            "listeners:\n  - port: 25\n    port: 26\nupstreams: [{kind: sink}]\n",
            "listeners[0].port: duplicate key at line 3, column 5 (YAML keeps only the last)",
            id="duplicate-key",
        ),
    ],
)
def test_load_config_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert caught.value.problems == (expected,)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(
            b"hostname: relay\x07\n",
            "invalid YAML: character #x0007 at position 15: special characters are not allowed",
            id="control-character",
        ),
        pytest.param(
            b"hostname: \xffrelay\n",
            "not valid utf-8 text at byte 10: invalid start byte",
            id="not-utf-8",
        ),
    ],
)
def test_load_config_unreadable_text(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "relay.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == (expected,)


def test_cyclic_alias(tmp_path: Path) -> None:
    cyclic = "listeners: &a [*a]\nupstreams: [{kind: sink}]\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, cyclic))
    assert caught.value.problems == ("listeners[0]: expected a mapping, got a list",)


def test_duplicate_keys_join_other_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "listeners:\n  - port: 25\n    port: 26\n    prot: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == (
        "listeners[0].port: duplicate key at line 3, column 5 (YAML keeps only the last)",
        'listeners[0].prot: unknown key (did you mean "port"?)',
        "upstreams: missing required key (a list of upstreams)",
    )


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = (
        "listeners: [{port: 25}]\n"
        "upstreams:\n"
        "  - &base {kind: sink, path: a}\n"
        "  - <<: *base\n"
        "    path: b\n"
        "    name: second\n"
    )
    config = load_config(write(tmp_path, text))
    assert [upstream.path for upstream in config.upstreams] == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param(
            "missing.yaml", "cannot read the file: No such file or directory", id="missing"
        ),
        pytest.param(".", "cannot read the file: Is a directory", id="directory"),
    ],
)
def test_load_config_unreadable(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / name)
    assert caught.value.problems == (expected,)


@pytest.mark.parametrize("name", ["smtpwarden.yaml", "quickstart.yaml"])
def test_example_config_loads(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.source == str(CONFIGS / name)


def test_quickstart_is_the_default() -> None:
    quickstart = load_config(CONFIGS / "quickstart.yaml")
    assert dataclasses.replace(quickstart, source="<default>") == default_config()


def test_full_example_shows_every_key_with_its_default() -> None:
    data = yaml.safe_load((CONFIGS / "smtpwarden.yaml").read_text(encoding="utf-8"))
    top_keys = {field.name for field in dataclasses.fields(Config)} - {"source"}
    assert set(data) == top_keys
    listener_keys = {field.name for field in dataclasses.fields(ListenerConfig)}
    assert set(data["listeners"][0]) == listener_keys
    upstream_keys = {field.name for field in dataclasses.fields(UpstreamConfig)}
    assert set(data["upstreams"][0]) | set(data["upstreams"][1]) == upstream_keys
    config = load_config(CONFIGS / "smtpwarden.yaml")
    assert config.event_loop == "auto"
    assert config.limits == LimitsConfig()
    assert config.timeouts == TimeoutsConfig()
    assert config.shutdown == ShutdownConfig()
    assert config.log == LogConfig()


# --- Command-line shorthand --------------------------------------------------------


def test_default_config() -> None:
    config = default_config()
    assert config.source == "<default>"
    assert config.listeners == (
        ListenerConfig(name="listener0", host="127.0.0.1", port=2525, upstream="upstream0"),
    )
    assert config.upstreams == (
        UpstreamConfig(name="upstream0", kind="sink", host="127.0.0.1", port=0, path="./mail"),
    )


@pytest.mark.parametrize(
    ("listen", "upstream", "listener", "expected_upstream"),
    [
        pytest.param(
            "127.0.0.1:2525",
            "mta.example.com:25",
            ("127.0.0.1", 2525),
            ("smtp", "mta.example.com", 25, None),
            id="ipv4-to-smtp",
        ),
        pytest.param(
            "[::1]:25",
            "[2001:db8::1]:587",
            ("::1", 25),
            ("smtp", "2001:db8::1", 587, None),
            id="ipv6",
        ),
        pytest.param(
            "localhost:0",
            "sink:./captured",
            ("localhost", 0),
            ("sink", "127.0.0.1", 0, "./captured"),
            id="sink-folder",
        ),
    ],
)
def test_simple_config(
    listen: str,
    upstream: str,
    listener: tuple[str, int],
    expected_upstream: tuple[str, str, int, str | None],
) -> None:
    config = simple_config(listen=listen, upstream=upstream)
    assert config.source == "<cli>"
    (only_listener,) = config.listeners
    (only_upstream,) = config.upstreams
    assert (only_listener.host, only_listener.port) == listener
    assert only_listener.upstream == only_upstream.name
    kind, host, port, path = expected_upstream
    assert (only_upstream.kind, only_upstream.host, only_upstream.port) == (kind, host, port)
    assert only_upstream.path == path
    assert config.limits == LimitsConfig()


@pytest.mark.parametrize(
    ("listen", "upstream", "expected"),
    [
        pytest.param(
            "localhost",
            "mta:25",
            ('--listen: expected HOST:PORT, got "localhost"',),
            id="no-port",
        ),
        pytest.param(
            "::1:25",
            "mta:25",
            ('--listen: expected an IPv6 address in brackets, as [::1]:25, got "::1:25"',),
            id="ipv6-without-brackets",
        ),
        pytest.param(
            "127.0.0.1:25",
            "sink:",
            ('--upstream: expected sink:FOLDER, got "sink:"',),
            id="sink-without-folder",
        ),
        pytest.param(
            ":25",
            "mta:0",
            (
                '--listen: expected HOST:PORT, got ":25"',
                '--upstream: expected a port 1-65535 after ":", got "mta:0"',
            ),
            id="both-reported",
        ),
    ],
)
def test_simple_config_problems(listen: str, upstream: str, expected: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as caught:
        simple_config(listen=listen, upstream=upstream)
    assert caught.value.source == "<cli>"
    assert caught.value.problems == expected


@pytest.mark.parametrize(
    ("text", "allow_zero", "expected"),
    [
        pytest.param("127.0.0.1:25", False, ("127.0.0.1", 25), id="ipv4"),
        pytest.param("mta.example.com:587", False, ("mta.example.com", 587), id="name"),
        pytest.param("[::1]:25", False, ("::1", 25), id="ipv6"),
        pytest.param("[fe80::1%eth0]:25", False, ("fe80::1%eth0", 25), id="ipv6-scope"),
        pytest.param("localhost:0", True, ("localhost", 0), id="ephemeral"),
        pytest.param("localhost:65535", False, ("localhost", 65535), id="top-port"),
    ],
)
def test_parse_hostport(text: str, allow_zero: bool, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, what="--listen", allow_zero=allow_zero) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", 'expected HOST:PORT, got ""', id="empty"),
        pytest.param("25", 'expected HOST:PORT, got "25"', id="port-only"),
        pytest.param("host:", 'expected a port 1-65535 after ":", got "host:"', id="no-digits"),
        pytest.param("host:0", 'expected a port 1-65535 after ":", got "host:0"', id="zero"),
        pytest.param(
            "host:65536", 'expected a port 1-65535 after ":", got "host:65536"', id="too-big"
        ),
        pytest.param("host:+25", 'expected a port 1-65535 after ":", got "host:+25"', id="sign"),
        pytest.param(
            "[::g]:25", 'expected an IPv6 address inside [ ], got "[::g]:25"', id="bad-ipv6"
        ),
        pytest.param(
            "[127.0.0.1]:25",
            'expected an IPv6 address inside [ ], got "[127.0.0.1]:25"',
            id="ipv4-in-brackets",
        ),
        pytest.param(
            "a b:25",
            'expected a host name or IP address before ":", got "a b:25"',
            id="space-in-host",
        ),
    ],
)
def test_parse_hostport_problems(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_hostport(text, what="--upstream")
    assert caught.value.source == "<cli>"
    assert caught.value.problems == (f"--upstream: {expected}",)
