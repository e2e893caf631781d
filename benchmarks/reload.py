"""Reloads under load: how long a SIGHUP takes, and what the sessions see.

Starts ``python -m smtpwarden run`` from this checkout in front of its
embedded sink, opens --sessions idle sessions (EHLO said), then sends
--reloads SIGHUPs, one after the line of the previous one, alternating two
valid files (another hostname and size limit). Meanwhile a client sends one
message after another through fresh sessions. Reported:

- the time from each SIGHUP to its "configuration reloaded" line (median,
  p99, max), with the relay's RSS and descriptors before and after;
- the messages the client sent during the reloads, and the slowest one;
- that every idle session still answers NOOP with 250 afterwards, and that
  a new session offers the size limit of the last file.

Bounded: at most --reloads signals, each waited for at most 10 s.

    python benchmarks/reload.py [--sessions 1000] [--reloads 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from queue import Empty, Queue
from typing import Any

HOST = "127.0.0.1"
SOURCE = Path(__file__).resolve().parent.parent / "src"
WAIT_S = 10.0
LISTENER = re.compile(r"listener main on 127\.0\.0\.1:(\d+) relays to")
APPLIED = "configuration reloaded from"
START_SIZE = 2_000_000  # limits.max_message_bytes at start
SIZES = (5_000_000, 10_240_000)  # and in the two files reloaded in turn


def document(folder: Path, size: int) -> dict[str, Any]:
    return {
        "hostname": f"relay-{size}.test",
        "listeners": [{"name": "main", "host": HOST, "port": 0, "upstream": "sink"}],
        "upstreams": [{"name": "sink", "kind": "sink", "path": str(folder / "mail")}],
        "limits": {
            "max_message_bytes": size,
            "max_connections": 5000,
            "max_connections_per_client": 0,
        },
        "http": {"enabled": False},
        "log": {"transactions": str(folder / "records.jsonl"), "level": "info"},
    }


class Relay:
    """The relay process and its standard error, read line by line in a thread."""

    def __init__(self, config: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(SOURCE), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smtpwarden", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: Queue[str] = Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in iter(self.process.stderr.readline, b""):
            self.lines.put(raw.decode("utf-8", "replace"))

    def expect(self, pattern: str | re.Pattern[str]) -> str:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                raise SystemExit(f"no line matching {pattern!r} within {WAIT_S} s") from None
            found = pattern.search(line) if isinstance(pattern, re.Pattern) else pattern in line
            if found:
                return line
            if "ERROR" in line:
                raise SystemExit(f"relay error: {line.strip()}")

    def usage(self) -> tuple[float, int]:
        """RSS in MiB and open descriptors."""
        pid = self.process.pid
        rss_kib = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
        return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def reply(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


async def idle_session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port)
    await reply(reader)
    writer.write(b"EHLO idle.test\r\n")
    await reply(reader)
    return reader, writer


async def one_message(port: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port)
    for line in (b"", b"EHLO load.test", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>"):
        if line:
            writer.write(line + b"\r\n")
        assert (await reply(reader))[:1] == b"2"
    writer.write(b"DATA\r\n")
    assert (await reply(reader))[:3] == b"354"
    writer.write(b"Subject: reload\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert (await reply(reader))[:3] == b"250"
    await reply(reader)
    writer.close()
    return time.perf_counter() - started


async def load(port: int, stop: asyncio.Event, times: list[float]) -> None:
    while not stop.is_set():
        times.append(await one_message(port))


async def size_offered(port: int) -> int:
    reader, writer = await idle_session(port)
    writer.write(b"EHLO size.test\r\n")
    ehlo = (await reply(reader)).decode()
    writer.close()
    return int(re.search(r"250.SIZE (\d+)", ehlo).group(1))  # type: ignore[union-attr]


async def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    config = folder / "smtpwarden.yaml"
    config.write_text(json.dumps(document(folder, START_SIZE)))
    relay = Relay(config)
    try:
        port = int(LISTENER.search(relay.expect(LISTENER)).group(1))  # type: ignore[union-attr]
        idle = [await idle_session(port) for _ in range(args.sessions)]
        before = relay.usage()
        stop = asyncio.Event()
        times: list[float] = []
        loader = asyncio.create_task(load(port, stop, times))
        durations: list[float] = []
        for number in range(args.reloads):
            config.write_text(json.dumps(document(folder, SIZES[number % 2])))
            started = time.perf_counter()
            relay.process.send_signal(signal.SIGHUP)
            await asyncio.to_thread(relay.expect, APPLIED)
            durations.append(time.perf_counter() - started)
        stop.set()
        await loader
        after = relay.usage()
        answered = 0
        for reader, writer in idle:
            writer.write(b"NOOP\r\n")
            answered += (await reply(reader))[:3] == b"250"
            writer.close()
        last_size = SIZES[(args.reloads - 1) % 2]
        offered = await size_offered(port)
    finally:
        relay.process.send_signal(signal.SIGTERM)
        relay.process.wait(60)
    durations.sort()
    return {
        "sessions": args.sessions,
        "reloads": args.reloads,
        "reload_ms": {
            "median": round(statistics.median(durations) * 1000, 2),
            "p99": round(durations[int(len(durations) * 0.99) - 1] * 1000, 2),
            "max": round(durations[-1] * 1000, 2),
        },
        "messages_during_reloads": len(times),
        "slowest_message_ms": round(max(times) * 1000, 2) if times else None,
        "idle_sessions_answering": answered,
        "size_offered": offered,
        "size_expected": last_size,
        "rss_mib": [round(before[0], 1), round(after[0], 1)],
        "descriptors": [before[1], after[1]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--reloads", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smtpwarden-reload-") as folder:
        result = asyncio.run(run(args, Path(folder)))
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = result["idle_sessions_answering"] == args.sessions
    return 0 if ok and result["size_offered"] == result["size_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
