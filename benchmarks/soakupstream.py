"""The fault-injecting upstream of benchmarks/soak.py.

The upstream runs as a process of its own (``UpstreamProcess`` starts it and
reads its events): an SMTP server on 127.0.0.1 that accepts every envelope,
reads every message (DATA or BDAT, pipelined or not) and, at random with the
odds of its options, injects a fault instead of a plain success:
``deferred_451`` (451 to the final dot or BDAT LAST), ``lost_outcome`` (the
connection cut after the dot, no reply), ``mid_session_421`` (RCPT accepted,
then 421 to DATA or BDAT), ``contradictory_250`` (a 250 to the dot whose text
says failure, in phrases the relay knows by default), ``slow_reply`` (a pause
before the reply to the dot), ``refused_period`` (the listening socket closed
for a few seconds).

A message is delivered only when the upstream wrote a plain 250 for its end:
a cut after the dot and a contradictory 250 are no deliveries, though a real
MTA may have kept the cut message. Events on standard output: ``port N``
first, then ``D ID`` (a 250 for the message whose X-Soak-Id is ID), ``F KIND
ID`` (a fault; ID "-" when not known), ``U`` (a 250 for a message without
an id). SIGTERM stops it.

The clients are soakload.py's.

    python benchmarks/soakupstream.py [--deferred 0.03] [--lost 0.01] ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"
# Larger than the largest message the soak sends (1 MiB) with its headers.
STREAM_LIMIT = 4 * 1024 * 1024
# A connection silent this long is closed; far above every relay timeout used.
IDLE_TIMEOUT_S = 600.0
FLUSH_S = 0.1  # how often buffered event lines are written out
HEADER_SCAN = 4096  # the id header is the first line; look no further
SLOW_MIN_S = 0.2
RELISTEN_TRIES, RELISTEN_PAUSE_S = 100, 0.1  # opening the port again after a refusal
ID_HEADER = re.compile(rb"(?:^|\r\n)X-Soak-Id: (\d+)\r\n")
BANNER = b"220 upstream.soak ESMTP soak upstream\r\n"
EHLO = (
    b"250-upstream.soak\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n"
    b"250-SIZE 20000000\r\n250 ENHANCEDSTATUSCODES\r\n"
)
CONTRADICTORY = (
    b"250 2.0.0 Mail transaction failed\r\n",
    b"250 2.0.0 Ok, but delivery failed: transport suspended\r\n",
    b"250 Message rejected, try again later\r\n",
)
FILLER = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnop\r\n"
# The fault options: name, default, help. soak.py takes the same and passes them on.
FAULTS: tuple[tuple[str, float, str], ...] = (
    ("deferred", 0.03, "odds of 451 to the final dot"),
    ("lost", 0.01, "odds of a cut after the final dot, without a reply"),
    ("mid-session", 0.01, "odds of 421 after RCPT"),
    ("contradictory", 0.02, "odds of a 250 to the dot whose text says failure"),
    ("slow", 0.02, "odds of a slow reply to the dot"),
    ("slow-max", 3.0, "longest slow reply, seconds"),
    ("refuse-every", 90.0, "mean seconds between periods of refused connections (0: none)"),
    ("refuse-for", 6.0, "longest period of refused connections, seconds"),
)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
# A connection ends on these: the peer left, went silent or sent what is not
# SMTP. RuntimeError: uvloop's write to a transport the relay has just closed.
GONE: tuple[type[Exception], ...] = (OSError, EOFError, TimeoutError, ValueError, IndexError)
GONE += (RuntimeError, asyncio.LimitOverrunError)
SIMPLE = {b"HELO": b"250 upstream.soak\r\n", b"NOOP": b"250 2.0.0 Ok\r\n"}


class Upstream:
    """The server; ``odds`` holds the fault options."""

    def __init__(self, odds: argparse.Namespace, rng: random.Random) -> None:
        self.odds = odds
        self.rng = rng
        self.accepted = 0
        self.server: asyncio.Server | None = None

    def emit(self, line: str) -> None:
        sys.stdout.write(line + "\n")  # buffered; flushed every FLUSH_S and at the end

    async def flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            sys.stdout.flush()

    async def listen(self, port: int) -> int:
        self.server = await asyncio.start_server(
            self.serve, HOST, port, limit=STREAM_LIMIT, backlog=1024, reuse_address=True
        )
        return int(self.server.sockets[0].getsockname()[1])

    async def refusals(self, port: int) -> None:
        """Close the listening socket now and then, and open it again on the same port."""
        if self.odds.refuse_every <= 0:
            return
        while True:
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.odds.refuse_every)
            seconds = self.rng.uniform(1.0, max(1.0, self.odds.refuse_for))
            self.emit(f"F refused_period {seconds:.1f}")
            if self.server is not None:
                self.server.close()
            await asyncio.sleep(seconds)
            for _ in range(RELISTEN_TRIES):
                try:
                    await self.listen(port)
                    break
                except OSError:
                    await asyncio.sleep(RELISTEN_PAUSE_S)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(*GONE):
            try:
                await self._session(reader, writer)
            finally:
                writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        chunks: list[bytes] = []
        doomed = False  # the next DATA or BDAT gets 421 (mid-session loss)
        while True:
            await writer.drain()
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT_S)
            except asyncio.IncompleteReadError:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(EHLO)
            elif verb in (b"MAIL", b"RSET"):
                chunks, doomed = [], False
                writer.write(b"250 2.1.0 Ok\r\n" if verb == b"MAIL" else b"250 2.0.0 Ok\r\n")
            elif verb == b"RCPT":
                doomed = doomed or self.rng.random() < self.odds.mid_session
                writer.write(b"250 2.1.5 Ok\r\n")
            elif verb in (b"DATA", b"BDAT") and doomed:
                self.emit("F mid_session_421 -")
                writer.write(b"421 4.4.2 upstream.soak Closing transmission channel\r\n")
                await writer.drain()
                return
            elif verb == b"DATA":
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                await writer.drain()
                data = await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), IDLE_TIMEOUT_S)
                if not await self._end(data, writer):
                    return
            elif verb == b"BDAT":
                words = line.split()
                size = int(words[1])
                chunks.append(await asyncio.wait_for(reader.readexactly(size), IDLE_TIMEOUT_S))
                if len(words) < 3 or words[2].upper() != b"LAST":
                    writer.write(b"250 2.0.0 %d octets received\r\n" % size)
                    continue
                data, chunks = b"".join(chunks), []
                if not await self._end(data, writer):
                    return
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(SIMPLE.get(verb, b"502 5.5.1 Not implemented\r\n"))

    async def _end(self, data: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer the end of a message; False when the connection was cut."""
        found = ID_HEADER.search(data, 0, HEADER_SCAN)
        ident = found.group(1).decode() if found else "-"
        odds, rng = self.odds, self.rng
        if rng.random() < odds.slow:
            self.emit(f"F slow_reply {ident}")
            await asyncio.sleep(rng.uniform(SLOW_MIN_S, max(SLOW_MIN_S, odds.slow_max)))
        roll = rng.random()
        if roll < odds.deferred:
            self.emit(f"F deferred_451 {ident}")
            writer.write(b"451 4.3.0 Temporary failure, try again later\r\n")
            return True
        roll -= odds.deferred
        if roll < odds.lost:
            self.emit(f"F lost_outcome {ident}")
            writer.transport.abort()
            return False
        roll -= odds.lost
        if roll < odds.contradictory:
            self.emit(f"F contradictory_250 {ident}")
            writer.write(rng.choice(CONTRADICTORY))
            return True
        self.accepted += 1
        self.emit(f"D {ident}" if found else "U")
        writer.write(b"250 2.0.0 Ok: queued as S%08d\r\n" % self.accepted)
        return True


def add_fault_options(parser: argparse.ArgumentParser) -> None:
    for name, default, text in FAULTS:
        parser.add_argument(f"--{name}", type=float, default=default, help=f"{text} ({default})")


class UpstreamProcess:
    """This server as a process of soak.py, and the events it reported."""

    def __init__(self) -> None:
        self.delivered: Counter[int] = Counter()
        self.times: dict[int, list[float]] = {}  # id -> when each delivery was reported
        self.faults: Counter[str] = Counter()
        self.cut: set[int] = set()  # ids cut after the dot (lost outcome)
        self.unidentified = 0
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self.reading: asyncio.Task[None] | None = None

    async def start(self, args: argparse.Namespace) -> None:
        """Start it with the seed and fault options of ``args``; RuntimeError if it fails."""
        arguments = [f"--{name}={getattr(args, name.replace('-', '_'))}" for name, _, _ in FAULTS]
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__)),
            f"--seed={args.seed}",
            *arguments,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), START_TIMEOUT_S)
        if not line.startswith(b"port "):
            raise RuntimeError(f"the upstream did not start: {line!r}")
        self.port = int(line.split()[1])
        self.reading = asyncio.get_running_loop().create_task(self._read(self.process.stdout))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            kind, *rest = raw.decode().split()
            if kind == "D":
                ident = int(rest[0])
                self.delivered[ident] += 1
                self.times.setdefault(ident, []).append(time.monotonic())
            elif kind == "F":
                self.faults[rest[0]] += 1
                if rest[0] == "lost_outcome" and rest[1].isdigit():
                    self.cut.add(int(rest[1]))
            elif kind == "U":
                self.unidentified += 1

    async def stop(self) -> None:
        """SIGTERM, then read its last events."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.terminate()
        if self.reading is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.reading), STOP_TIMEOUT_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed, else None (asyncio's own)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def run(args: argparse.Namespace) -> None:
    upstream = Upstream(args, random.Random(args.seed))
    port = await upstream.listen(args.port)
    print(f"port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = [loop.create_task(upstream.flusher()), loop.create_task(upstream.refusals(port))]
    await stop.wait()
    for task in tasks:
        task.cancel()
    if upstream.server is not None:
        upstream.server.close()
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    parser.add_argument("--seed", type=int, default=1)
    add_fault_options(parser)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
