"""Smoke benchmark: messages per second straight to an upstream and through smtpwarden.

Three processes take part, so that none steals CPU from another:

- a minimal SMTP responder (this file, started again with ``--responder``)
  that answers every command at once and writes nothing to disk, so that
  neither fsync nor a real MTA's work hides the relay's cost;
- the relay, ``python -m smtpwarden run``, in front of that responder;
- the load client (this process): SESSIONS concurrent sessions, each sending
  messages one after another, MAIL, RCPT and DATA pipelined (RFC 2920) and
  the body sent after the 354.

Rounds alternate direct and relayed (A B A B ...) so that drift in the
machine's load affects both alike. The relay's CPU time comes from
/proc/PID/stat (Linux); elsewhere it is shown as "n/a".

    python benchmarks/smoke.py [--messages 2000] [--sessions 10] [--size 1024]

The figures compare the two paths on one machine; they are not a capacity
claim. Only the standard library and smtpwarden are needed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from smtpwarden.net.loop import loop_factory

HOST = "127.0.0.1"
END_OF_DATA = b"\r\n.\r\n"
# How long to wait for a helper process to report its port.
STARTUP_TIMEOUT_S = 15.0
# Messages sent along each path before measuring, so that the first round
# does not also pay for imports, connection setup and cold caches.
WARMUP_MESSAGES = 200

_REPLIES = {
    b"HELO": b"250 bench.example\r\n",
    b"EHLO": b"250-bench.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
}


# -- the responder -------------------------------------------------------------


class Responder(asyncio.Protocol):
    """Answers every command at once; accepts every message without storing it.

    Minimal on purpose: it trusts its client (this benchmark) to send CRLF
    lines and non-empty bodies that end in CRLF.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(b"220 bench.example ESMTP responder\r\n")

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        buf = self.buf + data if self.buf else data
        out: list[bytes] = []
        pos = 0
        while pos < len(buf):
            if self.in_data:
                end = buf.find(END_OF_DATA, max(pos - 4, 0))
                if end < 0:
                    pos = max(len(buf) - 4, pos)
                    break
                pos = end + len(END_OF_DATA)
                self.in_data = False
                out.append(b"250 2.0.0 Ok: accepted\r\n")
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            verb = buf[pos : pos + 4].upper()
            pos = end + 2
            if verb == b"DATA":
                self.in_data = True
                out.append(b"354 Go ahead\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                transport.write(b"".join(out))
                transport.close()
                return
            else:
                out.append(_REPLIES.get(verb, b"502 5.5.1 Not implemented\r\n"))
        self.buf = buf[pos:]
        if out:
            transport.write(b"".join(out))


async def serve_responder() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Responder, HOST, 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


# -- the load client -----------------------------------------------------------


class Quota:
    """Messages left to send in a round, shared by its sessions."""

    def __init__(self, count: int, deadline: float) -> None:
        self.left = count
        self.deadline = deadline

    def take(self) -> bool:
        if self.left <= 0 or time.monotonic() >= self.deadline:
            return False
        self.left -= 1
        return True


class UnexpectedReply(Exception):
    pass


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    """Read one (possibly multi-line) reply; raise unless its code is ``code``."""
    while True:
        line = await reader.readuntil(b"\r\n")
        if line[3:4] != b"-":
            break
    if line[:3] != code:
        raise UnexpectedReply(line.decode("ascii", "replace").rstrip())


async def client_session(port: int, quota: Quota, message: bytes) -> int:
    """Send messages on one connection until the quota is spent; return how many."""
    reader, writer = await asyncio.open_connection(HOST, port)
    sent = 0
    try:
        await expect(reader, b"220")
        writer.write(b"EHLO client.bench.example\r\n")
        await expect(reader, b"250")
        while quota.take():
            writer.write(
                b"MAIL FROM:<load@client.bench.example>\r\nRCPT TO:<sink@bench.example>\r\nDATA\r\n"
            )
            await expect(reader, b"250")
            await expect(reader, b"250")
            await expect(reader, b"354")
            writer.write(message)
            await expect(reader, b"250")
            sent += 1
        writer.write(b"QUIT\r\n")
        await expect(reader, b"221")
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
    return sent


@dataclass(frozen=True, slots=True)
class Round:
    messages: int
    seconds: float
    errors: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


async def run_round(port: int, messages: int, sessions: int, size: int, limit_s: float) -> Round:
    message = make_message(size)
    started = time.monotonic()
    quota = Quota(messages, started + limit_s)
    results = await asyncio.gather(
        *(client_session(port, quota, message) for _ in range(sessions)), return_exceptions=True
    )
    seconds = time.monotonic() - started
    sent = sum(result for result in results if isinstance(result, int))
    errors = sum(1 for result in results if isinstance(result, BaseException))
    for result in results:
        if isinstance(result, BaseException):
            print(f"  session failed: {type(result).__name__}: {result}", file=sys.stderr)
    return Round(messages=sent, seconds=seconds, errors=errors)


def make_message(size: int) -> bytes:
    """A message of ``size`` octets (headers included, at least the headers), then ".<CRLF>"."""
    head = (
        b"From: load@client.bench.example\r\n"
        b"To: sink@bench.example\r\n"
        b"Subject: smtpwarden smoke benchmark\r\n"
        b"\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n"
    body = bytearray(head)
    while len(body) + len(line) <= size:
        body += line
    if size - len(body) >= len(b"x\r\n"):
        body += b"x" * (size - len(body) - 2) + b"\r\n"
    return bytes(body) + b".\r\n"


# -- the helper processes ------------------------------------------------------


def _read_until(stream: IO[str], pattern: re.Pattern[str]) -> re.Match[str]:
    """Read lines until one matches; the caller bounds the time with a watchdog."""
    for line in stream:
        found = pattern.search(line)
        if found:
            return found
    raise RuntimeError(f"helper exited before printing a line matching {pattern.pattern!r}")


def _drain(stream: IO[str]) -> None:
    threading.Thread(target=stream.read, daemon=True).start()


@contextmanager
def _watchdog(process: subprocess.Popen[str], what: str) -> Iterator[None]:
    timer = threading.Timer(STARTUP_TIMEOUT_S, process.kill)
    timer.start()
    try:
        yield
    except RuntimeError as error:
        raise RuntimeError(f"{what} did not start: {error}") from error
    finally:
        timer.cancel()


def start_responder(event_loop: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--responder", "--event-loop", event_loop],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    with _watchdog(process, "the responder"):
        port = int(_read_until(process.stdout, re.compile(r"^(\d+)$")).group(1))
    return process, port


_LISTENING = re.compile(r"listener \S+ on \S+:(\d+) relays")
_RUNNING = re.compile(r"running on (\S+)")


def start_relay(
    upstream_port: int, records: IO[bytes], event_loop: str, policy: str, folder: str
) -> tuple[subprocess.Popen[str], int, str]:
    # A configuration file with one route: its policy is what is measured.
    config = Path(folder) / "relay.yaml"
    config.write_text(
        "listeners: [{name: bench, host: 127.0.0.1, port: 0, upstream: up}]\n"
        f"upstreams: [{{name: up, host: 127.0.0.1, port: {upstream_port}}}]\n"
        f"routes: [{{name: bench, policy: {policy}, upstreams: [up]}}]\n"
        f"spool: {{path: {Path(folder) / 'spool'}}}\n",
        encoding="utf-8",
    )
    command = [
        sys.executable,
        "-m",
        "smtpwarden",
        "run",
        "--config",
        str(config),
        "--event-loop",
        event_loop,
    ]
    process = subprocess.Popen(command, stdout=records, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    with _watchdog(process, "the relay"):
        port = int(_read_until(process.stderr, _LISTENING).group(1))
        loop_name = _read_until(process.stderr, _RUNNING).group(1)
    _drain(process.stderr)
    return process, port, loop_name


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process, from /proc (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may hold spaces;
    # utime and stime are fields 14 and 15 of proc(5).
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STARTUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the report ----------------------------------------------------------------


def _row(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per round (default 2000)")
    parser.add_argument("--sessions", type=int, default=10, help="concurrent (default 10)")
    parser.add_argument("--size", type=int, default=1024, help="message octets (default 1024)")
    parser.add_argument("--repetitions", type=int, default=3, help="A/B pairs (default 3)")
    parser.add_argument(
        "--time-limit", type=float, default=30.0, help="seconds per round at most (default 30)"
    )
    parser.add_argument(
        "--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="all processes"
    )
    parser.add_argument(
        "--policy",
        choices=("passthrough", "retry", "requeue"),
        default="passthrough",
        help="the relay route's delivery policy (default passthrough); the responder never"
        " fails, so retry and requeue cost only the held copy of each message",
    )
    parser.add_argument("--responder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    factory, client_loop = loop_factory(args.event_loop)
    if args.responder:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve_responder())
        return 0

    def measure(port: int, messages: int) -> Round:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(run_round(port, messages, args.sessions, args.size, args.time_limit))

    responder, upstream_port = start_responder(args.event_loop)
    with tempfile.TemporaryFile() as records, tempfile.TemporaryDirectory() as folder:
        try:
            relay, relay_port, relay_loop = start_relay(
                upstream_port, records, args.event_loop, args.policy, folder
            )
        except BaseException:
            stop(responder)
            raise
        try:
            measure(upstream_port, WARMUP_MESSAGES)
            measure(relay_port, WARMUP_MESSAGES)
            rounds = run_rounds(
                args.repetitions, args.messages, measure, upstream_port, relay_port, relay.pid
            )
        finally:
            stop(relay)
            stop(responder)
        records.seek(0)
        log = records.read()
    delivered = log.count(b'"outcome":"delivered"')
    relayed = WARMUP_MESSAGES + sum(r.messages for path, r, _ in rounds if path == "relay")

    octets = len(make_message(args.size)) - len(b".\r\n")
    print(
        f"smtpwarden smoke benchmark: {args.messages} messages of {octets} octets per round,"
        f" {args.sessions} sessions, {args.repetitions} repetitions, policy {args.policy}"
    )
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs;"
        f" client and responder on {client_loop}, relay on {relay_loop}"
    )
    print()
    widths = (3, 6, 8, 7, 7, 14)
    print(_row(("rep", "path", "messages", "seconds", "msg/s", "relay CPU/msg"), widths))
    for i, (path, result, cpu) in enumerate(rounds):
        cpu_text = "-" if path == "direct" else "n/a" if cpu is None else f"{cpu * 1e3:.3f} ms"
        cells = (
            str(i // 2 + 1),
            path,
            str(result.messages),
            f"{result.seconds:.3f}",
            f"{result.rate:.0f}",
            cpu_text,
        )
        print(_row(cells, widths))
    direct = statistics.median(r.rate for path, r, _ in rounds if path == "direct")
    through = statistics.median(r.rate for path, r, _ in rounds if path == "relay")
    cpus = [cpu for path, _, cpu in rounds if path == "relay" and cpu is not None]
    print()
    print(f"median direct:  {direct:.0f} msg/s")
    print(f"median relayed: {through:.0f} msg/s")
    print(f"relayed/direct: {through / direct:.2f}" if direct else "relayed/direct: n/a")
    if cpus:
        print(f"relay CPU:      {statistics.median(cpus) * 1e3:.3f} ms per message (median)")
    print(f"relay records:  {delivered} delivered of {relayed} relayed (warm-up included)")
    errors = sum(result.errors for _, result, _ in rounds)
    if errors or delivered != relayed:
        print(f"FAILED: {errors} sessions failed, record count mismatch: {delivered != relayed}")
        return 1
    return 0


def run_rounds(
    repetitions: int,
    messages: int,
    measure: Callable[[int, int], Round],
    direct_port: int,
    relay_port: int,
    relay_pid: int,
) -> list[tuple[str, Round, float | None]]:
    """Run direct and relayed rounds alternately; return (path, round, CPU s/msg)."""
    rounds: list[tuple[str, Round, float | None]] = []
    for _ in range(repetitions):
        for path, port in (("direct", direct_port), ("relay", relay_port)):
            before = cpu_seconds(relay_pid)
            result = measure(port, messages)
            after = cpu_seconds(relay_pid)
            cpu = None
            if path == "relay" and before is not None and after is not None and result.messages:
                cpu = (after - before) / result.messages
            rounds.append((path, result, cpu))
    return rounds


if __name__ == "__main__":
    sys.exit(main())
