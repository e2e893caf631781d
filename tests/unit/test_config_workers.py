"""The `workers` setting, and configuration documents handed to worker processes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from smtpwarden import configworkers
from smtpwarden.config import (
    CLI_SOURCE,
    DEFAULT_SOURCE,
    MAX_WORKERS,
    ConfigError,
    Document,
    available_cpus,
    config_of,
    default_config,
    default_document,
    load_config,
    parse_config,
    read_document,
    simple_config,
    simple_document,
)

BASE: dict[object, object] = {
    "listeners": [{"name": "main", "port": 2525}],
    "upstreams": [{"name": "mta", "host": "mta.example.net", "port": 25}],
}
EXPECTED = 'an integer 1-256 or "auto"'


def workers(value: object) -> int:
    return parse_config({**BASE, "workers": value}, source="test.yaml").workers


def problems(sections: Mapping[object, object]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, **sections}, source="test.yaml")
    assert caught.value.source == "test.yaml"
    return caught.value.problems


def test_default_is_one_process() -> None:
    assert parse_config(BASE, source="test.yaml").workers == 1
    assert default_config().workers == 1
    assert simple_config(listen="127.0.0.1:2525", upstream="sink:./mail").workers == 1


@pytest.mark.parametrize("count", [1, 2, 7, MAX_WORKERS])
def test_integers(count: int) -> None:
    assert workers(count) == count


def test_auto_is_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert available_cpus() == 3
    assert workers("auto") == 3


def test_auto_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(1000)), raising=False)
    assert workers("auto") == MAX_WORKERS


def test_auto_without_affinity_counts_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert workers("auto") == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert configworkers.available_cpus() == 1


def test_auto_when_affinity_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int) -> set[int]:
        raise PermissionError("not allowed")

    monkeypatch.setattr(os, "sched_getaffinity", refuse, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert workers("auto") == 4


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param(0, "0", id="zero"),
        pytest.param(-1, "-1", id="negative"),
        pytest.param(MAX_WORKERS + 1, str(MAX_WORKERS + 1), id="too-many"),
        pytest.param(1.5, "1.5", id="decimal"),
        pytest.param(2.0, "2.0", id="decimal-integer"),
        pytest.param(True, "true", id="bool"),
        pytest.param("2", '"2"', id="quoted-number"),
        pytest.param("Auto", '"Auto"', id="auto-capitalised"),
        pytest.param("all", '"all"', id="word"),
        pytest.param(None, "null", id="null"),
        pytest.param([2], "a list", id="list"),
    ],
)
def test_bad_values_are_reported_at_the_key(value: object, shown: str) -> None:
    assert problems({"workers": value}) == (f"workers: expected {EXPECTED}, got {shown}",)


def test_a_bad_count_is_reported_with_the_other_problems() -> None:
    found = problems({"workers": 0, "limits": {"max_connections": 0}})
    assert found == (
        f"workers: expected {EXPECTED}, got 0",
        "limits.max_connections: expected an integer >= 1, got 0",
    )


def test_unknown_key_suggests_workers() -> None:
    assert problems({"worker": 2}) == ('worker: unknown key (did you mean "workers"?)',)


# --- Documents: what a worker process is handed --------------------------------


def test_a_file_document_is_what_load_config_reads(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "workers: 3\nlisteners: [{port: 2525}]\nupstreams: [{kind: sink}]\n", encoding="utf-8"
    )
    document = read_document(path)
    assert document == Document(
        {"workers": 3, "listeners": [{"port": 2525}], "upstreams": [{"kind": "sink"}]},
        str(path),
    )
    assert config_of(document) == load_config(path)
    assert config_of(document).workers == 3


def test_a_document_keeps_repeated_keys_as_problems(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "workers: 2\nworkers: 0\nlisteners: [{port: 2525}]\nupstreams: [{kind: sink}]\n",
        encoding="utf-8",
    )
    document = read_document(path)
    assert document.problems == (
        "workers: duplicate key at line 2, column 1 (YAML keeps only the last)",
    )
    with pytest.raises(ConfigError) as caught:
        config_of(document)
    assert caught.value.problems == (
        *document.problems,
        f"workers: expected {EXPECTED}, got 0",
    )


def test_cli_and_default_documents() -> None:
    document = simple_document(listen="127.0.0.1:2600", upstream="mta.example.net:25")
    assert document.source == CLI_SOURCE
    assert config_of(document) == simple_config(
        listen="127.0.0.1:2600", upstream="mta.example.net:25"
    )
    assert default_document().source == DEFAULT_SOURCE
    assert config_of(default_document()) == default_config()
    with pytest.raises(ConfigError) as caught:
        simple_document(listen="nowhere", upstream="mta.example.net:25")
    assert caught.value.source == CLI_SOURCE
