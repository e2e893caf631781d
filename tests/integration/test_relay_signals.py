"""Signals to ``python -m smtpwarden run``: SIGINT stops fast, a second SIGTERM at once.

The relay runs as a process with ``shutdown: {grace: 30, fast: 2}`` in front
of a recording upstream. One client idles between transactions, another is
mid-transaction (after RCPT). The idle one must be told at once; the busy
one keeps its session until the grace that applies runs out. Either way the
process exits 0 long before the 30 s SIGTERM grace, and the log holds one
record per transaction and per session.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import (
    WireClient,
    check_log_invariants,
    read_records,
    validate_records,
)

GRACE_S = 30.0  # SIGTERM's grace: no test may come near it
FAST_S = 2.0  # SIGINT's grace
START_TIMEOUT_S = 20.0
# How long after its grace a stopping relay may take to exit: the closing
# replies linger (net.session.LINGER_S, twice at most) plus a busy machine.
EXIT_MARGIN_S = 8.0
READY_LINE = re.compile(r"listener main on (127\.0\.0\.1):(\d+) relays to ")
SHUTTING_DOWN = b"421 4.3.2 relay.test Service shutting down\r\n"


@dataclass
class RelayProcess:
    """``python -m smtpwarden run --config FILE`` with its standard error read."""

    process: subprocess.Popen[bytes]
    log_path: Path
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def read_stderr(self) -> None:
        assert self.process.stderr is not None
        for raw in iter(self.process.stderr.readline, b""):
            self.lines.put(raw.decode("utf-8", "replace"))
        self.lines.put(None)

    def wait_ready(self) -> tuple[str, int]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no listener line on stderr:\n" + self.output())
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("the relay exited before it was ready:\n" + self.output())
            self.seen.append(line)
            found = READY_LINE.search(line)
            if found:
                return found.group(1), int(found.group(2))

    def output(self) -> str:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)

    def records(self, record_type: str) -> list[dict[str, Any]]:
        records = read_records(self.log_path)
        validate_records(records)
        check_log_invariants(records)
        return [record for record in records if record["type"] == record_type]


@pytest.fixture
def relay_process(
    tmp_path: Path, loop_kind: str, raw_upstream: RawUpstream
) -> Iterator[RelayProcess]:
    log_path = tmp_path / "transactions.jsonl"
    config = tmp_path / "smtpwarden.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "event_loop": loop_kind,
                "hostname": "relay.test",
                "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "up"}],
                "upstreams": [{"name": "up", **raw_upstream.config}],
                "log": {"transactions": str(log_path), "sessions": True, "level": "info"},
                "shutdown": {"grace": GRACE_S, "fast": FAST_S},
            }
        ),
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "smtpwarden", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    relay = RelayProcess(process=process, log_path=log_path)
    reader = threading.Thread(target=relay.read_stderr, daemon=True)
    reader.start()
    try:
        yield relay
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(START_TIMEOUT_S)
        reader.join(START_TIMEOUT_S)
        if process.stderr is not None:
            process.stderr.close()


def idle_client(address: tuple[str, int]) -> WireClient:
    client = WireClient(address)
    client.expect(220)
    client.command(b"EHLO idle.test\r\n", 250)
    return client


def busy_client(address: tuple[str, int]) -> WireClient:
    client = WireClient(address, timeout=GRACE_S)
    client.start_transaction()
    return client


def assert_nothing_received(client: WireClient) -> None:
    assert not client.buf
    client.sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            client.sock.recv(1)
    finally:
        client.sock.settimeout(client.timeout)


def exit_code(relay: RelayProcess, timeout: float) -> int:
    try:
        return relay.process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit within {timeout} s:\n{relay.output()}") from None


def check_records(relay: RelayProcess, idle: tuple[str, int], busy: tuple[str, int]) -> None:
    """One deferred transaction (the busy client's), one session record per client."""
    sessions = relay.records("session")
    by_port = {session["client"]["port"]: session for session in sessions}
    assert len(sessions) == 2, sessions
    assert sorted(by_port) == sorted([idle[1], busy[1]])
    assert [session["end"] for session in sessions] == ["shutdown", "shutdown"]
    (transaction,) = relay.records("transaction")
    assert transaction["session_id"] == by_port[busy[1]]["session_id"]
    assert by_port[busy[1]]["transactions"] == 1
    assert by_port[idle[1]]["transactions"] == 0
    # Session.force_close reports the 421 as a failure on the relay's side,
    # so the open transaction is "deferred" (the client keeps the message),
    # not "aborted" (the client's doing).
    assert transaction["outcome"] == "deferred"
    assert transaction["mail_from"]["address"] == "sender@example.org"
    assert [rcpt["address"] for rcpt in transaction["recipients"]] == ["rcpt@example.net"]
    final = transaction["final_reply"]
    assert (final["code"], final["enhanced"], final["local"]) == (421, "4.3.2", True)


def test_sigint_closes_idle_at_once_and_busy_after_the_fast_grace(
    relay_process: RelayProcess, raw_upstream: RawUpstream
) -> None:
    address = relay_process.wait_ready()
    with idle_client(address) as idle, busy_client(address) as busy:
        idle_port = idle.sock.getsockname()
        busy_port = busy.sock.getsockname()
        signalled = time.monotonic()
        relay_process.process.send_signal(signal.SIGINT)
        assert idle.expect(421) == SHUTTING_DOWN
        assert idle.read_to_eof() == b""
        # Mid-transaction, the session is left to finish until the grace ends.
        assert_nothing_received(busy)
        assert busy.expect(421) == SHUTTING_DOWN
        told = time.monotonic() - signalled
        assert busy.read_to_eof() == b""
    code = exit_code(relay_process, FAST_S + EXIT_MARGIN_S)
    exited = time.monotonic() - signalled
    assert code == 0, relay_process.output()
    # uvloop's clock counts whole milliseconds: allow for its rounding.
    assert FAST_S - 0.01 <= told < FAST_S + EXIT_MARGIN_S
    assert exited < FAST_S + EXIT_MARGIN_S < GRACE_S

    check_records(relay_process, idle_port, busy_port)
    conns = raw_upstream.wait_all_ended(2)
    busy_conn = next(conn for conn in conns if b"MAIL" in conn.command_text())
    # Between commands the upstream is left politely, and gets no message.
    assert busy_conn.commands[-1] == b"QUIT\r\n"
    assert busy_conn.data == []


def test_second_sigterm_during_the_grace_exits_promptly(
    relay_process: RelayProcess, raw_upstream: RawUpstream
) -> None:
    address = relay_process.wait_ready()
    with idle_client(address) as idle, busy_client(address) as busy:
        idle_port = idle.sock.getsockname()
        busy_port = busy.sock.getsockname()
        relay_process.process.send_signal(signal.SIGTERM)
        # The idle client's 421 shows the first signal was handled; a
        # second one sent earlier could merge with it.
        assert idle.expect(421) == SHUTTING_DOWN
        assert idle.read_to_eof() == b""
        assert_nothing_received(busy)
        signalled = time.monotonic()
        relay_process.process.send_signal(signal.SIGTERM)
        assert busy.expect(421) == SHUTTING_DOWN
        told = time.monotonic() - signalled
        assert busy.read_to_eof() == b""
    code = exit_code(relay_process, EXIT_MARGIN_S)
    exited = time.monotonic() - signalled
    assert code == 0, relay_process.output()
    assert told < EXIT_MARGIN_S
    assert exited < EXIT_MARGIN_S < GRACE_S
    check_records(relay_process, idle_port, busy_port)
    raw_upstream.wait_all_ended(2)
