"""The HTML page of ``smtpwarden report``: one file, inline CSS and SVG.

Rules kept here:
- Self-contained: no script, no external resource, no URL. The page's
  Content-Security-Policy forbids loading anything, so even a mistake
  here could not make a browser fetch or run something.
- Log content is untrusted: every string from a record or the command line
  goes through ``_e`` (``html.escape``, quotes included, after ``printable``
  has shown control and bidirectional-override characters as escapes).
- Every chart is an ``<svg role="img">`` with an id, an ``aria-label``
  that sums it up and a ``<title>``, and a table under it holds the same
  numbers for screen readers and for copying.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from smtpwarden.reportmodel import Report
from smtpwarden.reportstats import DAY_S
from smtpwarden.reporttext import latency_note, ms, phase_name, printable

CHART_WIDTH = 760  # px; fits the page's 960 px column with its margins
LABEL_WIDTH = 200  # px left of the bars for their names
VALUE_WIDTH = 110  # px right of the longest bar for its number
ROW_HEIGHT = 24
BAR_HEIGHT = 16
LABEL_CHARS = 28  # longer names are cut in a chart; tables show them whole
TIMELINE_HEIGHT = 300
X_LABELS = 8  # at most this many time labels under the timeline

OUTCOME_COLORS = {
    "delivered": "#2e7d32",
    "retried": "#7cb342",
    "rejected": "#c62828",
    "deferred": "#ef6c00",
    "requeued": "#1565c0",
    "unknown": "#6a1b9a",
    "aborted": "#757575",
}
PATTERN_COLOR, CAUSE_COLOR = "#00838f", "#5d4037"
PERCENTILE_COLORS = (("p50", "#90caf9"), ("p90", "#1e88e5"), ("p99", "#0d47a1"))
RETRIED_COLOR, REQUEUED_COLOR = OUTCOME_COLORS["retried"], OUTCOME_COLORS["requeued"]

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none'"
_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1a1a1a; margin: 0; background: #fafafa; }
main { max-width: 960px; margin: 0 auto; padding: 1rem 1.5rem 3rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2.2rem; border-bottom: 1px solid #ccc; }
section { background: #fff; padding: .2rem 1rem 1rem; margin-top: 1rem; }
svg { display: block; max-width: 100%; height: auto; margin: .8rem 0; }
svg text { font: 12px system-ui, sans-serif; fill: #1a1a1a; }
svg .axis { stroke: #444; stroke-width: 1; }
svg .grid { stroke: #ddd; stroke-width: 1; }
table { border-collapse: collapse; margin: .6rem 0; }
caption { text-align: left; font-weight: 600; padding: .3rem 0; }
th, td { border: 1px solid #ddd; padding: .2rem .6rem; vertical-align: top; }
th { background: #f0f0f0; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; font-size: .9rem; }
"""


def _e(text: object) -> str:
    """Text for HTML content or a quoted attribute."""
    return html.escape(printable(str(text)), quote=True)


def _short(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "\u2026"


def _f(value: float) -> str:
    """A coordinate: two decimals at most."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: float
    text: str  # the number written at the end of the bar
    color: str


def _svg(chart_id: str, label: str, width: float, height: float, parts: Sequence[str]) -> str:
    return (
        f'<svg id="{chart_id}" role="img" aria-label="{_e(label)}" '
        f'viewBox="0 0 {_f(width)} {_f(height)}" width="{_f(width)}" height="{_f(height)}">'
        f"<title>{_e(label)}</title>{''.join(parts)}</svg>"
    )


def bar_chart(chart_id: str, label: str, groups: Sequence[tuple[str, Sequence[Bar]]]) -> str:
    """Horizontal bars in titled groups (an empty title: none), on one scale."""
    peak = max((bar.value for _, bars in groups for bar in bars), default=0.0) or 1.0
    room = CHART_WIDTH - LABEL_WIDTH - VALUE_WIDTH
    parts, y = [], 8.0
    for title, bars in groups:
        if title:
            parts.append(f'<text x="0" y="{_f(y + 14)}" font-weight="bold">{_e(title)}</text>')
            y += ROW_HEIGHT
        for bar in bars:
            length = max(bar.value / peak * room, 1.0 if bar.value else 0.0)
            mid = y + BAR_HEIGHT / 2 + 4
            parts.append(
                f'<text x="{LABEL_WIDTH - 8}" y="{_f(mid)}" text-anchor="end">'
                f"{_e(_short(bar.label))}</text>"
                f'<rect x="{LABEL_WIDTH}" y="{_f(y)}" width="{_f(length)}" '
                f'height="{BAR_HEIGHT}" fill="{bar.color}">'
                f"<title>{_e(bar.label)}: {_e(bar.text)}</title></rect>"
                f'<text x="{_f(LABEL_WIDTH + length + 6)}" y="{_f(mid)}">{_e(bar.text)}</text>'
            )
            y += ROW_HEIGHT
    if not parts:
        parts.append(f'<text x="0" y="{_f(y + 14)}">nothing to show</text>')
        y += ROW_HEIGHT
    return _svg(chart_id, label, CHART_WIDTH, y + 8, parts)


def _nice_ceiling(value: float) -> int:
    """The smallest of 1, 2, 5 times a power of ten at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    return next(int(step * power) for step in (1, 2, 5, 10) if step * power >= value)


def _time_label(start: str, width: int, days: bool) -> str:
    if width >= DAY_S:
        return start[5:10]
    return start[5:16].replace("T", " ") if days else start[11:16]


def timeline_chart(report: Report) -> str:
    """Stacked bars of retried and requeued transactions per time bucket."""
    buckets = report.timeline
    left, right, top, bottom = 48.0, 12.0, 34.0, 44.0
    plot_w, plot_h = CHART_WIDTH - left - right, TIMELINE_HEIGHT - top - bottom
    peak = max((b.retried + b.requeued for b in buckets), default=0)
    ceiling = _nice_ceiling(peak)
    base = top + plot_h
    parts = [
        f'<rect x="{_f(left)}" y="6" width="12" height="12" fill="{RETRIED_COLOR}"/>'
        f'<text x="{_f(left + 18)}" y="16">retried</text>'
        f'<rect x="{_f(left + 90)}" y="6" width="12" height="12" fill="{REQUEUED_COLOR}"/>'
        f'<text x="{_f(left + 108)}" y="16">requeued</text>'
    ]
    for tick in sorted({0, ceiling // 2, ceiling}):
        y = base - tick / ceiling * plot_h
        parts.append(
            f'<line class="grid" x1="{_f(left)}" y1="{_f(y)}" x2="{_f(left + plot_w)}" '
            f'y2="{_f(y)}"/><text x="{_f(left - 6)}" y="{_f(y + 4)}" '
            f'text-anchor="end">{tick:,}</text>'
        )
    slot = plot_w / max(len(buckets), 1)
    bar_w = max(slot * 0.7, 1.0)
    days = len({bucket.start[:10] for bucket in buckets}) > 1
    every = math.ceil(len(buckets) / X_LABELS) if buckets else 1
    for index, bucket in enumerate(buckets):
        x = left + index * slot + (slot - bar_w) / 2
        y = base
        for count, color, name in (
            (bucket.retried, RETRIED_COLOR, "retried"),
            (bucket.requeued, REQUEUED_COLOR, "requeued"),
        ):
            if not count:
                continue
            h = count / ceiling * plot_h
            y -= h
            parts.append(
                f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(bar_w)}" height="{_f(h)}" '
                f'fill="{color}"><title>{_e(bucket.start)}: {count:,} {name}</title></rect>'
            )
        if index % every == 0:
            parts.append(
                f'<text x="{_f(x + bar_w / 2)}" y="{_f(base + 18)}" text-anchor="middle">'
                f"{_e(_time_label(bucket.start, report.bucket_seconds, days))}</text>"
            )
    parts.append(
        f'<line class="axis" x1="{_f(left)}" y1="{_f(base)}" x2="{_f(left + plot_w)}" '
        f'y2="{_f(base)}"/><line class="axis" x1="{_f(left)}" y1="{_f(top)}" '
        f'x2="{_f(left)}" y2="{_f(base)}"/>'
        f'<text x="{_f(left + plot_w / 2)}" y="{_f(TIMELINE_HEIGHT - 6)}" '
        f'text-anchor="middle">time (UTC), buckets of {_e(report.bucket)}</text>'
    )
    if not peak:
        parts.append(
            f'<text x="{_f(left + plot_w / 2)}" y="{_f(top + plot_h / 2)}" '
            'text-anchor="middle">no retries or requeues in this period</text>'
        )
    span = f" from {buckets[0].start} to {buckets[-1].start}" if buckets else ""
    label = (
        f"Retried and requeued transactions per {report.bucket}, {len(buckets)} buckets"
        f"{span}: {report.retried:,} retried and {report.requeued:,} requeued in all"
    )
    return _svg("report-timeline", label, CHART_WIDTH, TIMELINE_HEIGHT, parts)


def outcomes_chart(report: Report) -> str:
    bars = [
        Bar(s.name, s.count, f"{s.count:,} ({s.percent:.1f}%)", OUTCOME_COLORS[s.name])
        for s in report.outcomes
    ]
    summary = ", ".join(f"{s.name} {s.count:,} ({s.percent:.1f}%)" for s in report.outcomes)
    label = f"Outcomes of {report.transactions:,} transactions: {summary}"
    return bar_chart("report-outcomes", label, [("", bars)])


def patterns_chart(report: Report) -> str:
    patterns = [
        Bar(s.name, s.count, f"{s.count:,} ({s.percent:.1f}%)", PATTERN_COLOR)
        for s in report.patterns
    ]
    causes = [
        Bar(s.name, s.count, f"{s.count:,} ({s.percent:.1f}%)", CAUSE_COLOR) for s in report.causes
    ]
    label = (
        "Transactions by diagnosis pattern: "
        + (", ".join(f"{s.name} {s.count:,}" for s in report.patterns) or "none")
        + "; by cause: "
        + (", ".join(f"{s.name} {s.count:,}" for s in report.causes) or "none")
    )
    groups = [("Patterns", patterns), ("Causes", causes)] if patterns else []
    return bar_chart("report-patterns", label, groups)


def latency_chart(report: Report) -> str:
    groups = []
    summary = []
    for row in report.latency:
        values = (row.p50, row.p90, row.p99)
        bars = [
            Bar(name, value, f"{ms(value)} ms", color)
            for (name, color), value in zip(PERCENTILE_COLORS, values, strict=True)
        ]
        groups.append((f"{phase_name(row.phase)}: {row.count:,} replies", bars))
        summary.append(f"{row.phase} " + ", ".join(f"{b.label} {b.text}" for b in bars))
    label = "Latency percentiles per phase: " + ("; ".join(summary) or "no steps")
    return bar_chart("report-latency", label, groups)


def table(caption: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A table; int and float cells are right-aligned numbers."""
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            if isinstance(cell, int | float):
                text = f"{cell:,}" if isinstance(cell, int) else f"{cell:.1f}"
                cells.append(f'<td class="n">{text}</td>')
            else:
                cells.append(f"<td>{_e(cell)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(headers)}">none</td></tr>')
    return (
        f"<table><caption>{_e(caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _summary(report: Report, sources: Sequence[str]) -> str:
    lines = report.lines
    span = (
        f"from {_e(report.first)} to {_e(report.last)}"
        if report.first is not None
        else "no transaction records"
    )
    skipped = (
        f"; skipped {lines.skipped:,} lines ({lines.not_json:,} not JSON, "
        f"{lines.not_records:,} not a known record, {lines.malformed:,} malformed)"
        if lines.skipped
        else ""
    )
    filtered = f"; {lines.filtered:,} outside the filters" if lines.filtered else ""
    return (
        f"<p><strong>{report.transactions:,} transactions</strong> {span}, "
        f"{report.recipients:,} recipients with a reply ({report.failed_recipients:,} refused), "
        f"{lines.sessions:,} session records and {lines.deliveries:,} delivery records.</p>"
        f'<p class="note">Read from {", ".join(_e(name) for name in sources)}{skipped}'
        f"{filtered}.</p>"
    )


def _failing(report: Report) -> str:
    upstreams = [
        [
            row.name,
            row.failed,
            row.total,
            row.percent,
            f"{'none' if row.reply_code is None else row.reply_code} ({row.reply_count:,})",
            ", ".join(f"{share.name} {share.count:,}" for share in row.outcomes),
        ]
        for row in report.upstreams
    ]
    domains = [
        [row.name, row.failed, row.total, f"{row.code} ({row.code_count:,})"]
        for row in report.domains
    ]
    return table(
        f"Failing upstreams: transactions neither delivered nor retried, top {report.top}",
        ["upstream", "failed", "of", "% failed", "most common failing reply", "outcomes"],
        upstreams,
    ) + table(
        f"Failing recipient domains: RCPT answered 4xx or 5xx, top {report.top}",
        ["domain", "refused", "of", "most common reply"],
        domains,
    )


def render_html(report: Report, *, sources: Sequence[str]) -> str:
    """The report as one self-contained HTML page."""
    outcomes = table(
        "Outcomes",
        ["outcome", "transactions", "%"],
        [[s.name, s.count, s.percent] for s in report.outcomes],
    )
    patterns = table(
        "Diagnosis patterns",
        ["pattern", "transactions", "%"],
        [[s.name, s.count, s.percent] for s in report.patterns],
    ) + table(
        "Causes, with the advice the records give",
        ["cause", "transactions", "%", "advice"],
        [[s.name, s.count, s.percent, s.advice] for s in report.causes],
    )
    latency = table(
        f"Latency in ms ({latency_note(report.latency)})",
        ["phase", "replies", "p50", "p90", "p99", "max"],
        [
            [phase_name(row.phase), row.count, ms(row.p50), ms(row.p90), ms(row.p99), ms(row.max)]
            for row in report.latency
        ],
    )
    timeline = table(
        f"Per {report.bucket} (UTC)",
        ["from", "transactions", "retried", "requeued", "replays", "duplicate risk"],
        [
            [b.start, b.transactions, b.retried, b.requeued, b.replays, b.duplicate_risk]
            for b in report.timeline
        ],
    )
    risk = (
        f"<p>Duplicate risk: <strong>{report.duplicate_risk:,}</strong> transactions were "
        "replayed after a lost outcome, so a recipient may get the message twice; "
        f"{report.delivery_duplicate_risk:,} spooled deliveries carry the same risk.</p>"
    )
    sections = [
        ("Outcomes", outcomes_chart(report) + outcomes),
        ("Patterns and causes", patterns_chart(report) + patterns),
        ("Failing upstreams and recipient domains", _failing(report)),
        ("Latency per phase", latency_chart(report) + latency),
        ("Retries and requeues over time", timeline_chart(report) + timeline + risk),
    ]
    body = "".join(
        f"<section><h2>{_e(title)}</h2>{content}</section>" for title, content in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>smtpwarden report</title><style>{_STYLE}</style></head>"
        f"<body><main><h1>smtpwarden report</h1>{_summary(report, sources)}{body}</main>"
        "</body></html>\n"
    )
