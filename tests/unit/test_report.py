"""The report's analysis (``smtpwarden.report``) on synthetic, schema-valid records."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reportrecords import delivery, session, transaction, validator
from smtpwarden.protocol.records import Outcome
from smtpwarden.report import OUTCOMES, PHASES, Analysis, Filters, analyze
from smtpwarden.reportstats import (
    DAY_S,
    HOUR_S,
    MINUTE_S,
    OTHER,
    Count,
    Sample,
    Tally,
    Timeline,
    parse_time,
)


def by_name(shares: Any) -> dict[str, int]:
    return {share.name: share.count for share in shares}


START = datetime(2025, 3, 1, 9, tzinfo=UTC)


def at(minute: int) -> str:
    """A log time ``minute`` minutes after 2025-03-01T09:00Z."""
    return (START + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def test_known_values_match_the_record_vocabulary() -> None:
    assert set(OUTCOMES) == {outcome.value for outcome in Outcome}
    commands = validator("transaction").schema["$defs"]["Step"]["properties"]["command"]["enum"]
    assert set(PHASES) <= set(commands)


def mixed_log() -> list[dict[str, Any]]:
    return [
        transaction(time=at(0)),
        transaction(time=at(1), recipients=[("a@example.net", 250), ("b@Bad.Example", 550)]),
        transaction(
            time=at(2),
            outcome="rejected",
            final=554,
            pattern="deferred_failure",
            cause="policy",
        ),
        transaction(time=at(3), outcome="retried", attempts=2, upstream="mx1"),
        transaction(
            time=at(4),
            outcome="requeued",
            attempts=3,
            final=451,
            pattern="deferred_failure",
            cause="resources",
            duplicate_risk=True,
        ),
        transaction(
            time=at(5),
            outcome="deferred",
            upstream="mx2",
            final=421,
            pattern="mid_session_loss",
            cause="connection_lost",
            latencies=[("MAIL", 0.4, 250), ("RCPT", None, None)],
        ),
        transaction(
            time=at(6),
            outcome="aborted",
            final=None,
            recipients=[("x@bad.example", 550), ("y@full.example", 452)],
            latencies=[("MAIL", 0.4, 250), ("RCPT", 0.5, 550), ("RCPT", 0.5, 452)],
        ),
    ]


def test_totals_and_outcomes_with_percentages() -> None:
    report = analyze(mixed_log())
    assert report.transactions == 7
    assert report.first == "2025-03-01T09:00:00.000Z"
    assert report.last == "2025-03-01T09:06:00.000Z"
    assert [share.name for share in report.outcomes] == list(OUTCOMES)
    assert by_name(report.outcomes) == {
        "delivered": 2,
        "rejected": 1,
        "deferred": 1,
        "retried": 1,
        "requeued": 1,
        "unknown": 0,
        "aborted": 1,
    }
    delivered = report.outcomes[0]
    assert delivered.percent == pytest.approx(28.6)
    assert sum(share.percent for share in report.outcomes) == pytest.approx(100, abs=0.5)
    assert (report.retried, report.requeued, report.replays) == (1, 1, 3)
    assert report.duplicate_risk == 1


def test_patterns_and_causes_carry_the_records_advice() -> None:
    report = analyze(mixed_log())
    assert by_name(report.patterns) == {"none": 4, "deferred_failure": 2, "mid_session_loss": 1}
    assert report.patterns[0].name == "none"  # most frequent first
    causes = {cause.name: cause for cause in report.causes}
    assert causes["policy"].count == 1
    assert causes["resources"].advice.startswith("The server is short of resources")
    assert causes["connection_lost"].percent == pytest.approx(14.3)


def test_the_most_common_advice_line_wins() -> None:
    records = [transaction(cause="policy") for _ in range(3)]
    records[0]["diagnosis"]["advice"] = "A rarer line."
    (cause,) = analyze(records).causes
    assert cause.advice == "The server refused the message by policy."


def test_failing_upstreams_count_everything_but_delivered_and_retried() -> None:
    report = analyze(mixed_log())
    rows = {row.name: row for row in report.upstreams}
    assert set(rows) == {"mx1", "mx2"}
    mx1 = rows["mx1"]
    assert (mx1.failed, mx1.total) == (3, 6)  # rejected, requeued, aborted of six
    assert mx1.percent == 50.0
    assert by_name(mx1.outcomes) == {"rejected": 1, "requeued": 1, "aborted": 1}
    assert (mx1.reply_code, mx1.reply_count) == (451, 1)  # 554, 451, 452 tie: the lowest
    mx2 = rows["mx2"]
    assert (mx2.failed, mx2.total, mx2.reply_code) == (1, 1, 421)
    assert report.upstreams[0].name == "mx1"  # most failures first


def test_the_failing_reply_is_the_upstreams_last_refusal() -> None:
    requeued = transaction(
        outcome="requeued",
        latencies=[("MAIL", 0.4, 250), ("RCPT", 0.5, 250), ("DATA", 0.3, 354), (".", 9.0, 452)],
    )
    requeued["final_reply"] = {"code": 250, "enhanced": "2.0.0", "text": "queued", "local": True}
    aborted = transaction(
        outcome="aborted",
        final=None,
        recipients=[("a@example.net", 550)],
        latencies=[("MAIL", 0.4, 250), ("RCPT", 0.5, 550), ("QUIT", 0.1, 221)],
    )
    refused_here = transaction(
        outcome="deferred",
        final=421,
        latencies=[("MAIL", 0.4, 250), ("RCPT", 0.0, 452)],
    )
    refused_here["timeline"][1]["local"] = True  # smtpwarden's own 452: not the upstream's
    rows = []
    for record in (requeued, aborted, refused_here):
        (row,) = analyze([record]).upstreams
        rows.append(row.reply_code)
    assert rows == [452, 550, 421]


def test_an_upstream_code_of_no_reply_is_none() -> None:
    report = analyze([transaction(outcome="aborted", final=None) for _ in range(2)])
    (row,) = report.upstreams
    assert (row.reply_code, row.reply_count) == (None, 2)


def test_failing_recipient_domains_are_case_folded_and_ranked() -> None:
    report = analyze(mixed_log())
    assert [(row.name, row.failed, row.total, row.code) for row in report.domains] == [
        ("bad.example", 2, 2, 550),
        ("full.example", 1, 1, 452),
    ]
    assert (report.recipients, report.failed_recipients) == (9, 3)


def test_top_limits_the_failure_tables() -> None:
    records = [
        transaction(outcome="rejected", final=550, upstream=f"mx{i}", recipients=[(f"u@d{i}", 550)])
        for i in range(5)
    ]
    report = analyze(records, top=2)
    assert len(report.upstreams) == 2
    assert len(report.domains) == 2
    assert report.top == 2


def test_latency_percentiles_are_exact_nearest_rank() -> None:
    records = [
        transaction(latencies=[("MAIL", float(value), 250), (".", value * 10.0, 250)])
        for value in range(1, 101)
    ]
    records.append(session(connect_ms=2.5))
    report = analyze(records)
    rows = {row.phase: row for row in report.latency}
    assert [row.phase for row in report.latency] == ["CONNECT", "MAIL", "."]
    mail = rows["MAIL"]
    assert (mail.count, mail.p50, mail.p90, mail.p99, mail.max) == (100, 50, 90, 99, 100)
    assert mail.exact
    assert mail.sampled == 100
    assert rows["."].p99 == 990
    assert rows["CONNECT"].p50 == 2.5


def test_steps_without_a_reply_or_of_other_commands_are_not_latencies() -> None:
    record = transaction(
        latencies=[("MAIL", 1.0, 250), ("RCPT", None, None), ("RSET", 3.0, 250), ("BDAT", 1.0, 250)]
    )
    report = analyze([record])
    assert [(row.phase, row.count) for row in report.latency] == [("MAIL", 1)]


def test_a_sample_keeps_its_size_and_the_exact_maximum() -> None:
    sample = Sample(size=100)
    for value in range(10_000):
        sample.add(float(value))
    assert (sample.count, len(sample.values), sample.maximum) == (10_000, 100, 9999.0)
    assert not sample.exact
    p50, p90, _ = sample.percentiles()
    assert 3500 < p50 < 6500
    assert 8000 < p90 < 10_000


def test_a_sample_is_the_same_for_the_same_input() -> None:
    first, second = Sample(size=10), Sample(size=10)
    for value in range(1000):
        first.add(float(value))
        second.add(float(value))
    assert first.values == second.values
    assert Sample().percentiles() == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("span_minutes", "width"),
    [
        (0, MINUTE_S),
        (30, MINUTE_S),
        (59, MINUTE_S),
        (180, 5 * MINUTE_S),
        (24 * 60, 30 * MINUTE_S),
        (7 * 24 * 60, 3 * HOUR_S),
        (90 * 24 * 60, 2 * DAY_S),
    ],
    ids=["one", "half-hour", "hour", "three-hours", "day", "week", "quarter"],
)
def test_time_buckets_are_chosen_for_ten_to_sixty_bars(span_minutes: int, width: int) -> None:
    records = [transaction(time=at(0)), transaction(time=at(span_minutes), outcome="retried")]
    report = analyze(records)
    assert report.bucket_seconds == width
    assert len(report.timeline) <= 60
    if span_minutes >= 10:
        assert len(report.timeline) >= 10
    assert sum(bucket.transactions for bucket in report.timeline) == 2
    assert sum(bucket.retried for bucket in report.timeline) == 1
    assert report.timeline[0].start.endswith(":00.000Z")


def test_bucket_names_read_well() -> None:
    names = {
        analyze([transaction(time=at(0)), transaction(time=at(m))]).bucket
        for m in (5, 180, 24 * 60)
    }
    assert names == {"1 minute", "5 minutes", "30 minutes"}


def test_timeline_grows_coarser_past_its_bound_and_keeps_counts() -> None:
    timeline = Timeline(max_stored=10)
    for minute in range(0, 3 * 24 * 60, 7):
        timeline.at(minute * 60.0).transactions += 1
    assert timeline.unit == DAY_S
    assert sum(counts.transactions for counts in timeline.buckets.values()) == math.ceil(
        3 * 24 * 60 / 7
    )
    assert timeline.width() == DAY_S


def test_timeline_over_centuries_stays_bounded() -> None:
    timeline = Timeline(max_stored=3)
    for day in range(0, 200 * 365, 11):
        timeline.at(day * float(DAY_S)).replays += 1
    assert timeline.unit == 30 * DAY_S
    assert len(timeline.buckets) <= 200 * 365 // 30 + 1
    width = timeline.width()
    assert width % (30 * DAY_S) == 0
    assert len(timeline.series(width)) <= 60


def test_reply_codes_outside_smtp_are_no_codes() -> None:
    records = [transaction(outcome="rejected", final=550) for _ in range(3)]
    for record, code in zip(records, (99999, -5, 1e3), strict=True):
        record["final_reply"]["code"] = code
        record["timeline"][-1]["code"] = code
    (row,) = analyze(records).upstreams
    assert (row.reply_code, row.reply_count) == (None, 3)


def test_a_tally_shares_one_key_once_full() -> None:
    tally: Tally[Count] = Tally(Count, limit=3)
    for key in ("a", "b", "c", "d", "e", "a"):
        tally[key].n += 1
    assert {key: count.n for key, count in tally.items.items()} == {
        "a": 2,
        "b": 1,
        "c": 1,
        OTHER: 2,
    }


def test_time_filters_are_inclusive_then_exclusive() -> None:
    records = [transaction(time=at(minute)) for minute in range(10)]
    since, until = parse_time(at(2)), parse_time(at(5))
    report = analyze(records, Filters(since=since, until=until))
    assert report.transactions == 3
    assert report.lines.filtered == 7
    assert (report.first, report.last) == (at(2), at(4))


def test_listener_and_upstream_filters() -> None:
    records = [
        transaction(listener="main", upstream="mx1"),
        transaction(listener="main", upstream="mx2"),
        transaction(listener="submission", upstream="mx1"),
        session(listener="submission", upstream="mx1"),
        delivery(),
    ]
    only_mx1 = analyze(records, Filters(upstreams=frozenset({"mx1"})))
    assert (only_mx1.transactions, only_mx1.lines.sessions, only_mx1.lines.deliveries) == (2, 1, 0)
    only_main = analyze(records, Filters(listeners=frozenset({"main"})))
    assert (only_main.transactions, only_main.lines.sessions) == (2, 0)
    assert only_main.lines.deliveries == 0  # a delivery names no listener
    assert only_main.lines.filtered == 3
    both = analyze(records, Filters(listeners=frozenset({"main"}), upstreams=frozenset({"mx2"})))
    assert both.transactions == 1


def test_delivery_records_are_counted_by_outcome() -> None:
    records = [delivery(), delivery(outcome="dead", risk=True), delivery(outcome="rejected")]
    report = analyze(records)
    assert by_name(report.deliveries) == {"delivered": 1, "rejected": 1, "dead": 1}
    assert report.delivery_duplicate_risk == 1
    assert report.transactions == 0
    assert report.timeline == ()
    assert report.first is None


def test_records_that_are_not_usable_are_counted_not_fatal() -> None:
    good = transaction()
    no_time = {**transaction(), "time": "yesterday"}
    odd_outcome = {**transaction(), "outcome": ["delivered"]}
    bad_delivery = {**delivery(), "outcome": "lost"}
    items: list[object] = [good, no_time, odd_outcome, bad_delivery, [1, 2], "text", {"type": 3}]
    items.append({"type": "metrics"})
    report = analyze(items, not_json=4)
    assert report.transactions == 1
    assert (report.lines.malformed, report.lines.not_records, report.lines.not_json) == (3, 4, 4)
    assert report.lines.skipped == 11


def test_fields_of_the_wrong_type_are_treated_as_missing() -> None:
    record = transaction(outcome="rejected", final=550)
    record.update(
        upstream="mx1",
        recipients={"a": 1},
        timeline=[
            None,
            {"command": "MAIL", "latency_ms": "slow"},
            {"command": ".", "latency_ms": True},
        ],
        diagnosis=None,
        attempts="2",
        final_reply={"code": "550"},
        listener=["main"],
    )
    report = analyze([record], Filters(listeners=frozenset({"main"})))
    assert report.lines.filtered == 1
    report = analyze([record])
    assert report.transactions == 1
    assert report.latency == ()
    assert report.patterns[0].name == "(none given)"
    assert report.upstreams[0].name == "(unknown)"
    assert report.upstreams[0].reply_code is None


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(value=JSON_VALUES)
def test_any_json_value_is_counted_without_raising(value: object) -> None:
    analysis = Analysis()
    analysis.add(value)
    report = analysis.finish()
    assert report.lines.transactions + report.lines.skipped + report.lines.sessions <= 1


@given(field=st.sampled_from(sorted(transaction())), value=JSON_VALUES)
def test_a_record_with_any_field_replaced_never_breaks_the_report(
    field: str, value: object
) -> None:
    record = json.loads(json.dumps(transaction()))
    record[field] = value
    analysis = Analysis()
    analysis.add(record)
    analysis.add(session() | {field: value})
    report = analysis.finish()
    assert report.lines.transactions + report.lines.malformed + report.lines.not_records >= 1
