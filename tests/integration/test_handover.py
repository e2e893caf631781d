"""A restart without downtime: a new relay takes the port while the old one drains.

With ``reuse_port`` both processes bind the same listening port. The new
one starts and reports itself running; SIGTERM then makes the old one stop
accepting and finish the session it has. Throughout, a prober connects
again and again and must be greeted; the session in progress on the old
process must end with its message delivered, and the HTTP endpoint, never
shared, passes to the new process once the old one is gone.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import POLL_S, WAIT_S, WireClient, free_port, read_records

RUNNING = "smtpwarden running on"
BODY = b"Subject: handover\r\n\r\nsent across a restart\r\n"


class RelayProcess:
    """``python -m smtpwarden run`` with its own log files."""

    def __init__(self, folder: Path, name: str, config: dict[str, object]) -> None:
        self.errors = folder / f"{name}.err"
        self.log = folder / f"{name}.jsonl"
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**config, "log": {"transactions": str(self.log)}}))
        with self.errors.open("wb") as errors:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "smtpwarden", "run", "--config", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )

    def wait_running(self) -> None:
        """Wait for the line the relay writes once its listeners are up."""
        deadline = time.monotonic() + WAIT_S
        while RUNNING not in self.errors.read_text(errors="replace"):
            assert self.process.poll() is None, self.errors.read_text()
            assert time.monotonic() < deadline, self.errors.read_text()
            time.sleep(POLL_S)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT_S)


class Prober:
    """Connects to ``address`` over and over until stopped; counts what it got."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.outcomes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 4 * WAIT_S  # bounded, whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                with socket.create_connection(self.address, timeout=WAIT_S) as sock:
                    banner = sock.recv(512)
                    sock.sendall(b"QUIT\r\n")
                    sock.recv(512)
                if banner.startswith(b"220"):
                    self.outcomes["greeted"] += 1
                elif banner.startswith(b"421 4.3.2"):
                    # Accepted by the old process just before its SIGTERM:
                    # a draining relay closes it, and the client tries again.
                    self.outcomes["shutting down"] += 1
                else:
                    self.outcomes["other"] += 1
            except ConnectionRefusedError:
                self.outcomes["refused"] += 1
            except OSError:
                self.outcomes["reset"] += 1

    def wait_for(self, outcome: str, count: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.outcomes[outcome] < count:
            assert time.monotonic() < deadline, dict(self.outcomes)
            time.sleep(POLL_S)

    def stop(self) -> Counter[str]:
        self._stop.set()
        self._thread.join(WAIT_S)
        return self.outcomes


@pytest.fixture
def processes() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for process in started:
        process.close()


def test_a_new_relay_takes_over_the_port_while_the_old_one_drains(
    tmp_path: Path, raw_upstream: RawUpstream, processes: list[RelayProcess]
) -> None:
    port, http_port = free_port(), free_port()
    config: dict[str, object] = {
        "hostname": "relay.test",
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": port, "upstream": "up"}],
        "upstreams": [{"name": "up", **raw_upstream.config}],
        "limits": {"max_connections_per_client": 0},
        "health": {"check_interval": 0},
        "http": {"port": http_port},
        "shutdown": {"grace": 30},
        "reuse_port": True,
    }
    old = RelayProcess(tmp_path, "old", config)
    processes.append(old)
    old.wait_running()
    with WireClient(("127.0.0.1", port)) as client:
        # A message in progress on the old process.
        client.open_data()
        client.send(BODY[:10])
        new = RelayProcess(tmp_path, "new", config)
        processes.append(new)
        new.wait_running()
        prober = Prober(("127.0.0.1", port))
        try:
            prober.wait_for("greeted", 20)
            old.process.send_signal(signal.SIGTERM)
            # The old process stops accepting at once; its session goes on.
            prober.wait_for("greeted", 60)
            client.send(BODY[10:] + b".\r\n")
            client.expect(250)
            # Between transactions a draining relay closes the session itself.
            assert client.reply()[0] == 421
            assert old.process.wait(WAIT_S) == 0
            prober.wait_for("greeted", prober.outcomes["greeted"] + 20)
        finally:
            outcomes = prober.stop()
    # Never refused. The one connection in flight at the SIGTERM may be
    # closed with 421 by the old process, or reset (Linux drops the old
    # listener's accept queue unless net.ipv4.tcp_migrate_req is 1).
    assert outcomes["refused"] == 0, dict(outcomes)
    assert outcomes["other"] == 0, dict(outcomes)
    assert outcomes["reset"] + outcomes["shutting down"] <= 1, dict(outcomes)
    # The HTTP endpoint is not shared: the new process serves it once the
    # old one has let it go.
    deadline = time.monotonic() + WAIT_S
    while "metrics on http://" not in new.errors.read_text(errors="replace"):
        assert time.monotonic() < deadline, new.errors.read_text()
        time.sleep(POLL_S)
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=WAIT_S) as ready:
        assert ready.status == 200
    delivered = [conn.data for conn in raw_upstream.wait_all_ended(1)]
    assert [BODY + b".\r\n"] in delivered
    (record,) = [r for r in read_records(old.log) if r["type"] == "transaction"]
    assert record["outcome"] == "delivered"
    # The new process greeted probes before and after the old one left.
    assert sum(r["type"] == "session" for r in read_records(new.log)) >= 20


def lone_relay(port: int, upstream: RawUpstream) -> dict[str, object]:
    """The configuration of a relay on ``port`` with no HTTP endpoint."""
    return {
        "listeners": [{"host": "127.0.0.1", "port": port}],
        "upstreams": [upstream.config],
        "health": {"check_interval": 0},
        "http": {"enabled": False},
    }


def test_without_reuse_port_a_second_relay_cannot_start(
    tmp_path: Path, raw_upstream: RawUpstream, processes: list[RelayProcess]
) -> None:
    port = free_port()
    config = {**lone_relay(port, raw_upstream), "reuse_port": False}
    first = RelayProcess(tmp_path, "first", config)
    processes.append(first)
    first.wait_running()
    second = RelayProcess(tmp_path, "second", config)
    processes.append(second)
    assert second.process.wait(WAIT_S) == 1
    assert "address already in use" in second.errors.read_text().lower()
    with contextlib.closing(socket.create_connection(("127.0.0.1", port), WAIT_S)) as sock:
        assert sock.recv(512).startswith(b"220")


def test_without_reuse_port_workers_do_not_join_a_shared_port(
    tmp_path: Path, raw_upstream: RawUpstream, processes: list[RelayProcess]
) -> None:
    # The supervisor reserves its ports with SO_REUSEPORT for its workers;
    # with reuse_port off, a port another relay already shares is an error.
    port = free_port()
    config = lone_relay(port, raw_upstream)
    sharing = RelayProcess(tmp_path, "sharing", {**config, "reuse_port": True})
    processes.append(sharing)
    sharing.wait_running()
    supervisor = RelayProcess(tmp_path, "supervisor", {**config, "workers": 2})
    processes.append(supervisor)
    assert supervisor.process.wait(WAIT_S) == 1
    assert "address already in use" in supervisor.errors.read_text().lower()
