"""Instructions per relayed message, counted by valgrind's callgrind.

Wall-clock and CPU-time figures move with whatever else the machine does;
an instruction count does not. This runs the relay under
``valgrind --tool=callgrind`` twice, with the same warm-up and then
``--messages`` more messages the second time (Postfix's smtp-source, 10
sessions over reused connections, to Postfix's smtp-sink), and prints the
difference per message: the relay's own user-space instructions for one
message, without start-up and shutdown. System calls run in the kernel and
are not counted.

``--bare`` measures a minimal uvloop byte relay (in this file) the same
way: the floor that any Python relay on uvloop pays for the same traffic.

    python benchmarks/instructions.py [--messages 2000] [--policy passthrough] [--size 1024]
    python benchmarks/instructions.py --bare

Slow (valgrind runs the relay about 50 times slower): about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from peers import HOST, SMTP_SOURCE, accepts, free_port, smtpwarden_env, start_sink
from sysinfo import find_tool

WARMUP_MESSAGES = 200
SESSIONS = 10
VALGRIND_START_S = 120.0
_TOTAL = re.compile(r"^(?:summary|totals): (\d+)", re.M)


def _bare(port: int, upstream: int) -> None:
    """A byte relay: one upstream connection per client connection, nothing else."""
    import uvloop

    class Up(asyncio.Protocol):
        def __init__(self, down: Down) -> None:
            self.down = down

        def data_received(self, data: bytes) -> None:
            self.down.transport.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.down.transport.close()

    class Down(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.up: asyncio.Transport | None = None
            transport.pause_reading()  # type: ignore[attr-defined]
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            self.up, _ = await loop.create_connection(lambda: Up(self), HOST, upstream)
            self.transport.resume_reading()

        def data_received(self, data: bytes) -> None:
            if self.up is not None:
                self.up.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.up is not None:
                self.up.close()

    async def serve() -> None:
        await asyncio.get_running_loop().create_server(Down, HOST, port)
        await asyncio.Event().wait()

    uvloop.run(serve())


def _count(
    messages: int, sink_port: int, folder: Path, args: argparse.Namespace, valgrind: str
) -> int:
    """Instructions of one relay run that carried ``messages`` messages."""
    port = free_port()
    out = folder / f"callgrind-{messages}.out"
    if args.bare:
        target = [sys.executable, __file__, "--serve-bare", str(port), str(sink_port)]
    else:
        config = {
            "event_loop": "uvloop",
            "hostname": "relay.bench.example",
            "listeners": [{"name": "bench", "host": HOST, "port": port, "upstream": "sink"}],
            "upstreams": [{"name": "sink", "host": HOST, "port": sink_port}],
            "routes": [{"name": "bench", "policy": args.policy, "upstreams": ["sink"]}],
            "spool": {"path": str(folder / "spool")},
            "log": {"transactions": str(folder / f"transactions-{messages}.jsonl")},
            "health": {"check_interval": 0},
        }
        path = folder / f"smtpwarden-{messages}.yaml"
        path.write_text(json.dumps(config) + "\n", encoding="utf-8")  # JSON is YAML
        target = [sys.executable, "-m", "smtpwarden", "run", "--config", str(path)]
    command = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", *target]
    relay = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=smtpwarden_env())
    try:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(_wait_accepting(port, relay))
        finally:
            loop.close()
        source = find_tool("smtp-source", SMTP_SOURCE) or SMTP_SOURCE
        load = ["-s", str(SESSIONS), "-m", str(messages), "-l", str(args.size), "-d"]
        subprocess.run([source, *load, f"{HOST}:{port}"], check=True, timeout=600)
    finally:
        relay.send_signal(signal.SIGINT if args.bare else signal.SIGTERM)
        relay.wait(VALGRIND_START_S)
    found = _TOTAL.search(out.read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(found[1])


async def _wait_accepting(port: int, relay: subprocess.Popen[bytes]) -> None:
    async with asyncio.timeout(VALGRIND_START_S):
        while not accepts(port):
            if relay.poll() is not None:
                raise RuntimeError(f"the relay exited with {relay.returncode}")
            await asyncio.sleep(0.1)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-bare":
        _bare(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--policy", default="passthrough", choices=["passthrough", "retry"])
    parser.add_argument("--size", type=int, default=1024, help="message octets")
    parser.add_argument("--bare", action="store_true", help="a minimal uvloop byte relay")
    args = parser.parse_args()
    valgrind = find_tool("valgrind", "/usr/bin/valgrind")
    if valgrind is None:
        print("valgrind not found (Debian package valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="smtpwarden-instructions-") as scratch:
        folder = Path(scratch)
        sink = start_sink("sink", folder, None)
        try:
            warm = _count(WARMUP_MESSAGES, sink.port, folder, args, valgrind)
            full = _count(WARMUP_MESSAGES + args.messages, sink.port, folder, args, valgrind)
        finally:
            sink.stop()
    what = "bare uvloop byte relay" if args.bare else f"smtpwarden {args.policy}"
    per = (full - warm) / args.messages
    print(
        f"{what}, {args.size} octets, {SESSIONS} sessions reused: {per:,.0f} instructions/message"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
