"""systemd's notify protocol: READY, RELOADING, STOPPING, from the main process only.

Each test plays the service manager: it binds a datagram socket (an
abstract one, as systemd's path may be), puts its name in NOTIFY_SOCKET and
starts ``python -m smtpwarden run``. Each message is read with the sender's
credentials, so that a message from a worker would be seen.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import smtplib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import TEST_TIMEOUTS, WAIT_S
from integration.supervised import START_TIMEOUT_S, Supervised
from smtpwarden.net.notify import Notifier, without_notify_socket

LISTENER_LINE = re.compile(r"listener main on 127\.0\.0\.1:(\d+)")
CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Manager:
    """The service manager's end of NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.name = f"@smtpwarden-test-{secrets.token_hex(8)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(START_TIMEOUT_S)

    def receive(self) -> tuple[int, dict[str, str]]:
        """The next message: the sender's pid and its fields."""
        size = CREDENTIALS.size
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(size))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = CREDENTIALS.unpack(payload[:size])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return pid, fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    made = Manager()
    monkeypatch.setenv("NOTIFY_SOCKET", made.name)
    yield made
    made.close()


def document(loop_kind: str, upstream: RawUpstream, log: Path, **extra: Any) -> dict[str, Any]:
    return {
        "event_loop": loop_kind,
        "hostname": "relay.test",
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "up"}],
        "upstreams": [{"name": "up", **upstream.config}],
        "timeouts": TEST_TIMEOUTS,
        "health": {"check_interval": 0},
        "http": {"enabled": False},
        "log": {"transactions": str(log), "level": "info"},
        **extra,
    }


def test_a_relay_says_ready_reloading_and_stopping(
    tmp_path: Path, loop_kind: str, raw_upstream: RawUpstream, manager: Manager
) -> None:
    relay = Supervised(document(loop_kind, raw_upstream, tmp_path / "log.jsonl"), tmp_path)
    try:
        pid, ready = manager.receive()
        assert pid == relay.process.pid
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("running on ")
        # Ready means serving: the listener takes a message at once.
        port = int(relay.expect(LISTENER_LINE).group(1))
        with smtplib.SMTP("127.0.0.1", port, timeout=WAIT_S) as client:
            client.sendmail("a@example.org", ["b@example.net"], "Subject: x\r\n\r\nready\r\n")
        relay.signal(signal.SIGHUP)
        _, reloading = manager.receive()
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) > 0
        _, reloaded = manager.receive()
        assert reloaded == {"READY": "1", "STATUS": "running; configuration reloaded"}
        (tmp_path / "smtpwarden.yaml").write_text("listeners: [\n", encoding="utf-8")
        relay.signal(signal.SIGHUP)
        manager.receive()
        _, refused = manager.receive()
        assert refused["STATUS"] == "running; the last reload was refused, see the log"
        relay.signal(signal.SIGTERM)
        pid, stopping = manager.receive()
        assert pid == relay.process.pid
        assert stopping["STOPPING"] == "1"
        assert relay.wait_exit(WAIT_S) == 0
    finally:
        relay.close()


def test_under_workers_only_the_supervisor_speaks(
    tmp_path: Path, loop_kind: str, raw_upstream: RawUpstream, manager: Manager
) -> None:
    config = document(loop_kind, raw_upstream, tmp_path / "log.jsonl", workers=2)
    config["http"] = {"port": 0}
    supervisor = Supervised(config, tmp_path)
    try:
        supervisor.wait_ready(2)
        statuses = []
        for _ in range(2):  # one READY as each worker gets ready
            pid, ready = manager.receive()
            assert pid == supervisor.process.pid
            assert ready["READY"] == "1"
            statuses.append(ready["STATUS"])
        assert statuses == ["running: 1 of 2 workers ready", "running: 2 of 2 workers ready"]
        supervisor.signal(signal.SIGHUP)
        for _ in range(2):  # a worker's reload would say RELOADING too
            pid, _fields = manager.receive()
            assert pid == supervisor.process.pid
        supervisor.signal(signal.SIGTERM)
        assert supervisor.wait_exit(WAIT_S) == 0
        pids = []
        manager.sock.settimeout(0.5)  # everything sent is queued by now
        while True:
            try:
                pids.append(manager.receive()[0])
            except TimeoutError:
                break
        assert set(pids) == {supervisor.process.pid}
    finally:
        supervisor.close()


def test_without_a_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled
    monkeypatch.setenv("NOTIFY_SOCKET", "@nobody-listens-here")
    notifier = Notifier()
    assert notifier.enabled
    notifier.ready("x")  # refused by the kernel: logged once, never raised
    notifier.stopping()
    assert "NOTIFY_SOCKET" not in without_notify_socket()
    assert os.environ["NOTIFY_SOCKET"] == "@nobody-listens-here"
