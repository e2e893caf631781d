"""Transcript settings: listeners' capture, the folder and retention, the control file."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from smtpwarden.capturecontrol import (
    CONTROL_FILE,
    CaptureOverride,
    control_path,
    parse_control,
    read_control,
    write_control,
)
from smtpwarden.config import (
    Config,
    ConfigError,
    ListenerTranscripts,
    TranscriptMatch,
    TranscriptsConfig,
    parse_config,
)
from smtpwarden.configtranscripts import describe

BASE: dict[str, object] = {
    "hostname": "relay.test",
    "upstreams": [{"host": "mta.test", "port": 25}],
}


def parse(transcripts: object = None, top: Mapping[str, object] | None = None) -> Config:
    listener: dict[str, object] = {"port": 2525}
    if transcripts is not None:
        listener["transcripts"] = transcripts
    document = {**BASE, "listeners": [listener], **(top or {})}
    return parse_config(document, source="test.yaml")


def problems(transcripts: object = None, top: Mapping[str, object] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(transcripts, top)
    return list(caught.value.problems)


def test_defaults() -> None:
    config = parse()
    assert config.listeners[0].transcripts == ListenerTranscripts()
    assert ListenerTranscripts() == ListenerTranscripts(
        mode="off", match=TranscriptMatch(), bodies=False, max_bytes=1048576
    )
    assert config.transcripts == TranscriptsConfig(
        path="transcripts", max_age=604800.0, max_total_bytes=1073741824
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (False, ListenerTranscripts()),
        ("off", ListenerTranscripts()),
        ("failure", ListenerTranscripts(mode="failure")),
        ("always", ListenerTranscripts(mode="always")),
        ({"mode": False}, ListenerTranscripts()),
        ({}, ListenerTranscripts()),
        ({"mode": "always", "bodies": True}, ListenerTranscripts(mode="always", bodies=True)),
        (
            {"mode": "failure", "max_bytes": 4096},
            ListenerTranscripts(mode="failure", max_bytes=4096),
        ),
        (
            {
                "mode": "match",
                "match": {
                    "networks": ["192.0.2.0/24", "2001:db8::1"],
                    "senders": ["Alice@Example.org", "@example.net", "@example.net"],
                    "recipients": ["@EXAMPLE.com"],
                    "sessions": 5,
                },
            },
            ListenerTranscripts(
                mode="match",
                match=TranscriptMatch(
                    networks=(
                        ipaddress.ip_network("192.0.2.0/24"),
                        ipaddress.ip_network("2001:db8::1/128"),
                    ),
                    senders=("alice@example.org", "@example.net"),
                    recipients=("@example.com",),
                    sessions=5,
                ),
            ),
        ),
        ({"mode": "match", "match": None}, ListenerTranscripts(mode="match")),
    ],
    ids=[
        "false",
        "off",
        "failure",
        "always",
        "mode-false",
        "empty",
        "bodies",
        "max-bytes",
        "match",
        "match-null",
    ],
)
def test_listener_transcripts(raw: object, expected: ListenerTranscripts) -> None:
    assert parse(raw).listeners[0].transcripts == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("sometimes", 'listeners[0].transcripts: expected one of "off", "failure", "always", '
         '"match", got "sometimes"'),
        (7, "listeners[0].transcripts: expected a mode or a mapping, got 7"),
        ({"mode": "on"}, 'listeners[0].transcripts.mode: expected one of "off", "failure", '
         '"always", "match", got "on"'),
        ({"mdoe": "always"}, 'listeners[0].transcripts.mdoe: unknown key (did you mean "mode"?)'),
        ({"bodies": "yes"}, 'listeners[0].transcripts.bodies: expected true or false, got "yes"'),
        ({"max_bytes": 100}, "listeners[0].transcripts.max_bytes: expected an integer >= 4096, "
         "got 100"),
        ({"match": []}, "listeners[0].transcripts.match: expected a mapping, got an empty list"),
        ({"match": {"sessions": -1}}, "listeners[0].transcripts.match.sessions: expected an "
         "integer >= 0, got -1"),
        ({"match": {"senders": "a@b.example"}}, "listeners[0].transcripts.match.senders: "
         'expected a list of addresses or @domains, got "a@b.example"'),
        ({"match": {"senders": ["nobody"]}}, "listeners[0].transcripts.match.senders[0]: "
         'expected an address ("user@example.org") or a domain ("@example.org"), got "nobody"'),
        ({"match": {"recipients": ["<a@b.example>"]}}, "listeners[0].transcripts.match."
         "recipients[0]: expected an address (\"user@example.org\") or a domain "
         '("@example.org"), got "<a@b.example>"'),
        ({"match": {"networks": ["10.0.0.1/8"]}}, "listeners[0].transcripts.match.networks[0]: "),
    ],
    ids=[
        "mode-word",
        "not-a-mapping",
        "mode-key",
        "unknown-key",
        "bodies",
        "max-bytes",
        "match-list",
        "sessions",
        "senders-not-a-list",
        "sender",
        "recipient-brackets",
        "network-host-bits",
    ],
)  # fmt: skip
def test_listener_transcripts_problems(raw: object, expected: str) -> None:
    (problem,) = problems(raw)
    assert problem.startswith(expected)


def test_top_level() -> None:
    section = {"path": "/var/lib/smtpwarden/t", "max_age": 0, "max_total_bytes": 0}
    assert parse(top={"transcripts": section}).transcripts == TranscriptsConfig(
        path="/var/lib/smtpwarden/t", max_age=0.0, max_total_bytes=0
    )
    assert parse(top={"transcripts": None}).transcripts == TranscriptsConfig()
    assert problems(top={"transcripts": {"path": "", "max_age": -1, "max_total": 1}}) == [
        'transcripts.max_total: unknown key (did you mean "max_total_bytes"?)',
        'transcripts.path: expected a folder path, got ""',
        "transcripts.max_age: expected a number of seconds >= 0, got -1",
    ]


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (ListenerTranscripts(), "off"),
        (ListenerTranscripts(mode="off", bodies=True), "off"),
        (ListenerTranscripts(mode="always", bodies=True), "always, with bodies"),
        (
            ListenerTranscripts(
                mode="match",
                match=TranscriptMatch(
                    networks=(ipaddress.ip_network("192.0.2.0/24"),),
                    senders=("@a.example",),
                    recipients=("b@c.example",),
                    sessions=3,
                ),
            ),
            "match, network 192.0.2.0/24, sender @a.example, recipient b@c.example, 3 sessions",
        ),
    ],
)
def test_describe(settings: ListenerTranscripts, words: str) -> None:
    assert describe(settings) == words


# -- the control file ------------------------------------------------------------------

OVERRIDE = CaptureOverride(
    mode="match",
    match=TranscriptMatch(
        networks=(ipaddress.ip_network("192.0.2.0/24"),),
        senders=("a@b.example",),
        recipients=(),
        sessions=2,
    ),
    bodies=True,
    max_bytes=None,
    set_at="2025-03-01T09:15:02.123Z",
)


def test_control_file_round_trip(tmp_path: Path) -> None:
    path = control_path(tmp_path / "new")
    assert path.name == CONTROL_FILE
    assert read_control(path) == {}
    other = CaptureOverride(
        mode="always", match=TranscriptMatch(), bodies=False, max_bytes=8192, set_at="x"
    )
    write_control(path, {"main": OVERRIDE, "other": other})
    assert read_control(path) == {"main": OVERRIDE, "other": other}
    assert json.loads(path.read_text())["listeners"]["other"]["max_bytes"] == 8192
    assert "max_bytes" not in json.loads(path.read_text())["listeners"]["main"]
    assert sorted(p.name for p in path.parent.iterdir()) == [CONTROL_FILE]  # no temporary left
    write_control(path, {})
    assert not path.exists()
    write_control(path, {})


def test_override_applied() -> None:
    configured = ListenerTranscripts(mode="failure", max_bytes=5000)
    assert OVERRIDE.applied_to(configured) == ListenerTranscripts(
        mode="match", match=OVERRIDE.match, bodies=True, max_bytes=5000
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], ["top level: expected a mapping, got an empty list"]),
        ({"listener": {}}, ['listener: unknown key (did you mean "listeners"?)']),
        ({"listeners": []}, ["listeners: expected a mapping of listener names, got an empty list"]),
        ({"listeners": {"main": {}}}, ["listeners.main.mode: missing required key"]),
        (
            {"listeners": {"main": {"mode": "on", "max_bytes": 1, "when": 1}}},
            [
                "listeners.main.when: unknown key (known keys: mode, match, bodies, max_bytes, "
                "set_at)",
                'listeners.main.mode: expected one of "off", "failure", "always", "match", '
                'got "on"',
                "listeners.main.max_bytes: expected an integer >= 4096, got 1",
            ],
        ),
        (
            {"listeners": {"bad name!": {"mode": "always"}}},
            ["listeners.bad name!: expected a name of letters, digits, '.', '_' and '-', "
             'got "bad name!"'],
        ),
    ],
)  # fmt: skip
def test_control_file_problems(data: object, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_control(data, source="capture.json")
    assert list(caught.value.problems) == expected


def test_unreadable_control_files(tmp_path: Path) -> None:
    path = tmp_path / CONTROL_FILE
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        read_control(path)
    path.write_bytes(b" " * (1 << 21))
    with pytest.raises(ConfigError, match="larger than"):
        read_control(path)
    with pytest.raises(ConfigError, match="cannot read the file"):
        read_control(tmp_path)
