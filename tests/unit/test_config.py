"""Tests for smtpwarden.config: defaults, every kind of problem, sources."""

from __future__ import annotations

import dataclasses
import datetime
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import yaml

from smtpwarden.config import (
    POLICIES,
    BackoffConfig,
    Config,
    ConfigError,
    HealthConfig,
    HttpConfig,
    LimitsConfig,
    ListenerConfig,
    ListenerTranscripts,
    LogConfig,
    Policy,
    RetryConfig,
    RouteConfig,
    ShutdownConfig,
    SpoolConfig,
    TimeoutsConfig,
    TranscriptMatch,
    TranscriptsConfig,
    UpstreamConfig,
    default_config,
    load_config,
    parse_config,
    parse_hostport,
    route_for,
    simple_config,
)
from smtpwarden.configroutes import domain_routes, find_route
from smtpwarden.configtls import UpstreamTls

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
        pytest.param("limits.max_connections_per_client", 50, id="max_connections_per_client"),
        pytest.param("limits.connection_rate_per_minute", 0, id="connection_rate_per_minute"),
        pytest.param("limits.max_message_bytes", 10240000, id="max_message_bytes"),
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
        pytest.param("listeners.0.tls", None, id="listener-tls"),
        pytest.param("listeners.0.auth", None, id="listener-auth"),
        pytest.param("listeners.0.proxy_protocol", None, id="listener-proxy_protocol"),
        pytest.param("listeners.0.allow", (), id="listener-allow"),
        pytest.param("upstreams.0.name", "upstream0", id="upstream-name"),
        pytest.param("upstreams.0.kind", "smtp", id="upstream-kind"),
        pytest.param("upstreams.0.path", None, id="upstream-path"),
        pytest.param("upstreams.0.tls.mode", "none", id="upstream-tls-mode"),
        pytest.param("upstreams.0.tls.required", True, id="upstream-tls-required"),
        pytest.param("upstreams.0.tls.verify", True, id="upstream-tls-verify"),
        pytest.param("upstreams.0.tls.ca_file", None, id="upstream-tls-ca_file"),
        pytest.param("upstreams.0.tls.server_name", None, id="upstream-tls-server_name"),
        pytest.param("upstreams.0.tls.certificate", None, id="upstream-tls-certificate"),
        pytest.param("upstreams.0.tls.key", None, id="upstream-tls-key"),
        pytest.param("upstreams.0.tls.min_version", "1.2", id="upstream-tls-min_version"),
        pytest.param("upstreams.0.xclient", False, id="upstream-xclient"),
        pytest.param("upstreams.0.xforward", False, id="upstream-xforward"),
        pytest.param("source", "test.yaml", id="source"),
        pytest.param("routes.0.name", "listener0", id="route-name"),
        pytest.param("routes.0.listeners", ("listener0",), id="route-listeners"),
        pytest.param("routes.0.policy", "passthrough", id="route-policy"),
        pytest.param("routes.0.upstreams", ("upstream0",), id="route-upstreams"),
        pytest.param("retry.attempts", 3, id="attempts"),
        pytest.param("retry.budget", 120.0, id="budget"),
        pytest.param("retry.hold_memory_bytes", 1048576, id="hold_memory_bytes"),
        pytest.param("retry.lost_outcome", "retry", id="lost_outcome"),
        pytest.param("retry.phrases", (), id="phrases"),
        pytest.param("retry.take_over_partial", False, id="take_over_partial"),
        pytest.param("health.failures", 3, id="failures"),
        pytest.param("health.cooldown", 30.0, id="cooldown"),
        pytest.param("health.check_interval", 30.0, id="check_interval"),
        pytest.param("health.check_starttls", False, id="check_starttls"),
        pytest.param("health.certificate_warning_days", 14, id="certificate_warning_days"),
        pytest.param("http.enabled", True, id="http-enabled"),
        pytest.param("http.host", "127.0.0.1", id="http-host"),
        pytest.param("http.port", 9125, id="http-port"),
        pytest.param("spool.path", "spool", id="spool-path"),
        pytest.param("spool.max_age", 432000.0, id="max_age"),
        pytest.param("spool.workers", 4, id="workers"),
        pytest.param("spool.backoff.initial", 300.0, id="initial"),
        pytest.param("spool.backoff.factor", 2.0, id="factor"),
        pytest.param("spool.backoff.maximum", 4000.0, id="maximum"),
        pytest.param("spool.backoff.jitter", 0.2, id="jitter"),
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


IMPLICIT_ROUTE = RouteConfig(
    name="listener0", listeners=("listener0",), policy="passthrough", upstreams=("upstream0",)
)


@pytest.mark.parametrize(
    "sections",
    [
        pytest.param({}, id="absent"),
        pytest.param(
            {
                "limits": None,
                "timeouts": None,
                "shutdown": None,
                "log": None,
                "routes": None,
                "retry": None,
                "health": None,
                "http": None,
                "spool": None,
            },
            id="null",
        ),
        pytest.param(
            {"routes": [], "retry": {}, "health": {}, "spool": {"backoff": None}, "http": {}},
            id="empty",
        ),
    ],
)
def test_empty_sections_take_defaults(sections: dict[object, object]) -> None:
    config = parse(sections)
    assert config.limits == LimitsConfig()
    assert config.timeouts == TimeoutsConfig()
    assert config.shutdown == ShutdownConfig()
    assert config.log == LogConfig()
    assert config.routes == (IMPLICIT_ROUTE,)
    assert config.retry == RetryConfig()
    assert config.health == HealthConfig()
    assert config.spool == SpoolConfig(backoff=BackoffConfig())
    assert config.http == HttpConfig()


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


def test_full_delivery_values_are_kept() -> None:
    config = parse(
        {
            "retry": {
                "attempts": 20,
                "budget": 599.5,
                "hold_memory_bytes": 0,
                "lost_outcome": "defer",
                "phrases": ["Queue Full", "try later"],
                "take_over_partial": True,
            },
            "health": {
                "failures": 1,
                "cooldown": 0.5,
                "check_interval": 0,
                "check_starttls": True,
                "certificate_warning_days": 0,
            },
            "spool": {
                "path": "queue/smtpwarden",
                "max_age": 86400,
                "workers": 1,
                "backoff": {"initial": 60, "factor": 1, "maximum": 60, "jitter": 0},
            },
        }
    )
    assert config.retry == RetryConfig(
        attempts=20,
        budget=599.5,
        hold_memory_bytes=0,
        lost_outcome="defer",
        phrases=("Queue Full", "try later"),
        take_over_partial=True,
    )
    assert config.health == HealthConfig(
        failures=1,
        cooldown=0.5,
        check_interval=0.0,
        check_starttls=True,
        certificate_warning_days=0,
    )
    assert config.spool == SpoolConfig(
        path="queue/smtpwarden",
        max_age=86400.0,
        workers=1,
        backoff=BackoffConfig(initial=60.0, factor=1.0, maximum=60.0, jitter=0.0),
    )
    for number in (config.spool.max_age, config.spool.backoff.factor, config.spool.backoff.jitter):
        assert type(number) is float


@pytest.mark.parametrize("policy", POLICIES)
def test_route_values_are_kept(policy: Policy) -> None:
    config = parse(
        {
            "upstreams": [
                {"name": "mta1", "host": "mta1.test", "port": 25},
                {"name": "mta2", "host": "mta2.test", "port": 25},
            ],
            "routes": [{"name": "main", "policy": policy, "upstreams": ["mta2", "mta1"]}],
        }
    )
    assert config.routes == (
        RouteConfig(name="main", listeners=(), policy=policy, upstreams=("mta2", "mta1")),
    )


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
            "colour: unknown key (known keys: event_loop, hostname, workers, reuse_port, "
            "listeners, upstreams, routes, retry, health, spool, limits, timeouts, shutdown, log, "
            "http, transcripts)",
            id="unknown-key-listed",
        ),
        pytest.param(
            {7: "x"},
            "7: unknown key (known keys: event_loop, hostname, workers, reuse_port, listeners, "
            "upstreams, routes, retry, health, spool, limits, timeouts, shutdown, log, http, "
            "transcripts)",
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


# --- Delivery sections: one problem each -------------------------------------------

NAME_EXPECTED = "expected a name of letters, digits, '.', '_' and '-'"
BUDGET_EXPECTED = "expected seconds greater than 0 and less than 600"
TWO_UPSTREAMS = [
    {"name": "mta1", "host": "mta1.test", "port": 25},
    {"name": "mta2", "host": "mta2.test", "port": 25},
]


def route(**keys: object) -> dict[str, object]:
    """One route over BASE's only listener and upstream, with some keys replaced."""
    return {"upstreams": ["upstream0"], **keys}


def cases(section: str, table: Sequence[tuple[str, object, str]]) -> Iterator[object]:
    """pytest params for problems in one mapping section: (id, section value, problem)."""
    for case_id, value, expected in table:
        yield pytest.param({section: value}, expected, id=f"{section}-{case_id}")


ROUTE_CASES = [
    ("not-a-list", {"name": "a"}, "routes: expected a list of routes, got a mapping"),
    ("item-not-a-mapping", ["main"], 'routes[0]: expected a mapping, got "main"'),
    (
        "unknown-key",
        [route(policey="retry")],
        'routes[0].policey: unknown key (did you mean "policy"?)',
    ),
    (
        "unknown-key-listed",
        [route(domains=["example.com"])],
        "routes[0].domains: unknown key "
        "(known keys: name, listeners, recipient_domains, policy, upstreams)",
    ),
    (
        "unknown-key-suggestion",
        [route(recipient_domain=["example.com"])],
        'routes[0].recipient_domain: unknown key (did you mean "recipient_domains"?)',
    ),
    ("name-type", [route(name=5)], f"routes[0].name: {NAME_EXPECTED}, got 5"),
    ("name-value", [route(name="a b")], f'routes[0].name: {NAME_EXPECTED}, got "a b"'),
    (
        "name-duplicate",
        [route(name="r", listeners=["listener0"]), route(name="r")],
        'routes[1].name: duplicate route name "r" (first used by routes[0].name)',
    ),
    (
        "listeners-type",
        [route(listeners="listener0")],
        'routes[0].listeners: expected a list of listener names, got "listener0"',
    ),
    (
        "listeners-item-type",
        [route(listeners=[5])],
        f"routes[0].listeners[0]: {NAME_EXPECTED}, got 5",
    ),
    (
        "listeners-unknown",
        [route(listeners=["listener1"])],
        'routes[0].listeners[0]: no listener named "listener1" (did you mean "listener0"?)',
    ),
    (
        "listeners-duplicate",
        [route(listeners=["listener0", "listener0"])],
        'routes[0].listeners[1]: duplicate listener "listener0" '
        "(first used by routes[0].listeners[0])",
    ),
    (
        "policy-value",
        [route(policy="retyr")],
        'routes[0].policy: expected one of "passthrough", "retry", "requeue", got "retyr" '
        '(did you mean "retry"?)',
    ),
    (
        "policy-type",
        [route(policy=True)],
        'routes[0].policy: expected one of "passthrough", "retry", "requeue", got true',
    ),
    (
        "upstreams-missing",
        [{"name": "main"}],
        "routes[0].upstreams: missing required key (a list of upstream names)",
    ),
    (
        "upstreams-empty",
        [route(upstreams=[])],
        "routes[0].upstreams: expected a list of at least one upstream name, got an empty list",
    ),
    (
        "upstreams-null",
        [route(upstreams=None)],
        "routes[0].upstreams: expected a list of at least one upstream name, got null",
    ),
    (
        "upstreams-type",
        [route(upstreams="upstream0")],
        'routes[0].upstreams: expected a list of at least one upstream name, got "upstream0"',
    ),
    (
        "upstreams-item-type",
        [route(upstreams=[True])],
        f"routes[0].upstreams[0]: {NAME_EXPECTED}, got true",
    ),
    (
        "upstreams-unknown",
        [route(upstreams=["upstream0", "upstream1"])],
        'routes[0].upstreams[1]: no upstream named "upstream1" (did you mean "upstream0"?)',
    ),
    (
        "upstreams-duplicate",
        [route(upstreams=["upstream0", "upstream0"])],
        'routes[0].upstreams[1]: duplicate upstream "upstream0" '
        "(first used by routes[0].upstreams[0])",
    ),
]

RETRY_CASES = [
    ("not-a-mapping", 3, "retry: expected a mapping, got 3"),
    ("unknown-key", {"attempt": 3}, 'retry.attempt: unknown key (did you mean "attempts"?)'),
    ("attempts-type", {"attempts": "3"}, 'retry.attempts: expected an integer 0-20, got "3"'),
    ("attempts-bool", {"attempts": True}, "retry.attempts: expected an integer 0-20, got true"),
    ("attempts-negative", {"attempts": -1}, "retry.attempts: expected an integer 0-20, got -1"),
    ("attempts-high", {"attempts": 21}, "retry.attempts: expected an integer 0-20, got 21"),
    ("budget-type", {"budget": "2m"}, f'retry.budget: {BUDGET_EXPECTED}, got "2m"'),
    ("budget-bool", {"budget": True}, f"retry.budget: {BUDGET_EXPECTED}, got true"),
    ("budget-zero", {"budget": 0}, f"retry.budget: {BUDGET_EXPECTED}, got 0"),
    ("budget-negative", {"budget": -1.5}, f"retry.budget: {BUDGET_EXPECTED}, got -1.5"),
    ("budget-600", {"budget": 600}, f"retry.budget: {BUDGET_EXPECTED}, got 600"),
    ("budget-900", {"budget": 900}, f"retry.budget: {BUDGET_EXPECTED}, got 900"),
    ("budget-inf", {"budget": float("inf")}, f"retry.budget: {BUDGET_EXPECTED}, got .inf"),
    (
        "hold-negative",
        {"hold_memory_bytes": -1},
        "retry.hold_memory_bytes: expected an integer >= 0, got -1",
    ),
    (
        "hold-type",
        {"hold_memory_bytes": "1M"},
        'retry.hold_memory_bytes: expected an integer >= 0, got "1M"',
    ),
    (
        "hold-float",
        {"hold_memory_bytes": 1.5},
        "retry.hold_memory_bytes: expected an integer >= 0, got 1.5",
    ),
    (
        "lost-value",
        {"lost_outcome": "defr"},
        'retry.lost_outcome: expected one of "retry", "defer", got "defr" (did you mean "defer"?)',
    ),
    (
        "lost-type",
        {"lost_outcome": False},
        'retry.lost_outcome: expected one of "retry", "defer", got false',
    ),
    (
        "phrases-type",
        {"phrases": "transaction failed"},
        'retry.phrases: expected a list of phrases, got "transaction failed"',
    ),
    (
        "phrases-empty-string",
        {"phrases": [""]},
        'retry.phrases[0]: expected a phrase that is not blank, got ""',
    ),
    (
        "phrases-blank",
        {"phrases": ["queue full", " \t"]},
        'retry.phrases[1]: expected a phrase that is not blank, got " \\t"',
    ),
    (
        "phrases-item-type",
        {"phrases": [451]},
        "retry.phrases[0]: expected a phrase that is not blank, got 451",
    ),
    (
        "take-over-type",
        {"take_over_partial": "yes"},
        'retry.take_over_partial: expected true or false, got "yes"',
    ),
]

HEALTH_CASES = [
    ("not-a-mapping", [], "health: expected a mapping, got an empty list"),
    ("unknown-key", {"cooldwn": 3}, 'health.cooldwn: unknown key (did you mean "cooldown"?)'),
    ("failures-zero", {"failures": 0}, "health.failures: expected an integer >= 1, got 0"),
    ("failures-type", {"failures": 2.5}, "health.failures: expected an integer >= 1, got 2.5"),
    (
        "cooldown-zero",
        {"cooldown": 0},
        "health.cooldown: expected a number of seconds > 0, got 0",
    ),
    (
        "cooldown-type",
        {"cooldown": "30s"},
        'health.cooldown: expected a number of seconds > 0, got "30s"',
    ),
    (
        "check-interval-negative",
        {"check_interval": -1},
        "health.check_interval: expected a number of seconds >= 0, got -1",
    ),
    (
        "check-interval-type",
        {"check_interval": "30s"},
        'health.check_interval: expected a number of seconds >= 0, got "30s"',
    ),
    (
        "check-starttls-type",
        {"check_starttls": "yes"},
        'health.check_starttls: expected true or false, got "yes"',
    ),
    (
        "warning-days-negative",
        {"certificate_warning_days": -1},
        "health.certificate_warning_days: expected an integer >= 0, got -1",
    ),
    (
        "warning-days-type",
        {"certificate_warning_days": 1.5},
        "health.certificate_warning_days: expected an integer >= 0, got 1.5",
    ),
]

HTTP_CASES = [
    ("not-a-mapping", True, "http: expected a mapping, got true"),
    ("unknown-key", {"bind": "::1"}, "http.bind: unknown key (known keys: enabled, host, port)"),
    ("enabled-type", {"enabled": "no"}, 'http.enabled: expected true or false, got "no"'),
    (
        "host-type",
        {"host": "[::1]"},
        'http.host: expected a host name or IP address (IPv6 without brackets), got "[::1]"',
    ),
    ("port-high", {"port": 65536}, "http.port: expected an integer 0-65535, got 65536"),
    ("port-type", {"port": "9125"}, 'http.port: expected an integer 0-65535, got "9125"'),
]

SPOOL_CASES = [
    ("not-a-mapping", "spool", 'spool: expected a mapping, got "spool"'),
    (
        "unknown-key",
        {"folder": "q"},
        "spool.folder: unknown key (known keys: path, max_age, workers, backoff)",
    ),
    ("path-empty", {"path": ""}, 'spool.path: expected a folder path, got ""'),
    ("path-type", {"path": 5}, "spool.path: expected a folder path, got 5"),
    ("max-age-zero", {"max_age": 0}, "spool.max_age: expected a number of seconds > 0, got 0"),
    (
        "max-age-type",
        {"max_age": "5d"},
        'spool.max_age: expected a number of seconds > 0, got "5d"',
    ),
    ("workers-zero", {"workers": 0}, "spool.workers: expected an integer >= 1, got 0"),
    ("workers-type", {"workers": "4"}, 'spool.workers: expected an integer >= 1, got "4"'),
    ("backoff-not-a-mapping", {"backoff": 300}, "spool.backoff: expected a mapping, got 300"),
    (
        "backoff-unknown-key",
        {"backoff": {"minimum": 1}},
        'spool.backoff.minimum: unknown key (did you mean "maximum"?)',
    ),
    (
        "initial-zero",
        {"backoff": {"initial": 0}},
        "spool.backoff.initial: expected a number of seconds > 0, got 0",
    ),
    (
        "initial-type",
        {"backoff": {"initial": "5m"}},
        'spool.backoff.initial: expected a number of seconds > 0, got "5m"',
    ),
    (
        "factor-below-one",
        {"backoff": {"factor": 0.5}},
        "spool.backoff.factor: expected a number >= 1, got 0.5",
    ),
    (
        "factor-type",
        {"backoff": {"factor": "2"}},
        'spool.backoff.factor: expected a number >= 1, got "2"',
    ),
    (
        "factor-nan",
        {"backoff": {"factor": float("nan")}},
        "spool.backoff.factor: expected a number >= 1, got .nan",
    ),
    (
        "maximum-zero",
        {"backoff": {"maximum": 0}},
        "spool.backoff.maximum: expected a number of seconds > 0, got 0",
    ),
    (
        "maximum-below-initial",
        {"backoff": {"initial": 600, "maximum": 500}},
        "spool.backoff.maximum: expected a number of seconds >= initial (600), got 500",
    ),
    (
        "maximum-below-default-initial",
        {"backoff": {"maximum": 60}},
        "spool.backoff.maximum: expected a number of seconds >= initial (300), got 60",
    ),
    (
        "initial-above-default-maximum",
        {"backoff": {"initial": 5000}},
        "spool.backoff.initial: expected a number of seconds <= maximum (4000), got 5000",
    ),
    (
        "maximum-below-decimal-initial",
        {"backoff": {"initial": 0.5, "maximum": 0.25}},
        "spool.backoff.maximum: expected a number of seconds >= initial (0.5), got 0.25",
    ),
    (
        "jitter-high",
        {"backoff": {"jitter": 1.5}},
        "spool.backoff.jitter: expected a fraction 0-1, got 1.5",
    ),
    (
        "jitter-negative",
        {"backoff": {"jitter": -0.1}},
        "spool.backoff.jitter: expected a fraction 0-1, got -0.1",
    ),
    (
        "jitter-type",
        {"backoff": {"jitter": "20%"}},
        'spool.backoff.jitter: expected a fraction 0-1, got "20%"',
    ),
]


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        *cases("routes", ROUTE_CASES),
        *cases("retry", RETRY_CASES),
        *cases("health", HEALTH_CASES),
        *cases("spool", SPOOL_CASES),
        *cases("http", HTTP_CASES),
        pytest.param(
            {"upstreams": TWO_UPSTREAMS, "routes": [{"upstreams": ["mta1", "mta3"]}]},
            'routes[0].upstreams[1]: no upstream named "mta3" (did you mean "mta2"?)',
            id="routes-upstream-suggestion",
        ),
    ],
)
def test_delivery_problem(sections: dict[object, object], expected: str) -> None:
    assert problems(sections) == (expected,)


def test_http_values_are_kept() -> None:
    config = parse({"http": {"enabled": False, "host": "::1", "port": 0}})
    assert config.http == HttpConfig(enabled=False, host="::1", port=0)


@pytest.mark.parametrize(
    ("http", "expected"),
    [
        pytest.param(
            {"port": 2525},
            "http.port: expected a port no listener uses, got 2525 "
            "(127.0.0.1:2525 is listeners[0])",
            id="same-address",
        ),
        pytest.param({"port": 2525, "enabled": False}, None, id="disabled"),
        pytest.param({"port": 2525, "host": "127.0.0.2"}, None, id="other-host"),
        pytest.param({"port": 0, "host": "127.0.0.1"}, None, id="ephemeral"),
    ],
)
def test_http_endpoint_may_not_take_a_listener_address(
    http: dict[str, object], expected: str | None
) -> None:
    if expected is None:
        parse({"http": http})
    else:
        assert problems({"http": http}) == (expected,)


def test_huge_integer_is_a_problem_not_a_crash() -> None:
    huge = 10**400
    found = problems({"retry": {"budget": huge}, "timeouts": {"connect": huge}})
    assert found == (
        f"retry.budget: {BUDGET_EXPECTED}, got {huge}",
        f"timeouts.connect: expected a number of seconds > 0, got {huge}",
    )


def test_delivery_problems_reported_at_once_in_document_order() -> None:
    data = yaml.safe_load(
        """
        spool: {workers: 0, backoff: {jitter: 2}}
        listeners: [{name: a, port: 25}]
        routes:
          - listeners: [b]
            policy: hold
            upstreams: [mta3]
        upstreams: [{name: mta, host: mta.test, port: 25}]
        retry: {budget: 900}
        health: {failures: 0}
        """
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="relay.yaml")
    assert caught.value.problems == (
        "spool.workers: expected an integer >= 1, got 0",
        "spool.backoff.jitter: expected a fraction 0-1, got 2",
        'routes[0].listeners[0]: no listener named "b"',
        'routes[0].policy: expected one of "passthrough", "retry", "requeue", got "hold"',
        'routes[0].upstreams[0]: no upstream named "mta3" (did you mean "mta"?)',
        f"retry.budget: {BUDGET_EXPECTED}, got 900",
        "health.failures: expected an integer >= 1, got 0",
    )


# --- Routes: which route matches each listener ------------------------------------------

THREE_LISTENERS = [
    {"name": "a", "port": 2525},
    {"name": "b", "port": 2526},
    {"name": "c", "port": 2527},
]


def no_route(listener: str) -> str:
    return (
        f'routes: no route matches listener "{listener}" (name it in a route\'s listeners, '
        "or add a route that leaves listeners empty)"
    )


def routed(routes: object) -> dict[object, object]:
    return {"listeners": THREE_LISTENERS, "upstreams": TWO_UPSTREAMS, "routes": routes}


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        pytest.param(
            [{"listeners": ["a"], "upstreams": ["mta1"]}, {"upstreams": ["mta2"]}],
            {"a": "route0", "b": "route1", "c": "route1"},
            id="named-and-rest",
        ),
        pytest.param(
            [{"upstreams": ["mta2"]}, {"listeners": ["c", "a"], "upstreams": ["mta1"]}],
            {"a": "route1", "b": "route0", "c": "route1"},
            id="rest-first",
        ),
        pytest.param(
            [{"name": "all", "listeners": None, "upstreams": ["mta1"]}],
            {"a": "all", "b": "all", "c": "all"},
            id="listeners-null",
        ),
        pytest.param(
            [
                {"listeners": ["a"], "upstreams": ["mta1"]},
                {"listeners": ["b", "c"], "upstreams": ["mta1"]},
            ],
            {"a": "route0", "b": "route1", "c": "route1"},
            id="all-named",
        ),
        pytest.param(
            [
                {"listeners": ["a", "b", "c"], "upstreams": ["mta1"]},
                {"name": "unused", "listeners": [], "upstreams": ["mta2"]},
            ],
            {"a": "route0", "b": "route0", "c": "route0"},
            id="rest-matches-nothing",
        ),
    ],
)
def test_route_for(routes: object, expected: dict[str, str]) -> None:
    config = parse(routed(routes))
    assert {name: route_for(config, name).name for name in expected} == expected


def test_route_for_implicit_routes() -> None:
    config = parse(
        {
            "listeners": [{"name": "a", "port": 25}, {"name": "b", "port": 26, "upstream": "mta2"}],
            "upstreams": TWO_UPSTREAMS,
        }
    )
    assert config.routes == (
        RouteConfig(name="a", listeners=("a",), policy="passthrough", upstreams=("mta1",)),
        RouteConfig(name="b", listeners=("b",), policy="passthrough", upstreams=("mta2",)),
    )
    assert route_for(config, "b") is config.routes[1]


def test_listener_upstream_is_ignored_when_routes_exist() -> None:
    config = parse(
        {
            "listeners": [{"name": "a", "port": 25, "upstream": "mta1"}],
            "upstreams": TWO_UPSTREAMS,
            "routes": [{"policy": "requeue", "upstreams": ["mta2"]}],
        }
    )
    assert config.listeners[0].upstream == "mta1"
    assert route_for(config, "a") == RouteConfig(
        name="route0", listeners=(), policy="requeue", upstreams=("mta2",)
    )


def test_route_for_unknown_listener() -> None:
    config = parse(routed([{"upstreams": ["mta1"]}]))
    with pytest.raises(KeyError):
        route_for(config, "d")


def test_route_for_config_built_without_routes() -> None:
    config = dataclasses.replace(parse(), routes=())
    with pytest.raises(KeyError):
        route_for(config, "listener0")


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        pytest.param(
            [
                {"name": "first", "listeners": ["a", "b"], "upstreams": ["mta1"]},
                {"listeners": ["c", "a"], "upstreams": ["mta2"]},
            ],
            ['routes[1].listeners[1]: listener "a" already matched by route "first" (routes[0])'],
            id="named-twice",
        ),
        pytest.param(
            [{"upstreams": ["mta1"]}, {"name": "other", "upstreams": ["mta2"]}],
            [
                "routes[1]: only one route without recipient_domains may leave listeners empty; "
                'route "route0" (routes[0]) does'
            ],
            id="two-rest-routes",
        ),
        pytest.param(
            [
                {"listeners": ["a", "b", "c"], "upstreams": ["mta1"]},
                {"upstreams": ["mta1"]},
                {"listeners": [], "upstreams": ["mta2"]},
            ],
            [
                "routes[2]: only one route without recipient_domains may leave listeners empty; "
                'route "route1" (routes[1]) does'
            ],
            id="two-rest-routes-matching-nothing",
        ),
        pytest.param(
            [{"listeners": ["a"], "upstreams": ["mta1"]}],
            [no_route("b"), no_route("c")],
            id="unmatched",
        ),
        pytest.param(
            [{"listeners": ["a", "bb"], "upstreams": ["mta1"]}],
            ['routes[0].listeners[1]: no listener named "bb" (did you mean "b"?)'],
            id="unknown-listener-does-not-also-leave-others-unmatched",
        ),
        pytest.param(
            [{"listeners": "a", "upstreams": ["mta1"]}],
            ['routes[0].listeners: expected a list of listener names, got "a"'],
            id="broken-listeners-do-not-also-leave-others-unmatched",
        ),
        pytest.param(
            [{"listeners": ["a"], "upstreams": ["mta1"]}, "b"],
            ['routes[1]: expected a mapping, got "b"'],
            id="broken-route-does-not-also-leave-others-unmatched",
        ),
    ],
)
def test_route_coverage_problems(routes: object, expected: list[str]) -> None:
    assert problems(routed(routes)) == tuple(expected)


def test_broken_listener_does_not_flag_route_references() -> None:
    found = problems(
        {
            "listeners": [{"name": "a", "port": 25}, {"name": 5, "port": 26}],
            "routes": [{"listeners": ["a"], "upstreams": ["upstream0"]}],
        }
    )
    assert found == (f"listeners[1].name: {NAME_EXPECTED}, got 5",)


# --- Routes: recipient domains ---------------------------------------------------

DOMAIN_EXPECTED = (
    'expected a domain name, "example.com" (that domain) or ".example.com" (its subdomains)'
)
DOMAINS_EXPECTED = (
    "expected a list of at least one domain (omit the key for a route that takes every recipient)"
)
SESSION_CONNECTED = "(a session is connected before its recipients are known)"


def domain_route(*domains: object, **keys: object) -> dict[str, object]:
    """A domain route on every listener, starting at mta1 like MAIN_ROUTE."""
    return {"recipient_domains": list(domains), "upstreams": ["mta1"], **keys}


MAIN_ROUTE = {"name": "main", "upstreams": ["mta1"]}


def test_domain_route_values_are_kept() -> None:
    config = parse(
        routed(
            [
                MAIN_ROUTE,
                domain_route(
                    "Example.COM.",
                    ".Sub.Example.com",
                    "Bücher.example",
                    name="d",
                    listeners=["a"],
                    policy="requeue",
                    upstreams=["mta1", "mta2"],
                ),
            ]
        )
    )
    assert config.routes == (
        RouteConfig(name="main", listeners=(), policy="passthrough", upstreams=("mta1",)),
        RouteConfig(
            name="d",
            listeners=("a",),
            recipient_domains=("example.com", ".sub.example.com", "bücher.example"),
            policy="requeue",
            upstreams=("mta1", "mta2"),
        ),
    )


@pytest.mark.parametrize(
    "entry",
    [
        "x",
        "xn--bcher-kva.example",
        "_dmarc.example.com",
        "192.0.2.1",
        "a-b.c_d.example",
        "例え.テスト",
        "a." * 126 + "b",  # 253 characters
        ".a" * 126 + "b.",  # a leading dot and 252 characters, and a trailing dot
    ],
)
def test_domain_entry_accepted(entry: str) -> None:
    config = parse(routed([MAIN_ROUTE, domain_route(entry)]))
    assert config.routes[1].recipient_domains == (entry.lower().removesuffix("."),)


@pytest.mark.parametrize(
    ("entry", "shown"),
    [
        pytest.param("", '""', id="empty"),
        pytest.param(".", '"."', id="dot"),
        pytest.param("..", '".."', id="two-dots"),
        pytest.param("..example.com", '"..example.com"', id="two-leading-dots"),
        pytest.param("example..com", '"example..com"', id="empty-label"),
        pytest.param("example.com..", '"example.com.."', id="two-trailing-dots"),
        pytest.param(" example.com", '" example.com"', id="space"),
        pytest.param("example.com\n", '"example.com\\n"', id="newline"),
        pytest.param("exa\u3000mple.com", '"exa\u3000mple.com"', id="wide-space"),
        pytest.param("exa\u200bmple.com", '"exa\u200bmple.com"', id="zero-width-space"),
        pytest.param("user@example.com", '"user@example.com"', id="at"),
        pytest.param("@example.com", '"@example.com"', id="leading-at"),
        pytest.param("[192.0.2.1]", '"[192.0.2.1]"', id="address-literal"),
        pytest.param("example.com:25", '"example.com:25"', id="port"),
        pytest.param("a." * 126 + "bc", f'"{("a." * 126)[:57]}..."', id="254-characters"),
        pytest.param(5, "5", id="integer"),
        pytest.param(None, "null", id="null"),
        pytest.param(["example.com"], "a list", id="list"),
        pytest.param(
            "*.example.com",
            '"*.example.com" (write ".example.com" for its subdomains)',
            id="wildcard",
        ),
    ],
)
def test_domain_entry_problem(entry: object, shown: str) -> None:
    found = problems(routed([MAIN_ROUTE, domain_route("ok.example", entry)]))
    assert found == (f"routes[1].recipient_domains[1]: {DOMAIN_EXPECTED}, got {shown}",)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param([], "an empty list", id="empty-list"),
        pytest.param(None, "null", id="null"),
        pytest.param("example.com", '"example.com"', id="string"),
        pytest.param({"example.com": None}, "a mapping", id="mapping"),
    ],
)
def test_recipient_domains_not_a_list(value: object, shown: str) -> None:
    # Still a domain route: it does not take the listeners from "main" too.
    broken = {"recipient_domains": value, "upstreams": ["mta1"]}
    found = problems(routed([MAIN_ROUTE, broken]))
    assert found == (f"routes[1].recipient_domains: {DOMAINS_EXPECTED}, got {shown}",)


def test_recipient_domains_duplicate_in_one_route() -> None:
    routes = [MAIN_ROUTE, domain_route("example.com", ".example.com", "EXAMPLE.com.")]
    assert problems(routed(routes)) == (
        'routes[1].recipient_domains[2]: duplicate domain "example.com" '
        "(first used by routes[1].recipient_domains[0])",
    )


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        pytest.param(["a", "b"], ["c", "b"], 'listener "b"', id="named"),
        pytest.param(None, ["c", "b"], 'listener "c"', id="every-then-named"),
        pytest.param(["b"], [], 'listener "b"', id="named-then-every"),
        pytest.param(None, None, "every listener", id="every"),
    ],
)
def test_recipient_domain_in_two_routes_on_one_listener(
    first: list[str] | None, second: list[str] | None, shared: str
) -> None:
    routes = [
        MAIN_ROUTE,
        domain_route(".example.com", "example.com", name="one", listeners=first),
        domain_route("other.example", "Example.com", name="two", listeners=second),
    ]
    assert problems(routed(routes)) == (
        'routes[2].recipient_domains[1]: domain "example.com" is also listed by route "one" '
        f"(routes[1]), and both apply to {shared}",
    )


@pytest.mark.parametrize(
    "routes",
    [
        pytest.param(
            [
                domain_route("example.com", listeners=["a"]),
                domain_route("example.com", listeners=["b", "c"]),
            ],
            id="disjoint-listeners",
        ),
        pytest.param(
            [domain_route("example.com"), domain_route(".example.com", "sub.example.com")],
            id="domain-and-subdomains",
        ),
    ],
)
def test_recipient_domains_that_do_not_overlap(routes: list[object]) -> None:
    config = parse(routed([MAIN_ROUTE, *routes]))
    assert len(config.routes) == 3


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        pytest.param(
            [
                {"name": "in", "listeners": ["a", "b"], "upstreams": ["mta1"]},
                {"name": "other", "upstreams": ["mta2"]},
                domain_route("example.com", name="d", upstreams=["mta2", "mta1"]),
            ],
            [
                'routes[2].upstreams[0]: expected "mta1", the first upstream of route "in" '
                f'(routes[0]) that listener "a" uses {SESSION_CONNECTED}, got "mta2"'
            ],
            id="every-listener",
        ),
        pytest.param(
            [
                {"listeners": ["a"], "upstreams": ["mta1", "mta2"]},
                {"upstreams": ["mta2", "mta1"]},
                domain_route("example.com", listeners=["c", "a"], upstreams=["mta1"]),
            ],
            [
                'routes[2].upstreams[0]: expected "mta2", the first upstream of route '
                f'"route1" (routes[1]) that listener "c" uses {SESSION_CONNECTED}, got "mta1"'
            ],
            id="named-listeners",
        ),
        pytest.param(
            [
                {"name": "one", "listeners": ["a"], "upstreams": ["mta1"]},
                {"name": "two", "upstreams": ["mta2"]},
                domain_route("example.com", upstreams=["mta3"]),
            ],
            ['routes[2].upstreams[0]: no upstream named "mta3" (did you mean "mta2"?)'],
            id="unknown-upstream-reported-once",
        ),
        pytest.param(
            [
                {"listeners": ["a"], "upstreams": ["mta1"]},
                domain_route("example.com", listeners=["b"], upstreams=["mta2"]),
            ],
            [
                no_route("b")[:-1] + '; route "route1" (routes[1]) has recipient_domains)',
                no_route("c"),
            ],
            id="only-coverage-when-a-listener-has-no-route",
        ),
    ],
)
def test_domain_route_first_upstream(routes: object, expected: list[str]) -> None:
    assert problems(routed(routes)) == tuple(expected)


def test_domain_route_first_upstream_matches() -> None:
    routes = [
        {"listeners": ["a"], "upstreams": ["mta1"]},
        {"upstreams": ["mta2"]},
        domain_route("one.example", listeners=["a"], upstreams=["mta1", "mta2"]),
        domain_route("two.example", listeners=["b", "c"], upstreams=["mta2"]),
    ]
    assert len(parse(routed(routes)).routes) == 4


def test_broken_listener_does_not_flag_domain_route_upstream() -> None:
    found = problems(
        {
            "listeners": [{"name": "a", "port": 25}, {"name": 5, "port": 26}],
            "upstreams": TWO_UPSTREAMS,
            "routes": [MAIN_ROUTE, domain_route("example.com", upstreams=["mta2"])],
        }
    )
    assert found == (f"listeners[1].name: {NAME_EXPECTED}, got 5",)


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        pytest.param(
            [domain_route("example.com")],
            [
                no_route(name)[:-1] + '; route "route0" (routes[0]) has recipient_domains)'
                for name in "abc"
            ],
            id="only-a-domain-route",
        ),
        pytest.param(
            [{"listeners": ["a", "b"], "upstreams": ["mta1"]}, domain_route("x.example")],
            [no_route("c")[:-1] + '; route "route1" (routes[1]) has recipient_domains)'],
            id="domain-route-does-not-take-the-rest",
        ),
        pytest.param(
            [
                {"listeners": ["a", "b", "c"], "upstreams": ["mta1"]},
                {"recipient_domains": 5, "listeners": ["a"], "upstreams": ["mta1"]},
            ],
            [f"routes[1].recipient_domains: {DOMAINS_EXPECTED}, got 5"],
            id="broken-domain-route-is-still-one",
        ),
    ],
)
def test_domain_routes_do_not_cover_listeners(routes: object, expected: list[str]) -> None:
    assert problems(routed(routes)) == tuple(expected)


def test_several_domain_routes_may_leave_listeners_empty() -> None:
    routes = [MAIN_ROUTE, domain_route("one.example"), domain_route("two.example")]
    config = parse(routed(routes))
    assert [route.name for route in domain_routes(config.routes, "b")] == ["route1", "route2"]


def test_domain_route_problems_reported_at_once_in_document_order() -> None:
    data = yaml.safe_load(
        """
        listeners: [{name: a, port: 25}, {name: b, port: 26}]
        upstreams: [{name: mx1, host: mx1.test, port: 25}, {name: mx2, host: mx2.test, port: 25}]
        routes:
          - {name: main, upstreams: [mx1]}
          - name: one
            listeners: [a]
            recipient_domains: [example.com, "*.example.com", Example.com]
            upstreams: [mx1]
          - name: two
            recipient_domains: [example.org, example.com]
            policy: requeue
            upstreams: [mx2]
        retry: {attempts: -1}
        """
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="relay.yaml")
    assert caught.value.problems == (
        f'routes[1].recipient_domains[1]: {DOMAIN_EXPECTED}, got "*.example.com" '
        '(write ".example.com" for its subdomains)',
        'routes[1].recipient_domains[2]: duplicate domain "example.com" '
        "(first used by routes[1].recipient_domains[0])",
        'routes[2].recipient_domains[1]: domain "example.com" is also listed by route "one" '
        '(routes[1]), and both apply to listener "a"',
        'routes[2].upstreams[0]: expected "mx1", the first upstream of route "main" '
        f'(routes[0]) that listener "a" uses {SESSION_CONNECTED}, got "mx2"',
        "retry.attempts: expected an integer 0-20, got -1",
    )


def test_route_lookups_tell_domain_routes_apart() -> None:
    config = parse(
        routed(
            [
                domain_route("one.example", name="d1", listeners=["a"]),
                {"name": "main", "upstreams": ["mta1"]},
                domain_route("two.example", name="d2"),
                {"name": "for-b", "listeners": ["b"], "upstreams": ["mta1"]},
                domain_route("three.example", name="d3", listeners=["b", "a"]),
            ]
        )
    )
    assert {name: route_for(config, name).name for name in "abc"} == {
        "a": "main",
        "b": "for-b",
        "c": "main",
    }
    assert find_route(config.routes, "b") is config.routes[3]

    def names(listener: str) -> list[str]:
        return [route.name for route in domain_routes(config.routes, listener)]

    assert (names("a"), names("b"), names("c")) == (["d1", "d2", "d3"], ["d2", "d3"], ["d2"])
    assert domain_routes(config.routes, "unknown") == (config.routes[2],)


def test_find_route_without_a_listener_route() -> None:
    routes = (
        RouteConfig(
            name="d",
            listeners=(),
            recipient_domains=("example.com",),
            policy="passthrough",
            upstreams=("mta",),
        ),
    )
    assert find_route(routes, "a") is None
    assert domain_routes(routes, "a") == routes


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
    for listener in config.listeners:
        assert route_for(config, listener.name) in config.routes


def test_full_example_routes() -> None:
    config = load_config(CONFIGS / "smtpwarden.yaml")
    assert config.routes == (
        RouteConfig(name="outbound", listeners=("submission",), policy="retry", upstreams=("mta",)),
        RouteConfig(name="capture", listeners=(), policy="passthrough", upstreams=("capture",)),
    )
    assert route_for(config, "submission").name == "outbound"
    assert route_for(config, "capture").name == "capture"


def test_quickstart_has_one_implicit_passthrough_route() -> None:
    config = load_config(CONFIGS / "quickstart.yaml")
    assert config.routes == (IMPLICIT_ROUTE,)


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
    assert set(data["upstreams"][0]["tls"]) == {
        field.name for field in dataclasses.fields(UpstreamTls)
    }
    # recipient_domains is shown in the commented domain route (see below).
    route_keys = {field.name for field in dataclasses.fields(RouteConfig)}
    assert set(data["routes"][0]) == route_keys - {"recipient_domains"}
    for section, keys in [
        (data["retry"], RetryConfig),
        (data["health"], HealthConfig),
        (data["http"], HttpConfig),
        (data["spool"], SpoolConfig),
        (data["spool"]["backoff"], BackoffConfig),
    ]:
        assert set(section) == {field.name for field in dataclasses.fields(keys)}
    config = load_config(CONFIGS / "smtpwarden.yaml")
    assert config.event_loop == "auto"
    listener = config.listeners[0]
    assert (listener.tls, listener.auth, listener.proxy_protocol, listener.allow) == (
        None,
        None,
        None,
        (),
    )
    upstream = config.upstreams[0]
    assert (upstream.tls, upstream.xclient, upstream.xforward) == (UpstreamTls(), False, False)
    assert config.limits == LimitsConfig()
    assert config.timeouts == TimeoutsConfig()
    assert config.shutdown == ShutdownConfig()
    assert config.log == LogConfig()
    assert config.retry == RetryConfig()
    assert config.health == HealthConfig()
    assert config.spool == SpoolConfig(backoff=BackoffConfig())
    assert config.http == HttpConfig()
    transcripts = data["listeners"][0]["transcripts"]
    assert set(transcripts) == {field.name for field in dataclasses.fields(ListenerTranscripts)}
    assert set(transcripts["match"]) == {
        field.name for field in dataclasses.fields(TranscriptMatch)
    }
    assert set(data["transcripts"]) == {
        field.name for field in dataclasses.fields(TranscriptsConfig)
    }
    assert listener.transcripts == ListenerTranscripts()
    assert config.transcripts == TranscriptsConfig()


def documented_keys(text: str) -> Iterator[tuple[str, bool]]:
    """Yield (key path without list indexes, documented) for each key holding a value.

    A key is documented when the comment lines right above it (a list item's
    "- #" line included) give its default or say it is required.
    """
    lines = text.splitlines()
    root = yaml.compose(text)
    assert root is not None
    pending: list[tuple[yaml.Node, str]] = [(root, "")]
    while pending:
        node, path = pending.pop()
        if isinstance(node, yaml.SequenceNode):
            pending.extend((item, f"{path}[]") for item in node.value)
            continue
        if not isinstance(node, yaml.MappingNode):
            continue
        for key_node, value_node in node.value:
            key_path = f"{path}.{key_node.value}" if path else key_node.value
            is_leaf = isinstance(value_node, yaml.ScalarNode) or (
                isinstance(value_node, yaml.SequenceNode)
                and all(isinstance(item, yaml.ScalarNode) for item in value_node.value)
            )
            if not is_leaf:
                pending.append((value_node, key_path))
                continue
            comment: list[str] = []
            for line in reversed(lines[: key_node.start_mark.line]):
                found = re.match(r"\s*(?:- )?#(.*)", line)
                if not found:
                    break
                comment.append(found[1])
            text_above = " ".join(comment)
            yield key_path, "Default:" in text_above or "Required." in text_above


def test_full_example_documents_every_key() -> None:
    found = list(documented_keys((CONFIGS / "smtpwarden.yaml").read_text(encoding="utf-8")))
    every = {path for path, _ in found}
    documented = {path for path, is_documented in found if is_documented}
    assert every == documented
    for section, keys in [
        ("listeners[]", ListenerConfig),
        ("upstreams[]", UpstreamConfig),
        ("upstreams[].tls", UpstreamTls),
        ("routes[]", RouteConfig),
        ("retry", RetryConfig),
        ("health", HealthConfig),
        ("http", HttpConfig),
        ("spool", SpoolConfig),
        ("spool.backoff", BackoffConfig),
        ("limits", LimitsConfig),
        ("listeners[].transcripts", ListenerTranscripts),
        ("listeners[].transcripts.match", TranscriptMatch),
        ("transcripts", TranscriptsConfig),
    ]:
        sections = (
            "upstreams[].tls",
            "spool.backoff",
            "listeners[].transcripts",
            "listeners[].transcripts.match",
        )
        for field in dataclasses.fields(keys):
            if f"{section}.{field.name}" not in sections and (field.name != "recipient_domains"):
                assert f"{section}.{field.name}" in documented


def commented_route(text: str, name: str = "partners") -> tuple[str, str]:
    """Return the comment above a commented list item of the full example, and the item uncommented.

    The item is the one whose first line is "  # - name: NAME".
    """
    lines = text.splitlines()
    start = lines.index(f"  # - name: {name}")
    end = start
    while end < len(lines) and lines[end].startswith(("  # - ", "  #   ")):
        end += 1
    first = start
    while lines[first - 1].startswith("  # ") and not lines[first - 1].startswith("  #   "):
        first -= 1
    comment = " ".join(line.removeprefix("  # ") for line in lines[first:start])
    route = "\n".join(line.removeprefix("  # ") for line in lines[start:end])
    return comment, route


def test_full_example_domain_route_is_documented_and_valid() -> None:
    text = (CONFIGS / "smtpwarden.yaml").read_text(encoding="utf-8")
    comment, route_text = commented_route(text)
    assert "recipient_domains" in comment
    assert "Default:" in comment
    assert "452 4.5.3" in comment
    example = yaml.safe_load(route_text)
    assert set(example[0]) == {field.name for field in dataclasses.fields(RouteConfig)}
    data = yaml.safe_load(text)
    data["routes"].extend(example)
    config = parse_config(data, source="smtpwarden.yaml")
    assert config.routes[-1] == RouteConfig(
        name="partners",
        listeners=("submission",),
        recipient_domains=("partner.example", ".partner.example"),
        policy="requeue",
        upstreams=("mta",),
    )
    assert route_for(config, "submission").name == "outbound"
    assert domain_routes(config.routes, "submission") == (config.routes[-1],)
    assert domain_routes(config.routes, "capture") == ()


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
    assert config.routes == (IMPLICIT_ROUTE,)
    assert config.retry == RetryConfig()
    assert config.health == HealthConfig()
    assert config.spool == SpoolConfig(backoff=BackoffConfig())


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
    assert config.routes == (
        RouteConfig(
            name=only_listener.name,
            listeners=(only_listener.name,),
            policy="passthrough",
            upstreams=(only_upstream.name,),
        ),
    )
    assert route_for(config, only_listener.name) is config.routes[0]
    assert config.retry == RetryConfig()
    assert config.spool == SpoolConfig(backoff=BackoffConfig())


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
