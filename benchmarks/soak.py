"""Soak run: the relay under load, upstream faults, SIGKILLs and reloads, for a bounded time.

soakupstream.py holds the fault-injecting upstream (faults, counting rules),
soakload.py the client sessions. The relay, ``python -m smtpwarden run`` from
this checkout with a generated requeue configuration, is SIGKILLed about every
--kill-every seconds and started again on the same port and spool (ready when
/readyz answers); one that exits by itself has crashed. About every
--hup-every seconds its file changes (replays, spool workers, size limit,
hostname) and it gets SIGHUP; a reload refused fails the run. Lost: acknowledged,
never delivered; must be 0. At the end the load stops, the spool drains (at
most --drain-timeout), the relay gets SIGTERM, and the report has a time
series of its RSS and descriptors (/proc) and of the spool. A stall (an
interval with the relay up and almost nothing sent) is probed with py-spy
into the temporary folder. Exit status 1 when a message was lost, the relay
crashed or stalled, the spool did not drain or the relay did not stop
cleanly; 2 when nothing could start. The folder (configuration, spool, logs)
is kept when the run failed, or with --keep.

    python benchmarks/soak.py [--minutes 10] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from subprocess import DEVNULL, PIPE, STDOUT
from typing import Any

from soakload import Ledger, load
from soakupstream import UpstreamProcess, add_fault_options, loop_factory

HOST = "127.0.0.1"
SOURCE = Path(__file__).resolve().parent.parent / "src"
START_TIMEOUT_S = 60.0  # the relay's start, spool recovery included
STOP_TIMEOUT_S = 60.0  # after SIGTERM; the relay's grace is 10 s
RETRY_BUDGET_S = 20.0  # the relay's replays of one message
LOAD_STOP_TIMEOUT_S = 150.0  # sessions finishing their last message after the deadline
POLL_S = 0.05
SETTLE_S = 1.0  # the upstream's last events, once the spool is empty
KILL_SLACK_S = 1.0  # events arrive a little after the fact
MAX_CRASHES = 10
STALL_SHARE = 0.05  # an interval that sent under this share of the median one is a stall
MAX_PROBES = 5  # stalls looked into (each costs a few seconds of py-spy)
SPY = ("py-spy", "dump", "--pid")  # optional; it needs the right to ptrace the relay
LOG_LINE = re.compile(r"^\S+ \S+ (\S+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")
AMBIGUOUS = "client sent it again after no reply to its end of data"
KILLED = "relay kill or crash between deliveries"
OK = (AMBIGUOUS, KILLED)  # the duplicates that at-least-once delivery explains
NOTABLE = {"ERROR": "errors", "CRITICAL": "errors", "WARNING": "warnings"}


class StartFailed(Exception):
    pass


def free_port() -> int:
    with socket.create_server((HOST, 0)) as probe:
        return int(probe.getsockname()[1])


def tree_usage(pid: int) -> tuple[int, int, int]:
    """RSS (KiB) and open descriptors summed over ``pid`` and its descendants, and their count."""
    children: dict[int, list[int]] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{name}/stat").read_text()
            children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(name))
    tree, todo, rss, fds = [], [pid], 0, 0
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
        rss += status_kib(tree[-1], "VmRSS")
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{tree[-1]}/fd"))
    return rss, fds, len(tree)


def status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/status").read_text()
        if found := re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE):
            return int(found.group(1))
    return 0


def spool_size(root: Path) -> tuple[int, int]:
    """Entries in the spool's queue (envelopes) and octets under its folder."""
    entries = octets = 0
    for folder, _, names in os.walk(root):
        for name in names:
            entries += folder.endswith("queue") and name.endswith(".env")
            with contextlib.suppress(OSError):
                octets += os.stat(os.path.join(folder, name)).st_size
    return entries, octets


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5.0)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        head, _, body = (await asyncio.wait_for(reader.read(), 10.0)).partition(b"\r\n\r\n")
    finally:
        writer.close()
    return int(head.split(b" ", 2)[1]), body


class Relay:
    """``python -m smtpwarden run`` on a fixed port and spool, started again after each kill."""

    def __init__(self, folder: Path, upstream_port: int, event_loop: str) -> None:
        self.folder, self.began = folder, time.monotonic()
        self.port, self.http = free_port(), free_port()
        self.spool, self.log, self.config = (
            folder / n for n in ("spool", "relay.log", "relay.yaml")
        )
        self.command = (sys.executable, "-m", "smtpwarden", "run", "--config", str(self.config))
        self.process: asyncio.subprocess.Process | None = None
        self.lives: list[dict[str, Any]] = []  # one per process started
        self.ends: list[float] = []  # when each kill or crash happened (monotonic)
        self.kills, self.crashes, self.stalls = 0, list[str](), list[dict[str, Any]]()
        self.hups = 0  # SIGHUPs sent, each with the file changed
        backoff = {"initial": 1, "factor": 2, "maximum": 8, "jitter": 0.2}
        self.settings: dict[str, Any] = {
            "event_loop": event_loop,
            "hostname": "relay.soak",
            "listeners": [{"name": "soak", "host": HOST, "port": self.port, "upstream": "up"}],
            "upstreams": [{"name": "up", "kind": "smtp", "host": HOST, "port": upstream_port}],
            "routes": [{"name": "soak", "policy": "requeue", "upstreams": ["up"]}],
            "retry": {"attempts": 2, "budget": RETRY_BUDGET_S, "lost_outcome": "retry"},
            "health": {"failures": 3, "cooldown": 3, "check_interval": 5},
            "spool": {"path": str(self.spool), "workers": 4, "backoff": backoff},
            "timeouts": {"connect": 5},
            "http": {"enabled": True, "host": HOST, "port": self.http},
            "log": {"transactions": str(folder / "transactions.jsonl"), "sessions": False},
            "shutdown": {"grace": 10, "fast": 2},
            "transcripts": {"path": str(folder / "transcripts")},
        }
        self.write_config()

    def write_config(self) -> None:
        self.config.write_text(
            json.dumps(self.settings, indent=1), encoding="utf-8"
        )  # JSON is YAML

    def hup(self) -> None:
        """Change the file (replays, spool workers, size limit, hostname) and send SIGHUP."""
        assert self.process is not None
        flip = self.hups % 2 == 0
        self.settings["retry"]["attempts"] = 1 if flip else 2
        self.settings["spool"]["workers"] = 2 if flip else 4
        self.settings["limits"] = {"max_message_bytes": 20_480_000 if flip else 10_240_000}
        self.settings["hostname"] = "relay2.soak" if flip else "relay.soak"
        self.write_config()
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGHUP)
        self.hups += 1

    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def now(self) -> float:
        return round(time.monotonic() - self.began, 1)

    async def start(self) -> None:
        """Start it and wait until /readyz answers; raises StartFailed."""
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": str(SOURCE) + (os.pathsep + path if path else "")}
        with self.log.open("ab") as log:
            log.write(f"--- soak: relay start {len(self.lives) + 1} at {self.now()} s\n".encode())
            log.flush()
            self.process = process = await asyncio.create_subprocess_exec(
                *self.command, stdout=DEVNULL, stderr=log, cwd=self.folder, env=env
            )
        life: dict[str, Any] = {"pid": process.pid, "started_s": self.now(), "ready_after_s": None}
        life |= {"spool_at_start": spool_size(self.spool)[0], "peak_rss_mib": None, "end": ""}
        self.lives.append(life)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.returncode is None:
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                status, body = await http_get(self.http, "/readyz")
                # 503 "marked down": the listener serves; the upstream refuses for now.
                if status == 200 or b"marked down" in body:
                    life["ready_after_s"] = round(self.now() - life["started_s"], 2)
                    return
            await asyncio.sleep(POLL_S)
        life["end"] = f"not ready (exit status {process.returncode})"
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise StartFailed(f"the relay did not get ready; see {self.log}")

    async def kill(self) -> None:
        assert self.process is not None
        self.lives[-1]["peak_rss_mib"] = round(status_kib(self.process.pid, "VmHWM") / 1024, 1)
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self.kills += 1
        self.ended(f"SIGKILL at {self.now()} s")

    def ended(self, how: str | None = None) -> None:
        """Note the end of the process: ``how``, or by default a crash."""
        assert self.process is not None
        self.ends.append(time.monotonic())
        crash = f"exited by itself at {self.now()} s: {self.process.returncode}"
        self.lives[-1]["end"] = how or crash
        if how is None:
            self.crashes.append(f"pid {self.process.pid} {self.lives[-1]['end']}")

    async def terminate(self) -> int | None:
        """SIGTERM; the exit status, or None if it had to be killed."""
        assert self.process is not None
        self.lives[-1]["peak_rss_mib"] = round(status_kib(self.process.pid, "VmHWM") / 1024, 1)
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            self.lives[-1]["end"] = "no exit after SIGTERM: killed"
            return None
        self.lives[-1]["end"] = f"SIGTERM at {self.now()} s: exit status {code}"
        return code


async def supervise(relay: Relay, args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Kill the relay at random moments and start it again; start it again after a crash."""
    rng = random.Random(args.seed + 1)
    while not stop.is_set():
        assert relay.process is not None
        wait = rng.uniform(2 / 3, 4 / 3) * args.kill_every if args.kill_every > 0 else None
        exited = asyncio.ensure_future(relay.process.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({exited, stopping}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if exited.done():
            relay.ended()
            if len(relay.crashes) > MAX_CRASHES:
                raise StartFailed(f"the relay crashed {len(relay.crashes)} times")
        else:
            exited.cancel()
            if stop.is_set():
                return
            await relay.kill()
        await asyncio.sleep(rng.uniform(0, args.down_max))
        await relay.start()


async def reload_loop(relay: Relay, args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Change the file and send SIGHUP at random moments, while the relay is up and ready."""
    rng = random.Random(args.seed + 2)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(2 / 3, 4 / 3) * args.hup_every)
        ready = relay.lives and relay.lives[-1]["ready_after_s"] is not None
        if not stop.is_set() and relay.running() and ready:
            relay.hup()


def count_lines(path: Path, text: str) -> int:
    with contextlib.suppress(OSError), path.open(encoding="utf-8", errors="replace") as lines:
        return sum(text in line for line in lines)
    return 0


async def sample_loop(
    relay: Relay, up: UpstreamProcess, ledger: Ledger, every: float, series: list[dict[str, Any]]
) -> None:
    while True:
        rss, fds, members = 0, 0, 0
        if relay.running() and relay.process is not None:
            rss, fds, members = tree_usage(relay.process.pid)
        entries, octets = spool_size(relay.spool)
        row = {"t_s": relay.now(), "rss_mib": round(rss / 1024, 1) if members else None}
        row |= {"fds": fds if members else None, "processes": members}
        row |= {"spool_entries": entries, "spool_mib": round(octets / 2**20, 2)}
        row |= {"sent": ledger.sent, "acknowledged": len(ledger.acked)}
        series.append(row | {"delivered": len(up.delivered), "kills": relay.kills})
        if stalled(series, ledger.deadline - relay.began) and len(relay.stalls) < MAX_PROBES:
            relay.stalls.append(await probe(relay, up, series[-1]["t_s"]))
        await asyncio.sleep(every)


def stalled(series: list[dict[str, Any]], load_s: float) -> bool:
    """The last interval, under load with one relay up throughout, sent almost nothing."""
    if len(series) < 4 or series[-1]["t_s"] > load_s:
        return False
    (a, b), steps = series[-2:], [y["sent"] - x["sent"] for x, y in itertools.pairwise(series)]
    same_relay = a["kills"] == b["kills"] and None not in (a["rss_mib"], b["rss_mib"])
    return same_relay and steps[-1] < sorted(steps)[len(steps) // 2] * STALL_SHARE


async def probe(relay: Relay, up: UpstreamProcess, t: float) -> dict[str, Any]:
    """Evidence of a stall: the Python stacks of relay and upstream, by py-spy."""
    assert relay.process is not None
    assert up.process is not None
    path = relay.folder / f"stall-{t:.0f}s.txt"
    text = []
    for name, pid in (("relay", relay.process.pid), ("upstream", up.process.pid)):
        text.append(f"--- py-spy dump --pid {pid} ({name}):")
        with contextlib.suppress(OSError, TimeoutError):
            spy = await asyncio.create_subprocess_exec(*SPY, str(pid), stdout=PIPE, stderr=STDOUT)
            stacks, _ = await asyncio.wait_for(spy.communicate(), 30.0)
            text.append(stacks.decode(errors="replace"))
    await asyncio.to_thread(path.write_text, "\n".join(text), encoding="utf-8")
    return {"t_s": t, "evidence": str(path)}


async def drain(relay: Relay, limit_s: float) -> tuple[float | None, int]:
    """Wait for an empty spool and no open session: (seconds, or None past ``limit_s``; entries)."""
    began, entries = time.monotonic(), -1
    while time.monotonic() - began < limit_s:
        if not relay.running():  # killed just before the load stopped, or crashed
            if relay.lives and not relay.lives[-1]["end"]:
                relay.ended()
            await relay.start()
        entries, active = spool_size(relay.spool)[0], -1.0
        with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
            status, body = await http_get(relay.http, "/metrics")
            gauge = [line for line in body.decode().splitlines() if "sessions_active{" in line]
            active = sum(float(line.rsplit(" ", 1)[1]) for line in gauge) if status == 200 else -1
        if entries == 0 and active == 0:
            await asyncio.sleep(SETTLE_S)
            return round(time.monotonic() - began, 1), 0
        await asyncio.sleep(0.5)
    return None, entries


def log_summary(path: Path) -> dict[str, Any]:
    """The relay's standard error: lines by level; errors, warnings, other lines (digits as N)."""
    levels: Counter[str] = Counter()
    notable = {key: Counter[str]() for key in ("errors", "warnings", "other")}
    with contextlib.suppress(OSError), path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if found := LOG_LINE.match(line.rstrip()):
                levels[found[2]] += 1
                if found[2] in NOTABLE:
                    text = f"{found[1]}: {found[3]}"
                    notable[NOTABLE[found[2]]][re.sub(r"\b\w*\d\w*\b", "N", text)[:150]] += 1
            elif line.strip() and not line.startswith("--- soak:"):
                notable["other"][re.sub(r"\b\w*\d\w*\b", "N", line.rstrip())[:150]] += 1
    return {"levels": dict(levels)} | {key: dict(c.most_common(8)) for key, c in notable.items()}


def summarise(
    ledger: Ledger, up: UpstreamProcess, relay: Relay, series: list[dict[str, Any]]
) -> dict[str, Any]:
    def reason(ident: int) -> str:
        seen = ledger.history.get(ident, [])
        if any(what.startswith("no reply to end of data") for what in seen):
            return AMBIGUOUS
        first, last = up.times[ident][0], up.times[ident][-1]
        if any(first - KILL_SLACK_S <= end <= last for end in relay.ends):
            return KILLED
        if seen:  # the relay had answered a failure, or the message never got its dot out
            return "client sent it again after: " + "; ".join(sorted(set(seen)))
        return "cut after the dot (lost outcome)" if ident in up.cut else "unexplained"

    delivered = up.delivered
    lost = sorted(ledger.acked - delivered.keys())
    reasons = {ident: reason(ident) for ident, count in delivered.items() if count > 1}
    rss = [(row["t_s"], row["rss_mib"]) for row in series if row["rss_mib"] is not None]
    first = [mib for t, mib in rss if t <= 60.0]
    final = [mib for t, mib in rss if rss and t >= rss[-1][0] - 60.0]
    mean = [round(sum(part) / len(part), 1) if part else None for part in (first, final)]
    return {
        "messages sent (attempts)": ledger.sent,
        "unique ids sent": ledger.issued,
        "resends": ledger.resends,
        "acknowledged": len(ledger.acked),
        "never acknowledged": ledger.issued - len(ledger.acked),
        "gave up (max attempts)": ledger.abandoned,
        "delivered (unique ids)": len(delivered),
        "deliveries": sum(delivered.values()),
        "delivered, never acknowledged": len(delivered.keys() - ledger.acked),
        "delivered without id": up.unidentified,
        "lost": len(lost),
        "lost ids": lost[:100],
        "duplicated": len(reasons),
        "duplicate reasons": dict(Counter(reasons.values())),
        "suspect duplicate ids": [i for i, why in reasons.items() if why not in OK][:100],
        "cut after dot, delivered later": len(up.cut & delivered.keys()),
        "kills": relay.kills,
        "reloads asked (SIGHUP, file changed)": relay.hups,
        "reloads applied": count_lines(relay.log, "configuration reloaded from"),
        "reloads refused": count_lines(relay.log, "configuration not reloaded"),
        "crashes": relay.crashes,
        "stalls (no progress, relay up)": relay.stalls,
        "faults injected": dict(up.faults),
        "not acknowledged, by reply": dict(ledger.failures.most_common()),
        "sessions failed before a message": dict(ledger.sessions.most_common()),
        "250 to the dot with failure text": dict(ledger.odd_acks),
        "max RSS MiB": max((mib for _, mib in rss), default=None),
        "RSS first minute MiB (mean)": mean[0],
        "RSS last minute MiB (mean)": mean[1],
        "RSS growth MiB": round(mean[1] - mean[0], 1) if mean[0] and mean[1] else None,
        "max fds": max((row["fds"] for row in series if row["fds"] is not None), default=None),
        "max spool entries": max((row["spool_entries"] for row in series), default=0),
        "relay starts": len(relay.lives),
        "ready after start, max s": max(life["ready_after_s"] or 0 for life in relay.lives),
        "peak RSS MiB of each relay": [life["peak_rss_mib"] for life in relay.lives],
    }


def print_report(report: dict[str, Any]) -> None:
    print("\n  t(s)  RSS MiB   fds  spool  spool MiB     sent    acked  delivered  kills")
    for r in report["timeseries"]:
        rss, fds = ("-" if r[key] is None else r[key] for key in ("rss_mib", "fds"))
        print(
            f"{r['t_s']:6.0f}  {rss:>7}  {fds:>4}  {r['spool_entries']:>5}  {r['spool_mib']:>9.2f}"
            f"  {r['sent']:>7}  {r['acknowledged']:>7}  {r['delivered']:>9}  {r['kills']:>5}"
        )
    rows = {key: value for key, value in report["summary"].items() if key != "lost ids"}
    print()
    for name, value in rows.items():
        print(
            f"{name:<34} {'-' if value in ({}, []) else '' if isinstance(value, dict) else value}"
        )
        for key, count in value.items() if isinstance(value, dict) else ():
            print(f"  {count:>8}  {key}")
    if lost := report["summary"]["lost ids"]:
        print(f"LOST (acknowledged, never delivered), first ids: {lost[:20]}")


async def soak(args: argparse.Namespace, folder: Path) -> tuple[int, dict[str, Any]]:
    seconds = args.minutes * 60.0
    # A short run still sees a few kills and refusals.
    args.kill_every = min(args.kill_every, seconds / 3) if args.kill_every > 0 else 0.0
    args.refuse_every = min(args.refuse_every, seconds / 2) if args.refuse_every > 0 else 0.0
    up, relay, series = UpstreamProcess(), None, list[dict[str, Any]]()
    stop, tasks = asyncio.Event(), list[asyncio.Future[Any]]()
    drained, left, exit_code, trouble = None, -1, None, None
    try:
        await up.start(args)
        relay = Relay(folder, up.port, args.event_loop)
        ledger = Ledger(args, relay.began + seconds)
        print(f"soak: {args.minutes:g} min, {args.sessions} sessions, seed {args.seed}")
        print(f"kills every ~{args.kill_every:g} s, refusals every ~{args.refuse_every:g} s")
        print(f"reloads (SIGHUP, file changed) every ~{args.hup_every:g} s")
        await relay.start()
        sampling = sample_loop(relay, up, ledger, args.sample_every, series)
        supervising = asyncio.ensure_future(supervise(relay, args, stop))
        loading = asyncio.ensure_future(load(relay.port, ledger, args))
        tasks += [asyncio.ensure_future(sampling), supervising, loading]
        if args.hup_every > 0:
            tasks.append(asyncio.ensure_future(reload_loop(relay, args, stop)))
        ending = asyncio.FIRST_COMPLETED
        await asyncio.wait({loading, supervising}, timeout=seconds + 5, return_when=ending)
        ledger.stopped = True
        await asyncio.wait({loading}, timeout=LOAD_STOP_TIMEOUT_S)
        stop.set()
        await asyncio.wait({supervising}, timeout=START_TIMEOUT_S + STOP_TIMEOUT_S)
        if supervising.done() and not supervising.cancelled() and supervising.exception():
            trouble = f"kills and restarts ended early: {supervising.exception()}"
        try:
            drained, left = await drain(relay, args.drain_timeout)
            exit_code = await relay.terminate()
        except StartFailed as error:
            trouble = f"the relay did not start again for the drain: {error}"
    except RuntimeError as error:
        raise StartFailed(str(error)) from error
    finally:
        for task in tasks:
            task.cancel()
        if relay is not None and relay.process is not None and relay.running():
            relay.process.kill()
            await relay.process.wait()
        await up.stop()
    assert relay is not None
    summary = summarise(ledger, up, relay, series)
    summary |= {"drain s": drained, "spool entries left": left, "relay exit status": exit_code}
    summary |= {f"relay log {key}": value for key, value in log_summary(relay.log).items()}
    summary["trouble"] = trouble
    report: dict[str, Any] = {"arguments": vars(args) | {"json": str(args.json)}}
    report |= {"summary": summary}
    report |= {"relay_lives": relay.lives, "timeseries": series}
    failed = summary["lost"] or relay.crashes or relay.stalls or trouble or drained is None
    failed = failed or exit_code != 0 or summary["reloads refused"] > 0
    return (1 if failed else 0), report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--minutes", type=float, default=10.0, help="duration of the load (default 10)")
    add("--quick", action="store_true", help="smoke check: at most 0.5 min, samples every 5 s")
    add("--sessions", type=int, default=20, help="concurrent client sessions (default 20)")
    add("--kill-every", type=float, default=45.0, help="mean s between SIGKILLs (0: none)")
    add("--down-max", type=float, default=2.0, help="longest s the relay stays down after a kill")
    add("--hup-every", type=float, default=10.0, help="mean s between reloads (0: none)")
    add("--sample-every", type=float, default=10.0, help="s between samples (default 10)")
    add("--drain-timeout", type=float, default=180.0, help="longest wait for the spool, s")
    add("--max-messages", type=int, default=2_000_000, help="unique ids at most")
    add("--max-attempts", type=int, default=6, help="sends of one id at most (default 6)")
    add("--single", type=float, default=0.4, help="share of connections with one message")
    add("--bdat", type=float, default=0.3, help="share of messages by BDAT when offered")
    add("--pipelining", type=float, default=0.5, help="share of pipelined messages when offered")
    add_fault_options(parser)
    add("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="the relay's")
    add("--seed", type=int, default=1)
    add("--json", type=Path, help="also write the report as JSON to this file")
    add("--keep", action="store_true", help="keep the temporary folder")
    add("--dir", help="where to make the temporary folder (default: the system's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.sample_every = min(args.minutes, 0.5), min(args.sample_every, 5.0)
    folder = Path(tempfile.mkdtemp(prefix="soak-", dir=args.dir))
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            status, report = runner.run(soak(args, folder))
    except StartFailed as error:
        print(f"FAILED: {error}; folder kept: {folder}")
        return 2
    print_report(report | {"folder": str(folder)})
    if args.json is not None:
        args.json.write_text(json.dumps(report | {"folder": str(folder)}, indent=1), "utf-8")
    if not (status or args.keep):
        shutil.rmtree(folder, ignore_errors=True)
    print(f"folder {folder}: {'kept' if status or args.keep else 'removed'}")
    print("FAILED" if status else "OK")
    return status


if __name__ == "__main__":
    sys.exit(main())
