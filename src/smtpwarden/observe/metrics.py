"""Prometheus metrics: counters, gauges and histograms, and their text exposition.

``Registry.exposition`` renders every registered family in the Prometheus
text format, version 0.0.4: a ``# HELP`` and a ``# TYPE`` line per family,
then one line per series; histograms as cumulative ``_bucket`` series ending
in ``le="+Inf"``, then ``_sum`` and ``_count``.

``RelayMetrics`` defines the relay's own families. Most of them are fed by
the records the relay writes anyway: ``RelayMetrics.observe`` is a
``RecordLog`` observer, so the hot path gains one call per record and
nothing per command, reply or chunk. What is a state rather than an event
(open sessions, upstream health, the spool) is read when scraped, through
the ``read_from`` callables the relay sets.

Rule 1: no I/O, no clock, no event loop. Values come in, bytes go out; the
HTTP endpoint (``net.control``) serves them.

Rule 2: recording never raises for a value the relay produced: label values
are any strings (escaped at exposition), and a record of an unknown type
is ignored.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import ClassVar, Final, Protocol, TypeVar, cast

from smtpwarden.protocol.records import SessionRecord, Step, TransactionRecord

LabelValues = tuple[str, ...]
Reading = Callable[[], Iterable[tuple[LabelValues, float]]]

F = TypeVar("F", bound="Family")

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# The Prometheus data model: metric and label names.
_METRIC_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Floats below this print as integers ("3", not "3.0"); beyond it a float
# no longer holds every integer.
_EXACT_INTEGER: Final = 2.0**53


def format_value(value: float) -> str:
    """A sample value as the text format writes it (Go's ParseFloat reads it)."""
    if isinstance(value, int):
        # Typed float, but ints pass too (PEP 484), and int has no
        # is_integer() before Python 3.12.
        value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < _EXACT_INTEGER:
        return str(int(value))
    return repr(value)


def escape_label(value: str) -> str:
    """A label value escaped for the text format: backslash, quote, line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """A HELP text escaped for the text format: backslash and line feed."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class Family:
    """A metric family: a name, its help, its label names, and its series."""

    kind: ClassVar[str]

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"not a metric name: {name!r}")
        for label in labels:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__") or label == "le":
                raise ValueError(f"{name}: not a usable label name: {label!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"{name}: a label name is repeated")
        self.name = name
        self.help = help_text
        self.labels = tuple(labels)

    @property
    def sample_names(self) -> tuple[str, ...]:
        """The names its sample lines use."""
        return (self.name,)

    def lines(self) -> Iterator[str]:
        """Its sample lines, each ending in a line feed."""
        raise NotImplementedError

    def _check(self, values: LabelValues) -> None:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: expected labels {self.labels}, got {values}")

    def _series(self, values: LabelValues, extra: str = "") -> str:
        pairs = [
            f'{label}="{escape_label(value)}"'
            for label, value in zip(self.labels, values, strict=True)
        ]
        if extra:
            pairs.append(extra)
        return "{" + ",".join(pairs) + "}" if pairs else ""


class _Valued(Family):
    """A counter or gauge: one number per series, or numbers read when scraped."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {}
        self._reading: Reading | None = None

    def read_from(self, reading: Reading) -> None:
        """Take the series from ``reading()`` at each scrape instead."""
        self._reading = reading

    def value(self, *values: str) -> float:
        """The current value of one series (0 if it has none)."""
        for found, value in self._items():
            if found == values:
                return value
        return 0.0

    def _items(self) -> Iterable[tuple[LabelValues, float]]:
        if self._reading is not None:
            return self._reading()
        return self._values.items()

    def lines(self) -> Iterator[str]:
        items = sorted(self._items())
        for values, value in items:
            self._check(values)
            yield f"{self.name}{self._series(values)} {format_value(value)}\n"


class Counter(_Valued):
    """A count that only goes up (or a reading of one, see ``read_from``)."""

    kind = "counter"

    def inc(self, *values: str, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0) to the series of these label values."""
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down")
        if len(values) != len(self.labels):
            self._check(values)
        self._values[values] = self._values.get(values, 0.0) + amount


class Gauge(_Valued):
    """A value that goes up and down (or a reading of one, see ``read_from``)."""

    kind = "gauge"

    def set(self, value: float, *values: str) -> None:
        """Set the series of these label values."""
        self._check(values)
        self._values[values] = value

    def clear(self) -> None:
        """Drop every series: what is no longer measured is not shown."""
        self._values.clear()


class _Buckets:
    """One histogram series: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total = 0.0


class Histogram(Family):
    """Observations counted in buckets by upper bound (``le``)."""

    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> None:
        super().__init__(name, help_text, labels)
        bounds = [float(bound) for bound in buckets if not math.isinf(bound)]
        if not bounds or any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
            raise ValueError(f"{name}: buckets must be increasing, at least one finite")
        if any(math.isnan(bound) for bound in bounds):
            raise ValueError(f"{name}: a bucket bound is NaN")
        self.bounds = tuple(bounds)
        self._series_of: dict[LabelValues, _Buckets] = {}

    @property
    def sample_names(self) -> tuple[str, ...]:
        return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")

    def observe(self, value: float, *values: str) -> None:
        """Count one observation in the series of these label values."""
        series = self._series_of.get(values)
        if series is None:
            self._check(values)
            series = self._series_of[values] = _Buckets(len(self.bounds) + 1)
        # The first bound >= value: bucket "le" holds values <= its bound.
        series.counts[bisect.bisect_left(self.bounds, value)] += 1
        series.total += value

    def count(self, *values: str) -> int:
        """Observations so far in one series."""
        series = self._series_of.get(values)
        return 0 if series is None else sum(series.counts)

    def lines(self) -> Iterator[str]:
        for values, series in sorted(self._series_of.items(), key=lambda item: item[0]):
            running = 0
            edges = [*(format_value(bound) for bound in self.bounds), "+Inf"]
            for edge, count in zip(edges, series.counts, strict=True):
                running += count
                labels = self._series(values, f'le="{edge}"')
                yield f"{self.name}_bucket{labels} {running}\n"
            labels = self._series(values)
            yield f"{self.name}_sum{labels} {format_value(series.total)}\n"
            yield f"{self.name}_count{labels} {running}\n"


class Registry:
    """The families one endpoint exposes, in the order they were registered."""

    def __init__(self) -> None:
        self._families: list[Family] = []
        self._names: set[str] = set()

    def register(self, family: F) -> F:
        """Add ``family`` and return it; raises ValueError for a name taken."""
        taken = self._names.intersection((family.name, *family.sample_names))
        if taken:
            raise ValueError(f"metric name already registered: {sorted(taken)[0]}")
        self._names.update((family.name, *family.sample_names))
        self._families.append(family)
        return family

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(self._families)

    def sample_names(self) -> frozenset[str]:
        """Every name a sample line of this registry can carry."""
        return frozenset(name for family in self._families for name in family.sample_names)

    def exposition(self) -> bytes:
        """Every family in the text format 0.0.4, UTF-8 encoded.

        Raises what a ``read_from`` callable raises.
        """
        out: list[str] = []
        for family in self._families:
            out.append(f"# HELP {family.name} {escape_help(family.help)}\n")
            out.append(f"# TYPE {family.name} {family.kind}\n")
            out.extend(family.lines())
        return "".join(out).encode("utf-8")


# --- The relay's metrics -------------------------------------------------------

# Upper bounds, in seconds, of the phase histograms: from a reply on the
# same host (under a millisecond) to RFC 5321 4.5.3.2.6's 10 minutes for the
# reply to the final dot, the longest wait the relay allows (timeouts.data_end).
PHASE_BUCKETS_S: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
PHASES: Final = ("connect", "banner", "ehlo", "mail", "rcpt", "data", "dot")
# Timeline commands whose reply latency is a phase; "." and "BDAT LAST" end
# the message, so both are the final dot's phase.
_PHASE_OF: Final = {
    "CONNECT": "banner",
    "EHLO": "ehlo",
    "HELO": "ehlo",
    "MAIL": "mail",
    "RCPT": "rcpt",
    "DATA": "data",
    ".": "dot",
    "BDAT LAST": "dot",
}
_CLASS_OF: Final = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
QUEUE_STATES: Final = ("queued", "deferred", "held", "dead")


class Delivered(Protocol):
    """What the metrics read of a spool delivery record (``net.verdict``)."""

    @property
    def outcome(self) -> str: ...
    @property
    def attempts(self) -> int: ...


class RelayMetrics:
    """The smtpwarden_* families and how records feed them."""

    def __init__(self) -> None:
        registry = self.registry = Registry()
        self.sessions = registry.register(
            Counter(
                "smtpwarden_sessions_total",
                "Client sessions ended, by listener and how they ended (the session record's end).",
                ("listener", "end"),
            )
        )
        self.transactions = registry.register(
            Counter(
                "smtpwarden_transactions_total",
                "Mail transactions ended, by listener, outcome and diagnosed failure pattern.",
                ("listener", "outcome", "pattern"),
            )
        )
        self.replies = registry.register(
            Counter(
                "smtpwarden_replies_total",
                "Upstream replies in the records' timelines, by upstream and reply class.",
                ("upstream", "class"),
            )
        )
        self.phases = registry.register(
            Histogram(
                "smtpwarden_phase_seconds",
                "Upstream latency by phase: connect, banner, ehlo, mail, rcpt, data "
                "(the reply to DATA) and dot (the reply to the final dot or BDAT LAST).",
                ("phase",),
                buckets=PHASE_BUCKETS_S,
            )
        )
        self.sessions_active = registry.register(
            Gauge(
                "smtpwarden_sessions_active",
                "Client sessions open now, by listener.",
                ("listener",),
            )
        )
        self.client_bytes = registry.register(
            Counter(
                "smtpwarden_client_bytes_total",
                "Octets received from clients, by listener (counted when a session ends).",
                ("listener",),
            )
        )
        self.upstream_bytes = registry.register(
            Counter(
                "smtpwarden_upstream_bytes_total",
                "Octets of commands and messages relayed upstream, by listener "
                "(counted when a session ends).",
                ("listener",),
            )
        )
        self.retries = registry.register(
            Counter(
                "smtpwarden_retries_total",
                "Upstream attempts after the first: replays of a transaction (source replay) "
                "and deliveries of a spooled message (source spool).",
                ("source",),
            )
        )
        self.deliveries = registry.register(
            Counter(
                "smtpwarden_spool_deliveries_total",
                "Spooled messages that left the queue or went to dead letters, by outcome.",
                ("outcome",),
            )
        )
        self.queue = registry.register(
            Gauge(
                "smtpwarden_queue_messages",
                "Messages in the spool, by state.",
                ("state",),
            )
        )
        self.queue_oldest = registry.register(
            Gauge(
                "smtpwarden_queue_oldest_seconds",
                "Age of the oldest message in the spool that is not dead (0 when none is).",
            )
        )
        self.upstream_up = registry.register(
            Gauge(
                "smtpwarden_upstream_up",
                "1 while an upstream is usable, 0 while its circuit breaker holds it down.",
                ("upstream",),
            )
        )
        self.checks = registry.register(
            Counter(
                "smtpwarden_upstream_checks_total",
                "Active health checks of upstreams, by result (ok or failed).",
                ("upstream", "result"),
            )
        )
        self.certificate_expiry = registry.register(
            Gauge(
                "smtpwarden_upstream_certificate_expiry_timestamp_seconds",
                "When the certificate an upstream presented to the last health check expires "
                "(Unix time).",
                ("upstream",),
            )
        )
        self.records_dropped = registry.register(
            Counter(
                "smtpwarden_records_dropped_total",
                "Records lost because the transaction log could not be written.",
            )
        )

        self.reloads = registry.register(
            Counter(
                "smtpwarden_config_reloads_total",
                "Configuration reloads (SIGHUP), by result: applied or refused.",
                ("result",),
            )
        )
        self.reload_ok = registry.register(
            Gauge(
                "smtpwarden_config_last_reload_successful",
                "0 after a reload was refused, until one applies; 1 otherwise.",
            )
        )
        self.reload_ok.set(1.0)

    def reloaded(self, applied: bool) -> None:
        """A reload was applied, or refused with the configuration kept."""
        self.reloads.inc("applied" if applied else "refused")
        self.reload_ok.set(1.0 if applied else 0.0)

    def observe(self, record: object) -> None:
        """Count one record the relay wrote (a ``RecordLog`` observer)."""
        if isinstance(record, TransactionRecord):
            # ``_value_``: the plain attribute, ``value`` is a Python-level property.
            pattern = "none" if record.diagnosis is None else record.diagnosis.pattern._value_
            self.transactions.inc(record.listener, record.outcome._value_, pattern)
            if record.attempts > 1:
                self.retries.inc("replay", amount=record.attempts - 1)
            self._timeline(record.upstream.name, record.timeline)
        elif isinstance(record, SessionRecord):
            self.sessions.inc(record.listener, record.end)
            self.client_bytes.inc(record.listener, amount=record.client_bytes)
            self.upstream_bytes.inc(record.listener, amount=record.upstream_bytes)
            self._timeline(record.upstream.name, record.timeline)
        elif getattr(record, "type", None) == "delivery":
            self._delivery(cast(Delivered, record))

    def connected(self, seconds: float) -> None:
        """An upstream connection opened after ``seconds`` (TCP, implicit TLS included)."""
        self.phases.observe(seconds, "connect")

    def _delivery(self, record: Delivered) -> None:
        self.deliveries.inc(str(record.outcome))
        if record.attempts > 1:
            self.retries.inc("spool", amount=record.attempts - 1)

    def _timeline(self, upstream: str, steps: Iterable[Step]) -> None:
        for step in steps:
            code = step.code
            if code is None or step.local:
                continue
            reply_class = _CLASS_OF.get(code // 100)
            if reply_class is not None:
                self.replies.inc(upstream, reply_class)
            phase = _PHASE_OF.get(step.command)
            if phase is not None and step.latency_ms is not None:
                self.phases.observe(step.latency_ms / 1000.0, phase)
