"""Scaling with worker processes: one relay process against ``workers: 2``.

Postfix's smtp-source sends 1 KB messages over 100 reused sessions to
Postfix's smtp-sink through two smtpwarden relays started side by side, one
with ``workers: 1`` and one with ``workers: 2`` (passthrough), alternating
(A B A B ...). Each repetition reports messages per second and the relay's
CPU time per message (its whole process tree: supervisor and workers). Then
it reads how many sessions each worker served from the relay's merged
/metrics (``smtpwarden_sessions_total`` per ``worker``).

Nothing is pinned: the relay's two workers need both CPUs of a 2-CPU
machine, so the load client and the sink share them. On a machine with more
CPUs, ``--relay-cpus`` and ``--load-cpus`` put the relay and the load on
cores of their own (for example ``--relay-cpus 0,1 --load-cpus 2``).

    python benchmarks/workers.py [--messages 20000] [--repetitions 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

from peers import SMTP_SOURCE, Peer, raise_nofile, start_sink, start_smtpwarden
from probes import run_source
from sysinfo import cpu_seconds, find_tool

SESSIONS = 100
SIZE = 1024
RUN_TIMEOUT_S = 300.0
_SESSIONS_LINE = re.compile(r"^smtpwarden_sessions_total\{([^}]*)\} (\S+)$", re.M)
_WORKER = re.compile(r'worker="(\d+)"')
# The supervisor's endpoint (each worker also logs its own, internal one).
_ENDPOINT = re.compile(r"HTTP endpoint for every worker on http://[^:/\s]+:(\d+)/metrics")


def cpus(text: str | None) -> frozenset[int] | None:
    return None if not text else frozenset(int(part) for part in text.split(","))


def sessions_per_worker(relay: Peer) -> dict[str, float]:
    """Sessions each worker served, from the supervisor's merged /metrics."""
    found = _ENDPOINT.search(relay.log.read_text(errors="replace"))
    if found is None:
        return {}
    with urllib.request.urlopen(f"http://127.0.0.1:{found[1]}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    served: dict[str, float] = {}
    for labels, value in _SESSIONS_LINE.findall(text):
        worker = _WORKER.search(labels)
        if worker is not None:
            served[worker[1]] = served.get(worker[1], 0.0) + float(value)
    return served


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="per repetition")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--relay-cpus", help="e.g. 0,1 (default: unpinned)")
    parser.add_argument("--load-cpus", help="e.g. 2 (default: unpinned)")
    args = parser.parse_args()
    source = find_tool("smtp-source", SMTP_SOURCE)
    if source is None:
        print("smtp-source not found (Debian package postfix)", file=sys.stderr)
        return 2
    raise_nofile()
    relay_cpus, load_cpus = cpus(args.relay_cpus), cpus(args.load_cpus)
    rates: dict[int, list[float]] = {1: [], 2: []}
    costs: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="smtpwarden-workers-") as scratch:
        folder = Path(scratch)
        peers: list[Peer] = []
        try:
            sink = start_sink("sink", folder, load_cpus)
            peers.append(sink)
            relays = {}
            for count in (1, 2):
                relays[count] = start_smtpwarden(
                    f"workers{count}",
                    folder,
                    sink.port,
                    relay_cpus,
                    policy="passthrough",
                    event_loop="uvloop",
                    workers=count,
                )
                peers.append(relays[count])
            print(f"{args.messages} messages of {SIZE} octets, {SESSIONS} sessions, reused")
            for rep in range(1, args.repetitions + 1):
                for count in (1, 2):
                    relay = relays[count]
                    before = cpu_seconds(relay.pid)
                    run = run_source(
                        source,
                        relay.port,
                        messages=args.messages,
                        sessions=SESSIONS,
                        size=SIZE,
                        reuse=True,
                        cpus=load_cpus,
                        timeout_s=RUN_TIMEOUT_S,
                        scratch=folder,
                    )
                    if not run.ok:
                        print(f"workers {count}: smtp-source failed: {run.output}", file=sys.stderr)
                        return 1
                    cost = (cpu_seconds(relay.pid) - before) / args.messages * 1e6
                    rates[count].append(run.rate)
                    costs[count].append(cost)
                    print(
                        f"rep {rep}  workers {count}: {run.rate:8,.0f} msg/s"
                        f"  relay CPU {cost:6.1f} us/msg"
                    )
            served = sessions_per_worker(relays[2])
        finally:
            for peer in reversed(peers):
                peer.stop()
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"median workers 1: {one:,.0f} msg/s, {statistics.median(costs[1]):.1f} us/msg")
    print(f"median workers 2: {two:,.0f} msg/s, {statistics.median(costs[2]):.1f} us/msg")
    print(f"workers 2 / workers 1: {two / one:.2f}")
    shares = ", ".join(f"worker {w}: {n:,.0f}" for w, n in sorted(served.items()))
    print(f"sessions served by each of the 2 workers: {shares or 'n/a'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
