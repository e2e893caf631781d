"""The `workers` setting: how many relay processes share the listeners.

`smtpwarden.config` reads the whole file; this module defines and reads the
top-level `workers` key: an integer 1-`MAX_WORKERS`, or "auto" for the
CPUs this process may run on. With more than one, `smtpwarden run` starts
a supervisor and that many relay processes on the same ports
(`smtpwarden.net.workers`).

Rule 1: like `smtpwarden.config`, it never prints, never exits and never
raises `ConfigError`; it reports problems to the checker it is given.

Rule 2: it imports nothing from the project but `smtpwarden.configcheck`, so
that `smtpwarden.config` can import it without a cycle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from smtpwarden.configcheck import Checker, Integer

# Our cap: past a few hundred processes the supervisor's scrape of every
# worker and the memory of idle workers cost more than another core gains,
# and one machine rarely has more cores to give.
MAX_WORKERS: Final = 256
AUTO_WORKERS: Final = "auto"
DEFAULT_WORKERS: Final = 1


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), else every CPU; at least 1."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux, or the call is refused
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class WorkerCount:
    """An integer 1-`MAX_WORKERS`, or "auto": the available CPUs, up to the cap."""

    expected: str = f'an integer 1-{MAX_WORKERS} or "{AUTO_WORKERS}"'

    def convert(self, raw: object) -> int | None:
        if isinstance(raw, str) and raw == AUTO_WORKERS:
            return min(available_cpus(), MAX_WORKERS)
        return Integer(1, MAX_WORKERS).convert(raw)


def read_workers(check: Checker, top: Mapping[str, object]) -> int:
    """The `workers` key; absent means `DEFAULT_WORKERS` (the relay runs alone)."""
    return check.value(top, "workers", "", WorkerCount(), DEFAULT_WORKERS)
