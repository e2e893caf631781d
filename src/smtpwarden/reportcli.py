"""``smtpwarden report``: read transaction logs, print or write what they show.

``add_command`` declares the command; its handler reads every LOG line by
line (``-`` is standard input; gzip files, whatever their name, are
decompressed as they are read), feeds ``report.Analysis``, and prints the
report as text (``reporttext``) or JSON, and writes ``--html FILE``
(``reporthtml``). On a terminal, standard error shows one progress line.

Rules kept here:
- Bounded memory: one line at a time, at most ``MAX_LINE_BYTES`` of it.
- Bad options raise ConfigError (all problems at once), missing or
  unreadable files OSError; ``cli.main`` prints them and picks the exit
  code. Nothing here exits.
- Lines that are not JSON are counted, never fatal: a log cut off by a
  crash ends in half a line.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import os
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, TypeVar, cast

import orjson

from smtpwarden.config import CLI_SOURCE, ConfigError
from smtpwarden.report import DEFAULT_TOP, Analysis, Filters
from smtpwarden.reporthtml import render_html
from smtpwarden.reportmodel import Report
from smtpwarden.reportstats import parse_time
from smtpwarden.reporttext import render_text

P = TypeVar("P", bound=argparse.ArgumentParser)

STDIN = "-"
GZIP_MAGIC = b"\x1f\x8b"  # RFC 1952 2.3.1: ID1 ID2
# A record longer than this is not one the relay writes (a transaction with
# thousands of recipients is a few MB); past it the line is counted as not
# JSON and skipped without being held in memory. Our choice.
MAX_LINE_BYTES = 16 * 1024 * 1024
# Progress: at most four updates a second, and the clock is read once every
# so many lines rather than for each.
PROGRESS_INTERVAL_S = 0.25
PROGRESS_EVERY_LINES = 1024
# "24h", "90m", "7d", "2w", "30s": a time that long before now.
_RELATIVE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw])\s*\Z")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

_DESCRIPTION = """\
Read transaction logs and summarise them: outcomes with their share,
diagnosis patterns and causes (with the advice the records give), the
upstreams and recipient domains that fail most, latency percentiles per
SMTP phase, and retries and requeues over time. Lines that are not JSON,
and records that are not transaction, session or delivery records, are
counted and skipped. Give - to read standard input; gzip files are read
as they are."""

_EPILOG = """\
times (--since, --until):
  RFC 3339, e.g. 2025-03-01T09:00:00Z (no offset means UTC), or a time
  before now: 30s, 15m, 24h, 7d, 2w

examples:
  smtpwarden report transactions.jsonl
  smtpwarden report transactions.jsonl.1.gz transactions.jsonl --since 24h
  smtpwarden report transactions.jsonl --upstream mx1 --top 20
  smtpwarden report transactions.jsonl --html report.html
  smtpwarden report transactions.jsonl --json | jq '.outcomes'"""


def _top(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_command(commands: argparse._SubParsersAction[P]) -> None:
    """Declare ``report`` among ``commands``; its handler is (parser, args) -> exit code."""
    report = commands.add_parser(
        "report",
        help="summarise transaction logs as text, JSON or an HTML page",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("logs", metavar="LOG", nargs="+", help="a log file, or - for stdin")
    report.add_argument("--since", metavar="TIME", help="only records at or after TIME")
    report.add_argument("--until", metavar="TIME", help="only records before TIME")
    report.add_argument(
        "--listener",
        metavar="NAME",
        action="append",
        default=[],
        help="only this listener (repeat for more)",
    )
    report.add_argument(
        "--upstream",
        metavar="NAME",
        action="append",
        default=[],
        help="only this upstream (repeat for more)",
    )
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--html", metavar="FILE", help="also write the report as an HTML page")
    report.add_argument(
        "--top",
        metavar="N",
        type=_top,
        default=DEFAULT_TOP,
        help=f"rows in the upstream and domain tables (default: {DEFAULT_TOP})",
    )
    report.set_defaults(handler=_handle, command_parser=report)


def _handle(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    return run(args, now=time.time(), stdin=_stdin, stdout=sys.stdout, stderr=sys.stderr)


def _stdin() -> io.BufferedReader:
    """Standard input as a stream that can peek (for the gzip magic)."""
    stream = sys.stdin.buffer
    if isinstance(stream, io.BufferedReader):
        return stream
    # A replaced sys.stdin (an embedding program's): io streams all have readinto.
    return io.BufferedReader(cast(io.RawIOBase, stream))


def parse_moment(text: str, *, now: float) -> float | None:
    """Epoch seconds of an RFC 3339 time or of a relative one ("24h"), or None."""
    relative = _RELATIVE.match(text)
    if relative is not None:
        return now - float(relative[1]) * _UNIT_S[relative[2]]
    return parse_time(text.strip())


def filters_of(args: argparse.Namespace, *, now: float) -> Filters:
    """The Filters the options ask for; ConfigError lists every bad time."""
    problems = []
    moments: dict[str, float | None] = {}
    for option in ("since", "until"):
        text: str | None = getattr(args, option)
        moments[option] = None if text is None else parse_moment(text, now=now)
        if text is not None and moments[option] is None:
            problems.append(
                f"--{option}: expected an RFC 3339 time or a relative one like 24h, got {text!r}"
            )
    since, until = moments["since"], moments["until"]
    if since is not None and until is not None and since >= until:
        problems.append(f"--since: expected a time before --until, got {args.since!r}")
    if problems:
        raise ConfigError(CLI_SOURCE, problems)
    return Filters(
        since=since,
        until=until,
        listeners=frozenset(args.listener),
        upstreams=frozenset(args.upstream),
    )


class Progress:
    """One updating line on a terminal: bytes read of the total, records per second.

    Shows nothing unless ``stream`` is a terminal; ``close`` erases the line.
    """

    def __init__(
        self,
        stream: TextIO,
        total_bytes: int | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float | None = None,
    ) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.total_bytes = total_bytes
        self.clock = clock
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.started = clock()
        self.shown_at: float | None = None

    def update(self, done_bytes: int, records: int) -> None:
        """Show ``done_bytes`` read and ``records`` parsed, unless shown too recently."""
        if not self.enabled:
            return
        now = self.clock()
        # A run shorter than one interval ends without a progress line.
        if now - (self.started if self.shown_at is None else self.shown_at) < self.interval:
            return
        self.shown_at = now
        rate = records / max(now - self.started, 1e-9)
        read = _mib(done_bytes)
        if self.total_bytes:
            share = min(100.0, 100.0 * done_bytes / self.total_bytes)
            read = f"{read} of {_mib(self.total_bytes)} ({share:.0f}%)"
        self.stream.write(f"\rreading {read}, {records:,} records, {rate:,.0f} records/s\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.shown_at is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _mib(octets: int) -> str:
    return f"{octets / (1024 * 1024):,.1f} MiB"


@dataclass(slots=True)
class _Tally:
    not_json: int = 0
    lines: int = 0
    records: int = 0  # lines that parsed as JSON
    done_before: int = 0  # bytes of the inputs already finished


def _size(name: str) -> int | None:
    """The size of a regular file, None for stdin or a pipe; OSError if missing."""
    if name == STDIN:
        return None
    found = os.stat(name)
    return found.st_size if Path(name).is_file() else None


def _lines(stream: io.BufferedIOBase) -> Iterator[bytes | None]:
    """Each line of ``stream``; None for a line past MAX_LINE_BYTES (skipped)."""
    while line := stream.readline(MAX_LINE_BYTES):
        if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := stream.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        yield line


def _read(
    name: str, raw: io.BufferedReader, analysis: Analysis, tally: _Tally, progress: Progress
) -> None:
    """Feed every line of one input to ``analysis``; OSError names a bad gzip file."""
    gzipped = raw.peek(len(GZIP_MAGIC))[: len(GZIP_MAGIC)] == GZIP_MAGIC
    stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
    seekable = raw.seekable()
    consumed = 0  # octets read, for an input whose position cannot be asked
    try:
        for line in _lines(stream):
            tally.lines += 1
            if line is None:
                consumed += MAX_LINE_BYTES
                tally.not_json += 1
                continue
            consumed += len(line)
            if line.strip():
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    tally.not_json += 1
                else:
                    tally.records += 1
                    analysis.add(record)
            if tally.lines % PROGRESS_EVERY_LINES == 0:
                done = raw.tell() if seekable else consumed
                progress.update(tally.done_before + done, tally.records)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise OSError(f"{name}: not a readable gzip file ({error})") from error
    tally.done_before += raw.tell() if seekable else consumed


def run(
    args: argparse.Namespace,
    *,
    now: float,
    stdin: Callable[[], io.BufferedReader],
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    """Report on ``args.logs``; print text or JSON to ``stdout``; return 0.

    Raises ConfigError for bad options and OSError for an input that cannot
    be opened or read, or an HTML file that cannot be written.
    """
    filters = filters_of(args, now=now)
    names: list[str] = args.logs
    if names.count(STDIN) > 1:
        raise ConfigError(CLI_SOURCE, ["LOG: standard input (-) can be read only once"])
    sizes = [_size(name) for name in names]  # every input exists before any is read
    total = None if None in sizes else sum(size or 0 for size in sizes)
    analysis = Analysis(filters, top=args.top)
    tally = _Tally()
    progress = Progress(stderr, total)
    try:
        for name in names:
            if name == STDIN:
                _read(name, stdin(), analysis, tally, progress)
                continue
            with open(name, "rb") as raw:
                _read(name, raw, analysis, tally, progress)
    finally:
        progress.close()
    report = analysis.finish(not_json=tally.not_json)
    if args.html is not None:
        Path(args.html).write_text(render_html(report, sources=names), encoding="utf-8")
    stdout.write(_json(report) if args.json else render_text(report))
    stdout.flush()
    return 0


def _json(report: Report) -> str:
    document = dataclasses.asdict(report)
    document["lines"]["skipped"] = report.lines.skipped
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE).decode()
