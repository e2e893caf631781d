"""``python -m smtpwarden run`` as a process: start, relay one message, SIGTERM.

The listener binds port 0; readiness is the "listener NAME on HOST:PORT"
line the relay logs to standard error at INFO.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from integration.relay_harness import (
    WireClient,
    check_log_invariants,
    read_records,
    validate_records,
)

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
READY_LINE = re.compile(r"listener main on (127\.0\.0\.1):(\d+) relays to ")

MESSAGE = (
    b"From: sender@example.org\r\n"
    b"To: rcpt@example.net\r\n"
    b"Subject: through the process\r\n"
    b"\r\n"
    b".a dot-stuffed line\r\n"
    b"the end\r\n"
)


def read_lines(stream: object, lines: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
        lines.put(raw.decode("utf-8", "replace"))
    lines.put(None)


def wait_ready(lines: queue.Queue[str | None], seen: list[str]) -> tuple[str, int]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no listener line on stderr:\n" + "".join(seen))
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError("the relay exited before it was ready:\n" + "".join(seen))
        seen.append(line)
        found = READY_LINE.search(line)
        if found:
            return found.group(1), int(found.group(2))


def test_run_relays_to_embedded_sink_and_stops_on_sigterm(tmp_path: Path, loop_kind: str) -> None:
    mail = tmp_path / "mail"
    log_path = tmp_path / "transactions.jsonl"
    config = tmp_path / "smtpwarden.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "event_loop": loop_kind,
                "hostname": "relay.test",
                "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "sink"}],
                "upstreams": [{"name": "sink", "kind": "sink", "path": str(mail)}],
                "log": {"transactions": str(log_path), "level": "info"},
                "shutdown": {"grace": 5},
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
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(process.stderr, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        host, port = wait_ready(lines, seen)
        with smtplib.SMTP(host, port, local_hostname="client.test", timeout=10) as client:
            refused = client.sendmail("sender@example.org", ["rcpt@example.net"], MESSAGE)
        assert refused == {}
        # A client still connected, between transactions, is told the relay stops.
        with WireClient((host, port)) as idle:
            idle.expect(220)
            idle.command(b"EHLO idle.test\r\n", 250)
            process.send_signal(signal.SIGTERM)
            assert idle.expect(421).startswith(b"421 4.3.2 ")
            code = process.wait(STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT_S)
        reader.join(STOP_TIMEOUT_S)
        if process.stderr is not None:
            process.stderr.close()
    while not lines.empty():
        line = lines.get_nowait()
        if line is not None:
            seen.append(line)
    assert code == 0, "".join(seen)

    (eml,) = sorted(mail.glob("*.eml"))
    (envelope_file,) = sorted(mail.glob("*.json"))
    assert eml.stem == envelope_file.stem
    assert eml.read_bytes() == MESSAGE
    envelope = json.loads(envelope_file.read_bytes())
    assert envelope["mail_from"] == "sender@example.org"
    assert envelope["rcpt_to"] == ["rcpt@example.net"]
    assert envelope["helo"] == "client.test"

    records = read_records(log_path)
    validate_records(records)
    check_log_invariants(records)
    (transaction,) = [record for record in records if record["type"] == "transaction"]
    assert transaction["outcome"] == "delivered"
    assert transaction["mail_from"]["address"] == "sender@example.org"
    assert transaction["final_reply"]["code"] == 250
    assert envelope["id"] in transaction["final_reply"]["text"]
    sessions = [record for record in records if record["type"] == "session"]
    assert [session["end"] for session in sessions] == ["quit", "shutdown"]
