"""A SIGKILL at any moment loses no message that ``put`` returned for (invariant 7).

A child process puts messages from several threads through one Spool (so
puts share group commits) and prints each queue id, with the sha256 of the
octets it gave, only after ``put_sync`` returned: a printed line stands for
a 250 the relay would have sent. The test kills the child with SIGKILL at a
random point, reopens the spool, recovers it, and checks that every printed
entry is there and complete, and that nothing half-written is visible.
Several rounds reuse the same spool, so each round also recovers what the
previous kill left behind. Bounded: ROUNDS children of at most MESSAGES puts.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from smtpwarden.spool import EntryState, Spool

MESSAGES = 300
ROUNDS = 5
WRITERS = 8
LINE_TIMEOUT_S = 30.0

CHILD = r"""
import hashlib, sys, threading
from smtpwarden.spool import BodyKind, Envelope, Spool

folder, first, count, writers = sys.argv[1], *map(int, sys.argv[2:5])
envelope = Envelope(
    mail_from=b"MAIL FROM:<load@example.org>",
    recipients=(b"RCPT TO:<one@example.net>", b"RCPT TO:<two@example.net>"),
    body=BodyKind.DATA,
    transaction_id="durability",
    dedupe_key="durability",
)
numbers = iter(range(first, first + count))
lock = threading.Lock()

def message(n):
    # Sizes from a few octets to about 40 KiB, so some writes take a while.
    line = b"message %d, line of text\r\n" % n
    return b"Subject: %d\r\n\r\n" % n + line * (n * 37 % 1500) + b".\r\n"

def work():
    while True:
        with lock:
            n = next(numbers, None)
        if n is None:
            return
        data = message(n)
        half = len(data) // 2
        queue_id = spool.put_sync(envelope, [data[:half], data[half:]])
        digest = hashlib.sha256(data).hexdigest()
        with lock:
            sys.stdout.write(f"{queue_id} {n} {digest}\n")
            sys.stdout.flush()

spool = Spool(folder)
spool.recover()
print("ready", flush=True)
threads = [threading.Thread(target=work) for _ in range(writers)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
spool.close()
print("done", flush=True)
"""


def read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line.strip())
    lines.put(None)


def run_and_kill(folder: Path, first: int, kill_after: int) -> dict[str, tuple[int, str]]:
    """Start a child, SIGKILL it once ``kill_after`` ids were printed; return the ids."""
    acknowledged: dict[str, tuple[int, str]] = {}
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), str(first), str(MESSAGES), str(WRITERS)],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=read_lines, args=(child.stdout, lines), daemon=True)
        reader.start()
        try:
            assert lines.get(timeout=LINE_TIMEOUT_S) == "ready"
            while len(acknowledged) < kill_after:
                line = lines.get(timeout=LINE_TIMEOUT_S)
                if line is None or line == "done":
                    break
                queue_id, number, digest = line.split()
                acknowledged[queue_id] = (int(number), digest)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        reader.join(LINE_TIMEOUT_S)
        # Lines printed before the kill and not yet read are acknowledged too.
        while (line := lines.get_nowait()) is not None:
            if line != "done":
                queue_id, number, digest = line.split()
                acknowledged[queue_id] = (int(number), digest)
    return acknowledged


def check_spool(folder: Path, acknowledged: dict[str, tuple[int, str]]) -> int:
    """Recover the spool and check it; returns how many entries it holds."""
    with Spool(folder) as spool:
        report = spool.recover()
        assert report.cleaned
        assert report.quarantined == ()
        assert os.listdir(spool.layout.tmp) == []
        names = os.listdir(spool.layout.queue)
        envelopes = {n[:-4] for n in names if n.endswith(".env")}
        messages = {n[:-4] for n in names if n.endswith(".msg")}
        assert envelopes == messages, "a half-written entry is visible"
        missing = set(acknowledged) - envelopes
        assert not missing, f"acknowledged and lost: {sorted(missing)[:5]}"
        entries = {e.queue_id: e for e in spool.entries()}
        assert set(entries) == envelopes  # every envelope parses
        for queue_id, entry in entries.items():
            assert entry.state is EntryState.QUEUED
            with spool.open_message(queue_id) as stream:
                data = stream.read()
            assert len(data) == entry.size
            assert hashlib.sha256(data).hexdigest() == entry.sha256
            if queue_id in acknowledged:
                assert entry.sha256 == acknowledged[queue_id][1]
        return len(entries)


def test_sigkill_during_puts_loses_nothing_acknowledged(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    folder = tmp_path / "spool"
    acknowledged: dict[str, tuple[int, str]] = {}
    # The first round dies before any put can return; the others mid-load.
    kill_points = [0] + [rng.randrange(1, MESSAGES) for _ in range(ROUNDS - 1)]
    for round_number, kill_after in enumerate(kill_points):
        got = run_and_kill(folder, round_number * MESSAGES, kill_after)
        assert len(got) >= kill_after, f"seed {seed}: the child stopped early"
        acknowledged.update(got)
        stored = check_spool(folder, acknowledged)
        assert stored >= len(acknowledged), f"seed {seed}"
    numbers = [n for n, _ in acknowledged.values()]
    assert len(numbers) == len(set(numbers)), "one put got two queue ids"
