"""What ``smtpwarden report`` takes and produces: frozen dataclasses, no logic.

``report.Analysis`` applies ``Filters`` and builds a ``Report``;
``reporttext`` and ``reporthtml`` render it, and ``dataclasses.asdict``
gives its JSON. Every name in a Report comes from a log and is untrusted:
renderers escape it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Filters:
    """Which records count: a time range and listener and upstream names.

    ``since`` is inclusive and ``until`` exclusive, both epoch seconds; an
    empty set of names lets every name through.
    """

    since: float | None = None
    until: float | None = None
    listeners: frozenset[str] = frozenset()
    upstreams: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class Lines:
    """What the records given to the analysis were."""

    transactions: int = 0  # transaction records counted in the report
    sessions: int = 0
    deliveries: int = 0
    filtered: int = 0  # records outside --since, --until, --listener or --upstream
    not_json: int = 0  # set by the reader: lines that did not parse
    not_records: int = 0  # JSON that is not an object, or a record of no known type
    malformed: int = 0  # transaction records without a usable time or outcome

    @property
    def skipped(self) -> int:
        return self.not_json + self.not_records + self.malformed


@dataclass(frozen=True, slots=True, kw_only=True)
class Share:
    """A name, how many, and what percent of the whole that is."""

    name: str
    count: int
    percent: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CauseShare:
    name: str
    count: int
    percent: float
    advice: str  # the advice the records give most often for this cause


@dataclass(frozen=True, slots=True, kw_only=True)
class FailingUpstream:
    """Transactions through one upstream that were neither delivered nor retried."""

    name: str
    failed: int
    total: int
    percent: float  # failed of total
    outcomes: tuple[Share, ...]  # the failed ones by outcome
    # Their most common failing reply code (the upstream's last 4xx or 5xx in
    # the transaction, else a failing final reply); None: there was none.
    reply_code: int | None
    reply_count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FailingDomain:
    """Recipients of one domain whose RCPT got a 4xx or 5xx reply."""

    name: str
    failed: int
    total: int  # recipients of the domain with any reply
    code: int  # the most common failure code
    code_count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    """Percentiles of one phase's latency, in ms (nearest rank)."""

    phase: str
    count: int
    exact: bool  # False: estimated from a uniform sample of ``sampled`` values
    sampled: int
    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Bucket:
    """Transactions that began in [start, start + bucket width)."""

    start: str  # RFC 3339
    transactions: int
    retried: int
    requeued: int
    replays: int
    duplicate_risk: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Everything ``smtpwarden report`` shows; every list is in display order."""

    lines: Lines
    first: str | None  # the earliest and latest transaction time, RFC 3339
    last: str | None
    transactions: int
    recipients: int
    failed_recipients: int
    outcomes: tuple[Share, ...]  # every outcome, zeros included
    patterns: tuple[Share, ...]  # patterns and causes seen, most frequent first
    causes: tuple[CauseShare, ...]
    upstreams: tuple[FailingUpstream, ...]  # top N by failures
    domains: tuple[FailingDomain, ...]  # top N by failed recipients
    latency: tuple[Latency, ...]  # phases seen, in PHASES order
    bucket_seconds: int
    bucket: str  # the bucket width for people, e.g. "1 hour"
    timeline: tuple[Bucket, ...]
    retried: int
    requeued: int
    replays: int
    duplicate_risk: int
    deliveries: tuple[Share, ...]  # spooled messages finished, by outcome
    delivery_duplicate_risk: int
    top: int
