"""The paths of the matrix, and its latency and idle-memory phases (used by matrix.py).

A path is what stands between the client and Postfix's smtp-sink: nothing
(direct), HAProxy, smtpwarden under one policy, or aiosmtpd's Proxy.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peers import Peer, start_aiosmtpd, start_haproxy, start_sink, start_smtpwarden
from probes import ReplyError, latencies, percentile, run_hold
from sysinfo import memory_kib, wait_quiet

ALL_PATHS = ("direct", "haproxy", "passthrough", "retry", "requeue", "aiosmtpd", "passthrough-w2")
DEFAULT_PATHS = ALL_PATHS[:-1]  # passthrough-w2 only on request
MEMORY_PATHS = ("passthrough", "haproxy", "aiosmtpd", "passthrough-w2")
LATENCY_WARMUP = 50  # transactions per path before the timed rounds, not kept
QUIET_LIMIT_S = 30.0  # a relay still busy after this long is reported as such
MEMORY_WARMUP_SESSIONS = 20  # opened and closed before the baseline reading
FD_RESERVE = 200  # descriptors a relay needs besides two per session


@dataclass(slots=True)
class Context:
    """What every phase needs: the run's folders, CPUs and settings."""

    folder: Path
    spool_root: Path
    relay_cpus: frozenset[int] | None
    load_cpus: frozenset[int] | None
    all_cpus: frozenset[int]  # the unpinned phases run on these
    event_loop: str
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            print(f"note: {text}", flush=True)


def start_path(
    name: str,
    ctx: Context,
    folder: Path,
    sinks: dict[str, Peer],
    cpus: frozenset[int] | None,
    *,
    maxconn: int | None = None,
) -> Peer | None:
    """Start the path's process (None for direct), in front of the right sink."""
    sink = sinks["sink"].port
    extra: dict[str, Any] = {} if maxconn is None else {"max_connections": maxconn}
    match name:
        case "direct":
            return None
        case "haproxy":
            if maxconn is None:
                return start_haproxy(folder, sink, cpus)
            return start_haproxy(folder, sink, cpus, maxconn=maxconn)
        case "passthrough" | "retry":
            return start_smtpwarden(
                name, folder, sink, cpus, policy=name, event_loop=ctx.event_loop, **extra
            )
        case "requeue":
            spool = ctx.spool_root / f"{folder.name}-requeue"
            return start_smtpwarden(
                name,
                folder,
                sinks["reject"].port,
                cpus,
                policy="requeue",
                event_loop=ctx.event_loop,
                spool=spool,
                **extra,
            )
        case "aiosmtpd":
            return start_aiosmtpd(folder, sink, cpus)
        case "passthrough-w2":
            return start_smtpwarden(
                name,
                folder,
                sink,
                cpus,
                policy="passthrough",
                event_loop=ctx.event_loop,
                workers=2,
                **extra,
            )
    raise ValueError(f"unknown path {name!r}")


def start_sinks(
    ctx: Context, paths: list[str], cpus: frozenset[int] | None, label: str, max_conn: int = 4000
) -> dict[str, Peer]:
    """smtp-sink, and a second one that answers the final dot 450 if requeue runs."""
    sinks = {"sink": start_sink(f"{label}-sink", ctx.folder, cpus, max_connections=max_conn)}
    if "requeue" in paths:
        try:
            sinks["reject"] = start_sink(
                f"{label}-reject-sink", ctx.folder, cpus, reject_dot=True, max_connections=max_conn
            )
        except BaseException:
            sinks["sink"].stop()
            raise
    return sinks


def rotated(items: list[str], turn: int) -> list[str]:
    if not items:
        return []
    shift = turn % len(items)
    return items[shift:] + items[:shift]


# -- latency -----------------------------------------------------------------------


def latency_phase(
    ctx: Context, paths: list[str], transactions: int, seconds: float, rounds: int
) -> dict[str, Any]:
    """Transaction latency at concurrency 1, every process unpinned, rounds interleaved."""
    print("\n== latency at concurrency 1 (unpinned) ==", flush=True)
    folder = ctx.folder / "latency"
    folder.mkdir(exist_ok=True)
    samples: dict[str, list[int]] = {name: [] for name in paths}
    errors: dict[str, str] = {}
    peers: dict[str, Peer | None] = {}
    sinks = start_sinks(ctx, paths, None, "latency")
    try:
        for name in paths:
            try:
                peers[name] = start_path(name, ctx, folder, sinks, None)
            except RuntimeError as error:
                errors[name] = f"did not start: {error}"
        live = [name for name in paths if name not in errors]
        per_round = max(1, math.ceil(transactions / rounds))
        limit = seconds / rounds
        for turn in range(-1, rounds):  # turn -1: warm-up, not kept
            for name in rotated(live, max(turn, 0)):
                if name in errors:
                    continue
                peer = peers[name]
                port = sinks["sink"].port if peer is None else peer.port
                try:
                    if turn < 0:
                        latencies(port, LATENCY_WARMUP, limit)
                    else:
                        samples[name] += latencies(port, per_round, limit)
                except (OSError, ReplyError) as error:
                    errors[name] = f"{type(error).__name__}: {error}"
                wait_quiet(None if peer is None else peer.pid, QUIET_LIMIT_S)
    finally:
        for peer in peers.values():
            if peer is not None:
                peer.stop()
        for sink in sinks.values():
            sink.stop()
    result: dict[str, Any] = {"size": 1024, "rounds": rounds, "paths": {}, "added": {}}
    for name in paths:
        values = sorted(samples[name])
        stats: dict[str, Any] = {"n": len(values), "error": errors.get(name)}
        if values:
            stats.update(
                p50_us=percentile(values, 0.50) / 1e3,
                p90_us=percentile(values, 0.90) / 1e3,
                p99_us=percentile(values, 0.99) / 1e3,
                mean_us=statistics.fmean(values) / 1e3,
                max_us=values[-1] / 1e3,
            )
        result["paths"][name] = stats
    direct = result["paths"].get("direct", {})
    for name, stats in result["paths"].items():
        if name != "direct" and "p50_us" in stats and "p50_us" in direct:
            result["added"][name] = {
                "p50_us": stats["p50_us"] - direct["p50_us"],
                "p99_us": stats["p99_us"] - direct["p99_us"],
            }
    through = result["paths"].get("passthrough", {})
    haproxy = result["paths"].get("haproxy", {})
    if "p50_us" in through and "p50_us" in haproxy:
        result["passthrough_minus_haproxy_p50_us"] = through["p50_us"] - haproxy["p50_us"]
    return result


# -- idle memory ---------------------------------------------------------------------


def memory_phase(
    ctx: Context,
    paths: list[str],
    counts: list[int],
    nofile: int,
    timeout_s: float,
    settle_s: float,
) -> dict[str, Any]:
    """RSS per idle relayed session: a fresh relay, N sessions after EHLO, the difference / N."""
    print("\n== idle memory per session ==", flush=True)
    # Each relayed session holds two descriptors (client and upstream legs).
    ceiling = (nofile - FD_RESERVE) // 2 // 100 * 100
    largest = min(max(counts), ceiling)
    if max(counts) > ceiling:
        ctx.note(
            f"idle memory: {max(counts):,} sessions need about {2 * max(counts) + FD_RESERVE:,}"
            f" descriptors in the relay, RLIMIT_NOFILE allows {nofile:,} (hard limit):"
            f" measured at {ceiling:,}"
        )
    if "aiosmtpd" in paths:
        ctx.note(
            "idle memory: aiosmtpd's Proxy handler connects upstream per message (smtplib,"
            " in handle_DATA), so its idle sessions have no upstream leg"
        )
    folder = ctx.folder / "memory"
    folder.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    sinks = {
        "sink": start_sink("memory-sink", folder, ctx.load_cpus, max_connections=largest + 100)
    }
    try:
        for requested in counts:
            sessions = min(requested, ceiling)
            for name in paths:
                row = _measure_memory(
                    ctx, name, folder, sinks, requested, sessions, timeout_s, settle_s
                )
                rows.append(row)
                per = row.get("per_session_rss_kib")
                shown = "-" if per is None else f"{per:.1f} KiB/session RSS"
                print(
                    f"  {name:<16} {sessions:>6,} sessions: {shown}"
                    + (f"  ({row['error']})" if row.get("error") else ""),
                    flush=True,
                )
    finally:
        for sink in sinks.values():
            sink.stop()
    return {"rows": rows, "settle_s": settle_s, "timeout_s": timeout_s}


def _measure_memory(
    ctx: Context,
    name: str,
    folder: Path,
    sinks: dict[str, Peer],
    requested: int,
    sessions: int,
    timeout_s: float,
    settle_s: float,
) -> dict[str, Any]:
    row: dict[str, Any] = {"path": name, "requested": requested, "sessions": sessions}
    try:
        peer = start_path(name, ctx, folder, sinks, ctx.relay_cpus, maxconn=sessions + 50)
    except RuntimeError as error:
        row["error"] = f"did not start: {error}"
        return row
    assert peer is not None
    try:
        run_hold(peer.port, MEMORY_WARMUP_SESSIONS, timeout_s, 0.0, lambda: None)
        time.sleep(settle_s)
        row["rss_before_kib"], row["pss_before_kib"] = memory_kib(peer.pid)
        held, after = run_hold(
            peer.port, sessions, timeout_s, settle_s, lambda: memory_kib(peer.pid)
        )
        row.update(established=held.established, failed=held.failed, seconds=held.seconds)
        if after is None:
            why = "timed out" if held.timed_out else held.first_error
            row["error"] = f"{held.established:,} of {sessions:,} sessions opened: {why}"
        else:
            row["rss_after_kib"], row["pss_after_kib"] = after
            row["per_session_rss_kib"] = (after[0] - row["rss_before_kib"]) / sessions
            row["per_session_pss_kib"] = (after[1] - row["pss_before_kib"]) / sessions
        if peer.process.poll() is not None:
            row["error"] = f"exited with {peer.process.returncode}: {peer.log_tail()[-300:]}"
    finally:
        peer.stop()
    return row
