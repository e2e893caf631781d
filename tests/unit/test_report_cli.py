"""``smtpwarden report`` from the command line: inputs, options, text and JSON output."""

from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from reportrecords import delivery, session, transaction
from smtpwarden import reportcli
from smtpwarden.cli import main
from smtpwarden.config import ConfigError
from smtpwarden.reportcli import Progress, parse_moment, run
from smtpwarden.reportstats import parse_time
from smtpwarden.reporttext import printable, render_text

NOW = parse_time("2025-03-02T12:00:00Z") or 0.0


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(record) + b"\n" for record in records)


def sample_log() -> list[dict[str, Any]]:
    return [
        session(time="2025-03-01T09:00:00.000Z", connect_ms=2.0),
        transaction(time="2025-03-01T09:00:01.000Z"),
        transaction(
            time="2025-03-01T09:05:00.000Z",
            outcome="rejected",
            final=550,
            recipients=[("nobody@bad.example", 550)],
            cause="routing",
        ),
        transaction(time="2025-03-01T09:10:00.000Z", outcome="retried", attempts=2),
        transaction(
            time="2025-03-01T09:20:00.000Z",
            outcome="requeued",
            attempts=2,
            final=451,
            pattern="deferred_failure",
            cause="resources",
            upstream="mx2",
        ),
        delivery(time="2025-03-01T09:30:00.000Z"),
    ]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def args_for(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    reportcli.add_command(commands)
    return parser.parse_args(["report", *argv])


def report_of(
    *argv: str, stdin: bytes = b"", stderr: io.StringIO | None = None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), stderr if stderr is not None else io.StringIO()
    code = run(
        args_for(*argv),
        now=NOW,
        stdin=lambda: io.BufferedReader(io.BytesIO(stdin)),
        stdout=out,
        stderr=err,
    )
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "transactions.jsonl"
    path.write_bytes(jsonl(sample_log()))
    return path


def test_text_report_shows_every_section(log: Path) -> None:
    code, out, err = report_of(str(log))
    assert (code, err) == (0, "")
    assert out.startswith(
        "smtpwarden report: 4 transactions, 2025-03-01T09:00:01.000Z to 2025-03-01T09:20:00.000Z\n"
        "  also counted: 1 session, 1 spooled delivery\n\n"
    )
    assert "\n  delivered      1  25.0%\n" in out
    assert "\n  requeued       1  25.0%\n" in out
    assert "  resources      1  25.0%  The server is short of resources" in out
    assert "\n  bad.example        1   1  550 (1)\n" in out
    assert "CONNECT (banner)      1  2.000" in out
    assert "Retries and requeues per 1 minute" in out
    assert "total: 1 retried, 1 requeued, 2 replays" in out
    assert "Spooled deliveries: delivered 1, rejected 0, dead 0; duplicate risk 0" in out
    assert "skipped" not in out


def test_text_report_of_an_empty_log(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    _, out, _ = report_of(str(empty))
    assert out.startswith("smtpwarden report: 0 transactions\n")
    assert "Failing upstreams (transactions not delivered or retried), top 10\n  none" in out
    assert "no timeline steps with a reply" in out
    assert "no transactions" in out


def test_bad_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [
        orjson.dumps(transaction()),
        b"not json at all",
        b'{"type": "transaction", "time": "2025-03-01T09:1',  # cut off by a crash
        b"[1, 2, 3]",
        b'{"type": "metrics", "value": 1}',
        b"",
        b"\xff\xfe binary",
        orjson.dumps({**transaction(), "outcome": "vanished"}),
    ]
    path.write_bytes(b"\n".join(lines))  # the last line has no newline
    _, out, _ = report_of(str(path))
    assert "smtpwarden report: 1 transaction," in out
    assert "  skipped 6 lines: 3 not JSON, 2 not a known record, 1 malformed\n" in out
    _, out, _ = report_of(str(path), "--json")
    assert json.loads(out)["lines"] == {
        "transactions": 1,
        "sessions": 0,
        "deliveries": 0,
        "filtered": 0,
        "not_json": 3,
        "not_records": 2,
        "malformed": 1,
        "skipped": 6,
    }


def test_a_line_past_the_limit_is_skipped_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reportcli, "MAX_LINE_BYTES", 4096)
    path = tmp_path / "long.jsonl"
    path.write_bytes(b'{"pad": "' + b"x" * 50_000 + b'"}\n' + jsonl([transaction()]))
    _, out, _ = report_of(str(path), "--json")
    document = json.loads(out)
    assert document["lines"]["not_json"] == 1
    assert document["transactions"] == 1


def test_gzip_and_plain_files_and_stdin_add_up(log: Path, tmp_path: Path) -> None:
    packed = tmp_path / "old.jsonl.gz"
    packed.write_bytes(gzip.compress(jsonl(sample_log())))
    renamed = tmp_path / "rotated.1"  # a gzip file is known by its content
    renamed.write_bytes(gzip.compress(jsonl([transaction()])))
    piped = gzip.compress(jsonl([transaction(), transaction()]))
    _, out, _ = report_of(str(log), str(packed), str(renamed), "-", "--json", stdin=piped)
    document = json.loads(out)
    assert document["transactions"] == 4 + 4 + 1 + 2
    assert document["lines"]["sessions"] == 2


def test_a_broken_gzip_file_is_an_error_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(jsonl(sample_log()))[:-12])
    with pytest.raises(OSError, match=r"broken\.gz: not a readable gzip file"):
        report_of(str(broken))


def test_a_missing_file_is_an_error_before_anything_is_read(log: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        report_of(str(log), str(tmp_path / "nope.jsonl"))


def test_stdin_can_be_named_once() -> None:
    with pytest.raises(ConfigError, match="only once"):
        report_of("-", "-")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-01T09:00:00Z", "2025-03-01T09:00:00+00:00"),
        ("2025-03-01T10:00:00+01:00", "2025-03-01T09:00:00+00:00"),
        ("2025-03-01T09:00:00.250Z", "2025-03-01T09:00:00.250000+00:00"),
        ("2025-03-01 09:00", "2025-03-01T09:00:00+00:00"),
        ("2025-03-01", "2025-03-01T00:00:00+00:00"),
        ("24h", "2025-03-01T12:00:00+00:00"),
        ("90m", "2025-03-02T10:30:00+00:00"),
        ("2d", "2025-02-28T12:00:00+00:00"),
        ("1w", "2025-02-23T12:00:00+00:00"),
        ("30s", "2025-03-02T11:59:30+00:00"),
        ("1.5h", "2025-03-02T10:30:00+00:00"),
    ],
)
def test_times_absolute_and_relative(text: str, expected: str) -> None:
    moment = parse_moment(text, now=NOW)
    assert moment == parse_time(expected)


@pytest.mark.parametrize("text", ["yesterday", "24", "h", "-3h", "2025-13-01", ""])
def test_bad_times_are_refused(text: str) -> None:
    assert parse_moment(text, now=NOW) is None


def test_since_and_until_select_records(log: Path) -> None:
    _, out, _ = report_of(
        str(log), "--since", "2025-03-01T09:05:00Z", "--until", "2025-03-01T09:20:00Z", "--json"
    )
    document = json.loads(out)
    assert document["transactions"] == 2
    assert document["lines"]["filtered"] == 4  # two transactions, the session and the delivery
    relative = json.loads(report_of(str(log), "--since", "12h", "--json")[1])
    assert relative["transactions"] == 0


def test_every_bad_option_is_reported_at_once(log: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        report_of(str(log), "--since", "soon", "--until", "later")
    assert len(caught.value.problems) == 2
    assert caught.value.problems[0].startswith("--since: expected an RFC 3339 time")
    with pytest.raises(ConfigError, match="before --until"):
        report_of(str(log), "--since", "1h", "--until", "2h")


def test_listener_and_upstream_options(log: Path) -> None:
    _, out, _ = report_of(str(log), "--upstream", "mx2", "--json")
    assert json.loads(out)["transactions"] == 1
    _, out, _ = report_of(str(log), "--upstream", "mx1", "--upstream", "mx2", "--json")
    assert json.loads(out)["transactions"] == 4
    _, out, _ = report_of(str(log), "--listener", "other", "--json")
    assert json.loads(out)["transactions"] == 0


def test_json_report_is_complete(log: Path) -> None:
    _, out, _ = report_of(str(log), "--json", "--top", "1")
    document = json.loads(out)
    assert document["top"] == 1
    assert {row["name"]: row["count"] for row in document["outcomes"]}["retried"] == 1
    assert [row["name"] for row in document["upstreams"]] == ["mx1"]
    assert document["latency"][0]["phase"] == "CONNECT"
    assert document["bucket"] == "1 minute"


def test_html_option_writes_the_page(log: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    _, out, _ = report_of(str(log), "--html", str(page))
    assert out.startswith("smtpwarden report: 4 transactions")
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_progress_is_silent_when_not_a_terminal(log: Path) -> None:
    err = io.StringIO()
    report_of(str(log), stderr=err)
    assert err.getvalue() == ""


def test_progress_line_on_a_terminal_is_rate_limited() -> None:
    clock = iter([0.0, 0.1, 0.3, 0.4, 0.45, 0.9])
    tty = Tty()
    progress = Progress(tty, 4 * 1024 * 1024, clock=lambda: next(clock))
    progress.update(1024 * 1024, 100)  # 0.1: too soon after the start
    progress.update(2 * 1024 * 1024, 3000)  # 0.3: shown
    progress.update(2 * 1024 * 1024, 3500)  # 0.4: too soon
    progress.update(3 * 1024 * 1024, 3600)  # 0.45: too soon
    progress.update(4 * 1024 * 1024, 9000)  # 0.9: shown
    progress.close()
    shown = tty.getvalue().split("\r")
    assert shown[1:] == [
        "reading 2.0 MiB of 4.0 MiB (50%), 3,000 records, 10,000 records/s\x1b[K",
        "reading 4.0 MiB of 4.0 MiB (100%), 9,000 records, 10,000 records/s\x1b[K",
        "\x1b[K",
    ]
    quiet = Tty()
    Progress(quiet, None).close()  # a run that showed nothing erases nothing
    assert quiet.getvalue() == ""


def test_progress_without_a_known_size() -> None:
    clock = iter([0.0, 2.0])
    tty = Tty()
    Progress(tty, None, clock=lambda: next(clock)).update(3 * 1024 * 1024, 500)
    assert tty.getvalue() == "\rreading 3.0 MiB, 500 records, 250 records/s\x1b[K"


def test_progress_shows_while_reading_a_large_input(
    log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reportcli, "PROGRESS_EVERY_LINES", 1)
    monkeypatch.setattr(reportcli, "PROGRESS_INTERVAL_S", 0.0)
    err = Tty()
    report_of(str(log), stderr=err)
    text = err.getvalue()
    assert f"of {log.stat().st_size / 1024 / 1024:.1f} MiB" in text
    assert text.endswith("\r\x1b[K")


def test_terminal_escapes_from_a_log_are_shown_not_sent(tmp_path: Path) -> None:
    record = transaction(outcome="rejected", final=550, recipients=[("a@evil.example", 550)])
    record["recipients"][0]["address"] = "a@evil\x1b]0;pwned\x07\u202e.example"
    record["upstream"]["name"] = "mx\x1b[31m"
    path = tmp_path / "evil.jsonl"
    path.write_bytes(jsonl([record]))
    _, out, _ = report_of(str(path))
    for unsafe in ("\x1b", "\x07", "\u202e"):
        assert unsafe not in out
    assert "evil\\x1b]0;pwned\\x07\\u202e.example" in out
    assert printable("plain ascii, \u00e9t\u00e9") == "plain ascii, \u00e9t\u00e9"


def test_render_text_ends_with_one_newline(log: Path) -> None:
    _, out, _ = report_of(str(log))
    assert out.endswith("duplicate risk 0\n")
    assert not out.endswith("\n\n")
    assert callable(render_text)


def test_main_runs_report_and_maps_errors_to_exit_codes(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(log)]) == 0
    assert capsys.readouterr().out.startswith("smtpwarden report: 4 transactions")
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["report", str(log), "--since", "whenever"]) == 2
    assert "--since: expected" in capsys.readouterr().err
    assert main(["report", str(log), "--top", "0"]) == 2
    assert "expected a whole number >= 1" in capsys.readouterr().err
