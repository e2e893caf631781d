"""The pieces of the supervisor of ``workers`` that need no worker process.

The restart backoff, the brief a worker reads, the configuration a worker
runs, the merged metrics (read back with the integration suite's strict
parser), the line forwarding of the workers' standard output, the port
reservation, and ``run`` choosing the supervisor.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import io
import json
import os
import socket
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from integration.prometheus_text import get, parse
from smtpwarden import cli
from smtpwarden.config import Config, ConfigError, Document, HttpConfig, config_of, parse_config
from smtpwarden.net import forwarding, reservation
from smtpwarden.net.metricsmerge import merge
from smtpwarden.net.worker import (
    MAX_BRIEF_BYTES,
    RELOAD,
    WORKER_COMMAND,
    WorkerBrief,
    run_worker,
    worker_config,
    worker_document,
)
from smtpwarden.net.workers import Supervisor
from smtpwarden.net.workerslot import Backoff, WorkerSlot, describe_exit, read_status
from smtpwarden.observe.metrics import RelayMetrics

DATA: dict[str, object] = {
    "workers": 2,
    "listeners": [
        {"name": "main", "host": "127.0.0.1", "port": 0},
        {"name": "other", "host": "127.0.0.1", "port": 2600},
    ],
    "upstreams": [{"name": "up", "host": "mta.example.net", "port": 25}],
    "http": {"host": "::1", "port": 9999},
}


def brief(**changes: object) -> WorkerBrief:
    fields: dict[str, object] = {
        "index": 1,
        "config": DATA,
        "source": "relay.yaml",
        "event_loop": None,
        "ports": {"main": 40001, "other": 2600},
        "status_fd": 5,
    }
    return WorkerBrief(**{**fields, **changes})  # type: ignore[arg-type]


# --- Restarts ---------------------------------------------------------------------


def test_backoff_doubles_while_a_worker_keeps_dying_and_resets_once_it_lived() -> None:
    backoff = Backoff()
    assert [backoff.after_exit(0.5) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.after_exit(30.0) == 30  # neither quick nor steady: the wait stays
    assert backoff.after_exit(60.0) == 1  # lived long enough: from the start again
    assert backoff.after_exit(9.9) == 1
    assert backoff.after_exit(9.9) == 2


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0, "exited with code 0"),
        (1, "exited with code 1"),
        (-9, "was killed by SIGKILL"),
        (-15, "was killed by SIGTERM"),
        (-200, "was killed by signal 200"),
    ],
)
def test_describe_exit(code: int, text: str) -> None:
    assert describe_exit(code) == text


@pytest.mark.parametrize(
    ("line", "read"),
    [
        (b'{"pid": 7, "http": ["127.0.0.1", 4000]}\n', (True, ("127.0.0.1", 4000))),
        (b'{"pid": 7, "http": null}\n', (True, None)),
        (b"", (False, None)),  # the worker exited before it was ready
        (b"ready\n", (False, None)),
        (b"[1, 2]\n", (False, None)),
        (b'{"pid": 7, "http": ["127.0.0.1"]}\n', (False, None)),
    ],
)
def test_read_status(line: bytes, read: tuple[bool, tuple[str, int] | None]) -> None:
    assert read_status(line) == read


def test_slot_states() -> None:
    slot = WorkerSlot(0)
    assert slot.state == "down"
    slot.process = object()  # type: ignore[assignment]
    assert slot.state == "starting"
    slot.ready = True
    assert slot.state == "ready"


# --- The brief and the worker's configuration ---------------------------------------


def test_brief_round_trip() -> None:
    sent = brief(event_loop="uvloop", spool="/var/lib/smtpwarden/spool")
    line = sent.encode()
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert WorkerBrief.decode(line) == sent


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"not json\n", "not a JSON line"),
        (b"[1]\n", "expected a JSON object"),
        (b'{"index": -1}\n', "index: expected an integer >= 0"),
        (b'{"index": true}\n', "index: expected an integer >= 0"),
        (b'{"source": 7}\n', "source: expected a string"),
        (b'{"event_loop": "twisted"}\n', "event_loop: expected one of auto, uvloop, asyncio"),
        (b'{"ports": {"main": 0}}\n', "ports: expected a mapping of listener names"),
        (b'{"status_fd": "x"}\n', "status_fd: expected a file descriptor"),
        (b'{"spool": 1}\n', "spool: expected a path or null"),
        (b"{}\n", "config: missing"),
    ],
)
def test_a_bad_brief_is_a_config_error(line: bytes, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        WorkerBrief.decode(line)
    assert any(found.startswith(problem) for found in caught.value.problems), caught.value


def test_a_brief_carries_only_json() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        brief(config={"x": float("nan")}).encode()
    with pytest.raises(TypeError):
        brief(config={"x": b"bytes"}).encode()


def test_worker_config_takes_the_reserved_ports_and_an_internal_endpoint() -> None:
    config = parse_config(DATA, source="relay.yaml")
    mine = worker_config(config, brief(event_loop="asyncio"))
    assert [(item.name, item.port) for item in mine.listeners] == [("main", 40001), ("other", 2600)]
    assert mine.http == HttpConfig(enabled=True, host="127.0.0.1", port=0)
    assert mine.event_loop == "asyncio"
    assert (
        dataclasses.replace(mine, listeners=config.listeners, http=config.http, event_loop="auto")
        == config
    )
    off = parse_config({**DATA, "http": {"enabled": False}}, source="relay.yaml")
    assert not worker_config(off, brief()).http.enabled
    with pytest.raises(ConfigError, match="no port for listener other"):
        worker_config(config, brief(ports={"main": 40001}))


def test_worker_document_goes_through_json_unchanged() -> None:
    document = Document(DATA, "relay.yaml")
    config = config_of(document)
    assert worker_document(config, document) == document
    with pytest.raises(ConfigError) as caught:
        worker_document(config, Document({**DATA, "x": b"bytes"}, "relay.yaml"))
    assert caught.value.problems[0].startswith("the configuration cannot be handed to worker")
    other = Document({**DATA, "workers": 3}, "relay.yaml")
    with pytest.raises(ConfigError, match="cannot be handed to worker processes as JSON"):
        worker_document(config, other)


def test_run_worker_reads_its_brief_from_standard_input() -> None:
    with pytest.raises(ConfigError, match="expected one line of JSON"):
        run_worker(io.BytesIO(b'{"index": 1}'))
    bad = brief(config={**DATA, "workers": 0}).encode()
    with pytest.raises(ConfigError) as caught:
        run_worker(io.BytesIO(bad))
    assert caught.value.source == "relay.yaml"


def test_the_hidden_command_is_the_workers() -> None:
    assert cli.WORKER_COMMAND == WORKER_COMMAND
    usage = cli.build_parser().format_help()
    assert WORKER_COMMAND not in usage


def test_run_chooses_the_supervisor_for_more_than_one_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[object, ...]] = []

    def run_supervisor(
        config: Config, document: Document, *, event_loop: str | None, path: str | None
    ) -> int:
        calls.append((config.workers, document.source, event_loop, path))
        return 0

    workers = types.ModuleType("smtpwarden.net.workers")
    workers.run_supervisor = run_supervisor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "smtpwarden.net.workers", workers)
    path = tmp_path / "relay.yaml"
    path.write_text("workers: 3\nlisteners: [{port: 2525}]\nupstreams: [{kind: sink}]\n")
    assert cli.main(["run", "-c", str(path), "--event-loop", "asyncio"]) == 0
    assert calls == [(3, str(path), "asyncio", str(path))]


# --- Merged metrics ----------------------------------------------------------------


def exposition(sessions: int, listener: str = "main") -> bytes:
    metrics = RelayMetrics()
    for _ in range(sessions):
        metrics.sessions.inc(listener, "quit")
    metrics.phases.observe(0.003, "mail")
    metrics.sessions_active.set(2.0, listener)
    return metrics.registry.exposition()


def test_merged_metrics_have_each_family_once_with_a_worker_label() -> None:
    merged = merge([("0", exposition(3)), ("1", exposition(5, 'odd "name" {x}'))])
    families = parse(merged)
    assert list(families) == [family.name for family in RelayMetrics().registry.families]
    assert get(families, "smtpwarden_sessions_total", listener="main", end="quit", worker="0") == 3
    assert (
        get(
            families, "smtpwarden_sessions_total", listener='odd "name" {x}', end="quit", worker="1"
        )
        == 5
    )
    assert get(families, "smtpwarden_phase_seconds_count", phase="mail", worker="1") == 1
    for family in families.values():
        for _, labels, _ in family.samples:
            assert dict(labels)["worker"] in ("0", "1")


def test_merge_keeps_families_of_one_worker_only_and_skips_garbage() -> None:
    one = b"# HELP a_total A.\n# TYPE a_total counter\na_total 1\n"
    two = b'# HELP b B.\n# TYPE b gauge\nb{x="1",} 2\nnot a sample line {\nb{x="} 3\n'
    families = parse(merge([("0", one), ("1", two), ("2", one)]))
    assert get(families, "a_total", worker="0") == 1
    assert get(families, "a_total", worker="2") == 1
    assert get(families, "b", x="1", worker="1") == 2
    assert len(families["b"].samples) == 1
    assert merge([]) == b""


def test_no_relay_metric_has_a_worker_label() -> None:
    for family in RelayMetrics().registry.families:
        assert "worker" not in family.labels, family.name


# --- Forwarding the workers' standard output -----------------------------------------


def test_forwarding_writes_whole_lines_only(monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[bytes] = []
    forwarder = forwarding.LineForwarder(-1)
    monkeypatch.setattr(forwarder, "write", lambda data: writes.append(bytes(data)))

    async def feed() -> None:
        stream = asyncio.StreamReader()
        for piece in (b'{"a":1}\n{"b"', b':2}\n{"c":', b"3}\n", b"cut off"):
            stream.feed_data(piece)
        stream.feed_eof()
        await forwarder.forward(stream)

    asyncio.run(feed())
    assert all(write.endswith(b"\n") for write in writes)
    assert b"".join(writes) == b'{"a":1}\n{"b":2}\n{"c":3}\ncut off\n'


def test_forwarding_survives_a_closed_target() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    forwarder = forwarding.LineForwarder(write_end)
    try:
        forwarder.write(b"line\n")
        forwarder.write(b"more\n")
    finally:
        os.close(write_end)
    assert forwarder.dropped_bytes == 10


# --- Reserving ports -----------------------------------------------------------------


def test_reserving_port_zero_gives_one_port_for_every_address() -> None:
    config = parse_config(
        {
            "listeners": [{"name": "main", "host": "localhost", "port": 0}],
            "upstreams": [{"host": "mta.example.net", "port": 25}],
        },
        source="t",
    )
    reserved = reservation.Reservation()
    reserved.reserve(config.listeners)
    try:
        port = reserved.ports["main"]
        assert port > 0
        # Not listening: nobody answers yet.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        # A worker binds it beside the reservation, with SO_REUSEPORT.
        worker = socket.socket()
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", port))
        worker.listen()
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        worker.close()
        # A program without SO_REUSEADDR cannot take it.
        with socket.socket() as other, pytest.raises(OSError, match="Address already in use"):
            other.bind(("127.0.0.1", port))
    finally:
        reserved.close()


def test_a_port_in_use_names_the_listener() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = parse_config(
            {
                "listeners": [
                    {"name": "free", "host": "127.0.0.1", "port": 0},
                    {"name": "busy", "host": "127.0.0.1", "port": port},
                ],
                "upstreams": [{"host": "mta.example.net", "port": 25}],
            },
            source="t",
        )
        reserved = reservation.Reservation()
        with pytest.raises(OSError, match=f"listener busy: cannot bind 127.0.0.1:{port}: "):
            reserved.reserve(config.listeners)
        assert reserved.ports.get("busy") is None
        reserved.close()


# --- Reloads -------------------------------------------------------------------------


def test_a_document_longer_than_a_worker_reads_is_refused() -> None:
    document = Document({**DATA, "junk": "x" * MAX_BRIEF_BYTES}, "relay.yaml")
    with pytest.raises(ConfigError, match="bytes, over"):
        worker_document(config_of(Document(DATA, "relay.yaml")), document)


class Pipe:
    """A worker's standard input, as the supervisor writes it."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.lines.append(data)

    def is_closing(self) -> bool:
        return False


@dataclasses.dataclass
class Worker:
    stdin: Pipe = dataclasses.field(default_factory=Pipe)

    def requests(self) -> list[tuple[bool, object]]:
        """Each reload line: whether the file was accepted, and its listeners."""
        found = []
        for line in self.stdin.lines:
            assert line.startswith(RELOAD)
            fields = json.loads(line[len(RELOAD) :])
            found.append((fields["accepted"], fields["config"]["listeners"][0].get("upstream")))
        return found


def supervised(tmp_path: Path, data: dict[str, object], event_loop: str | None = None) -> Any:
    path = tmp_path / "relay.yaml"
    path.write_text(json.dumps(data), encoding="utf-8")
    document = Document(data, str(path))
    supervisor = Supervisor(
        config_of(document),
        document,
        event_loop=event_loop,  # type: ignore[arg-type]
        path=str(path),
    )
    workers = [Worker(), Worker()]
    for slot, worker in zip(supervisor.slots, workers, strict=True):
        slot.process = worker  # type: ignore[assignment]
    supervisor.slots[0].ready = True  # the second is still starting
    return supervisor, path, workers


def edit(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


UPSTREAMS = [
    {"name": "up", "host": "mta.example.net", "port": 25},
    {"name": "other", "host": "mta2.example.net", "port": 25},
]


def test_the_supervisor_hands_a_reload_to_ready_workers_and_to_late_ones(
    tmp_path: Path,
) -> None:
    data: dict[str, Any] = {**DATA, "upstreams": UPSTREAMS}
    supervisor, path, (ready, starting) = supervised(tmp_path, data)
    moved = copy.deepcopy(data)
    moved["listeners"][0]["upstream"] = "other"
    edit(path, moved)
    supervisor._on_hangup()
    assert ready.requests() == [(True, "other")]
    assert starting.requests() == []
    # The starting one is told once it is ready, of the file it missed.
    supervisor._catch_up(supervisor.slots[1])
    assert starting.requests() == [(True, "other")]
    supervisor._catch_up(supervisor.slots[1])  # once only
    assert starting.requests() == [(True, "other")]
    # A refused file: every worker applies what it runs again, counting a refusal,
    # a late one too (its log is reopened all the same).
    edit(path, {**moved, "workers": 3})
    supervisor.slots[1].ready = False
    supervisor.slots[1].hangups -= 1  # as if started before this SIGHUP
    supervisor._on_hangup()
    assert ready.requests()[-1] == (False, "other")
    supervisor._catch_up(supervisor.slots[1])
    assert starting.requests()[-1] == (False, "other")
    assert supervisor.config.listeners[0].upstream == "other"


def test_the_supervisor_compares_with_the_command_line_event_loop(tmp_path: Path) -> None:
    supervisor, path, (ready, _) = supervised(tmp_path, DATA, event_loop="asyncio")
    edit(path, {**DATA, "event_loop": "uvloop"})
    supervisor._on_hangup()
    assert ready.requests() == [(True, None)]


def test_the_supervisor_keeps_the_spool_it_recovered(tmp_path: Path) -> None:
    requeue = [{"name": "all", "upstreams": ["up"], "policy": "requeue"}]
    passthrough = [{"name": "all", "upstreams": ["up"], "policy": "passthrough"}]
    supervisor, path, (ready, _) = supervised(tmp_path, {**DATA, "routes": requeue})
    edit(path, {**DATA, "routes": passthrough})
    supervisor._on_hangup()
    edit(path, {**DATA, "routes": requeue})  # back: the spool is still the one recovered
    supervisor._on_hangup()
    edit(path, {**DATA, "routes": requeue, "spool": {"path": "elsewhere"}})
    supervisor._on_hangup()
    assert [accepted for accepted, _ in ready.requests()] == [True, True, False]
