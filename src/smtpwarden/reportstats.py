"""Bounded accumulators for ``report``: tallies, latency samples, time buckets.

Rule 1: pure. Values in, summaries out; no I/O, no clock. The one source
of randomness is a generator seeded with a constant, so the same log gives
the same report.

Rule 2: memory stays bounded however long the log is. A tally stops adding
keys at its limit and counts the rest under ``OTHER``; a latency sample
keeps at most ``SAMPLE_SIZE`` values; time buckets grow coarser when there
are too many of them.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

T = TypeVar("T")

OTHER = "(other)"
# Distinct keys (upstream names, recipient domains, ...) a tally keeps before
# it counts new ones under OTHER: 100,000 domains is far more than a top-N
# table shows and keeps a tally to tens of MB. Our choice.
MAX_KEYS = 100_000
# Latency values kept per phase. Up to this many steps the percentiles are
# exact; past it they come from a uniform sample of this size (Vitter's
# Algorithm R), about 1.6 MB of doubles per phase. Our choice: the p99 of
# 200,000 values is off by well under a percent of rank.
SAMPLE_SIZE = 200_000
# Fixed seed: the sample, so the report, depends only on the log.
SAMPLE_SEED = 5321
PERCENTILES = (50, 90, 99)

MINUTE_S, HOUR_S, DAY_S = 60, 3600, 86400
# Bucket widths for the timeline, smallest first; each at most 3.5 times the
# one before it, so the first width giving at most MAX_BUCKETS buckets gives
# at least MAX_BUCKETS / 3.5 (about 17) whenever the span allows ten.
WIDTHS_S = (
    MINUTE_S,
    2 * MINUTE_S,
    5 * MINUTE_S,
    10 * MINUTE_S,
    15 * MINUTE_S,
    30 * MINUTE_S,
    HOUR_S,
    2 * HOUR_S,
    3 * HOUR_S,
    6 * HOUR_S,
    12 * HOUR_S,
    DAY_S,
    2 * DAY_S,
    7 * DAY_S,
    14 * DAY_S,
    30 * DAY_S,
)
MAX_BUCKETS = 60  # bars a chart can show legibly at page width; our choice
# Distinct stored buckets before the stored unit grows from minutes to hours,
# then to days, then to 30 days: two weeks of minutes, about two years of
# hours, about 55 years of days. Our choice: a few MB at most.
MAX_STORED_BUCKETS = 14 * 24 * 60
# Each unit divides the next and every width in WIDTHS_S at least as large.
UNITS_S = (MINUTE_S, HOUR_S, DAY_S, 30 * DAY_S)


class Tally(Generic[T]):
    """A value per key, made by ``factory``; keys past ``limit`` share OTHER."""

    def __init__(self, factory: Callable[[], T], limit: int = MAX_KEYS) -> None:
        self.factory = factory
        self.limit = limit
        self.items: dict[str, T] = {}

    def __getitem__(self, key: str) -> T:
        """The value for ``key`` (made if new), or OTHER's once the tally is full."""
        found = self.items.get(key)
        if found is None:
            if len(self.items) >= self.limit and key != OTHER:
                return self[OTHER]
            found = self.items[key] = self.factory()
        return found


@dataclass(slots=True)
class Count:
    """A mutable counter, the value type of a counting ``Tally``."""

    n: int = 0


def top_keys(counts: dict[str, int], limit: int | None = None) -> list[tuple[str, int]]:
    """Keys by count, highest first, then by name; at most ``limit`` of them."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ranked if limit is None else ranked[:limit]


class Sample:
    """Latencies of one phase: an exact count and maximum, and a bounded sample."""

    def __init__(self, size: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED) -> None:
        self.size = size
        self.count = 0
        self.maximum = 0.0
        self.values = array("d")
        # Not for security: a reproducible sample of latencies.
        self._rng = random.Random(seed)  # noqa: S311

    def add(self, value: float) -> None:
        self.count += 1
        self.maximum = max(self.maximum, value)
        if len(self.values) < self.size:
            self.values.append(value)
            return
        # Algorithm R: the n-th value replaces a kept one with probability size/n.
        slot = self._rng.randrange(self.count)
        if slot < self.size:
            self.values[slot] = value

    @property
    def exact(self) -> bool:
        return self.count <= self.size

    def percentiles(self) -> tuple[float, ...]:
        """Nearest-rank percentiles for ``PERCENTILES``; zeros when empty."""
        ordered = sorted(self.values)
        if not ordered:
            return tuple(0.0 for _ in PERCENTILES)
        return tuple(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in PERCENTILES)


@dataclass(slots=True)
class BucketCounts:
    """What happened in one time bucket."""

    transactions: int = 0
    retried: int = 0
    requeued: int = 0
    replays: int = 0  # upstream attempts beyond the first
    duplicate_risk: int = 0

    def merge(self, other: BucketCounts) -> None:
        self.transactions += other.transactions
        self.retried += other.retried
        self.requeued += other.requeued
        self.replays += other.replays
        self.duplicate_risk += other.duplicate_risk


class Timeline:
    """Counts per time bucket, stored by minute, then hour, day or 30 days (``UNITS_S``)."""

    def __init__(self, max_stored: int = MAX_STORED_BUCKETS) -> None:
        self.unit = MINUTE_S
        self.max_stored = max_stored
        self.buckets: dict[int, BucketCounts] = {}

    def at(self, epoch: float) -> BucketCounts:
        """The stored bucket that holds ``epoch`` (seconds), made if new."""
        key = int(epoch // self.unit) * self.unit
        found = self.buckets.get(key)
        if found is None:
            if len(self.buckets) >= self.max_stored and self.unit < UNITS_S[-1]:
                self._coarsen()
                return self.at(epoch)
            found = self.buckets[key] = BucketCounts()
        return found

    def _coarsen(self) -> None:
        self.unit = UNITS_S[UNITS_S.index(self.unit) + 1]
        merged: dict[int, BucketCounts] = {}
        for key, counts in self.buckets.items():
            merged.setdefault(key // self.unit * self.unit, BucketCounts()).merge(counts)
        self.buckets = merged

    def width(self) -> int:
        """The bucket width in seconds: the smallest giving at most MAX_BUCKETS buckets."""
        if not self.buckets:
            return MINUTE_S
        first, last = min(self.buckets), max(self.buckets)
        for width in WIDTHS_S:
            if width % self.unit == 0 and last // width - first // width < MAX_BUCKETS:
                return width
        width = WIDTHS_S[-1]
        while last // width - first // width >= MAX_BUCKETS:
            width *= 2
        return width

    def series(self, width: int) -> list[tuple[int, BucketCounts]]:
        """Every bucket of ``width`` seconds from the first to the last, empty ones too."""
        if not self.buckets:
            return []
        merged: dict[int, BucketCounts] = {}
        for key, counts in self.buckets.items():
            merged.setdefault(key // width * width, BucketCounts()).merge(counts)
        first, last = min(merged), max(merged)
        return [
            (start, merged.get(start, BucketCounts())) for start in range(first, last + 1, width)
        ]


def width_name(width: int) -> str:
    """A bucket width for people: "1 minute", "15 minutes", "1 hour", "7 days"."""
    for unit, name in ((DAY_S, "day"), (HOUR_S, "hour"), (MINUTE_S, "minute")):
        if width % unit == 0:
            count = width // unit
            return f"{count} {name}{'' if count == 1 else 's'}"
    return f"{width} seconds"


def rfc3339(epoch: float) -> str:
    """``epoch`` as RFC 3339 UTC with milliseconds, as the log writes times."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str) -> float | None:
    """Epoch seconds of an RFC 3339 time (a time without offset is UTC), or None."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
