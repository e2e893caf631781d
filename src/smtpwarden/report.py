"""What ``smtpwarden report`` finds in transaction logs, as a ``Report``.

``Analysis`` takes parsed log records one at a time (``add``) and ``finish``
returns the ``Report``; ``analyze`` does both for an iterable. Transaction
records make most of it; session records add the latency of the upstream's
banner (CONNECT) and delivery records the outcomes of spooled messages.

Rules kept here:
- Pure: record dicts in, a frozen dataclass out. No I/O, no clock, no
  printing; reading files and rendering live in ``reportcli``,
  ``reporttext`` and ``reporthtml``.
- Log content is untrusted. A record is looked at field by field, and a
  field of the wrong type is treated as missing; a transaction record
  without a readable ``time`` or a known ``outcome`` is counted as
  malformed and skipped. Names kept from the log are cut to
  ``MAX_NAME_CHARS``.
- Memory is bounded whatever the log's length (``reportstats``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from smtpwarden.reportmodel import (
    Bucket,
    CauseShare,
    FailingDomain,
    FailingUpstream,
    Latency,
    Lines,
    Report,
    Share,
)
from smtpwarden.reportmodel import Filters as Filters  # part of this module's API
from smtpwarden.reportstats import (
    Count,
    Sample,
    Tally,
    Timeline,
    parse_time,
    rfc3339,
    top_keys,
    width_name,
)

# The outcomes a transaction record can have, in the order a report lists them.
OUTCOMES = ("delivered", "rejected", "deferred", "retried", "requeued", "unknown", "aborted")
# Outcomes that got the message to the upstream; the others count as failures.
SUCCESSES = frozenset({"delivered", "retried"})
DELIVERY_OUTCOMES = ("delivered", "rejected", "dead")
# Timeline steps whose latency a report shows: the banner, the envelope, the
# start of the message and its end (the upstream's time to take it).
PHASES = ("CONNECT", "MAIL", "RCPT", "DATA", ".", "BDAT LAST")
TRANSACTION_PHASES = frozenset(PHASES) - {"CONNECT"}
DEFAULT_TOP = 10
# Longer names from a log (upstreams, domains, patterns) are cut: a name in
# the configuration has at most 64 characters (the schema's pattern), and a
# domain at most 255 octets (RFC 5321 4.5.3.1.2).
MAX_NAME_CHARS = 255
# Different advice lines kept per cause: the diagnosis has a handful.
MAX_ADVICE_PER_CAUSE = 32
# An advice line is one sentence or two; 500 is the schema's bound on the
# similar free text of a delivery record's reason.
MAX_ADVICE_CHARS = 500
# RFC 5321 4.2: a reply code is three digits, the first 2 to 5; anything
# else in a log is no code, which also bounds the codes counted per row.
MIN_CODE, MAX_CODE = 200, 599
NO_DOMAIN = "(no domain)"


def _percent(count: int, whole: int) -> float:
    return round(100.0 * count / whole, 1) if whole else 0.0


def _name(value: object, missing: str) -> str:
    return value[:MAX_NAME_CHARS] if isinstance(value, str) and value else missing


def _number(value: object) -> float | None:
    """A finite, non-negative JSON number, else None (booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _code(reply: object) -> int | None:
    """The code of a ReplyInfo object, or None."""
    if not isinstance(reply, Mapping):
        return None
    code = reply.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        return None
    return code if MIN_CODE <= code <= MAX_CODE else None


def _failure_code(record: Mapping[str, object]) -> int | None:
    """The last 4xx or 5xx the upstream gave in a transaction, else a failing final reply.

    A requeued transaction ends in smtpwarden's own 250 and an aborted one
    in none: the upstream's refusal before that says what went wrong.
    """
    found = None
    timeline = record.get("timeline")
    for step in timeline if isinstance(timeline, list) else ():
        if isinstance(step, Mapping) and step.get("local") is False:
            code = _code(step)
            found = code if code is not None and code >= 400 else found
    if found is None:
        final = _code(record.get("final_reply"))
        found = final if final is not None and final >= 400 else None
    return found


def _domain(address: str) -> str:
    _, at, domain = address.rpartition("@")
    return domain.lower()[:MAX_NAME_CHARS] if at and domain else NO_DOMAIN


@dataclass(slots=True)
class _Upstream:
    total: int = 0
    failed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    codes: dict[int | None, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Domain:
    total: int = 0
    failed: int = 0
    codes: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Cause:
    count: int = 0
    advice: Tally[Count] = field(default_factory=lambda: Tally(Count, MAX_ADVICE_PER_CAUSE))


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


class Analysis:
    """Accumulates records; ``finish`` returns the Report. Bounded memory."""

    def __init__(self, filters: Filters | None = None, *, top: int = DEFAULT_TOP) -> None:
        self.filters = filters or Filters()
        self.top = top
        self.counts = {"transactions": 0, "sessions": 0, "deliveries": 0, "filtered": 0}
        self.not_records = 0
        self.malformed = 0
        self.first: float | None = None
        self.last: float | None = None
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.patterns: Tally[Count] = Tally(Count)
        self.causes: Tally[_Cause] = Tally(_Cause)
        self.upstreams: Tally[_Upstream] = Tally(_Upstream)
        self.domains: Tally[_Domain] = Tally(_Domain)
        self.samples = {phase: Sample() for phase in PHASES}
        self.timeline = Timeline()
        self.recipients = 0
        self.failed_recipients = 0
        self.totals = {"replays": 0, "duplicate_risk": 0}
        self.deliveries = dict.fromkeys(DELIVERY_OUTCOMES, 0)
        self.delivery_duplicate_risk = 0

    def add(self, record: object) -> None:
        """Count one parsed log line (any JSON value)."""
        if not isinstance(record, Mapping):
            self.not_records += 1
            return
        match record.get("type"):
            case "transaction":
                self._transaction(record)
            case "session":
                self._session(record)
            case "delivery":
                self._delivery(record)
            case _:
                self.not_records += 1

    def _selected(self, epoch: float, listener: object, upstream: str | None) -> bool:
        wanted = self.filters
        if (wanted.since is not None and epoch < wanted.since) or (
            wanted.until is not None and epoch >= wanted.until
        ):
            return False
        if wanted.listeners and not (isinstance(listener, str) and listener in wanted.listeners):
            return False
        return not wanted.upstreams or (upstream is not None and upstream in wanted.upstreams)

    @staticmethod
    def _upstream_name(record: Mapping[str, object]) -> str | None:
        upstream = record.get("upstream")
        name = upstream.get("name") if isinstance(upstream, Mapping) else None
        return name if isinstance(name, str) else None

    def _transaction(self, record: Mapping[str, object]) -> None:
        when = record.get("time")
        epoch = parse_time(when) if isinstance(when, str) else None
        outcome = record.get("outcome")
        if epoch is None or not isinstance(outcome, str) or outcome not in self.outcomes:
            self.malformed += 1
            return
        upstream = self._upstream_name(record)
        if not self._selected(epoch, record.get("listener"), upstream):
            self.counts["filtered"] += 1
            return
        self.counts["transactions"] += 1
        self.first = epoch if self.first is None else min(self.first, epoch)
        self.last = epoch if self.last is None else max(self.last, epoch)
        self.outcomes[outcome] += 1
        self._diagnosis(record.get("diagnosis"))
        failed = outcome not in SUCCESSES
        stats = self.upstreams[_name(upstream, "(unknown)")]
        stats.total += 1
        if failed:
            stats.failed += 1
            _bump(stats.outcomes, outcome)
            code = _failure_code(record)
            stats.codes[code] = stats.codes.get(code, 0) + 1
        self._recipients(record.get("recipients"))
        self._steps(record.get("timeline"), TRANSACTION_PHASES)
        attempts = record.get("attempts")
        replays = attempts - 1 if isinstance(attempts, int) and attempts > 1 else 0
        risky = record.get("duplicate_risk") is True
        self.totals["replays"] += replays
        self.totals["duplicate_risk"] += risky
        bucket = self.timeline.at(epoch)
        bucket.transactions += 1
        bucket.retried += outcome == "retried"
        bucket.requeued += outcome == "requeued"
        bucket.replays += replays
        bucket.duplicate_risk += risky

    def _diagnosis(self, diagnosis: object) -> None:
        if not isinstance(diagnosis, Mapping):
            diagnosis = {}
        self.patterns[_name(diagnosis.get("pattern"), "(none given)")].n += 1
        cause = self.causes[_name(diagnosis.get("cause"), "(none given)")]
        cause.count += 1
        advice = diagnosis.get("advice")
        if isinstance(advice, str) and advice:
            cause.advice[advice[:MAX_ADVICE_CHARS]].n += 1

    def _recipients(self, recipients: object) -> None:
        if not isinstance(recipients, list):
            return
        for recipient in recipients:
            if not isinstance(recipient, Mapping):
                continue
            code = _code(recipient.get("reply"))
            address = recipient.get("address")
            if code is None or not isinstance(address, str):
                continue
            self.recipients += 1
            stats = self.domains[_domain(address)]
            stats.total += 1
            if code >= 400:
                self.failed_recipients += 1
                stats.failed += 1
                stats.codes[code] = stats.codes.get(code, 0) + 1

    def _steps(self, timeline: object, phases: frozenset[str]) -> None:
        if not isinstance(timeline, list):
            return
        for step in timeline:
            if not isinstance(step, Mapping):
                continue
            command = step.get("command")
            latency = _number(step.get("latency_ms"))
            if isinstance(command, str) and command in phases and latency is not None:
                self.samples[command].add(latency)

    def _session(self, record: Mapping[str, object]) -> None:
        when = record.get("time")
        epoch = parse_time(when) if isinstance(when, str) else None
        if epoch is None:
            self.malformed += 1
            return
        if not self._selected(epoch, record.get("listener"), self._upstream_name(record)):
            self.counts["filtered"] += 1
            return
        self.counts["sessions"] += 1
        self._steps(record.get("timeline"), frozenset({"CONNECT"}))

    def _delivery(self, record: Mapping[str, object]) -> None:
        when = record.get("time")
        epoch = parse_time(when) if isinstance(when, str) else None
        outcome = record.get("outcome")
        if epoch is None or not isinstance(outcome, str) or outcome not in self.deliveries:
            self.malformed += 1
            return
        # A delivery record names no listener: with --listener it cannot be placed.
        if self.filters.listeners or not self._selected(epoch, None, self._upstream_name(record)):
            self.counts["filtered"] += 1
            return
        self.counts["deliveries"] += 1
        self.deliveries[outcome] += 1
        self.delivery_duplicate_risk += record.get("duplicate_risk") is True

    def finish(self, *, not_json: int = 0) -> Report:
        """The Report of every record added; ``not_json`` is the reader's count."""
        total = self.counts["transactions"]
        width = self.timeline.width()
        return Report(
            lines=Lines(
                transactions=total,
                sessions=self.counts["sessions"],
                deliveries=self.counts["deliveries"],
                filtered=self.counts["filtered"],
                not_json=not_json,
                not_records=self.not_records,
                malformed=self.malformed,
            ),
            first=None if self.first is None else rfc3339(self.first),
            last=None if self.last is None else rfc3339(self.last),
            transactions=total,
            recipients=self.recipients,
            failed_recipients=self.failed_recipients,
            outcomes=tuple(
                Share(name=name, count=count, percent=_percent(count, total))
                for name, count in self.outcomes.items()
            ),
            patterns=tuple(
                Share(name=name, count=count, percent=_percent(count, total))
                for name, count in top_keys({k: v.n for k, v in self.patterns.items.items()})
            ),
            causes=self._cause_shares(total),
            upstreams=self._failing_upstreams(),
            domains=self._failing_domains(),
            latency=self._latencies(),
            bucket_seconds=width,
            bucket=width_name(width),
            timeline=tuple(
                Bucket(
                    start=rfc3339(start),
                    transactions=counts.transactions,
                    retried=counts.retried,
                    requeued=counts.requeued,
                    replays=counts.replays,
                    duplicate_risk=counts.duplicate_risk,
                )
                for start, counts in self.timeline.series(width)
            ),
            retried=self.outcomes["retried"],
            requeued=self.outcomes["requeued"],
            replays=self.totals["replays"],
            duplicate_risk=self.totals["duplicate_risk"],
            deliveries=tuple(
                Share(name=name, count=count, percent=_percent(count, self.counts["deliveries"]))
                for name, count in self.deliveries.items()
            ),
            delivery_duplicate_risk=self.delivery_duplicate_risk,
            top=self.top,
        )

    def _cause_shares(self, total: int) -> tuple[CauseShare, ...]:
        ranked = top_keys({name: cause.count for name, cause in self.causes.items.items()})
        shares = []
        for name, count in ranked:
            advice = top_keys({k: v.n for k, v in self.causes[name].advice.items.items()}, 1)
            shares.append(
                CauseShare(
                    name=name,
                    count=count,
                    percent=_percent(count, total),
                    advice=advice[0][0] if advice else "",
                )
            )
        return tuple(shares)

    def _failing_upstreams(self) -> tuple[FailingUpstream, ...]:
        failing = {name: stats.failed for name, stats in self.upstreams.items.items()}
        rows = []
        for name, failed in top_keys(failing, self.top):
            if failed == 0:
                break
            stats = self.upstreams[name]
            # Ties go to a real reply over none, then to the lower code.
            code, code_count = max(
                stats.codes.items(),
                key=lambda item: (item[1], item[0] is not None, -(item[0] or 0)),
            )
            rows.append(
                FailingUpstream(
                    name=name,
                    failed=failed,
                    total=stats.total,
                    percent=_percent(failed, stats.total),
                    outcomes=tuple(
                        Share(name=outcome, count=count, percent=_percent(count, failed))
                        for outcome, count in top_keys(stats.outcomes)
                    ),
                    reply_code=code,
                    reply_count=code_count,
                )
            )
        return tuple(rows)

    def _failing_domains(self) -> tuple[FailingDomain, ...]:
        failing = {name: stats.failed for name, stats in self.domains.items.items()}
        rows = []
        for name, failed in top_keys(failing, self.top):
            if failed == 0:
                break
            stats = self.domains[name]
            code, code_count = max(stats.codes.items(), key=lambda item: (item[1], -item[0]))
            rows.append(
                FailingDomain(
                    name=name, failed=failed, total=stats.total, code=code, code_count=code_count
                )
            )
        return tuple(rows)

    def _latencies(self) -> tuple[Latency, ...]:
        rows = []
        for phase, sample in self.samples.items():
            if not sample.count:
                continue
            p50, p90, p99 = sample.percentiles()
            rows.append(
                Latency(
                    phase=phase,
                    count=sample.count,
                    exact=sample.exact,
                    sampled=len(sample.values),
                    p50=p50,
                    p90=p90,
                    p99=p99,
                    max=sample.maximum,
                )
            )
        return tuple(rows)


def analyze(
    records: Iterable[object],
    filters: Filters | None = None,
    *,
    top: int = DEFAULT_TOP,
    not_json: int = 0,
) -> Report:
    """The Report of ``records`` (parsed JSON lines) under ``filters``."""
    analysis = Analysis(filters, top=top)
    for record in records:
        analysis.add(record)
    return analysis.finish(not_json=not_json)
