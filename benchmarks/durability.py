"""Durability benchmark: SIGKILL the relay while thousands of messages go through it.

PRODUCT.md invariant 7 at scale: nothing acknowledged is lost. The in-suite
test (tests/integration/test_durability.py) sends a few dozen messages; this
script sends thousands:

- a scripted upstream (this process, a thread per connection) accepts every
  envelope and, while it is "failing", answers 451 4.3.0 to the final dot,
  so that under the requeue policy every 250 a client gets comes from the
  spool. It records a message as delivered only when it answers 250 to it;
- the relay, ``python -m smtpwarden run``, with a requeue route to that
  upstream, is SIGKILLed at random points (``random.Random(--seed)``) while
  --clients threads send numbered messages, and restarted on the same port,
  for --rounds rounds or until --messages were attempted, whichever comes
  first, and for at most --time-limit seconds of sending;
- then the upstream recovers, one last relay starts on the same spool, and
  the script waits (at most --drain-timeout seconds) until every message a
  client saw acknowledged ("250 ... queued as") has been delivered.

    python benchmarks/durability.py [--messages 3000] [--rounds 10] [--clients 8]
                                    [--seed 7] [--time-limit 300] [--drain-timeout 300]

It prints what was attempted, acknowledged, delivered, lost (acknowledged,
never delivered: must be 0) and duplicated (delivered more than once: allowed,
delivery after a kill is at least once), and exits 1 if anything was lost.
Only the standard library, smtpwarden and PyYAML are needed; it imports
nothing from tests/. The spool lives in a temporary folder under --dir (by
default the system's); a SIGKILL does not test a power cut, so tmpfs is fine.
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import random
import re
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import IO, cast

import yaml

from smtpwarden.spool.files import Layout

HOST = "127.0.0.1"
# Far beyond any line either side sends; past it the peer is not speaking SMTP.
MAX_LINE_BYTES = 65536
# A relay recovering a spool of thousands of entries must still start in it.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# A client or upstream read that takes longer means a stuck peer; a killed
# relay resets its connections at once. Our choice, well past RETRY_BUDGET_S.
SOCKET_TIMEOUT_S = 30.0
# Replays of a refused message before it is spooled: short, so that the
# client's 250 comes from the spool quickly. Our choice.
RETRY_BUDGET_S = 5.0
# Once the round's message count is reached, the kill waits up to this long
# more, so that it lands at a random step of every session, not at a MAIL.
KILL_JITTER_S = 0.25
# Messages on one client connection before QUIT and a new one, so that kills
# also find connections being opened. Our choice.
MESSAGES_PER_SESSION = 20
POLL_S = 0.05  # how often the drain looks at what was delivered
RSS_SAMPLE_S = 0.5  # how often a relay's peak RSS is read from /proc
STDERR_TAIL_LINES = 40  # the relay's last lines, shown if it fails to start

_READY = re.compile(r"listener (\S+) on (\S+):(\d+) relays to ")
_RESUMED = re.compile(r": (\d+) to resume, (\d+) held, (\d+) dead, (\d+) quarantined")
_SUBJECT = re.compile(rb"Subject: durability (\d+)\r\n")
_REPLIES = {
    b"EHLO": b"250-upstream.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n",
    b"HELO": b"250 upstream.bench\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
}


# -- the scripted upstream -----------------------------------------------------


class Upstream(socketserver.ThreadingTCPServer):
    """Refuses every message with 451 while ``failing`` is set, then accepts them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _UpstreamHandler)
        self.port: int = self.server_address[1]
        self.failing = threading.Event()
        self.failing.set()
        self.delivered: Counter[int] = Counter()  # message number -> times answered 250
        self.refused = 0  # final dots answered 451
        self.unnumbered = 0  # messages accepted without a "durability N" subject
        self.open = 0  # connections being served
        self.changed = threading.Condition()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.1,), daemon=True)
        self._thread.start()

    def end_of_data(self, number: int | None) -> bytes:
        """The reply to a final dot; a 250 is recorded before it is sent."""
        with self.changed:
            if self.failing.is_set():
                self.refused += 1
                return b"451 4.3.0 Not now, try again later\r\n"
            if number is None:
                self.unnumbered += 1
            else:
                self.delivered[number] += 1
            return b"250 2.0.0 Ok: delivered\r\n"

    def recover(self, timeout_s: float) -> None:
        """Stop failing once no connection of a killed relay is left.

        A connection whose relay was just killed may have read a whole
        message: answering it 250 would count a delivery nobody saw.
        """
        with self.changed:
            self.changed.wait_for(lambda: self.open == 0, timeout_s)
            self.failing.clear()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _UpstreamHandler(socketserver.StreamRequestHandler):
    timeout = SOCKET_TIMEOUT_S

    def handle(self) -> None:
        upstream = cast(Upstream, self.server)
        with upstream.changed:
            upstream.open += 1
        try:
            self._serve(upstream)
        except OSError:
            pass  # the relay was killed, or went silent
        finally:
            with upstream.changed:
                upstream.open -= 1
                upstream.changed.notify_all()

    def _serve(self, upstream: Upstream) -> None:
        self.wfile.write(b"220 upstream.bench ESMTP durability upstream\r\n")
        while line := self.rfile.readline(MAX_LINE_BYTES):
            verb = line[:4].upper()
            if verb == b"DATA":
                self.wfile.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.wfile.write(upstream.end_of_data(self._read_data()))
            elif verb == b"QUIT":
                self.wfile.write(b"221 2.0.0 Bye\r\n")
                return
            else:
                self.wfile.write(_REPLIES.get(verb, b"502 5.5.1 Not implemented\r\n"))

    def _read_data(self) -> int | None:
        """Read to <CRLF>.<CRLF>; return the message's number if it has one.

        Raises ConnectionError if the connection ends first.
        """
        number: int | None = None
        after_crlf = True  # the DATA line ended with CRLF
        in_header = True
        while line := self.rfile.readline(MAX_LINE_BYTES):
            if after_crlf and line == b".\r\n":
                return number
            if in_header and after_crlf:
                found = _SUBJECT.fullmatch(line)
                if found and number is None:
                    number = int(found.group(1))
                in_header = line != b"\r\n"
            after_crlf = line.endswith(b"\r\n")
        raise ConnectionError("the relay left in the middle of a message")


# -- the relay -----------------------------------------------------------------


class RelayFailed(Exception):
    """The relay did not start; the message holds its last lines of output."""


def peak_rss_kib(pid: int) -> int | None:
    """The process's peak resident set (VmHWM, proc(5)) in KiB, or None without /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else None


class Relay:
    """``python -m smtpwarden run`` as a process, ready once it logs its listener."""

    def __init__(self, config: Path, port: int) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smtpwarden", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.resumed = 0  # spool entries the relay found on start
        self.quarantined = 0
        self.peak_kib: int | None = None
        # The listener's address once it is logged; None if the output ends first.
        self._listening: queue.Queue[tuple[str, int] | None] = queue.Queue()
        assert self.process.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stderr,))
        self._reader.daemon = True
        self._reader.start()
        try:
            address = self._listening.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            address = None
        if address != (HOST, port):
            self.stop(signal.SIGKILL)
            raise RelayFailed("".join(self.tail) or "no output")
        self.ready_after: float = time.monotonic() - self.started
        threading.Thread(target=self._sample, daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        listening = False
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.tail.append(line)
            if listening:
                continue
            if found := _RESUMED.search(line):
                self.resumed = int(found.group(1))
                self.quarantined = int(found.group(4))
            if found := _READY.search(line):
                listening = True
                self._listening.put((found.group(2), int(found.group(3))))
        self._listening.put(None)

    def _sample(self) -> None:
        while self.process.poll() is None:
            self.sample_rss()
            time.sleep(RSS_SAMPLE_S)

    def sample_rss(self) -> None:
        kib = peak_rss_kib(self.process.pid)
        if kib is not None:
            self.peak_kib = max(kib, self.peak_kib or 0)

    def stop(self, sig: int) -> int | None:
        """Send ``sig`` unless the relay already exited; return its exit code if it had."""
        exited = self.process.poll()
        if exited is None:
            self.sample_rss()
            self.process.send_signal(sig)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(STOP_TIMEOUT_S)
        return exited


def write_config(folder: Path, port: int, upstream_port: int, event_loop: str) -> Path:
    config = folder / "relay.yaml"
    settings = {
        "event_loop": event_loop,
        "hostname": "relay.bench",
        "listeners": [{"name": "main", "host": HOST, "port": port, "upstream": "up"}],
        "upstreams": [{"name": "up", "kind": "smtp", "host": HOST, "port": upstream_port}],
        "routes": [{"name": "main", "policy": "requeue", "upstreams": ["up"]}],
        "retry": {"attempts": 1, "budget": RETRY_BUDGET_S},
        "spool": {"path": str(folder / "spool"), "backoff": {"initial": 0.2, "maximum": 1.0}},
        "log": {"transactions": "-", "sessions": False, "level": "info"},
        "shutdown": {"grace": 5},
    }
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return config


def free_port() -> int:
    """A port that was free a moment ago: the relay restarts on it after each kill."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


# -- the clients ---------------------------------------------------------------


class Ledger:
    """Numbers handed out, numbers acknowledged, and the bounds on sending."""

    def __init__(self, limit: int, deadline: float) -> None:
        self.limit = limit
        self.deadline = deadline
        self.attempted = 0
        self.acknowledged: set[int] = set()
        # Client-side events: the reply at each end of data, each connection cut.
        self.replies: Counter[str] = Counter()
        self.clients = 0  # client threads still sending this round
        self.changed = threading.Condition()

    def closed(self) -> bool:
        return self.attempted >= self.limit or time.monotonic() >= self.deadline

    def take(self) -> int | None:
        """The next message number, or None once --messages or --time-limit is reached."""
        with self.changed:
            if self.closed():
                return None
            self.attempted += 1
            self.changed.notify_all()
            return self.attempted

    def note(self, outcome: str, number: int | None = None) -> None:
        with self.changed:
            self.replies[outcome] += 1
            if number is not None:
                self.acknowledged.add(number)

    def client_done(self) -> None:
        with self.changed:
            self.clients -= 1
            self.changed.notify_all()


class UnexpectedReply(Exception):
    pass


class Wire:
    """One client connection, in lockstep: a command, then its reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT_S)
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def reply(self) -> tuple[int, bytes]:
        """One whole reply, multi-line or not: its code and its bytes."""
        raw = b""
        while True:
            line = self.reader.readline(MAX_LINE_BYTES)
            if not line:
                raise ConnectionError("the relay closed the connection")
            raw += line
            if not line[:3].isdigit():
                raise UnexpectedReply(raw)
            if line[3:4] != b"-":
                return int(line[:3]), raw

    def expect(self, code: int) -> None:
        got, raw = self.reply()
        if got != code:
            raise UnexpectedReply(raw)

    def command(self, data: bytes, code: int) -> None:
        self.sock.sendall(data)
        self.expect(code)


def message(number: int, size: int) -> bytes:
    """Message ``number`` of about ``size`` octets, ending in ".<CRLF>"."""
    head = (
        b"From: <client@client.bench>\r\nTo: <rcpt@upstream.bench>\r\n"
        b"Subject: durability %d\r\nMessage-ID: <%d.durability@client.bench>\r\n\r\n"
        % (number, number)
    )
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n"
    return head + line * max(1, (size - len(head)) // len(line)) + b".\r\n"


def send_session(wire: Wire, ledger: Ledger, size: int) -> bool:
    """Send messages on one connection; return False once there is nothing left to send."""
    wire.expect(220)
    wire.command(b"EHLO client.bench\r\n", 250)
    for _ in range(MESSAGES_PER_SESSION):
        number = ledger.take()
        if number is None:
            wire.command(b"QUIT\r\n", 221)
            return False
        wire.command(b"MAIL FROM:<client@client.bench>\r\n", 250)
        wire.command(b"RCPT TO:<rcpt@upstream.bench>\r\n", 250)
        wire.command(b"DATA\r\n", 354)
        wire.sock.sendall(message(number, size))
        code, raw = wire.reply()
        if code == 250 and b"queued as" in raw:
            ledger.note("end of data: 250 queued as", number)
        else:
            ledger.note(f"end of data: {code}")
    wire.command(b"QUIT\r\n", 221)
    return True


def connect(port: int) -> Wire | None:
    """A new connection to the relay, or None if it refuses: it was killed."""
    try:
        return Wire(port)
    except OSError:
        return None


def run_client(port: int, ledger: Ledger, size: int) -> None:
    """Send until nothing is left, or until the relay is gone (a refused connect)."""
    try:
        while (wire := connect(port)) is not None:
            try:
                if not send_session(wire, ledger, size):
                    return
            except (OSError, UnexpectedReply) as error:
                ledger.note(f"connection ended: {type(error).__name__}")
            finally:
                wire.close()
    finally:
        ledger.client_done()


# -- the rounds ----------------------------------------------------------------


def kill_round(relay: Relay, ledger: Ledger, target: int, rng: random.Random) -> float:
    """SIGKILL ``relay`` once ``target`` messages were attempted (or sending ended)."""
    with ledger.changed:
        ledger.changed.wait_for(
            lambda: ledger.attempted >= target or ledger.clients == 0 or ledger.closed(),
            max(0.0, ledger.deadline - time.monotonic()),
        )
    time.sleep(rng.uniform(0, KILL_JITTER_S))
    killed_after = time.monotonic() - relay.started
    exited = relay.stop(signal.SIGKILL)
    if exited is not None:
        print(f"  the relay had exited by itself with status {exited}:\n{''.join(relay.tail)}")
    return killed_after


def run_rounds(args: argparse.Namespace, config: Path, port: int, relays: list[Relay]) -> Ledger:
    """Send, kill and restart; return what was attempted and acknowledged."""
    rng = random.Random(args.seed)
    ledger = Ledger(args.messages, time.monotonic() + args.time_limit)
    print(f"{'round':>5}  {'resumed':>7}  {'attempted':>9}  {'acknowledged':>12}  killed after")
    for index in range(args.rounds):
        if ledger.closed():
            break
        # Each round's share of what is left, give or take half; the last
        # round sends the rest, so that all --messages are attempted.
        left = args.rounds - index
        mean = max(1, (args.messages - ledger.attempted) // left)
        target = ledger.attempted + rng.randint(max(1, mean // 2), max(1, mean * 3 // 2))
        if left == 1:
            target = args.messages
        before = (ledger.attempted, len(ledger.acknowledged))
        relay = Relay(config, port)
        relays.append(relay)
        ledger.clients = args.clients
        clients = [
            threading.Thread(target=run_client, args=(port, ledger, args.size), daemon=True)
            for _ in range(args.clients)
        ]
        for client in clients:
            client.start()
        killed_after = kill_round(relay, ledger, min(target, args.messages), rng)
        for client in clients:
            client.join()
        print(
            f"{index + 1:>5}  {relay.resumed:>7}  {ledger.attempted - before[0]:>9}"
            f"  {len(ledger.acknowledged) - before[1]:>12}  {killed_after:.2f} s"
        )
    return ledger


def drain(
    args: argparse.Namespace, config: Path, port: int, upstream: Upstream, ledger: Ledger
) -> tuple[Relay, float | None, float | None, int]:
    """Recover the upstream, start one last relay, wait for the spool to empty.

    Returns the relay, the seconds until every acknowledged message was
    delivered and until the spool's queue was empty (None if not within
    --drain-timeout), and the entries left in it.
    """
    upstream.recover(STOP_TIMEOUT_S)
    began = time.monotonic()
    deadline = began + args.drain_timeout
    relay = Relay(config, port)
    queued = Layout(config.parent / "spool").queue
    delivered_after: float | None = None
    empty_after: float | None = None
    left = -1
    try:
        while time.monotonic() < deadline:
            if delivered_after is None:
                with upstream.changed:
                    missing = any(n not in upstream.delivered for n in ledger.acknowledged)
                if not missing:
                    delivered_after = time.monotonic() - began
            left = sum(1 for name in os.listdir(queued) if name.endswith(".env"))
            if left == 0 and empty_after is None:
                empty_after = time.monotonic() - began
            if delivered_after is not None and empty_after is not None:
                break
            time.sleep(POLL_S)
    finally:
        relay.stop(signal.SIGTERM)
    return relay, delivered_after, empty_after, left


# -- the report ----------------------------------------------------------------


def seconds(value: float | None, timeout: float) -> str:
    return f"{value:.2f} s" if value is not None else f"not within {timeout:g} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--messages", type=int, default=3000, help="messages to attempt at most (default 3000)"
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="relay runs, each ended by a SIGKILL (default 10)"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the kills' random points (default 7)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=300.0,
        help="seconds of sending at most; then the last round ends (default 300)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for delivery once the upstream recovers (default 300)",
    )
    parser.add_argument(
        "--size", type=int, default=1024, help="octets per message, about (default 1024)"
    )
    parser.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the relay's event loop (default auto)",
    )
    parser.add_argument(
        "--dir",
        default=None,
        help="where to make the temporary spool folder (default: the system's temporary folder)",
    )
    args = parser.parse_args(argv)

    print(
        f"smtpwarden durability benchmark: up to {args.messages} messages in up to"
        f" {args.rounds} rounds, {args.clients} clients, seed {args.seed}"
    )
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs\n")
    upstream = Upstream()
    relays: list[Relay] = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="durability-", dir=args.dir) as folder:
            port = free_port()
            config = write_config(Path(folder), port, upstream.port, args.event_loop)
            ledger = run_rounds(args, config, port, relays)
            sending = time.monotonic() - started
            kills = len(relays)
            last, delivered_after, empty_after, left = drain(args, config, port, upstream, ledger)
            relays.append(last)
    except RelayFailed as error:
        print(f"FAILED: the relay did not start:\n{error}")
        return 2
    finally:
        for relay in relays:
            if relay.process.poll() is None:
                relay.stop(signal.SIGKILL)
        upstream.close()

    got = upstream.delivered
    lost = sorted(ledger.acknowledged - got.keys())
    duplicates = sum(count - 1 for count in got.values())
    peaks = [relay.peak_kib for relay in relays if relay.peak_kib is not None]
    print()
    print(f"messages attempted:        {ledger.attempted} in {sending:.1f} s")
    print(f"acknowledged (250 queued): {len(ledger.acknowledged)}")
    print(f"delivered (distinct):      {len(got)}")
    print(f"lost:                      {len(lost)}")
    print(f"duplicates:                {duplicates}")
    print(f"delivered, never acked:    {len(got.keys() - ledger.acknowledged)}")
    print(f"kills:                     {kills}")
    print(f"refused by the upstream:   {upstream.refused} final dots answered 451")
    print("seen by the clients:")
    for outcome, count in sorted(ledger.replies.items()):
        print(f"  {outcome}: {count}")
    print(f"spool at the last start:   {last.resumed} to resume, ready in {last.ready_after:.2f} s")
    print(f"quarantined on recovery:   {sum(relay.quarantined for relay in relays)}")
    print(f"drain, acknowledged:       {seconds(delivered_after, args.drain_timeout)}")
    still = "" if empty_after is not None else f" ({left} entries left)"
    print(f"drain, spool empty:        {seconds(empty_after, args.drain_timeout)}{still}")
    if peaks:
        print(f"peak relay RSS:            {max(peaks) / 1024:.1f} MiB")
    if upstream.unnumbered:
        print(f"delivered without a number: {upstream.unnumbered}")
    if lost:
        shown = ", ".join(map(str, lost[:20])) + (" ..." if len(lost) > 20 else "")
        print(f"FAILED: {len(lost)} acknowledged messages never delivered: {shown}")
        return 1
    if not ledger.acknowledged:
        print("FAILED: no message was acknowledged, so nothing was tested")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
