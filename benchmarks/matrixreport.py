"""Tables, Markdown, the SVG chart and the files of a matrix run (used by matrix.py).

The results are one JSON-ready dictionary (see matrix.py); everything here
only reads it. The chart is SVG text written by hand: grouped horizontal
bars, one group per cell, one bar per path, of throughput relative to the
direct path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

Results = Mapping[str, Any]

# One colour per path, the same in every chart; unknown paths cycle the rest.
COLOURS = {
    "direct": "#7f7f7f",
    "haproxy": "#1f77b4",
    "passthrough": "#2ca02c",
    "retry": "#98df8a",
    "requeue": "#d62728",
    "aiosmtpd": "#ff7f0e",
    "passthrough-w2": "#9467bd",
}
SPARE_COLOURS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf")


# -- numbers -----------------------------------------------------------------------


def number(value: object, digits: int = 0) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def ratio(value: object) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return "-"
    return f"{value:.2f}"


# -- tables --------------------------------------------------------------------------


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], labels: int = 2) -> str:
    """Columns right-aligned except the first ``labels`` ones."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = [
            cell.ljust(width) if i < labels else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], labels: int = 2) -> str:
    marks = ["---" if i < labels else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


CELL_HEADERS = (
    "cell",
    "path",
    "msg/s",
    "x direct",
    "x haproxy",
    "relay CPU us/msg",
    "x haproxy",
    "norm. cost",
    "x haproxy",
    "ok reps",
)


def cell_rows(cell: Mapping[str, Any]) -> list[list[str]]:
    """One row per path of a cell: medians and ratios."""
    rows = []
    for name, path in cell["paths"].items():
        median = path.get("median", {})
        ratios = cell.get("ratios", {}).get(name, {})
        reps = path.get("reps", [])
        ok = sum(1 for rep in reps if rep["ok"])
        status = f"{ok}/{len(reps)}" if path.get("error") is None else "error"
        rows.append(
            [
                cell["label"],
                name,
                number(median.get("rate")),
                ratio(ratios.get("rate_to_direct")),
                ratio(ratios.get("rate_to_haproxy")),
                number(median.get("cpu_us_per_msg"), 1),
                ratio(ratios.get("cpu_to_haproxy")),
                number(median.get("norm_cost"), 2),
                ratio(ratios.get("norm_to_haproxy")),
                status,
            ]
        )
    return rows


def cpu_rows(cell: Mapping[str, Any]) -> list[list[str]]:
    """One row per path of a cell: the relay's CPU, medians and ratios to haproxy."""
    rows = []
    for name, path in cell["paths"].items():
        median = path.get("median", {})
        ratios = cell.get("ratios", {}).get(name, {})
        rows.append(
            [
                cell["label"],
                name,
                number(median.get("cpu_us_per_msg"), 1),
                ratio(ratios.get("cpu_to_haproxy")),
                number(median.get("cpu_us_per_msg_during_run"), 1),
                number(median.get("norm_cost"), 2),
                ratio(ratios.get("norm_to_haproxy")),
                number(median.get("source_cpu_us_per_msg"), 1),
            ]
        )
    return rows


REP_HEADERS = (
    "rep",
    "path",
    "messages",
    "seconds",
    "msg/s",
    "relay CPU us/msg",
    "source CPU us/msg",
    "norm. cost",
    "drain s",
    "status",
)


def rep_row(rep: Mapping[str, Any]) -> list[str]:
    status = "ok" if rep["ok"] else "FAILED"
    if not rep.get("quiet", True):
        status += " (relay still busy)"
    return [
        str(rep["rep"]),
        rep["path"],
        str(rep["messages"]),
        f"{rep['wall_s']:.3f}",
        number(rep["rate"]),
        number(rep.get("cpu_us_per_msg"), 1),
        number(rep.get("source_cpu_us_per_msg"), 1),
        number(rep.get("norm_cost"), 2),
        f"{rep.get('drain_s', 0.0):.1f}",
        status,
    ]


LATENCY_HEADERS = ("path", "n", "p50 us", "p99 us", "added p50 us", "added p99 us", "status")


def latency_rows(latency: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, stats in latency.get("paths", {}).items():
        added = latency.get("added", {}).get(name, {})
        rows.append(
            [
                name,
                str(stats.get("n", 0)),
                number(stats.get("p50_us"), 1),
                number(stats.get("p99_us"), 1),
                number(added.get("p50_us"), 1),
                number(added.get("p99_us"), 1),
                "ok" if stats.get("error") is None else f"error: {stats['error'][:80]}",
            ]
        )
    return rows


MEMORY_HEADERS = (
    "path",
    "sessions",
    "RSS before MiB",
    "RSS after MiB",
    "KiB/session (RSS)",
    "KiB/session (PSS)",
    "open s",
    "note",
)


def memory_rows(memory: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for row in memory.get("rows", []):
        note = row.get("error") or ""
        if row["sessions"] != row["requested"]:
            note = (note + "; " if note else "") + f"{row['requested']:,} requested"
        rows.append(
            [
                row["path"],
                f"{row['sessions']:,}",
                number(_mib(row.get("rss_before_kib")), 1),
                number(_mib(row.get("rss_after_kib")), 1),
                number(row.get("per_session_rss_kib"), 1),
                number(row.get("per_session_pss_kib"), 1),
                number(row.get("seconds"), 1),
                note,
            ]
        )
    return rows


def _mib(kib: object) -> float | None:
    return kib / 1024 if isinstance(kib, int | float) else None


# -- the summary and the Markdown file ----------------------------------------------


def summary(results: Results) -> str:
    parts = ["== throughput and CPU (medians) =="]
    rows = [row for cell in results["cells"] for row in cell_rows(cell)]
    parts.append(text_table(CELL_HEADERS, rows) if rows else "(no cells)")
    latency = results.get("latency")
    if latency:
        parts += ["", "== added latency at concurrency 1 (unpinned) ==", ""]
        parts.append(text_table(LATENCY_HEADERS, latency_rows(latency), labels=1))
        parts.append(_latency_line(latency))
    memory = results.get("memory")
    if memory:
        parts += ["", "== idle memory per relayed session ==", ""]
        parts.append(text_table(MEMORY_HEADERS, memory_rows(memory), labels=1))
    notes = results.get("notes", [])
    if notes:
        parts += ["", "notes:"] + [f"- {note}" for note in notes]
    return "\n".join(parts)


def _latency_line(latency: Mapping[str, Any]) -> str:
    gap = latency.get("passthrough_minus_haproxy_p50_us")
    return f"passthrough minus haproxy at p50: {number(gap, 1)} us" if gap is not None else ""


def markdown(results: Results) -> str:
    options = results["options"]
    machine = results["machine"]
    lines = [
        f"# smtpwarden performance matrix, {results['started']}",
        "",
        "```sh",
        results["command"],
        "```",
        "",
        f"- machine: {machine.get('cpu_model')}, {machine.get('nproc')} CPUs,"
        f" kernel {machine.get('kernel')}, Python {machine.get('python')}",
        f"- smtpwarden {machine.get('smtpwarden')} ({machine.get('smtpwarden_commit')}),"
        f" uvloop {machine.get('uvloop')}, aiosmtpd {machine.get('aiosmtpd')},"
        f" {machine.get('haproxy')}, Postfix {machine.get('postfix')}",
        f"- pinning: {results['pinning']}",
        f"- {options['repetitions']} repetitions of about {options['seconds']} s per path and"
        " cell, paths interleaved in rotating order; medians over repetitions",
        f"- spool: {results.get('spool', {}).get('filesystem')} filesystem;"
        f" net.ipv4.tcp_tw_reuse = {machine.get('tcp_tw_reuse')}",
        "",
        "## Throughput",
        "",
        "msg/s: messages per second of smtp-source; x direct and x haproxy: ratio of medians.",
        "",
    ]
    headers = ("cell", "path", "msg/s", "x direct", "x haproxy", "ok reps")
    rows = [[r[0], r[1], r[2], r[3], r[4], r[9]] for c in results["cells"] for r in cell_rows(c)]
    lines += [markdown_table(headers, rows), "", "## CPU", ""]
    lines.append(
        "relay CPU us/msg: the relay's user + system time (its whole process tree, read from"
        " /proc before and after each repetition, after it went quiet) per message. Normalised"
        " cost: relay CPU seconds / smtp-source CPU seconds in the same repetition. Of which"
        " during the run: the relay's CPU until smtp-source exited, without what it did"
        " after (requeue's spool deliveries wait a day: they are not counted)."
    )
    lines.append("")
    headers = (
        "cell",
        "path",
        "relay CPU us/msg",
        "x haproxy",
        "of which during the run",
        "normalised cost",
        "x haproxy",
        "smtp-source CPU us/msg",
    )
    rows = [row for cell in results["cells"] for row in cpu_rows(cell)]
    lines += [markdown_table(headers, rows), ""]
    latency = results.get("latency")
    if latency:
        lines += ["## Added latency at concurrency 1 (unpinned)", ""]
        lines.append(
            "One connection, EHLO once, then one transaction at a time (MAIL, RCPT, DATA,"
            f" {latency.get('size', 1024)} octets, the final dot), each timed whole; rounds"
            " alternate the paths and the samples are pooled. Added: path minus direct."
        )
        lines += ["", markdown_table(LATENCY_HEADERS, latency_rows(latency), labels=1), ""]
        lines += [_latency_line(latency), ""]
    memory = results.get("memory")
    if memory:
        lines += ["## Idle memory per relayed session", ""]
        lines.append(
            "A fresh relay; RSS (VmRSS) and PSS before and after N sessions that each got"
            " their EHLO reply, per session = difference / N."
        )
        lines += ["", markdown_table(MEMORY_HEADERS, memory_rows(memory), labels=1), ""]
    notes = results.get("notes", [])
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


# -- the chart -------------------------------------------------------------------------


def svg_chart(results: Results) -> str:
    """Grouped horizontal bars: each path's throughput relative to direct, per cell."""
    cells = [cell for cell in results["cells"] if cell.get("ratios")]
    names: list[str] = []
    for cell in cells:
        names += [n for n in cell["ratios"] if n != "direct" and n not in names]
    colours = {
        name: COLOURS.get(name, SPARE_COLOURS[i % len(SPARE_COLOURS)])
        for i, name in enumerate(names)
    }
    values = [
        cell["ratios"][n].get("rate_to_direct")
        for cell in cells
        for n in names
        if n in cell["ratios"]
    ]
    finite = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
    top = max([1.0, *finite]) * 1.08
    left, right, bar, gap, head = 190, 70, 13, 14, 78
    width = 900
    plot = width - left - right
    rows = sum(1 + len([n for n in names if n in c["ratios"]]) for c in cells)
    height = head + rows * bar + len(cells) * gap + 56
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14" font-weight="bold">'
        "Throughput relative to direct (smtp-source to smtp-sink), medians</text>",
        f'<text x="{left}" y="36" fill="#555">{escape(results["started"])};'
        f" {escape(str(results['pinning']))}</text>",
    ]
    x = left
    for name in names:  # the legend
        out.append(f'<rect x="{x}" y="46" width="10" height="10" fill="{colours[name]}"/>')
        out.append(f'<text x="{x + 14}" y="55">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    step = _grid_step(top)
    bottom = height - 46
    tick = 0.0
    while tick <= top + 1e-9:
        gx = left + plot * tick / top
        dash = "" if abs(tick - 1.0) > 1e-9 else ' stroke-dasharray="4 3" stroke="#333"'
        colour = "" if dash else ' stroke="#ddd"'
        out.append(
            f'<line x1="{gx:.1f}" y1="{head - 8}" x2="{gx:.1f}" y2="{bottom}"{colour}{dash}/>'
        )
        out.append(f'<text x="{gx:.1f}" y="{bottom + 14}" text-anchor="middle">{tick:g}</text>')
        tick += step
    out.append(
        f'<text x="{left + plot / 2:.1f}" y="{bottom + 32}" text-anchor="middle" fill="#555">'
        "messages per second / direct's (dashed line: 1 = as fast as direct)</text>"
    )
    y = head
    for cell in cells:
        out.append(
            f'<text x="8" y="{y + bar - 3}" font-weight="bold">{escape(cell["label"])}</text>'
        )
        direct = cell["paths"].get("direct", {}).get("median", {}).get("rate")
        out.append(
            f'<text x="{left}" y="{y + bar - 3}" fill="#555">direct {number(direct)} msg/s</text>'
        )
        y += bar
        for name in names:
            if name not in cell["ratios"]:
                continue
            value = cell["ratios"][name].get("rate_to_direct")
            out.append(
                f'<text x="{left - 6}" y="{y + bar - 3}" text-anchor="end">{escape(name)}</text>'
            )
            if isinstance(value, int | float) and not math.isnan(value):
                length = plot * value / top
                out.append(
                    f'<rect x="{left}" y="{y + 1}" width="{length:.1f}" height="{bar - 2}"'
                    f' fill="{colours[name]}"/>'
                )
                rate = cell["paths"][name].get("median", {}).get("rate")
                label = f"{value:.2f} ({number(rate)}/s)"
                out.append(f'<text x="{left + length + 4:.1f}" y="{y + bar - 3}">{label}</text>')
            else:
                out.append(f'<text x="{left + 4}" y="{y + bar - 3}" fill="#a00">failed</text>')
            y += bar
        y += gap
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _grid_step(top: float) -> float:
    for step in (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0):
        if top / step <= 12:
            return step
    return 10.0


# -- files ---------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    # Written beside and renamed, so that a reader never sees half a file
    # (*.tmp is ignored by git).
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_outputs(results: Results, folder: Path, stamp: str) -> list[Path]:
    """matrix-STAMP.{json,md,svg} and latest.{json,md,svg}; return the timestamped ones."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = {
        "json": json.dumps(results, indent=1, sort_keys=False) + "\n",
        "md": markdown(results),
        "svg": svg_chart(results),
    }
    written = []
    for suffix, text in texts.items():
        stamped = folder / f"matrix-{stamp}.{suffix}"
        _write(stamped, text)
        _write(folder / f"latest.{suffix}", text)
        written.append(stamped)
    return written
