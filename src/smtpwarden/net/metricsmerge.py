"""Merging the metrics of several worker processes into one exposition.

Each worker serves its own ``/metrics`` (``net.telemetry``); the supervisor
of ``workers`` (``net.workerhttp``) fetches them all and answers with
``merge``: one Prometheus text exposition (format 0.0.4) in which every
sample carries the label ``worker="I"`` of the worker it came from, and
each family appears once, its ``# HELP`` and ``# TYPE`` lines first and all
its samples, of every worker, right after them. The text format requires
this: a family's lines must be contiguous, and a second ``# TYPE`` for a
name is an error a scraper rejects the whole scrape for.

Counters stay per worker (a restarted worker's counters start again at 0,
which ``rate`` reads as a reset of that worker's series only); summing
across workers is the query's job (``sum without (worker)``).

Rule 1: no I/O, no clock, no event loop: expositions in, bytes out.

Rule 2: merging never raises for what a worker sent: a line that is not a
comment, a family line or a sample is left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from smtpwarden.observe.metrics import escape_label

WORKER_LABEL: Final = "worker"
# A sample line starts with its metric name (the Prometheus data model),
# and its value follows a space: a float as Go's ParseFloat reads it, or a
# special value, then at most a timestamp.
_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_VALUE: Final = re.compile(
    r" [+-]?(?:Inf|NaN|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+)(?: -?[0-9]+)?"
)
_HISTOGRAM_SUFFIXES: Final = ("_bucket", "_sum", "_count")


@dataclass(slots=True)
class _Family:
    """One family as merged: its HELP and TYPE lines and every worker's samples."""

    help: str | None = None
    type: str | None = None
    samples: list[str] = field(default_factory=list)


def merge(parts: Iterable[tuple[str, bytes]], *, label: str = WORKER_LABEL) -> bytes:
    """One exposition from ``parts``, pairs of (label value, a worker's exposition).

    Families keep the order in which they first appear; within a family the
    samples keep the order of ``parts``, and each gets ``label``. Returns
    UTF-8 text ending in a line feed, or b"" when there is no family at all.
    """
    families: dict[str, _Family] = {}
    for value, exposition in parts:
        _add(families, exposition.decode("utf-8", "replace"), label, value)
    out: list[str] = []
    for family in families.values():
        if family.help is not None:
            out.append(family.help)
        if family.type is not None:
            out.append(family.type)
        out.extend(family.samples)
    return "".join(line + "\n" for line in out).encode("utf-8")


def _add(families: dict[str, _Family], text: str, label: str, value: str) -> None:
    """Add one worker's exposition to ``families``."""
    current: str | None = None
    for line in text.split("\n"):
        if line.startswith(("# HELP ", "# TYPE ")):
            name = line[7:].split(" ", 1)[0]
            family = families.setdefault(name, _Family())
            if line.startswith("# HELP "):
                family.help = family.help or line
            else:
                family.type = family.type or line
            current = name
            continue
        if not line or line.startswith("#"):
            continue
        found = _NAME.match(line)
        if found is None:
            continue
        labelled = with_label(line, found.end(), label, value)
        if labelled is None:
            continue
        name = found.group()
        owner = current if current is not None and _belongs(name, current) else name
        families.setdefault(owner, _Family()).samples.append(labelled)


def _belongs(sample: str, family: str) -> bool:
    return sample == family or (
        sample.startswith(family) and sample[len(family) :] in _HISTOGRAM_SUFFIXES
    )


def with_label(line: str, name_end: int, label: str, value: str) -> str | None:
    """The sample ``line`` with ``label="value"`` added to its labels.

    ``name_end`` is where its metric name ends. None for a line that is not
    a sample: a label set that does not end (an unclosed brace or quote),
    or no value after it.
    """
    pair = f'{label}="{escape_label(value)}"'
    if not line.startswith("{", name_end):
        if not _VALUE.fullmatch(line, name_end):
            return None
        return f"{line[:name_end]}{{{pair}}}{line[name_end:]}"
    close = _closing_brace(line, name_end + 1)
    if close is None or not _VALUE.fullmatch(line, close + 1):
        return None
    inner = line[name_end + 1 : close].rstrip()
    joined = pair if not inner else f"{inner}{pair}" if inner.endswith(",") else f"{inner},{pair}"
    return f"{line[:name_end]}{{{joined}}}{line[close + 1 :]}"


def _closing_brace(line: str, start: int) -> int | None:
    """The index of the "}" that ends a label set begun before ``start``; quoted
    label values (with their backslash escapes) may hold braces."""
    quoted = False
    at = start
    while at < len(line):
        char = line[at]
        if quoted and char == "\\":
            at += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            return at
        at += 1
    return None
