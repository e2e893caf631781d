"""The clients of the performance matrix: smtp-source runs, a latency client, idle sessions.

Used by matrix.py:

- ``run_source`` runs Postfix's smtp-source once against a port and returns
  its wall time and its own CPU time (from wait4), so that the relay's CPU
  can be set against the client's;
- ``latencies`` sends transactions one at a time on one connection (MAIL,
  RCPT, DATA, the body, the final dot, each reply awaited) and times each
  whole transaction;
- ``hold_sessions`` opens many sessions (banner, EHLO), keeps them open
  while the caller reads a relay's memory, and closes them.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from peers import HOST, TAIL_CHARS, on_cpus
from smoke import make_message

T = TypeVar("T")

SOCKET_TIMEOUT_S = 10.0
CONNECT_PARALLEL = 64  # sessions being opened at once by hold_sessions
MAX_REPLY_LINES = 200  # far more than any EHLO reply


# -- smtp-source -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceRun:
    messages: int
    wall_s: float
    cpu_s: float  # smtp-source's own user + system time
    returncode: int
    output: str  # what smtp-source printed (it prints nothing when all went well)
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.output.strip() and not self.timed_out

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s if self.wall_s > 0 else 0.0


def run_source(
    binary: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    size: int,
    reuse: bool,
    cpus: frozenset[int] | None,
    timeout_s: float,
    scratch: Path,
) -> SourceRun:
    """One smtp-source run; a run past ``timeout_s`` is killed and reported as such."""
    command = [binary, "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    if reuse:
        command.append("-d")
    command.append(f"{HOST}:{port}")
    out = scratch / "smtp-source.out"
    with open(out, "wb") as output, on_cpus(cpus):
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
    timed_out = False
    reaped = False
    try:
        # A pidfd becomes readable when the process exits; until wait4 reaps
        # it the pid cannot be reused, so killing it on a timeout is safe.
        pidfd = os.pidfd_open(process.pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout_s)
        finally:
            os.close(pidfd)
        wall = time.perf_counter() - started
        if not ready:
            timed_out = True
            os.kill(process.pid, signal.SIGKILL)
        _, status, usage = os.wait4(process.pid, 0)
        reaped = True
        process.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if not reaped:
            with suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            os.wait4(process.pid, 0)
            process.returncode = -signal.SIGKILL
    text = out.read_text(errors="replace")[-TAIL_CHARS:]
    return SourceRun(
        messages=messages,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        returncode=process.returncode,
        output=text,
        timed_out=timed_out,
    )


# -- latency -------------------------------------------------------------------------


class ReplyError(Exception):
    pass


def _expect(stream: IO[bytes], code: bytes) -> None:
    for _ in range(MAX_REPLY_LINES):
        line = stream.readline(4096)
        if not line:
            raise ReplyError(f"connection closed, expected {code.decode()}")
        if line[3:4] != b"-":
            break
    else:
        raise ReplyError(f"a reply of more than {MAX_REPLY_LINES} lines")
    if line[:3] != code:
        raise ReplyError(f"expected {code.decode()}, got {line.decode('ascii', 'replace').strip()}")


def latencies(port: int, count: int, limit_s: float, size: int = 1024) -> list[int]:
    """Nanoseconds of each whole transaction, one at a time on one connection.

    Stops after ``count`` transactions or ``limit_s`` seconds, whichever
    comes first. Raises OSError or ReplyError when the path fails.
    """
    message = make_message(size)
    samples: list[int] = []
    with socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT_S) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = conn.makefile("rb")
        _expect(stream, b"220")
        conn.sendall(b"EHLO latency.bench.example\r\n")
        _expect(stream, b"250")
        deadline = time.monotonic() + limit_s
        while len(samples) < count and time.monotonic() < deadline:
            started = time.perf_counter_ns()
            conn.sendall(b"MAIL FROM:<latency@client.bench.example>\r\n")
            _expect(stream, b"250")
            conn.sendall(b"RCPT TO:<sink@bench.example>\r\n")
            _expect(stream, b"250")
            conn.sendall(b"DATA\r\n")
            _expect(stream, b"354")
            conn.sendall(message)
            _expect(stream, b"250")
            samples.append(time.perf_counter_ns() - started)
        conn.sendall(b"QUIT\r\n")
        with suppress(OSError, ReplyError):
            _expect(stream, b"221")
    return samples


def percentile(sorted_values: list[int] | list[float], fraction: float) -> float:
    """Nearest-rank percentile of a sorted list (``fraction`` 0-1)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


# -- idle sessions ---------------------------------------------------------------------


@dataclass(slots=True)
class Held:
    requested: int
    established: int = 0
    failed: int = 0
    seconds: float = 0.0  # to establish them
    first_error: str = ""
    timed_out: bool = False


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    for _ in range(MAX_REPLY_LINES):
        line = await reader.readline()
        if not line:
            raise ReplyError("connection closed")
        if line[3:4] != b"-":
            return line[:3]
    raise ReplyError(f"a reply of more than {MAX_REPLY_LINES} lines")


async def _open_session(
    port: int, gate: asyncio.Semaphore, held: Held, writers: list[asyncio.StreamWriter]
) -> None:
    async with gate:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError as error:
            held.failed += 1
            held.first_error = held.first_error or f"connect: {error}"
            return
        writers.append(writer)
        try:
            if await _read_reply(reader) != b"220":
                raise ReplyError("no 220 banner")
            writer.write(b"EHLO idle.bench.example\r\n")
            if await _read_reply(reader) != b"250":
                raise ReplyError("EHLO refused")
        except (OSError, ReplyError) as error:
            held.failed += 1
            held.first_error = held.first_error or f"{type(error).__name__}: {error}"
            return
        held.established += 1


async def hold_sessions(
    port: int, count: int, timeout_s: float, settle_s: float, measure: Callable[[], T]
) -> tuple[Held, T | None]:
    """Open ``count`` sessions to ``port``, call ``measure`` while they are open, close them.

    ``measure`` runs only when every session got its EHLO reply within
    ``timeout_s``, after ``settle_s`` more seconds.
    """
    held = Held(requested=count)
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(CONNECT_PARALLEL)
    started = time.monotonic()
    tasks = [asyncio.ensure_future(_open_session(port, gate, held, writers)) for _ in range(count)]
    result: T | None = None
    try:
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        held.seconds = time.monotonic() - started
        if pending:
            held.timed_out = True
        elif held.established == count:
            await asyncio.sleep(settle_s)
            result = measure()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.transport.abort()
        await asyncio.sleep(0)
    return held, result


def run_hold(
    port: int, count: int, timeout_s: float, settle_s: float, measure: Callable[[], T]
) -> tuple[Held, T | None]:
    from smtpwarden.net.loop import loop_factory

    factory, _ = loop_factory("auto")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(hold_sessions(port, count, timeout_s, settle_s, measure))
