"""The text of ``smtpwarden report``: aligned tables for a terminal.

Rule: text from a log is untrusted and may hold terminal escapes. Every
name and advice line goes through ``printable``, which shows control and
bidirectional-override characters as escapes instead of sending them to the
terminal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from smtpwarden.reportmodel import FailingUpstream, Latency, Report

# C0 and C1 controls, DEL, and the Unicode bidirectional overrides and
# isolates (the "Trojan Source" characters, CVE-2021-42574).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on shown as an escape."""
    return _UNSAFE.sub(lambda found: found[0].encode("unicode_escape").decode("ascii"), text)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Rows under headers, two spaces apart; ``align`` has "l" or "r" per column."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [
            cell.ljust(width) if side == "l" else cell.rjust(width)
            for cell, width, side in zip(row, widths, align, strict=True)
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


# What a phase's latency measures, for people.
PHASE_NAMES = {
    "CONNECT": "CONNECT (banner)",
    ".": ". (end of DATA)",
    "BDAT LAST": "BDAT LAST (end of message)",
}


def phase_name(phase: str) -> str:
    return PHASE_NAMES.get(phase, phase)


def _n(count: int) -> str:
    return f"{count:,}"


def _pct(percent: float) -> str:
    return f"{percent:.1f}%"


def ms(value: float) -> str:
    """Milliseconds with precision that suits their size."""
    if value < 10:
        return f"{value:.3f}"
    if value < 1000:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _plural(count: int, noun: str, nouns: str | None = None) -> str:
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def _code(code: int | None, count: int) -> str:
    return f"{'none' if code is None else code} ({count:,})"


def _header(report: Report) -> list[str]:
    lines = report.lines
    span = f", {report.first} to {report.last}" if report.first is not None else ""
    out = [f"smtpwarden report: {_plural(report.transactions, 'transaction')}{span}"]
    read = [
        _plural(lines.sessions, "session"),
        _plural(lines.deliveries, "spooled delivery", "spooled deliveries"),
    ]
    also = f"  also counted: {', '.join(read)}"
    if lines.filtered:
        also += f"; {_plural(lines.filtered, 'record')} outside the filters"
    out.append(also)
    if lines.skipped:
        parts = [
            f"{lines.not_json:,} not JSON",
            f"{lines.not_records:,} not a known record",
            f"{lines.malformed:,} malformed",
        ]
        out.append(f"  skipped {_plural(lines.skipped, 'line')}: {', '.join(parts)}")
    return out


def _outcomes(report: Report) -> list[str]:
    rows = [[share.name, _n(share.count), _pct(share.percent)] for share in report.outcomes]
    return ["Outcomes", *_table(["outcome", "count", "share"], rows, "lrr")]


def _diagnoses(report: Report) -> list[str]:
    out = ["Diagnosis patterns"]
    rows = [[printable(s.name), _n(s.count), _pct(s.percent)] for s in report.patterns]
    out += _table(["pattern", "count", "share"], rows, "lrr") if rows else ["  none"]
    out += ["", "Causes, with the advice the records give"]
    rows = [
        [printable(c.name), _n(c.count), _pct(c.percent), printable(c.advice)]
        for c in report.causes
    ]
    out += _table(["cause", "count", "share", "advice"], rows, "lrrl") if rows else ["  none"]
    return out


def _upstream_row(row: FailingUpstream) -> list[str]:
    outcomes = ", ".join(f"{share.name} {share.count:,}" for share in row.outcomes)
    return [
        printable(row.name),
        _n(row.failed),
        _n(row.total),
        _pct(row.percent),
        _code(row.reply_code, row.reply_count),
        outcomes,
    ]


def _failures(report: Report) -> list[str]:
    out = [f"Failing upstreams (transactions not delivered or retried), top {report.top}"]
    if report.upstreams:
        headers = ["upstream", "failed", "of", "% failed", "failing reply", "outcomes"]
        out += _table(headers, [_upstream_row(row) for row in report.upstreams], "lrrrll")
    else:
        out.append("  none")
    out += ["", f"Failing recipient domains (RCPT answered 4xx or 5xx), top {report.top}"]
    if report.domains:
        rows = [
            [printable(d.name), _n(d.failed), _n(d.total), _code(d.code, d.code_count)]
            for d in report.domains
        ]
        out += _table(["domain", "refused", "of", "reply"], rows, "lrrl")
    else:
        out.append("  none")
    return out


def latency_note(rows: Sequence[Latency]) -> str:
    """How the percentiles were found: exactly, or from a sample."""
    sampled = [row for row in rows if not row.exact]
    if not sampled:
        return "nearest-rank percentiles of every value"
    phases = ", ".join(f"{row.phase} ({row.sampled:,} of {row.count:,})" for row in sampled)
    return f"nearest-rank percentiles; from a uniform sample for {phases}"


def _latency(report: Report) -> list[str]:
    out = [f"Latency in ms by phase ({latency_note(report.latency)})"]
    if not report.latency:
        return [*out, "  no timeline steps with a reply"]
    rows = [
        [phase_name(row.phase), _n(row.count), ms(row.p50), ms(row.p90), ms(row.p99), ms(row.max)]
        for row in report.latency
    ]
    return out + _table(["phase", "count", "p50", "p90", "p99", "max"], rows, "lrrrrr")


def _timeline(report: Report) -> list[str]:
    out = [f"Retries and requeues per {report.bucket}"]
    shown = [bucket for bucket in report.timeline if bucket.transactions]
    if not shown:
        return [*out, "  no transactions"]
    rows = [
        [
            bucket.start[:16].replace("T", " ") + "Z",
            _n(bucket.transactions),
            _n(bucket.retried),
            _n(bucket.requeued),
            _n(bucket.replays),
        ]
        for bucket in shown
    ]
    out += _table(["from", "transactions", "retried", "requeued", "replays"], rows, "lrrrr")
    empty = len(report.timeline) - len(shown)
    if empty:
        out.append(f"  ({_plural(empty, 'bucket')} without transactions not shown)")
    out.append(
        f"  total: {report.retried:,} retried, {report.requeued:,} requeued, "
        f"{report.replays:,} replays"
    )
    return out


def _deliveries(report: Report) -> list[str]:
    out = [
        f"Duplicate risk: {_plural(report.duplicate_risk, 'transaction')} "
        "(replayed after a lost outcome: the recipient may get the message twice)"
    ]
    if report.lines.deliveries:
        counts = ", ".join(f"{share.name} {share.count:,}" for share in report.deliveries)
        out.append(f"Spooled deliveries: {counts}; duplicate risk {report.delivery_duplicate_risk}")
    return out


def render_text(report: Report) -> str:
    """The whole report as text, ending in a newline."""
    sections = [
        _header(report),
        _outcomes(report),
        _diagnoses(report),
        _failures(report),
        _latency(report),
        _timeline(report),
        _deliveries(report),
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"
