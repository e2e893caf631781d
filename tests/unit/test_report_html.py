"""The HTML report page: self-contained, accessible charts, and escaped log content."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest

from reportrecords import session, transaction
from smtpwarden.report import analyze
from smtpwarden.reporthtml import render_html

CHART_IDS = ("report-outcomes", "report-patterns", "report-timeline", "report-latency")
SCRIPT_DOMAIN = "<script>alert(1)</script>.example"


class Page(HTMLParser):
    """The page's elements, and what each chart holds."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.charts: dict[str, dict[str, str | None]] = {}
        self.shapes: dict[str, int] = {}
        self.after_chart: dict[str, str] = {}  # the first element after each chart
        self.open_chart: str | None = None
        self.last_closed: str | None = None
        self.stack: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append((tag, found))
        if self.last_closed is not None:
            self.after_chart[self.last_closed] = tag
            self.last_closed = None
        if tag == "svg":
            self.open_chart = found.get("id") or ""
            self.charts[self.open_chart] = found
            self.shapes[self.open_chart] = 0
        elif self.open_chart is not None and tag in ("rect", "line", "path", "text"):
            self.shapes[self.open_chart] += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.last_closed, self.open_chart = self.open_chart, None


def busy_report_page(*, hostile: bool = True) -> str:
    records = [
        transaction(time="2025-03-01T09:00:00.000Z"),
        transaction(time="2025-03-01T09:20:00.000Z", outcome="retried", attempts=2),
        transaction(
            time="2025-03-01T09:40:00.000Z",
            outcome="requeued",
            attempts=2,
            final=451,
            pattern="deferred_failure",
            cause="resources",
        ),
        transaction(
            time="2025-03-01T09:50:00.000Z",
            outcome="rejected",
            final=550,
            recipients=[("victim@bad.example", 550)],
            cause="routing",
        ),
        session(),
    ]
    record = transaction(outcome="aborted", final=None, recipients=[("x@y.example", 550)])
    if hostile:
        record["recipients"][0]["address"] = f"x@{SCRIPT_DOMAIN}"
        record["upstream"]["name"] = 'mx"><img src=x onerror=alert(2)>'
        record["diagnosis"]["pattern"] = "\" onmouseover='alert(3)'"
        record["diagnosis"]["advice"] = "<b>bold</b> & <a href='//evil.example/'>click</a>"
    records.append(record)
    return render_html(analyze(records), sources=["transactions.jsonl", "<file>.gz"])


def test_every_chart_is_an_accessible_svg_with_content() -> None:
    page = Page(busy_report_page())
    assert set(page.charts) == set(CHART_IDS)
    for chart_id, attrs in page.charts.items():
        assert attrs["role"] == "img", chart_id
        assert attrs["aria-label"], chart_id
        assert attrs["viewbox"], chart_id
        assert page.shapes[chart_id] >= 5, chart_id
        assert page.after_chart[chart_id] == "table", chart_id
    outcomes = page.charts["report-outcomes"]["aria-label"] or ""
    assert outcomes.startswith("Outcomes of 5 transactions: delivered 1 (20.0%)")


def test_charts_hold_bars_for_their_data() -> None:
    text = busy_report_page()
    timeline = re.search(r'<svg id="report-timeline".*?</svg>', text, re.DOTALL)
    assert timeline is not None
    assert timeline[0].count("<rect") >= 4  # two legend swatches, a retried and a requeued bar
    assert "1 retried</title>" in timeline[0]
    assert "1 requeued</title>" in timeline[0]
    latency = re.search(r'<svg id="report-latency".*?</svg>', text, re.DOTALL)
    assert latency is not None
    assert latency[0].count("<rect") == 3 * 5  # p50, p90, p99 for CONNECT, MAIL, RCPT, DATA, .


def test_log_content_is_escaped() -> None:
    text = busy_report_page()
    assert "<script" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.example" in text
    for markup in ("<img", "<b>", "<a "):
        assert markup not in text
    assert "&lt;img src=x onerror=alert(2)&gt;" in text
    assert "onmouseover='" not in text
    assert "&quot; onmouseover=&#x27;alert(3)&#x27;" in text
    assert "&lt;file&gt;.gz" in text
    page = Page(text)
    assert {tag for tag, _ in page.tags} <= {
        "html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "p", "strong",
        "section", "svg", "rect", "line", "text", "table", "caption", "thead", "tbody", "tr",
        "th", "td",
    }  # fmt: skip
    allowed = {"id", "role", "aria-label", "viewbox", "width", "height", "x", "y", "x1", "y1"}
    allowed |= {"x2", "y2", "fill", "class", "text-anchor", "font-weight", "scope", "colspan"}
    allowed |= {"charset", "http-equiv", "content", "name", "lang"}
    for tag, attrs in page.tags:
        assert set(attrs) <= allowed, (tag, attrs)


def test_the_page_loads_nothing_from_anywhere() -> None:
    text = busy_report_page(hostile=False)
    for needle in ("http:", "https:", "//", "src=", "href=", "url(", "@import", "<script", "<link"):
        assert needle not in text, needle
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', text)
    assert csp is not None
    assert "default-src 'none'" in csp[1]


@pytest.mark.parametrize("records", [[], [session()]], ids=["nothing", "sessions-only"])
def test_an_empty_report_still_draws_every_chart(records: list[dict[str, Any]]) -> None:
    page = Page(render_html(analyze(records), sources=["empty.jsonl"]))
    assert set(page.charts) == set(CHART_IDS)
    assert all(page.shapes[chart_id] >= 1 for chart_id in CHART_IDS)


def test_long_names_are_cut_in_charts_and_whole_in_tables() -> None:
    long = "deferred_failure_" + "x" * 60
    text = render_html(analyze([transaction(pattern="none"), transaction()]), sources=["a"])
    assert "\u2026" not in text
    record = transaction()
    record["diagnosis"]["pattern"] = long
    text = render_html(analyze([record]), sources=["a"])
    assert f"<td>{long}</td>" in text
    assert "deferred_failure_xxxxxxxxxx\u2026</text>" in text
