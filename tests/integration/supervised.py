"""Running ``python -m smtpwarden run`` with ``workers`` as a process, for the tests.

``Supervised`` starts the supervisor with a configuration file, reads its
standard error (its own lines and every worker's) in a thread, and waits
on lines, never on time: ``expect`` returns the next line matching a
pattern, ``wait_ready`` the listener's port and the HTTP endpoint once
every worker reported ready. ``close`` kills whatever is left, the
supervisor and every worker it named, by process id.

``FlakyUpstream`` is an SMTP server (aiosmtpd) that answers the end of
every message with 451 until told to accept, and records each message it
accepted, so that a test can count deliveries exactly.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session

from integration.recording_upstreams import ThreadedServer

START_TIMEOUT_S = 30.0
WAIT_S = 20.0
POLL_S = 0.02

LISTENER_LINE = re.compile(r"listener main on 127\.0\.0\.1:(\d+), shared by (\d+) workers")
HTTP_LINE = re.compile(r"HTTP endpoint for every worker on http://127\.0\.0\.1:(\d+)/metrics")
RUNNING_LINE = re.compile(r"smtpwarden running: (\d+) workers ready")
READY_LINE = re.compile(r"smtpwarden\.workers INFO worker (\d+) \(pid (\d+)\) ready")


class Supervised:
    """The supervisor process and what it wrote on standard error."""

    def __init__(self, config: dict[str, object], folder: Path, stdout: IO[bytes] | None = None):
        path = folder / "smtpwarden.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smtpwarden", "run", "--config", str(path)],
            stdout=stdout if stdout is not None else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=folder,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._cursor = 0  # lines of ``seen`` that ``expect`` has looked at

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in iter(self.process.stderr.readline, b""):
            self._lines.put(raw.decode("utf-8", "replace"))
        self._lines.put(None)

    def _take(self, timeout: float) -> bool:
        """Move one more line into ``seen``; False at the end of the output."""
        line = self._lines.get(timeout=timeout)
        if line is None:
            self._lines.put(None)  # every later call sees the end too
            return False
        self.seen.append(line)
        return True

    def expect(self, pattern: re.Pattern[str], timeout: float = WAIT_S) -> re.Match[str]:
        """The next line (after the last one ``expect`` returned) that matches."""
        deadline = time.monotonic() + timeout
        while True:
            while self._cursor < len(self.seen):
                found = pattern.search(self.seen[self._cursor])
                self._cursor += 1
                if found:
                    return found
            left = deadline - time.monotonic()
            try:
                if left <= 0 or not self._take(left):
                    raise AssertionError(f"no line matching {pattern.pattern!r}:\n{self.output()}")
            except queue.Empty:
                continue

    def wait_ready(self, workers: int) -> tuple[tuple[str, int], tuple[str, int]]:
        """The listener's address and the HTTP endpoint, once every worker is ready."""
        listener = self.expect(LISTENER_LINE, START_TIMEOUT_S)
        assert int(listener.group(2)) == workers
        http = self.expect(HTTP_LINE, START_TIMEOUT_S)
        running = self.expect(RUNNING_LINE, START_TIMEOUT_S)
        assert int(running.group(1)) == workers
        return ("127.0.0.1", int(listener.group(1))), ("127.0.0.1", int(http.group(1)))

    def worker_pids(self) -> dict[int, int]:
        """Each worker index and the pid that last reported ready for it."""
        pids: dict[int, int] = {}
        for line in self.seen:
            found = READY_LINE.search(line)
            if found:
                pids[int(found.group(1))] = int(found.group(2))
        return pids

    def all_pids(self) -> set[int]:
        return {int(found.group(2)) for line in self.seen if (found := READY_LINE.search(line))}

    def output(self) -> str:
        with contextlib.suppress(queue.Empty):
            while self._take(0):
                pass
        return "".join(self.seen)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit within {timeout} s:\n{self.output()}") from None
        self._reader.join(WAIT_S)
        return code

    def close(self) -> None:
        """Kill the supervisor and every worker it named, if still there."""
        pids = self.all_pids()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT_S)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._reader.join(WAIT_S)
        if self.process.stderr is not None:
            self.process.stderr.close()


def gone(pid: int) -> bool:
    """True once process ``pid`` has ended (a zombie waiting for its reaper counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def wait_gone(pids: set[int], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            left = sorted(pid for pid in pids if not gone(pid))
            raise AssertionError(f"processes {left} still running after {timeout} s")
        time.sleep(POLL_S)


class _Flaky:
    """The aiosmtpd handler: 451 at the end of each message until ``accepting``."""

    def __init__(self, owner: FlakyUpstream) -> None:
        self.owner = owner

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.owner.changed:
            if not self.owner.accepting:
                self.owner.refused += 1
                return "451 4.3.0 Try again later"
            self.owner.accepted.append(envelope.original_content or b"")
            self.owner.changed.notify_all()
        return "250 2.0.0 Ok: accepted"


class FlakyUpstream(ThreadedServer):
    """aiosmtpd on its own loop in a thread: defers every message, then accepts."""

    name = "flaky upstream"

    def __init__(self) -> None:
        super().__init__()
        self.accepting = False
        self.refused = 0
        self.accepted: list[bytes] = []
        self._handler = _Flaky(self)
        self._start()

    def factory(self) -> SMTP:
        return SMTP(self._handler, hostname="flaky.test")

    def accept(self) -> None:
        with self.changed:
            self.accepting = True

    def wait_accepted(self, count: int, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.accepted) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.accepted)} of {count} messages accepted")
                self.changed.wait(left)
