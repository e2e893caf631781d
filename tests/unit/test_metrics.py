"""The metrics: the text exposition read back, and how records feed the relay's families.

The exposition is parsed with the strict reader the integration tests use
(``integration.prometheus_text``); records come from the same builders as
the schema tests, diagnosed as the tracker diagnoses them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pytest

from integration.prometheus_text import get, parse, series, total
from smtpwarden.observe.metrics import (
    PHASE_BUCKETS_S,
    PHASES,
    Counter,
    Gauge,
    Histogram,
    Registry,
    RelayMetrics,
    escape_label,
    format_value,
)
from smtpwarden.observe.txlog import RecordLog
from smtpwarden.protocol.diagnosis import diagnose
from smtpwarden.protocol.records import Outcome, SessionRecord, TransactionRecord
from test_schema import (
    dead_record,
    delivered_record,
    delivery_record,
    lost_record,
    session_record,
    upstream_failed_record,
)


def diagnosed(record: TransactionRecord) -> TransactionRecord:
    return dataclasses.replace(record, diagnosis=diagnose(record))


# --- The text format -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(0.0, "0", id="zero"),
        pytest.param(3.0, "3", id="integer"),
        pytest.param(7, "7", id="an-int"),
        pytest.param(-2.0, "-2", id="negative"),
        pytest.param(0.25, "0.25", id="fraction"),
        pytest.param(1e-05, "1e-05", id="tiny"),
        pytest.param(2.0**60, "1.152921504606847e+18", id="beyond-exact-integers"),
        pytest.param(math.inf, "+Inf", id="inf"),
        pytest.param(-math.inf, "-Inf", id="minus-inf"),
        pytest.param(math.nan, "NaN", id="nan"),
    ],
)
def test_format_value(value: float, expected: str) -> None:
    assert format_value(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("plain", id="plain"),
        pytest.param('say "hi"', id="quote"),
        pytest.param("C:\\mail\\", id="backslash"),
        pytest.param("two\nlines", id="line-feed"),
        pytest.param('\\"\n\\n', id="all-three"),
        pytest.param("Bücher ✉", id="unicode"),
        pytest.param("", id="empty"),
    ],
)
def test_label_values_are_escaped_and_read_back(value: str) -> None:
    registry = Registry()
    counter = registry.register(Counter("x_total", "Help.", ("name", "other")))
    counter.inc(value, "b")
    families = parse(registry.exposition())
    assert series(families, "x_total") == {(("name", value), ("other", "b")): 1.0}
    assert "\n" not in escape_label(value)


def test_help_and_type_lines() -> None:
    registry = Registry()
    registry.register(Gauge("g", "A gauge\\with a backslash\nand a line feed."))
    registry.register(Counter("c_total", "A counter."))
    text = registry.exposition().decode()
    assert text == (
        "# HELP g A gauge\\\\with a backslash\\nand a line feed.\n"
        "# TYPE g gauge\n"
        "# HELP c_total A counter.\n"
        "# TYPE c_total counter\n"
    )
    families = parse(text.encode())
    assert families["g"].help == "A gauge\\with a backslash\nand a line feed."
    assert families["g"].kind == "gauge"
    assert families["c_total"].samples == []


def test_series_are_sorted_and_unlabelled_ones_have_no_braces() -> None:
    registry = Registry()
    counter = registry.register(Counter("c_total", "Help.", ("k",)))
    plain = registry.register(Gauge("g", "Help."))
    counter.inc("b", amount=2)
    counter.inc("a")
    counter.inc("b", amount=0.5)
    plain.set(-1.5)
    assert registry.exposition().decode().splitlines()[2:] == [
        'c_total{k="a"} 1',
        'c_total{k="b"} 2.5',
        "# HELP g Help.",
        "# TYPE g gauge",
        "g -1.5",
    ]


def test_histogram_buckets_are_cumulative() -> None:
    registry = Registry()
    histogram = registry.register(Histogram("h_seconds", "Help.", ("p",), buckets=(0.1, 1, 10)))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0, 50.0, 50.0):
        histogram.observe(value, "a")
    histogram.observe(0.2, "b")
    families = parse(registry.exposition())
    buckets = {
        dict(labels)["le"]: value
        for labels, value in series(families, "h_seconds_bucket").items()
        if dict(labels)["p"] == "a"
    }
    # A value equal to a bound counts in that bound's bucket ("le").
    assert buckets == {"0.1": 2, "1": 4, "10": 5, "+Inf": 7}
    assert get(families, "h_seconds_count", p="a") == 7
    assert get(families, "h_seconds_sum", p="a") == pytest.approx(104.65)
    assert get(families, "h_seconds_bucket", p="b", le="0.1") == 0
    assert get(families, "h_seconds_bucket", p="b", le="1") == 1
    assert histogram.count("a") == 7


def test_readings_are_taken_at_each_scrape() -> None:
    registry = Registry()
    gauge = registry.register(Gauge("open", "Help.", ("listener",)))
    counter = registry.register(Counter("lost_total", "Help."))
    now = {"main": 2.0}
    gauge.read_from(lambda: [((name,), value) for name, value in now.items()])
    counter.read_from(lambda: [((), 7.0)])
    assert get(parse(registry.exposition()), "open", listener="main") == 2
    now["main"] = 0.0
    now["other"] = 1.0
    families = parse(registry.exposition())
    assert series(families, "open") == {(("listener", "main"),): 0, (("listener", "other"),): 1}
    assert get(families, "lost_total") == 7


def test_gauge_clear_drops_its_series() -> None:
    registry = Registry()
    gauge = registry.register(Gauge("g", "Help.", ("k",)))
    gauge.set(1, "a")
    gauge.clear()
    assert parse(registry.exposition())["g"].samples == []


@pytest.mark.parametrize(
    ("build", "message"),
    [
        pytest.param(lambda: Counter("1bad", "h"), "not a metric name", id="metric-name"),
        pytest.param(lambda: Counter("ok", "h", ("bad-label",)), "label", id="label-name"),
        pytest.param(lambda: Counter("ok", "h", ("__reserved",)), "label", id="reserved-label"),
        pytest.param(lambda: Histogram("ok", "h", ("le",), buckets=(1,)), "label", id="le"),
        pytest.param(lambda: Counter("ok", "h", ("a", "a")), "repeated", id="repeated-label"),
        pytest.param(lambda: Histogram("ok", "h", buckets=()), "buckets", id="no-buckets"),
        pytest.param(lambda: Histogram("ok", "h", buckets=(2, 1)), "buckets", id="decreasing"),
        pytest.param(lambda: Histogram("ok", "h", buckets=(1, 1)), "buckets", id="repeated"),
    ],
)
def test_bad_definitions_raise(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_names_are_registered_once() -> None:
    registry = Registry()
    registry.register(Histogram("h", "Help.", buckets=(1,)))
    with pytest.raises(ValueError, match="h_count"):
        registry.register(Counter("h_count", "Help."))
    with pytest.raises(ValueError, match="already registered: h"):
        registry.register(Gauge("h", "Help."))
    assert registry.sample_names() == {"h_bucket", "h_sum", "h_count"}


def test_misuse_raises() -> None:
    counter = Counter("c_total", "Help.", ("k",))
    with pytest.raises(ValueError, match="expected labels"):
        counter.inc()
    with pytest.raises(ValueError, match="cannot go down"):
        counter.inc("a", amount=-1)
    with pytest.raises(ValueError, match="expected labels"):
        Gauge("g", "Help.").set(1, "extra")
    with pytest.raises(ValueError, match="expected labels"):
        Histogram("h", "Help.", ("p",), buckets=(1,)).observe(1)


# --- The relay's families ------------------------------------------------------------


def test_relay_metrics_expose_every_family_in_the_text_format() -> None:
    metrics = RelayMetrics()
    families = parse(metrics.registry.exposition())
    assert all(name.startswith("smtpwarden_") for name in families)
    assert families["smtpwarden_phase_seconds"].kind == "histogram"
    assert {family.kind for family in families.values()} == {"counter", "gauge", "histogram"}
    for name, family in families.items():
        assert family.help, name
        assert name.endswith("_total") == (family.kind == "counter"), name


def test_a_transaction_record_feeds_its_families() -> None:
    metrics = RelayMetrics()
    record = diagnosed(delivered_record())
    metrics.observe(record)
    families = parse(metrics.registry.exposition())
    labels = {"listener": "submission", "outcome": "delivered", "pattern": "partial_recipients"}
    assert get(families, "smtpwarden_transactions_total", **labels) == 1
    # MAIL 250, RCPT 250, RCPT 452, DATA 354, "." 250: every step is the upstream's.
    assert series(families, "smtpwarden_replies_total") == {
        (("upstream", "mta"), ("class", "2xx")): 3,
        (("upstream", "mta"), ("class", "3xx")): 1,
        (("upstream", "mta"), ("class", "4xx")): 1,
    }
    counts = {
        phase: get(families, "smtpwarden_phase_seconds_count", phase=phase) for phase in PHASES
    }
    assert counts == {"mail": 1, "rcpt": 2, "data": 1, "dot": 1} | {
        phase: None for phase in ("connect", "banner", "ehlo")
    }
    assert get(families, "smtpwarden_phase_seconds_sum", phase="dot") == pytest.approx(0.03807)
    assert get(families, "smtpwarden_phase_seconds_bucket", phase="dot", le="0.025") == 0
    assert get(families, "smtpwarden_phase_seconds_bucket", phase="dot", le="0.05") == 1
    assert total(families, "smtpwarden_retries_total") == 0


def test_steps_without_a_reply_or_answered_locally_are_not_counted() -> None:
    metrics = RelayMetrics()
    metrics.observe(diagnosed(lost_record()))
    metrics.observe(diagnosed(upstream_failed_record()))
    families = parse(metrics.registry.exposition())
    # lost: MAIL, RCPT, BDAT answered, BDAT LAST not; failed: MAIL and RCPT
    # answered, a local 501, DATA unanswered.
    assert get(families, "smtpwarden_replies_total", upstream="mta", **{"class": "2xx"}) == 5
    assert total(families, "smtpwarden_replies_total") == 5
    assert get(families, "smtpwarden_phase_seconds_count", phase="dot") is None
    assert get(families, "smtpwarden_phase_seconds_count", phase="data") is None
    assert get(families, "smtpwarden_phase_seconds_count", phase="rcpt") == 2
    assert total(families, "smtpwarden_transactions_total", pattern="lost_outcome") == 1
    assert total(families, "smtpwarden_transactions_total", outcome="unknown") == 1
    assert total(families, "smtpwarden_transactions_total", pattern="mid_session_loss") == 1


def test_an_undiagnosed_record_counts_as_pattern_none_and_replays_as_retries() -> None:
    metrics = RelayMetrics()
    metrics.observe(dataclasses.replace(delivered_record(), outcome=Outcome.RETRIED, attempts=3))
    families = parse(metrics.registry.exposition())
    labels = {"listener": "submission", "outcome": "retried", "pattern": "none"}
    assert get(families, "smtpwarden_transactions_total", **labels) == 1
    assert get(families, "smtpwarden_retries_total", source="replay") == 2


def test_a_session_record_feeds_its_families() -> None:
    metrics = RelayMetrics()
    record: SessionRecord = session_record()
    metrics.observe(record)
    metrics.observe(dataclasses.replace(record, end="client_lost", client_bytes=8))
    families = parse(metrics.registry.exposition())
    assert series(families, "smtpwarden_sessions_total") == {
        (("listener", "submission"), ("end", "quit")): 1,
        (("listener", "submission"), ("end", "client_lost")): 1,
    }
    assert get(families, "smtpwarden_client_bytes_total", listener="submission") == 812 + 8
    assert get(families, "smtpwarden_upstream_bytes_total", listener="submission") == 790 * 2
    # CONNECT 220, EHLO 250 and QUIT 221 are the upstream's; UNKNOWN was local.
    assert get(families, "smtpwarden_replies_total", upstream="mta", **{"class": "2xx"}) == 6
    assert get(families, "smtpwarden_replies_total", upstream="mta", **{"class": "5xx"}) is None
    assert get(families, "smtpwarden_phase_seconds_count", phase="banner") == 2
    assert get(families, "smtpwarden_phase_seconds_count", phase="ehlo") == 2
    assert get(families, "smtpwarden_phase_seconds_sum", phase="banner") == pytest.approx(0.0038)


def test_delivery_records_feed_deliveries_and_retries() -> None:
    metrics = RelayMetrics()
    metrics.observe(delivery_record())
    metrics.observe(dead_record())
    metrics.observe({"type": "something else"})
    metrics.observe(object())
    families = parse(metrics.registry.exposition())
    assert series(families, "smtpwarden_spool_deliveries_total") == {
        (("outcome", "delivered"),): 1,
        (("outcome", "dead"),): 1,
    }
    assert get(families, "smtpwarden_retries_total", source="spool") == 1 + 2


def test_connect_latency() -> None:
    metrics = RelayMetrics()
    metrics.connected(0.004)
    families = parse(metrics.registry.exposition())
    assert get(families, "smtpwarden_phase_seconds_count", phase="connect") == 1
    assert get(families, "smtpwarden_phase_seconds_bucket", phase="connect", le="0.005") == 1
    assert len(metrics.phases.bounds) == len(PHASE_BUCKETS_S)


# --- The record log's observers ------------------------------------------------------


def test_observers_see_every_record_even_unlogged_sessions(tmp_path: Path) -> None:
    log = RecordLog(str(tmp_path / "records.jsonl"), sessions=False)
    seen: list[object] = []
    log.observers.append(seen.append)
    transaction, session = delivered_record(), session_record()
    log.write(transaction)
    log.write_session(session)
    log.close()
    assert seen == [transaction, session]
    assert (tmp_path / "records.jsonl").read_bytes().count(b"\n") == 1


def test_a_failing_observer_costs_no_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = RecordLog(str(tmp_path / "records.jsonl"))
    seen: list[object] = []

    def broken(record: object) -> None:
        raise RuntimeError("bug")

    log.observers.extend([broken, seen.append])
    with caplog.at_level(logging.ERROR, logger="smtpwarden.txlog"):
        log.write(delivered_record())
        log.write_session(session_record())
    log.close()
    assert len(seen) == 2
    assert (tmp_path / "records.jsonl").read_bytes().count(b"\n") == 2
    assert [r.getMessage() for r in caplog.records] == [
        "a record observer failed; records are still written"
    ]
