"""PRODUCT.md invariant 7 with the whole relay: nothing acknowledged is lost.

The upstream accepts each envelope and then refuses the end of the message,
so under requeue every message that gets a 250 got it from the spool. The
relay process is SIGKILLed at random points while clients send, restarted
on the same port, killed again; at last the upstream recovers and the
restarted relay's spool workers must deliver every acknowledged message.
Duplicates (at-least-once after a kill) are counted, never failures.
"""

from __future__ import annotations

import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import WireClient, free_port
from integration.test_relay_process import read_lines, wait_ready

ROUNDS = 6
MESSAGES_PER_ROUND = 80  # an upper bound: the kill usually comes first
KILL_AFTER_S = (0.3, 1.5)
DELIVERY_TIMEOUT_S = 90.0
SUBJECT = re.compile(rb"Subject: durability (\d+)\r\n")


class Relay:
    """The relay as a process, its standard error read by a thread."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smtpwarden", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(
            target=read_lines, args=(self.process.stderr, lines), daemon=True
        )
        self._reader.start()
        try:
            _, self.port = wait_ready(lines, [])
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def stop(self, sig: int) -> None:
        """Send ``sig`` and wait for the process and its reader to end."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(30)
        self._reader.join(30)
        assert self.process.stderr is not None
        self.process.stderr.close()


def send_until_killed(port: int, first: int, acknowledged: list[int]) -> int:
    """Send numbered messages until the relay dies; return the next number."""
    number = first
    try:
        for number in range(first, first + MESSAGES_PER_ROUND):
            with WireClient(("127.0.0.1", port), timeout=30) as client:
                client.open_data()
                client.send(b"Subject: durability %d\r\n\r\nbody %d\r\n.\r\n" % (number, number))
                code, raw = client.reply()
                if code == 250 and b"queued as" in raw:
                    acknowledged.append(number)
    except (OSError, AssertionError, ConnectionError):
        pass
    return number + 1


def delivered(upstream: RawUpstream, since: int) -> list[int]:
    """The message numbers in what the upstream accepted after ``since``."""
    numbers = []
    for connection in list(upstream.connections)[since:]:
        for section in connection.data:
            found = SUBJECT.search(section)
            if found:
                numbers.append(int(found.group(1)))
    return numbers


def test_sigkill_at_random_points_loses_no_acknowledged_message(tmp_path: Path) -> None:
    rng = random.Random(7)
    upstream = RawUpstream(replies={".": b"451 4.3.0 Not now\r\n"})
    port = free_port()
    config = tmp_path / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "hostname": "relay.test",
                "listeners": [
                    {"name": "main", "host": "127.0.0.1", "port": port, "upstream": "up"}
                ],
                "upstreams": [{"name": "up", **upstream.config}],
                "routes": [{"name": "main", "policy": "requeue", "upstreams": ["up"]}],
                "retry": {"attempts": 1, "budget": 10},
                "spool": {
                    "path": str(tmp_path / "spool"),
                    "backoff": {"initial": 0.2, "maximum": 0.5, "jitter": 0.1},
                },
                "log": {"transactions": str(tmp_path / "log.jsonl"), "level": "info"},
            }
        ),
        encoding="utf-8",
    )
    acknowledged: list[int] = []
    number = 0
    try:
        for _ in range(ROUNDS):
            relay = Relay(config)
            assert relay.port == port
            killer = threading.Timer(rng.uniform(*KILL_AFTER_S), relay.process.kill)
            killer.start()
            number = send_until_killed(port, number, acknowledged)
            killer.join()
            relay.stop(signal.SIGKILL)
        assert acknowledged, "no message was acknowledged before the kills"
        # The upstream recovers: only what it receives from now on counts as
        # delivered. A fresh relay's workers drain the spool.
        recovered_at = len(upstream.connections)
        upstream.replies.clear()
        relay = Relay(config)
        try:
            deadline = time.monotonic() + DELIVERY_TIMEOUT_S
            while missing := set(acknowledged) - set(delivered(upstream, recovered_at)):
                assert time.monotonic() < deadline, f"never delivered: {sorted(missing)}"
                time.sleep(0.1)
        finally:
            relay.stop(signal.SIGTERM)
    finally:
        upstream.close()
    got = delivered(upstream, recovered_at)
    duplicates = len(got) - len(set(got))
    print(f"acknowledged {len(acknowledged)}, delivered {len(set(got))}, duplicates {duplicates}")
    assert set(acknowledged) <= set(got)
