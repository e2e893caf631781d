"""Performance matrix: smtpwarden against HAProxy and aiosmtpd, between Postfix's test tools.

The client is Postfix's smtp-source, the upstream Postfix's smtp-sink; what
stands between them is the path:

- direct: smtp-source straight to smtp-sink;
- haproxy: HAProxy in TCP mode on one thread, the floor for a byte relay;
- passthrough, retry: smtpwarden (uvloop, transaction log to a file) with
  that route policy (retry holds a copy of each message while it streams);
- requeue: smtpwarden with policy requeue in front of a second smtp-sink
  that answers every final dot 450, with ``retry: {attempts: 0}``, so that
  every message is fsynced in the spool (group commit) before its 250; the
  spool must be on a real disk (--spool-dir when the temporary folder is
  tmpfs). Its figures are still compared with direct and haproxy to the
  normal sink;
- aiosmtpd: aiosmtpd's Proxy handler, the existing Python relay;
- passthrough-w2 (only with --paths): smtpwarden with ``workers: 2``.

Each cell is a concurrency (smtp-source -s), a message size (-l) and
connections reused (-d: one connection per session) or new (one per
message). Per cell, each path's process is started once and warmed up with
a short run, whose rate sets the message count of that path's repetitions
so that each lasts about --seconds. Then, for each repetition, every path
runs once, in an order that rotates from one repetition to the next. After
each run the script waits until the relay has gone quiet (whatever it still
does once the client is done; requeue's spool deliveries are kept out of the
run by a first backoff of a day), then reads
the relay's CPU time (user + system of its process tree, /proc) and
smtp-source's own (wait4). Per repetition: messages per second, relay CPU
microseconds per message and the normalised cost, relay CPU seconds /
smtp-source CPU seconds, which factors out how fast the machine is right
now. Medians over the repetitions that succeeded; ratios are ratios of
medians. A repetition in which smtp-source exits non-zero or prints
anything is recorded as failed, with what it printed.

On two cores or more, the relays run on the first core, smtp-source,
smtp-sink and this script on the second. Then transaction latency at
concurrency 1, every process unpinned (one connection, EHLO once, then one
transaction at a time, each timed whole; rounds alternate the paths), and
the resident memory per idle relayed session (a fresh relay, N sessions
that each got their EHLO reply, the difference of RSS and PSS divided by N).

    python benchmarks/matrix.py [--quick] [--paths direct,haproxy,...]
        [--concurrency 1,10,100] [--sizes 1024,102400] [--connections reused,new]
        [--repetitions 7] [--seconds 2.5] [--out benchmarks/results]
        [--skip-latency] [--skip-memory] [--spool-dir DIR]

It prints its tables as it goes and writes matrix-STAMP.json (every
repetition, the medians, the machine), .md (tables) and .svg (a chart),
and the same as latest.*, to --out. Linux only; the standard library and
smtpwarden, plus the programs measured: smtp-source and smtp-sink (Debian
package postfix), haproxy, and aiosmtpd. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matrixcells as cells_run
import matrixphases as phases
import matrixreport as report
from peers import plan_pinning, raise_nofile
from sysinfo import filesystem_of, find_tool, machine_facts

MEMORY_SIZES = (1000, 10000)
RAM_FILESYSTEMS = {"tmpfs", "ramfs"}
RESULTS = Path(__file__).resolve().parent / "results"
DRAIN_NOTE_S = 0.5  # a relay busy longer than this after its client is worth a note


def _list(kind: type, text: str) -> list[Any]:
    return [kind(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--paths",
        help=f"comma-separated, of {','.join(phases.ALL_PATHS)}"
        f" (default {','.join(phases.DEFAULT_PATHS)})",
    )
    parser.add_argument("--concurrency", help="smtp-source sessions, e.g. 1,10,100 (the default)")
    parser.add_argument("--sizes", help="message octets, e.g. 1024,102400 (the default)")
    parser.add_argument("--connections", help="reused,new (the default): smtp-source -d or not")
    parser.add_argument("--repetitions", type=int, help="per path and cell (default 7)")
    parser.add_argument("--seconds", type=float, help="per repetition, about (default 2.5)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 repetitions of 1 s, concurrency 10, 1 KB, reused connections, 1 s of latency"
        " per path, 1,000 idle sessions: a smoke run of about a minute",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder (default benchmarks/results)"
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--spool-dir", type=Path, help="where requeue's spool goes (real disk)")
    parser.add_argument(
        "--event-loop", choices=("uvloop", "asyncio", "auto"), default="uvloop", help="relays'"
    )
    parser.add_argument("--latency-transactions", type=int, help="per path (default 2000)")
    parser.add_argument("--latency-seconds", type=float, help="per path at most (default 3)")
    parser.add_argument("--latency-rounds", type=int, default=5, help="(default 5)")
    parser.add_argument("--memory-sessions", help="e.g. 1000,10000 (the default)")
    parser.add_argument("--memory-timeout", type=float, default=120.0, help="to open them (s)")
    parser.add_argument("--settle", type=float, default=1.0, help="before memory readings (s)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.paths = _list(str, args.paths) if args.paths else list(phases.DEFAULT_PATHS)
    unknown = [name for name in args.paths if name not in phases.ALL_PATHS]
    if unknown or len(set(args.paths)) != len(args.paths):
        parser.error(f"--paths: unknown or repeated: {','.join(unknown) or 'repeated'}")
    args.concurrency = _list(int, args.concurrency or ("10" if quick else "1,10,100"))
    args.sizes = _list(int, args.sizes or ("1024" if quick else "1024,102400"))
    args.connections = _list(str, args.connections or ("reused" if quick else "reused,new"))
    if any(kind not in ("reused", "new") for kind in args.connections):
        parser.error("--connections: reused and/or new")
    if args.repetitions is None:
        args.repetitions = 3 if quick else 7
    if args.seconds is None:
        args.seconds = 1.0 if quick else 2.5
    if args.latency_transactions is None:
        args.latency_transactions = 500 if quick else 2000
    if args.latency_seconds is None:
        args.latency_seconds = 1.0 if quick else 3.0
    args.memory_sessions = _list(
        int, args.memory_sessions or ("1000" if quick else ",".join(map(str, MEMORY_SIZES)))
    )
    numbers = [*args.concurrency, *args.sizes, *args.memory_sessions, args.repetitions]
    if min(numbers) < 1 or args.seconds <= 0 or args.latency_rounds < 1:
        parser.error("counts, sizes and durations must be positive")
    return args


# -- the run -------------------------------------------------------------------------


def choose_spool(folder: Path, wanted: Path | None, ctx_notes: list[str]) -> tuple[Path, str]:
    """A folder for requeue's spool on a real disk: --spool-dir, the run folder, or here."""
    base = wanted if wanted is not None else folder
    if wanted is None and filesystem_of(folder) in RAM_FILESYSTEMS:
        base = Path.cwd()
        ctx_notes.append(f"the temporary folder is on {filesystem_of(folder)}: spool under ./")
    base.mkdir(parents=True, exist_ok=True)
    spool = Path(tempfile.mkdtemp(prefix=".matrix-spool-", dir=base))
    kind = filesystem_of(spool)
    if kind in RAM_FILESYSTEMS:
        ctx_notes.append(f"the spool is on {kind}: fsync costs nothing there, use --spool-dir")
    return spool, kind


def scrub(value: Any, places: dict[str, str]) -> Any:
    """``value`` with each key of ``places`` replaced by its value in every string."""
    if isinstance(value, str):
        for place, shown in places.items():
            value = value.replace(place, shown)
        return value
    if isinstance(value, dict):
        return {key: scrub(item, places) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(item, places) for item in value]
    return value


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/matrix.py", *(argv or sys.argv[1:])])
    missing = [
        tool
        for tool in ("smtp-source", "smtp-sink")
        if find_tool(tool, f"/usr/sbin/{tool}") is None
    ]
    if "haproxy" in args.paths and find_tool("haproxy", "/usr/sbin/haproxy") is None:
        missing.append("haproxy (or leave it out of --paths)")
    if missing:
        print(f"matrix: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    nofile = raise_nofile()
    machine = machine_facts()  # before pinning: its usable CPUs are the machine's
    all_cpus = frozenset(os.sched_getaffinity(0))
    pinning = plan_pinning()
    if pinning is not None:
        os.sched_setaffinity(0, pinning.load)
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {
        "started": started,
        "command": command,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine,
        "pinning": pinning.describe() if pinning else "none: a single CPU, everything unpinned",
        "cells": [],
        "notes": [],
    }
    print(f"smtpwarden performance matrix, {started}\n{command}")
    print(
        f"{machine['cpu_model']}, {machine['nproc']} CPUs, kernel {machine['kernel']},"
        f" Python {machine['python']}; pinning: {results['pinning']}"
    )
    print(
        f"tcp_tw_reuse {machine['tcp_tw_reuse']}, ports {machine['ip_local_port_range']},"
        f" RLIMIT_NOFILE {nofile[0]}/{nofile[1]}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="smtpwarden-matrix-") as temporary:
        folder = Path(temporary)
        spool, kind = choose_spool(folder, args.spool_dir, results["notes"])
        results["spool"] = {"filesystem": kind}
        ctx = phases.Context(
            folder=folder,
            spool_root=spool,
            relay_cpus=None if pinning is None else pinning.relay,
            load_cpus=None if pinning is None else pinning.load,
            all_cpus=all_cpus,
            event_loop=args.event_loop,
            notes=results["notes"],
        )
        try:
            run_all(ctx, args, results, nofile[1])
        except KeyboardInterrupt:
            results["interrupted"] = True
            print("\ninterrupted: writing what was measured", file=sys.stderr)
        finally:
            shutil.rmtree(spool, ignore_errors=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    print("\n" + report.summary(results))
    # The files may be committed: no paths of this machine in them.
    places = {str(RESULTS.parents[1]): ".", temporary: "$TMPDIR/run", str(Path.home()): "~"}
    written = report.write_outputs(scrub(results, places), args.out, stamp)
    print("\nwritten: " + ", ".join(str(path) for path in written) + " (and latest.*)")
    return 130 if results.get("interrupted") else 0


def run_all(
    ctx: phases.Context, args: argparse.Namespace, results: dict[str, Any], nofile: int
) -> None:
    paths: list[str] = args.paths
    if "requeue" in paths:
        ctx.note(
            "requeue's upstream is smtp-sink -r . (450 to every final dot), which implies -p:"
            " it does not offer PIPELINING"
        )
    if "passthrough-w2" in paths and ctx.relay_cpus is not None and len(ctx.relay_cpus) == 1:
        ctx.note(
            "passthrough-w2's two workers share the relays' one CPU in the throughput cells:"
            " there it shows the cost of a second process, not scaling"
        )
    cells = [
        {"concurrency": c, "size": s, "connections": k}
        for s in args.sizes
        for k in args.connections
        for c in args.concurrency
    ]
    sinks = phases.start_sinks(ctx, paths, ctx.load_cpus, "throughput")
    try:
        for index, cell in enumerate(cells, 1):
            cell["index"] = index
            size = f"{cell['size'] // 1024} KB" if cell["size"] % 1024 == 0 else f"{cell['size']} B"
            cell["label"] = f"c{cell['concurrency']} {size} {cell['connections']}"
            print(
                f"\n== cell {index}/{len(cells)}: concurrency {cell['concurrency']},"
                f" {cell['size']} octets, connections {cell['connections']} ==",
                flush=True,
            )
            results["cells"].append(cell)
            cells_run.run_cell(ctx, cell, paths, sinks, args)
            rows = report.cell_rows(cell)
            print("\n" + _indent(report.text_table(report.CELL_HEADERS, rows)), flush=True)
            _cell_notes(ctx, cell)
    finally:
        for sink in sinks.values():
            sink.stop()
    if not args.skip_latency:
        os.sched_setaffinity(0, ctx.all_cpus)
        try:
            results["latency"] = phases.latency_phase(
                ctx, paths, args.latency_transactions, args.latency_seconds, args.latency_rounds
            )
        finally:
            if ctx.load_cpus:
                os.sched_setaffinity(0, ctx.load_cpus)
        print(
            _indent(
                report.text_table(report.LATENCY_HEADERS, report.latency_rows(results["latency"]))
            )
        )
    if not args.skip_memory:
        memory_paths = [name for name in phases.MEMORY_PATHS if name in paths]
        if memory_paths:
            results["memory"] = phases.memory_phase(
                ctx, memory_paths, args.memory_sessions, nofile, args.memory_timeout, args.settle
            )


def _cell_notes(ctx: phases.Context, cell: dict[str, Any]) -> None:
    for name, path in cell["paths"].items():
        reps = path["reps"]
        if any(not rep.get("quiet", True) for rep in reps):
            ctx.note(f"{cell['label']} {name}: the relay was still busy after a repetition")
        drains = [rep["drain_s"] for rep in reps]
        if drains and statistics.median(drains) > DRAIN_NOTE_S:
            ctx.note(
                f"{cell['label']} {name}: the relay kept working a median"
                f" {statistics.median(drains):.1f} s after smtp-source exited; that CPU is"
                " counted in its CPU per message"
            )
        down = sum(1 for rep in reps if rep.get("upstream_down"))
        if down:
            ctx.note(
                f"{cell['label']} {name}: the circuit breaker held the upstream down after"
                f" {down} of {len(reps)} repetitions"
            )
        records = path.get("records", {})
        if records.get("mismatch"):
            ctx.note(
                f"{cell['label']} {name}: {records['sent']:,} messages sent, records:"
                f" {records['outcomes']}"
            )
        problems = path.get("log_problems", {})
        if problems.get("count"):
            ctx.note(f"{cell['label']} {name}: {problems['count']} log lines of warning or worse")


def _indent(text: str) -> str:
    return "  " + text.replace("\n", "\n  ")


if __name__ == "__main__":
    sys.exit(main())
