"""One cell of the performance matrix: every path warmed up, then repetitions interleaved.

Used by matrix.py, whose docstring describes the method.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
from typing import Any

import matrixphases as phases
import matrixreport as report
from peers import SMTP_SOURCE, Peer, upstream_down
from probes import SourceRun, run_source
from sysinfo import cpu_seconds, find_tool, time_wait_sockets, wait_quiet

MIN_MESSAGES = 20
MAX_MESSAGES = 200_000
WARMUP_MIN, WARMUP_MAX = 200, 300  # warm-up messages: 3 per session within these bounds
SECOND_CALIBRATION_S = 0.5  # a warm-up shorter than this gets a second, longer one
RUN_TIMEOUT_FACTOR = 10  # a run may take this many times --seconds, plus a minute
DRAIN_FACTOR = 6  # how long, in --seconds, a relay may stay busy after a run
# The outcome of every transaction record of a smtpwarden path.
OUTCOME = {
    "passthrough": "delivered",
    "retry": "delivered",
    "requeue": "requeued",
    "passthrough-w2": "delivered",
}
_OUTCOME = re.compile(rb'"outcome":"([a-z_]+)"')


def _run(
    ctx: phases.Context, port: int, count: int, cell: dict[str, Any], seconds: float
) -> SourceRun:
    source = find_tool("smtp-source", SMTP_SOURCE)
    assert source is not None
    return run_source(
        source,
        port,
        messages=count,
        sessions=cell["concurrency"],
        size=cell["size"],
        reuse=cell["connections"] == "reused",
        cpus=ctx.load_cpus,
        timeout_s=seconds * RUN_TIMEOUT_FACTOR + 60,
        scratch=ctx.folder,
    )


def calibrate(
    ctx: phases.Context, port: int, peer: Peer | None, cell: dict[str, Any], seconds: float
) -> tuple[int | None, list[dict[str, Any]]]:
    """Warm the path up and size its repetitions; (None, runs) when a warm-up fails."""
    concurrency = cell["concurrency"]
    floor = max(MIN_MESSAGES, concurrency)
    count = min(WARMUP_MAX, max(WARMUP_MIN, 3 * concurrency))
    runs: list[dict[str, Any]] = []
    for _ in range(2):
        run = _run(ctx, port, count, cell, seconds)
        wait_quiet(None if peer is None else peer.pid, phases.QUIET_LIMIT_S)
        runs.append({"messages": count, "wall_s": run.wall_s, "ok": run.ok, "output": run.output})
        if not run.ok or run.rate <= 0:
            return None, runs
        if run.wall_s >= SECOND_CALIBRATION_S:
            break
        count = max(floor, min(MAX_MESSAGES, round(run.rate * min(SECOND_CALIBRATION_S, seconds))))
    return max(floor, min(MAX_MESSAGES, round(run.rate * seconds))), runs


def one_repetition(
    ctx: phases.Context,
    name: str,
    port: int,
    peer: Peer | None,
    count: int,
    cell: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    pid = None if peer is None else peer.pid
    before = None if pid is None else cpu_seconds(pid)
    run = _run(ctx, port, count, cell, seconds)
    during = None if pid is None else cpu_seconds(pid)
    drain, quiet = wait_quiet(pid, max(phases.QUIET_LIMIT_S, DRAIN_FACTOR * seconds))
    rep: dict[str, Any] = {
        "path": name,
        "messages": count,
        "wall_s": run.wall_s,
        "rate": run.rate,
        "source_cpu_s": run.cpu_s,
        "source_cpu_us_per_msg": run.cpu_s / count * 1e6,
        "drain_s": drain,
        "quiet": quiet,
        "ok": run.ok,
        "returncode": run.returncode,
        "timed_out": run.timed_out,
        "output": run.output,
    }
    if pid is not None and before is not None and during is not None:
        relay = cpu_seconds(pid) - before
        rep["relay_cpu_s"] = relay
        rep["cpu_us_per_msg"] = relay / count * 1e6
        # Without what the relay did after smtp-source exited.
        rep["cpu_us_per_msg_during_run"] = (during - before) / count * 1e6
        rep["norm_cost"] = relay / run.cpu_s if run.cpu_s > 0 else None
    if peer is not None and "metrics" in peer.extra:
        rep["upstream_down"] = upstream_down(peer)
    if peer is not None and peer.process.poll() is not None:
        rep["ok"] = False
        rep["output"] += f"\nrelay exited with {peer.process.returncode}:\n{peer.log_tail()}"
    return rep


def _median(reps: list[dict[str, Any]], key: str) -> float | None:
    values = [rep[key] for rep in reps if rep["ok"] and rep.get(key) is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(cell: dict[str, Any]) -> None:
    keys = (
        "rate",
        "wall_s",
        "cpu_us_per_msg",
        "cpu_us_per_msg_during_run",
        "source_cpu_us_per_msg",
        "norm_cost",
    )
    for path in cell["paths"].values():
        path["median"] = {key: _median(path["reps"], key) for key in keys}
    med = {name: path["median"] for name, path in cell["paths"].items()}
    base, floor = med.get("direct", {}), med.get("haproxy", {})
    cell["ratios"] = {
        name: {
            "rate_to_direct": _ratio(m["rate"], base.get("rate")),
            "rate_to_haproxy": _ratio(m["rate"], floor.get("rate")),
            "cpu_to_haproxy": _ratio(m["cpu_us_per_msg"], floor.get("cpu_us_per_msg")),
            "norm_to_haproxy": _ratio(m["norm_cost"], floor.get("norm_cost")),
        }
        for name, m in med.items()
    }


def check_records(name: str, peer: Peer, path: dict[str, Any]) -> None:
    """Count the stopped relay's transaction records by outcome; look at its log."""
    if peer.folder is None or name not in OUTCOME:
        return
    outcomes: dict[str, int] = {}
    records = peer.folder / "transactions.jsonl"
    with contextlib.suppress(OSError), open(records, "rb") as lines:
        for line in lines:
            if line.startswith(b'{"type":"transaction"'):
                found = _OUTCOME.findall(line)  # the record's own comes last
                outcome = found[-1].decode() if found else "(none)"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
    runs = path["calibration"] + path["reps"]
    sent = sum(run["messages"] for run in runs if run["ok"])
    complete = all(run["ok"] for run in runs)
    path["records"] = {"outcomes": outcomes, "sent": sent, "all_runs_ok": complete}
    if complete and outcomes != {OUTCOME[name]: sent}:
        path["records"]["mismatch"] = True
    log = peer.log.read_text(errors="replace").splitlines()
    bad = [line for line in log if " ERROR " in line or " WARNING " in line or "Traceback" in line]
    path["log_problems"] = {"count": len(bad), "first": bad[:5]}


def run_cell(
    ctx: phases.Context,
    cell: dict[str, Any],
    paths: list[str],
    sinks: dict[str, Peer],
    args: argparse.Namespace,
) -> None:
    folder = ctx.folder / f"cell{cell['index']}"
    folder.mkdir()
    peers: dict[str, Peer | None] = {}
    cell["paths"] = {name: {"calibration": [], "reps": [], "error": None} for name in paths}
    cell["time_wait_before"] = time_wait_sockets()
    try:
        for name in paths:
            try:
                peers[name] = phases.start_path(name, ctx, folder, sinks, ctx.relay_cpus)
            except RuntimeError as error:
                cell["paths"][name]["error"] = f"did not start: {error}"
                print(f"  {name}: did not start: {str(error)[:400]}", flush=True)
        counts: dict[str, int] = {}
        for name, peer in peers.items():
            port = sinks["sink"].port if peer is None else peer.port
            count, runs = calibrate(ctx, port, peer, cell, args.seconds)
            cell["paths"][name]["calibration"] = runs
            if count is None:
                cell["paths"][name]["error"] = "warm-up failed: " + runs[-1]["output"][-400:]
                print(f"  {name}: warm-up failed: {runs[-1]['output'][-400:]}", flush=True)
            else:
                counts[name] = cell["paths"][name]["count"] = count
        print(
            "  messages per repetition: " + ", ".join(f"{n} {c:,}" for n, c in counts.items()),
            flush=True,
        )
        widths = (3, 16, 8, 7, 8, 16, 17, 10, 7, 6)
        print("  " + _fixed(report.REP_HEADERS, widths), flush=True)
        for turn in range(args.repetitions):
            for position, name in enumerate(phases.rotated(list(counts), turn)):
                peer = peers[name]
                if cell["paths"][name]["error"] is not None:
                    continue
                port = sinks["sink"].port if peer is None else peer.port
                rep = one_repetition(ctx, name, port, peer, counts[name], cell, args.seconds)
                rep.update(rep=turn + 1, position=position)
                cell["paths"][name]["reps"].append(rep)
                print("  " + _fixed(report.rep_row(rep), widths), flush=True)
                if not rep["ok"]:
                    print("    " + rep["output"].strip().replace("\n", "\n    ")[-600:], flush=True)
                if peer is not None and peer.process.poll() is not None:
                    cell["paths"][name]["error"] = "relay exited"
    finally:
        for name, peer in peers.items():
            if peer is not None:
                peer.stop()
                check_records(name, peer, cell["paths"][name])
        cell["time_wait_after"] = time_wait_sockets()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(ctx.spool_root / f"{folder.name}-requeue", ignore_errors=True)
        summarise(cell)


def _fixed(cells: list[str] | tuple[str, ...], widths: tuple[int, ...]) -> str:
    return "  ".join(
        c.ljust(w) if i == 1 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
