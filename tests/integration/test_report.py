"""``smtpwarden report`` on a log a real relay wrote, and its page in headless Chromium.

The relay has three scripted upstreams: "a" (the listener's) takes DATA
messages but fails every BDAT LAST, refuses one recipient for good and
answers 421 to another; "b" is healthy; "c" fails BDAT LAST too. The
listener's route retries on [a, b]; a domain route for spool.example
requeues on [a, c]. So one log holds delivered, retried, requeued, aborted
and deferred transactions, refused recipients and replays. The report's
numbers are checked against the log itself, then the HTML page is opened in
Debian's Chromium, whose DOM must hold the four charts, and whose screenshot
must be made.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from integration.external_tools import require_tool
from integration.recording_upstreams import RawUpstream
from integration.relay_harness import RunningRelay, StartRelay, WireClient, read_records

MESSAGE = b"Subject: report\r\n\r\nbody\r\n"
FAILS_LAST = b"452 4.3.1 Insufficient system storage\r\n"
CHART_IDS = ("report-outcomes", "report-patterns", "report-timeline", "report-latency")
REPORT_TIMEOUT_S = 60.0
# Headless Chromium starts in about a second here; a loaded CI machine may
# take many times that.
CHROMIUM_TIMEOUT_S = 90.0
WINDOW = (1000, 3000)  # px: the screenshot's size
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (recipients, how the message is sent), one session each.
SESSIONS: list[tuple[list[bytes], str]] = [
    ([b"ok@good.example"], "data"),
    ([b"ok@good.example"], "data"),
    ([b"ok@good.example", b"nobody@bad.example"], "data"),
    ([b"ok@good.example"], "bdat"),
    ([b"other@good.example"], "bdat"),
    ([b"later@spool.example"], "bdat"),
    ([b"nobody@bad.example"], "data"),
    ([b"gone@lost.example"], "data"),
]


def send(client: WireClient, recipients: list[bytes], how: str) -> int:
    """One transaction in its own session; the reply that ended it."""
    client.expect(220)
    client.command(b"EHLO client.test\r\n", 250)
    client.command(b"MAIL FROM:<sender@example.org>\r\n", 250)
    accepted = 0
    for recipient in recipients:
        client.send(b"RCPT TO:<" + recipient + b">\r\n")
        code, _ = client.reply()
        if code == 421:
            return code
        accepted += code == 250
    if not accepted:
        client.command(b"QUIT\r\n", 221)
        return 550
    if how == "bdat":
        head, tail = MESSAGE[:10], MESSAGE[10:]
        client.send(b"BDAT %d\r\n" % len(head) + head)
        client.expect(250)
        client.send(b"BDAT %d LAST\r\n" % len(tail) + tail)
    else:
        client.command(b"DATA\r\n", 354)
        client.send(MESSAGE + b".\r\n")
    code, _ = client.reply()
    client.command(b"QUIT\r\n", 221)
    return code


def relay_log(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], tmp_path: Path
) -> RunningRelay:
    a = make_raw_upstream(
        replies={
            "BDAT LAST": FAILS_LAST,
            "RCPT <nobody@bad.example>": b"550 5.1.1 No such user here\r\n",
            "RCPT <gone@lost.example>": b"421 4.3.2 Service shutting down\r\n",
        }
    )
    b = make_raw_upstream()
    c = make_raw_upstream(replies={"BDAT LAST": FAILS_LAST})
    extra = {
        "upstreams": [
            {"name": "a", **a.config},
            {"name": "b", **b.config},
            {"name": "c", **c.config},
        ],
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "a"}],
        "routes": [
            {"name": "main", "policy": "retry", "upstreams": ["a", "b"]},
            {
                "name": "spool",
                "policy": "requeue",
                "recipient_domains": ["spool.example"],
                "upstreams": ["a", "c"],
            },
        ],
        "retry": {"attempts": 2, "budget": 20},
        "spool": {"path": str(tmp_path / "spool")},
    }
    relay = start_relay(a.config, extra=extra)
    codes = []
    for recipients, how in SESSIONS:
        with WireClient(relay.address()) as client:
            codes.append(send(client, recipients, how))
    assert codes == [250, 250, 250, 250, 250, 250, 550, 421]
    relay.wait_records(lambda rs: len(rs) == len(SESSIONS), "transaction")
    relay.wait_idle()
    relay.stop()
    return relay


def section(text: str, title: str) -> list[str]:
    """The lines of the report section whose heading starts with ``title``."""
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if lines and lines[0].startswith(title):
            return lines
    raise AssertionError(f"no section {title!r} in:\n{text}")


def rows(lines: list[str]) -> dict[str, list[str]]:
    """A table's rows (after its heading line and column headers) by first cell."""
    return {
        re.split(r"\s{2,}", line.strip())[0]: re.split(r"\s{2,}", line.strip())
        for line in lines[2:]
    }


def check_text_against_log(text: str, records: list[dict[str, Any]]) -> None:
    transactions = [r for r in records if r["type"] == "transaction"]
    sessions = [r for r in records if r["type"] == "session"]
    outcomes = Counter(r["outcome"] for r in transactions)
    assert outcomes == {
        "delivered": 3,
        "retried": 2,
        "requeued": 1,
        "aborted": 1,
        "deferred": 1,
    }, outcomes
    assert text.startswith(f"smtpwarden report: {len(transactions)} transactions, ")
    shown = rows(section(text, "Outcomes"))
    for name in ("delivered", "rejected", "deferred", "retried", "requeued", "unknown", "aborted"):
        count = outcomes.get(name, 0)
        assert shown[name][1:] == [str(count), f"{100 * count / len(transactions):.1f}%"], name

    patterns = Counter(r["diagnosis"]["pattern"] for r in transactions)
    shown = rows(section(text, "Diagnosis patterns"))
    assert {name: int(row[1]) for name, row in shown.items()} == patterns

    failed = [r for r in transactions if r["outcome"] not in ("delivered", "retried")]
    by_upstream = Counter(r["upstream"]["name"] for r in failed)
    shown = rows(section(text, "Failing upstreams"))
    for name, count in by_upstream.items():
        total = sum(r["upstream"]["name"] == name for r in transactions)
        assert shown[name][1:3] == [str(count), str(total)], name

    refused = Counter(
        rcpt["address"].rpartition("@")[2]
        for r in transactions
        for rcpt in r["recipients"]
        if rcpt["reply"]["code"] >= 400
    )
    assert refused == {"bad.example": 2, "lost.example": 1}
    shown = rows(section(text, "Failing recipient domains"))
    assert shown["bad.example"][1:] == ["2", "2", "550 (2)"]
    assert shown["lost.example"][1:] == ["1", "1", "421 (1)"]

    steps = Counter(
        step["command"]
        for r in transactions
        for step in r["timeline"]
        if step["latency_ms"] is not None
    )
    steps["CONNECT (banner)"] = sum(
        step["command"] == "CONNECT" and step["latency_ms"] is not None
        for r in sessions
        for step in r["timeline"]
    )
    shown = rows(section(text, "Latency in ms"))
    names = {"MAIL": "MAIL", "RCPT": "RCPT", "DATA": "DATA", ".": ". (end of DATA)"}
    names |= {"BDAT LAST": "BDAT LAST (end of message)", "CONNECT (banner)": "CONNECT (banner)"}
    for command, label in names.items():
        assert shown[label][1] == str(steps[command]), label

    replays = sum(r["attempts"] - 1 for r in transactions)
    assert f"total: 2 retried, 1 requeued, {replays} replays" in text
    risky = sum(r["duplicate_risk"] for r in transactions)
    assert f"Duplicate risk: {risky} transaction" in text


class Charts(HTMLParser):
    """The svg elements of a rendered DOM and how many shapes each holds."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.attrs: dict[str, dict[str, str | None]] = {}
        self.shapes: Counter[str] = Counter()
        self.current: str | None = None
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "svg":
            self.current = dict(attrs).get("id") or ""
            self.attrs[self.current] = dict(attrs)
        elif self.current is not None and tag in ("rect", "line", "text"):
            self.shapes[f"{self.current} {tag}"] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.current = None


def chromium(*args: str, home: Path) -> subprocess.CompletedProcess[bytes]:
    binary = require_tool("chromium")
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={home / 'profile'}",
        *args,
    ]
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run(
        command, capture_output=True, timeout=CHROMIUM_TIMEOUT_S, check=True, env=env
    )


def test_report_of_a_relay_log_and_its_page_in_chromium(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], tmp_path: Path
) -> None:
    require_tool("chromium")  # before the relay runs: fail or skip at once
    relay = relay_log(start_relay, make_raw_upstream, tmp_path)
    records = read_records(relay.log_path)
    page = tmp_path / "out.html"
    done = subprocess.run(
        [sys.executable, "-m", "smtpwarden", "report", str(relay.log_path), "--html", str(page)],
        capture_output=True,
        text=True,
        timeout=REPORT_TIMEOUT_S,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not a terminal: no progress line
    check_text_against_log(done.stdout, records)

    home = tmp_path / "chromium"
    home.mkdir()
    dom = chromium("--dump-dom", page.as_uri(), home=home).stdout.decode("utf-8")
    charts = Charts(dom)
    assert set(charts.attrs) == set(CHART_IDS)
    for chart_id in CHART_IDS:
        attrs = charts.attrs[chart_id]
        assert attrs["role"] == "img"
        assert attrs["aria-label"]
        assert charts.shapes[f"{chart_id} rect"] >= 2, chart_id
        assert charts.shapes[f"{chart_id} text"] >= 2, chart_id
    outcomes = charts.attrs["report-outcomes"]["aria-label"] or ""
    assert outcomes.startswith(f"Outcomes of {len(SESSIONS)} transactions: delivered 3 (37.5%)")

    shot = tmp_path / "out.png"
    width, height = WINDOW
    chromium(f"--screenshot={shot}", f"--window-size={width},{height}", page.as_uri(), home=home)
    data = shot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    # RFC 2083 / PNG 11.2.2: IHDR, the first chunk, starts with width and height.
    assert struct.unpack(">II", data[16:24]) == WINDOW
    assert len(data) > 20_000  # a page of charts and tables, not a blank one
