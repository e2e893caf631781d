"""The supervisor's book of its workers: slots, restart backoff, ready lines.

``WorkerSlot`` is one worker index of ``workers`` and the process that
holds it now, if any; ``Backoff`` says how long a slot waits before its
worker is started again; ``read_status`` reads the line a worker writes
once it is ready (``net.worker``). ``net.workers`` runs the processes.

Rule: nothing here starts, signals or waits for a process.
"""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import dataclass, field
from typing import Final

# Restarts of one worker: 1 s after a crash, doubling up to 30 s while it
# keeps dying within 10 s of its start, back to 1 s once it has lived 60 s.
# Our choice: quick enough that a one-off crash costs a second of capacity,
# slow enough that a worker that cannot start costs a few lines of log a
# minute (systemd's RestartSec and StartLimitIntervalSec are of this order).
BACKOFF_INITIAL_S: Final = 1.0
BACKOFF_MAX_S: Final = 30.0
QUICK_EXIT_S: Final = 10.0
STEADY_S: Final = 60.0
# The ready line is a small JSON object; past this it is not one.
MAX_STATUS_BYTES: Final = 4096


@dataclass(slots=True)
class Backoff:
    """The wait before a worker's next start (the rule at ``BACKOFF_INITIAL_S``)."""

    delay: float = BACKOFF_INITIAL_S

    def after_exit(self, lived: float) -> float:
        """The wait after a worker exited ``lived`` seconds after its start."""
        if lived >= STEADY_S:
            self.delay = BACKOFF_INITIAL_S
        wait = self.delay
        if lived < QUICK_EXIT_S:
            self.delay = min(self.delay * 2, BACKOFF_MAX_S)
        return wait


@dataclass(slots=True)
class WorkerSlot:
    """One worker index and the process that holds it now, if any."""

    index: int
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    http: tuple[str, int] | None = None
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    generation: int = 0  # the supervisor's configuration the process was handed
    hangups: int = 0  # the supervisor's SIGHUPs the process has had

    @property
    def state(self) -> str:
        """ready, starting (a process that has not reported ready) or down."""
        if self.process is None:
            return "down"
        return "ready" if self.ready else "starting"


def describe_exit(code: int) -> str:
    """How a process ended, from its return code (negative: the signal)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def read_status(line: bytes) -> tuple[bool, tuple[str, int] | None]:
    """Whether ``line`` is a ready line, and the worker's HTTP address if it has one."""
    try:
        status = json.loads(line) if line else None
    except ValueError:
        return False, None
    if not isinstance(status, dict):
        return False, None
    http = status.get("http")
    if http is None:
        return True, None
    if (
        isinstance(http, list)
        and len(http) == 2
        and isinstance(http[0], str)
        and isinstance(http[1], int)
    ):
        return True, (http[0], http[1])
    return False, None
