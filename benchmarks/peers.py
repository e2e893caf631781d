"""The processes of the performance matrix: sinks and relays, and where they run.

Used by matrix.py. Every process is started with its standard output and
error in a file of the run's folder, waited for until it is ready (a log
line, a port that accepts connections), never for a fixed time, and stopped
with SIGTERM, then SIGKILL, together with any children it left behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import smtpwarden
from sysinfo import HAPROXY, find_tool, stat_fields, tree

HOST = "127.0.0.1"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.02
# Connections a sink or haproxy accepts at once during the throughput cells:
# well above the largest concurrency (100), for both legs.
THROUGHPUT_MAXCONN = 4000
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
TAIL_CHARS = 2000
FIXED_PORTS_FROM = 10000  # listening ports are picked from here to the ephemeral range
BENCHMARKS = Path(__file__).resolve().parent


# -- limits, CPUs and ports ------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (children inherit it); return both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1048576
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass(frozen=True, slots=True)
class Pinning:
    """CPUs for the relays (one core) and for the load: smtp-source, smtp-sink, this script."""

    relay: frozenset[int]
    load: frozenset[int]

    def describe(self) -> str:
        return f"relays on CPU {_cpus(self.relay)}; smtp-source, smtp-sink and harness on CPU " + (
            _cpus(self.load)
        )


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def plan_pinning() -> Pinning | None:
    """Two cores or more: the first for relays, the second for the load; else None."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return Pinning(relay=frozenset(cpus[:1]), load=frozenset(cpus[1:2]))


@contextmanager
def on_cpus(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the block (and what it starts: children inherit it) on ``cpus``; None: unchanged."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def free_port() -> int:
    """A TCP port free now, below the ephemeral range when there is room there.

    The port is bound by a process started later; a port of the ephemeral
    range may meanwhile become the local end of one of the thousands of
    connections the matrix opens per second, and the bind then fails.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(FIXED_PORTS_FROM, low) if low > FIXED_PORTS_FROM + 1000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise RuntimeError("no free TCP port found")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


# -- processes -------------------------------------------------------------------


@dataclass(slots=True)
class Peer:
    """One started process: a sink or a path's relay."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    folder: Path | None = None  # the relay's own files (configuration, log, spool)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return text[-TAIL_CHARS:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; children left behind are killed too."""
        members = [(pid, _start_time(pid)) for pid in tree(self.pid)[1:]]
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid, started in members:
            if started is not None and _start_time(pid) == started:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _start_time(pid: int) -> str | None:
    fields = stat_fields(pid)
    return None if fields is None else fields[19]  # starttime, field 22 of proc(5)


def launch(
    name: str,
    command: Sequence[str],
    folder: Path,
    port: int,
    cpus: frozenset[int] | None,
    *,
    ready: re.Pattern[str] | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Peer:
    """Start ``command`` on ``cpus`` and wait (bounded) until it is ready.

    Ready: the pattern appeared in its output, if one is given, and then
    ``port`` accepts connections. A process that exits first, or is not
    ready in START_TIMEOUT_S, is stopped and RuntimeError names it with the
    end of its output.
    """
    log = folder / f"{name}.log"
    with open(log, "wb") as output, on_cpus(cpus):
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )
    peer = Peer(name=name, process=process, port=port, log=log, folder=cwd)
    try:
        _wait_ready(peer, ready)
    except BaseException:
        peer.stop()
        raise
    return peer


def _wait_ready(peer: Peer, ready: re.Pattern[str] | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    seen = ready is None
    while time.monotonic() < deadline:
        if peer.process.poll() is not None:
            raise RuntimeError(
                f"{peer.name} exited with {peer.process.returncode}:\n{peer.log_tail()}"
            )
        if not seen and ready is not None:
            with suppress(OSError):
                found = ready.search(peer.log.read_text(errors="replace"))
                if found:
                    seen = True
                    peer.extra.update(found.groupdict())
        if seen and accepts(peer.port):
            return
        time.sleep(POLL_S)
    raise RuntimeError(f"{peer.name} not ready in {START_TIMEOUT_S:g} s:\n{peer.log_tail()}")


def start_sink(
    name: str,
    folder: Path,
    cpus: frozenset[int] | None,
    *,
    reject_dot: bool = False,
    max_connections: int = THROUGHPUT_MAXCONN,
) -> Peer:
    """Postfix's smtp-sink; ``reject_dot``: the final dot is answered 4xx (450)."""
    sink = find_tool("smtp-sink", SMTP_SINK)
    if sink is None:
        raise RuntimeError("smtp-sink not found (Debian package postfix)")
    port = free_port()
    command = [sink]
    if os.geteuid() == 0:
        command += ["-u", "postfix"]
    # -t: idle sessions of the memory measurement stay open well past 100 s.
    command += ["-m", str(max_connections), "-t", "600"]
    if reject_dot:
        command += ["-r", "."]
    command += [f"{HOST}:{port}", str(LISTEN_BACKLOG)]
    return launch(name, command, folder, port, cpus)


def start_haproxy(
    folder: Path, upstream: int, cpus: frozenset[int] | None, maxconn: int = THROUGHPUT_MAXCONN
) -> Peer:
    """HAProxy in TCP mode on one thread: the native byte-relay floor."""
    haproxy = find_tool("haproxy", HAPROXY)
    if haproxy is None:
        raise RuntimeError("haproxy not found (Debian package haproxy)")
    port = free_port()
    config = folder / "haproxy.cfg"
    config.write_text(
        "global\n"
        "    nbthread 1\n"
        f"    maxconn {maxconn}\n"
        "defaults\n"
        "    mode tcp\n"
        f"    maxconn {maxconn}\n"
        "    timeout connect 10s\n"
        "    timeout client 600s\n"
        "    timeout server 600s\n"
        "frontend bench\n"
        f"    bind {HOST}:{port}\n"
        f"    backlog {LISTEN_BACKLOG}\n"
        "    default_backend sink\n"
        "backend sink\n"
        f"    server sink {HOST}:{upstream}\n",
        encoding="utf-8",
    )
    return launch("haproxy", [haproxy, "-db", "-f", str(config)], folder, port, cpus)


def smtpwarden_env() -> dict[str, str]:
    """The environment for relays: they import the smtpwarden this script imported."""
    source = str(Path(smtpwarden.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    return env


_RUNNING = re.compile(r"smtpwarden running on (?P<loop>\S+)")
_METRICS = re.compile(r"metrics on http://[^:/\s]+:(\d+)/metrics")


def start_smtpwarden(
    name: str,
    folder: Path,
    upstream: int,
    cpus: frozenset[int] | None,
    *,
    policy: str,
    event_loop: str,
    spool: Path | None = None,
    workers: int | None = None,
    max_connections: int = 20000,
) -> Peer:
    """``python -m smtpwarden run`` with one listener, one upstream and one route."""
    home = folder / name
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, object] = {
        "event_loop": event_loop,
        "hostname": "relay.bench.example",
        "listeners": [{"name": "bench", "host": HOST, "port": port, "upstream": "sink"}],
        "upstreams": [{"name": "sink", "host": HOST, "port": upstream}],
        "routes": [{"name": "bench", "policy": policy, "upstreams": ["sink"]}],
        "spool": {"path": str(spool if spool is not None else home / "spool")},
        "log": {"transactions": str(home / "transactions.jsonl")},
        "http": {"enabled": True, "host": HOST, "port": 0},
        "limits": {"max_connections": max_connections, "max_connections_per_client": 0},
        "shutdown": {"grace": 1, "fast": 1},
        "transcripts": {"path": str(home / "transcripts")},
    }
    if policy == "requeue":
        # Every message is refused by its sink: spool it at once, no replays.
        config["retry"] = {"attempts": 0}
        # And keep the spool's deliveries (to the same refusing sink) out of
        # the run: the first waits the first backoff, here a day.
        config["spool"] = {**config["spool"], "backoff": {"initial": 86400, "maximum": 86400}}
    if workers is not None:
        config["workers"] = workers
    path = home / "smtpwarden.yaml"
    # JSON is YAML: no YAML writer needed.
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "smtpwarden", "run", "--config", str(path)]
    peer = launch(name, command, home, port, cpus, ready=_RUNNING, env=smtpwarden_env(), cwd=home)
    metrics = _METRICS.search(peer.log.read_text(errors="replace"))
    if metrics:
        peer.extra["metrics"] = metrics.group(1)
    return peer


def upstream_down(peer: Peer) -> bool | None:
    """Whether the relay's circuit breaker holds its upstream down now, or None if unknown.

    Asked of /readyz, which answers 503 "... marked down" when every upstream
    is (the matrix relays have one), rather than of /metrics, whose scrape
    also scans the spool.
    """
    port = peer.extra.get("metrics")
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2.0) as reply:
            reply.read()
            return False
    except urllib.error.HTTPError as error:
        return b"marked down" in error.read() if error.code == 503 else None
    except (OSError, ValueError):
        return None


def start_aiosmtpd(folder: Path, upstream: int, cpus: frozenset[int] | None) -> Peer:
    """aiosmtpd's command line with its Proxy handler (aiosmtpd_proxy.py gives it from_cli)."""
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCHMARKS), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "aiosmtpd",
        "-n",
        "-l",
        f"{HOST}:{port}",
        "-c",
        "aiosmtpd_proxy.CliProxy",
        HOST,
        str(upstream),
    ]
    return launch("aiosmtpd", command, folder, port, cpus, env=env)
