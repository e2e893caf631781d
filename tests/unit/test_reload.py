"""What a reload may change, and the parts that take new settings in place.

``restart_changes`` names each setting a running relay cannot take; the
admission limits, the transaction log and the workers' reload lines are
checked on their own here. The reload itself, end to end, is in
``tests/integration/test_reload.py``.
"""

from __future__ import annotations

import copy
import ipaddress
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from smtpwarden.config import Config, ConfigError, Document, LimitsConfig, parse_config
from smtpwarden.configreload import changed_sections, restart_changes, spool_opened
from smtpwarden.net.admission import Admission, Refusal
from smtpwarden.net.worker import WorkerBrief, read_reload, reload_line
from smtpwarden.observe.txlog import RecordLog

ADDRESS = ipaddress.ip_address("192.0.2.7")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pki")
    leaf = trustme.CA().issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(folder / "relay.crt"))
    leaf.private_key_pem.write_to_path(str(folder / "relay.key"))
    return {"certificate": str(folder / "relay.crt"), "key": str(folder / "relay.key")}


@pytest.fixture
def document(pki: dict[str, str]) -> dict[str, Any]:
    return {
        "hostname": "relay.test",
        "listeners": [
            {"name": "main", "port": 2525, "upstream": "mx"},
            {"name": "smtps", "port": 4650, "upstream": "mx", "tls": {"mode": "implicit", **pki}},
            {"name": "submission", "port": 5870, "upstream": "mx", "tls": dict(pki)},
        ],
        "upstreams": [{"name": "mx", "host": "192.0.2.1", "port": 25}],
        "routes": [
            {"name": "all", "listeners": ["main", "smtps", "submission"], "upstreams": ["mx"]}
        ],
    }


def config(data: dict[str, Any]) -> Config:
    return parse_config(data, source="relay.yaml")


def changed(before: dict[str, Any], edit: dict[str, Any] | None = None, **top: Any) -> list[str]:
    """``restart_changes`` between ``before`` and a copy with ``top`` set and ``edit`` applied."""
    after = copy.deepcopy(before)
    after.update(top)
    for path, value in (edit or {}).items():
        *keys, last = path.split(".")
        node: Any = after
        for key in keys:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[last] = value
    running = config(before)
    return restart_changes(running, config(after), spool=spool_opened(running))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"event_loop": "asyncio"}, 'event_loop: "auto", now "asyncio"'),
        ({"workers": 2}, "workers: 1, now 2"),
        ({"reuse_port": True}, "reuse_port: false, now true"),
        ({"listeners.0.port": 2526}, "listeners[main].port: 2525, now 2526"),
        ({"listeners.0.host": "127.0.0.2"}, 'listeners[main].host: "127.0.0.1", now "127.0.0.2"'),
        ({"listeners.1.tls.min_version": "1.3"}, 'listeners[smtps].tls.min_version: "1.2"'),
        ({"listeners.1.tls.ciphers": "ECDHE+AESGCM"}, "listeners[smtps].tls.ciphers: null"),
        ({"listeners.1.tls.mode": "starttls"}, "listeners[smtps]: implicit TLS done by"),
        ({"listeners.2.tls.mode": "implicit"}, "listeners[submission]: implicit TLS done by"),
        ({"http.port": 9999}, "http.port: 9125, now 9999"),
        ({"http.enabled": False}, "http.enabled: true, now false"),
        ({"transcripts.path": "elsewhere"}, 'transcripts.path: "transcripts", now "elsewhere"'),
        ({"routes.0.policy": "requeue"}, "routes: a requeue route, where none opened the spool"),
    ],
)
def test_each_setting_fixed_at_start_is_named(
    document: dict[str, Any], edit: dict[str, Any], expected: str
) -> None:
    found = changed(document, edit)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


def test_listeners_added_or_renamed_need_a_restart(document: dict[str, Any]) -> None:
    extra = {"name": "extra", "port": 2600, "upstream": "mx"}
    listeners = [*document["listeners"], extra]
    routes = [{**document["routes"][0], "listeners": ["main", "smtps", "submission", "extra"]}]
    found = changed(document, listeners=listeners, routes=routes)
    assert found == ["listeners: main, smtps, submission, now main, smtps, submission, extra"]


def test_the_spool_path_is_fixed_only_once_the_spool_is_open(document: dict[str, Any]) -> None:
    assert changed(document, {"spool.path": "other"}) == []
    document["routes"][0]["policy"] = "requeue"
    assert changed(document, {"spool.path": "other"}) == [
        'spool.path: "spool", now "other" (the spool opened at start)'
    ]
    # The last requeue route may go: the spool stays open and is still delivered.
    assert changed(document, {"routes.0.policy": "passthrough"}) == []


def test_the_spool_opened_at_start_decides_not_the_running_file(
    document: dict[str, Any],
) -> None:
    started = config(document)  # no requeue: no spool opened
    document["routes"][0]["policy"] = "requeue"
    requeue = config(document)
    assert restart_changes(started, requeue, spool=None) == [
        "routes: a requeue route, where none opened the spool at start"
    ]
    # Started with requeue, reloaded to passthrough, then back: the spool is
    # still the one opened at start, and only its path is fixed.
    assert restart_changes(started, requeue, spool="spool") == []
    document["spool"] = {"path": "other"}
    assert restart_changes(started, config(document), spool="spool") == [
        'spool.path: "spool", now "other" (the spool opened at start)'
    ]


@pytest.mark.parametrize(
    "edit",
    [
        {"hostname": "relay2.test"},
        {"limits.max_recipients": 100},
        {"timeouts.command": 5},
        {"retry.attempts": 0},
        {"health.failures": 1},
        {"shutdown.grace": 5},
        {"log.transactions": "records.jsonl"},
        {"log.level": "debug"},
        {"listeners.0.proxy_protocol": {"trusted": ["10.0.0.0/8"]}},
        {"listeners.0.allow": ["192.0.2.0/24"]},
        {"listeners.2.tls.min_version": "1.3"},  # a STARTTLS listener builds a new context
        {"listeners.2.tls.require": True},
        {"listeners.0.transcripts": {"mode": "always"}},
        {"transcripts.max_age": 60},
        {"upstreams.0.host": "192.0.2.2"},
        {"routes.0.policy": "retry"},
    ],
)
def test_settings_for_new_sessions_need_no_restart(
    document: dict[str, Any], edit: dict[str, Any]
) -> None:
    assert changed(document, edit) == []


def test_changed_sections_name_the_top_level_keys(document: dict[str, Any]) -> None:
    after = copy.deepcopy(document)
    after["limits"] = {"max_recipients": 200}
    after["upstreams"][0]["port"] = 2525
    before_config, after_config = config(document), config(after)
    assert changed_sections(before_config, after_config) == ["upstreams", "limits"]
    assert changed_sections(before_config, config(copy.deepcopy(document))) == []


def test_new_admission_limits_apply_to_the_next_connections() -> None:
    admission = Admission(LimitsConfig(max_connections_per_client=2, connection_rate_per_minute=5))
    assert admission.admit(ADDRESS, 0.0) is None
    assert admission.admit(ADDRESS, 1.0) is None
    admission.configure(LimitsConfig(max_connections_per_client=1, connection_rate_per_minute=3))
    # The two open sessions are still counted: a third is one too many (and
    # counts towards the rate, as every connection does).
    assert admission.admit(ADDRESS, 2.0) is Refusal.TOO_MANY
    admission.release(ADDRESS)
    admission.release(ADDRESS)
    # The connections of the last minute are kept too: three, the new rate.
    assert admission.admit(ADDRESS, 3.0) is Refusal.TOO_FAST
    admission.configure(LimitsConfig(max_connections_per_client=1, connection_rate_per_minute=10))
    assert admission.admit(ADDRESS, 4.0) is None
    admission.configure(LimitsConfig(max_connections_per_client=0, connection_rate_per_minute=0))
    assert admission.admit(ADDRESS, 5.0) is None


def lines(path: Path) -> list[Any]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_the_log_is_reopened_at_its_name_after_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    records = RecordLog(str(path))
    records.write({"n": 1})
    records.flush()
    os.rename(path, tmp_path / "records.jsonl.1")
    records.write({"n": 2})  # buffered: goes to the file open until the reopen
    records.reopen(str(path), sessions=False)
    records.write({"n": 3})
    records.write_session({"n": "session"})
    records.close()
    assert lines(tmp_path / "records.jsonl.1") == [{"n": 1}, {"n": 2}]
    assert lines(path) == [{"n": 3}]


def test_a_log_that_cannot_be_opened_leaves_the_old_one_in_use(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    records = RecordLog(str(path))
    with pytest.raises(OSError, match="No such file"):
        records.reopen(str(tmp_path / "missing" / "records.jsonl"), sessions=False)
    records.write({"n": 1})
    records.write_session({"n": "session"})
    records.close()
    assert lines(path) == [{"n": 1}, {"n": "session"}]


def brief(ports: dict[str, int]) -> WorkerBrief:
    return WorkerBrief(
        index=1, config=None, source="relay.yaml", event_loop="asyncio", ports=ports, status_fd=3
    )


def test_a_reload_line_gives_the_worker_its_configuration(document: dict[str, Any]) -> None:
    line = reload_line(Document(document, "relay.yaml"), accepted=True)
    assert line.startswith(b"reload {")
    assert line.endswith(b"}\n")
    assert line.count(b"\n") == 1
    ports = {"main": 40000, "smtps": 40001, "submission": 40002}
    received = read_reload(line[len(b"reload ") : -1], brief(ports))
    assert received is not None
    assert received.source == "relay.yaml"
    assert {item.name: item.port for item in received.listeners} == ports
    assert received.event_loop == "asyncio"  # the worker's own, as its brief says
    assert received.listeners[0].upstream == "mx"


def test_a_refused_reload_hands_over_no_configuration(document: dict[str, Any]) -> None:
    line = reload_line(Document(document, "relay.yaml"), accepted=False)
    assert read_reload(line[len(b"reload ") : -1], brief({})) is None


@pytest.mark.parametrize("payload", [b"not json", b"[]", b'{"accepted": true}'])
def test_a_garbled_reload_line_is_a_configuration_error(payload: bytes) -> None:
    with pytest.raises(ConfigError, match="not a reload request"):
        read_reload(payload, brief({}))
