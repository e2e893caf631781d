"""Relay replicas as processes, and an upstream that knows every message by its id.

``Replica`` is one ``python -m smtpwarden run`` process with a folder of its
own (configuration, spool, record log, standard error), a PROXY listener on
a port chosen once and kept across restarts, and a requeue route to the
upstream. Readiness is a real SMTP greeting read from the listener after a
PROXY v2 LOCAL header (as a load balancer's own check sends it), never a
sleep. ``kill`` sends SIGKILL; ``start`` again runs a new process on the
same port, spool and log, and remembers where that run's records begin.

``IdUpstream`` is aiosmtpd in a thread. It finds each message's
``X-Test-Id`` header and records every acceptance with its time and the
EHLO name of the connection (a client's session says the client's name, a
spool delivery the replica's ``hostname``). Messages whose id is a multiple
of ``defer_every`` get 451 at their first ``deferrals`` ends of data, so
that replicas spool them and deliver them later.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session

from integration.external_tools import wait_for_banner
from integration.recording_upstreams import ThreadedServer
from integration.relay_harness import POLL_S, free_port
from smtpwarden.protocol.proxy import encode_v2
from smtpwarden.spool.files import Layout

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
START_ATTEMPTS = 3  # a fresh port each time, in case another program took the last one
TEST_ID = re.compile(rb"^X-Test-Id: (\d+)\r?$", re.MULTILINE)
RESUMED = re.compile(r"spool \S+: (\d+) to resume, (\d+) held, (\d+) dead, (\d+) quarantined")

# Short enough that a stuck peer fails the test quickly, long enough for a
# busy two-core machine.
TIMEOUTS = {
    "connect": 5.0,
    "banner": 15.0,
    "command": 30.0,
    "mail": 15.0,
    "rcpt": 15.0,
    "data_init": 15.0,
    "data_block": 15.0,
    "data_end": 15.0,
    "reply": 15.0,
}


@dataclass(frozen=True)
class Acceptance:
    """One 250 the upstream gave to the end of a message."""

    at: float  # time.monotonic() in this process
    helo: str  # the EHLO (or HELO) name of the connection


class _Handler:
    def __init__(self, owner: IdUpstream) -> None:
        self.owner = owner

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return self.owner.end_of_data(envelope.original_content or b"", session.host_name or "")


class IdUpstream(ThreadedServer):
    """aiosmtpd recording each message by its ``X-Test-Id``; defers some at first."""

    name = "id upstream"

    def __init__(self, *, defer_every: int, deferrals: int) -> None:
        super().__init__()
        self.defer_every = defer_every
        self.deferrals = deferrals
        self.accepted: defaultdict[int, list[Acceptance]] = defaultdict(list)
        self.refused: Counter[int] = Counter()
        self.unidentified = 0
        self._start()

    def factory(self) -> SMTP:
        return SMTP(_Handler(self), hostname="upstream.test")

    def end_of_data(self, content: bytes, helo: str) -> str:
        found = TEST_ID.search(content)
        with self.changed:
            if found is None:
                self.unidentified += 1
                return "554 5.6.0 No X-Test-Id"
            number = int(found.group(1))
            if number % self.defer_every == 0 and self.refused[number] < self.deferrals:
                self.refused[number] += 1
                return "451 4.3.0 Not yet, try again later"
            self.accepted[number].append(Acceptance(time.monotonic(), helo))
            self.changed.notify_all()
        return "250 2.0.0 Ok: accepted"

    def snapshot(self) -> dict[int, list[Acceptance]]:
        with self.changed:
            return {number: list(got) for number, got in self.accepted.items()}


class Replica:
    """One relay process in front of the upstream, restartable on its port and spool."""

    def __init__(
        self,
        name: str,
        folder: Path,
        upstream: dict[str, object],
        *,
        trusted: str,
        spool_workers: int,
        backoff: dict[str, float],
    ) -> None:
        self.name = name
        self.hostname = f"{name}.test"
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.upstream = upstream
        self.trusted = trusted
        self.spool_workers = spool_workers
        self.backoff = backoff
        self.config_path = folder / "smtpwarden.yaml"
        self.spool = Layout(folder / "spool")
        self.log_path = folder / "records.jsonl"
        self.stderr_path = folder / "stderr.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        # Where each run's records and standard error begin in their files.
        self.runs: list[tuple[int, int]] = []

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    def config(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "listeners": [
                {
                    "name": "main",
                    "host": HOST,
                    "port": self.port,
                    "upstream": "up",
                    "proxy_protocol": {"trusted": [self.trusted]},
                }
            ],
            "upstreams": [{"name": "up", **self.upstream}],
            "routes": [{"name": "main", "policy": "requeue", "upstreams": ["up"]}],
            # No replay: a deferred message goes to the spool at once.
            "retry": {"attempts": 0, "budget": 10},
            # Deferrals are part of the test: they must not take the upstream out.
            "health": {"failures": 1_000_000, "check_interval": 0},
            "spool": {
                "path": str(self.spool.root),
                "workers": self.spool_workers,
                "backoff": self.backoff,
            },
            "timeouts": TIMEOUTS,
            "log": {"transactions": str(self.log_path), "sessions": True, "level": "info"},
            "http": {"port": 0},
            "shutdown": {"grace": 5},
        }

    def start(self) -> None:
        """Start the process and wait until it greets through PROXY.

        The first start chooses a free port (another if the relay cannot
        bind it); a restart keeps the port. Whatever fails, no process is
        left running.
        """
        attempts = START_ATTEMPTS if self.port == 0 else 1
        fresh = self.port == 0
        try:
            for _ in range(attempts):
                if fresh:
                    self.port = free_port()
                self.config_path.write_text(yaml.safe_dump(self.config()), encoding="utf-8")
                self.runs.append((self._size(self.log_path), self._size(self.stderr_path)))
                with open(self.stderr_path, "ab") as stderr:
                    self.process = subprocess.Popen(
                        [sys.executable, "-m", "smtpwarden", "run", "--config", "smtpwarden.yaml"],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=stderr,
                        cwd=self.folder,
                    )
                if self._wait_ready():
                    return
                self.runs.pop()
            raise AssertionError(f"{self.name} did not start on port {self.port}:\n{self.stderr()}")
        except BaseException:
            self.kill()
            raise

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def _wait_ready(self) -> bool:
        """A 220 after a PROXY v2 LOCAL header; False if the process exited first."""
        process = self.process
        assert process is not None
        return wait_for_banner(
            self.port,
            time.monotonic() + START_TIMEOUT_S,
            process,
            preamble=encode_v2(None, None, local=True),
            what=f" through PROXY from {self.name}",
            diagnostics=self.stderr,
        )

    def kill(self) -> None:
        """SIGKILL the process, if it runs, and reap it."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(STOP_TIMEOUT_S)

    def stop(self) -> int | None:
        """SIGTERM, and SIGKILL past a deadline; the exit status, None if it was killed."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                return process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return process.returncode

    def stderr(self, run: int = 0) -> str:
        """What the process wrote on standard error, from run ``run`` on (0: every run)."""
        try:
            data = self.stderr_path.read_bytes()
        except FileNotFoundError:
            return ""
        start = self.runs[run][1] if self.runs else 0
        return data[start:].decode("utf-8", "replace")

    def resumed(self, run: int) -> int | None:
        """The spool entries run ``run`` found to resume when it started; None if not said."""
        found = RESUMED.search(self.stderr(run))
        return int(found.group(1)) if found is not None else None

    def records(self, run: int = 0) -> tuple[list[dict[str, Any]], int]:
        """The records from run ``run`` on, and how many lines were not JSON.

        A SIGKILL may cut the last write of a run; such a line is counted,
        not parsed.
        """
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return [], 0
        start = self.runs[run][0] if self.runs else 0
        records: list[dict[str, Any]] = []
        broken = 0
        for line in data[start:].splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                broken += 1
        return records, broken

    def queue_ids(self) -> set[str]:
        """The queue ids of the entries in the spool's queue (one envelope file each)."""
        with contextlib.suppress(FileNotFoundError):
            return {path.stem for path in self.spool.queue.iterdir() if path.suffix == ".env"}
        return set()

    def queued(self) -> int:
        return len(self.queue_ids())

    def quarantined(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            return sum(1 for _ in self.spool.quarantine.iterdir())
        return 0


def wait_for(holds: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``holds()`` until it is true; return the seconds it took, fail past ``timeout``."""
    began = time.monotonic()
    while not holds():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(POLL_S)
    return time.monotonic() - began
