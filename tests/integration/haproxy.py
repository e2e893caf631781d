"""HAProxy in TCP mode in front of one relay or several, sending the PROXY header.

``HAProxy`` writes its own configuration into a folder (``defaults`` with
``mode tcp`` and timeouts, one frontend on a free loopback port, one backend
with a server per relay, each with ``send-proxy`` or ``send-proxy-v2``) and
runs ``haproxy -db -f FILE`` in the foreground. HAProxy cannot report an
ephemeral port, so a port is found by binding port 0 and closing it, and
another is tried if HAProxy exits at once (another program took it).

Several servers are balanced (``balance``: roundrobin by default); a
connection whose server refuses it is tried again on another one (``option
redispatch 1``). ``check`` (a ``HealthCheck``) turns HAProxy's health checks
on, so that a dead relay is taken out of the rotation and put back once it
answers again. HAProxy sends its PROXY header on a check too (version 2: a
LOCAL header; version 1: a ``PROXY TCP4`` line with the check connection's
own addresses) as long as the check goes to the server's own address and
port: a listener that takes PROXY headers needs no ``check-send-proxy``.
Two kinds of check work with the relay (tried with PROXY version 2):

- ``smtp`` (``option smtpchk``): the 220 banner, ``HELO``, a 2xx, ``QUIT``,
  after the PROXY header; the relay records a session ending in ``quit``
  from HAProxy's own address. It proves the relay answers, upstream included.
- a plain TCP connect: HAProxy connects, writes the header and resets the
  connection. The relay often sees the reset before it can read the peer's
  address; under uvloop it then logs a warning about an untrusted PROXY
  connection and records a ``proxy_untrusted`` session with an empty
  address, once per check.

The server states are read from HAProxy's stats socket (an abstract unix
socket, so that no path length or port is at stake): ``server_states`` and
``wait_server``.

Readiness is the relay's 220 banner read through the frontend on a real
connection, tried until a deadline. HAProxy's connection log (``option
tcplog`` to stderr) is kept in the folder for a look after a failure.
Stopping terminates it, and kills it past a deadline.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import cast

from integration.external_tools import require_tool, wait_for_banner
from integration.relay_harness import POLL_S, free_port

HOST = "127.0.0.1"
SEND_PROXY = ("send-proxy", "send-proxy-v2")
BALANCE = ("roundrobin", "leastconn")
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
START_ATTEMPTS = 3  # a fresh port each time, in case another program took the last one
STATS_TIMEOUT_S = 2.0
STATE_TIMEOUT_S = 10.0
SUN_PATH_BYTES = 108  # sizeof(sockaddr_un.sun_path) on Linux

Address = tuple[str, int]
_names = itertools.count()


@dataclass(frozen=True)
class HealthCheck:
    """HAProxy's checks of every server: how often, and how many mark it down or up.

    A check runs every ``interval_ms``; ``fall`` failures in a row mark the
    server down, ``rise`` passes in a row up again. A refused connection
    fails at once; a check that connected fails after ``timeout_ms``
    without its answer (a relay that hangs). ``smtp`` chooses ``option
    smtpchk`` over a plain TCP connect (see the module's docstring).
    """

    interval_ms: int = 200
    fall: int = 2
    rise: int = 2
    timeout_ms: int = 2000
    smtp: bool = True

    def backend_lines(self) -> list[str]:
        lines = ["    option smtpchk"] if self.smtp else []
        return [*lines, f"    timeout check {self.timeout_ms}ms"]

    def server_options(self) -> str:
        return f" check inter {self.interval_ms}ms fall {self.fall} rise {self.rise}"


def abstract_address(name: str) -> bytes:
    """The address of HAProxy's ``abns@NAME`` socket.

    HAProxy binds abstract unix sockets with the name padded by zero octets
    to the whole of ``sun_path`` (108 octets), and the kernel compares every
    octet of the address given: the padding belongs to the name.
    """
    raw = b"\0" + name.encode("ascii")
    return raw + b"\0" * (SUN_PATH_BYTES - len(raw))


def server_name(index: int) -> str:
    """The name of the ``index``-th server (from 0), as in ``server_states``."""
    return f"s{index + 1}"


def haproxy_config(
    port: int,
    backends: Address | Sequence[Address],
    send_proxy: str,
    *,
    balance: str = "roundrobin",
    check: HealthCheck | None = None,
    stats: str | None = None,
) -> str:
    """The configuration: a TCP frontend on ``port`` passing to ``backends``.

    ``backends`` is one address or a list of them; ``stats`` the name of an
    abstract unix socket for HAProxy's runtime API, if any.
    """
    if send_proxy not in SEND_PROXY:
        raise ValueError(f"send_proxy must be one of {SEND_PROXY}, not {send_proxy!r}")
    if balance not in BALANCE:
        raise ValueError(f"balance must be one of {BALANCE}, not {balance!r}")
    servers = _addresses(backends)
    checks = check.server_options() if check is not None else ""
    lines = [
        "global",
        "    maxconn 256",
        "    log stderr format raw local0",
        *([f"    stats socket abns@{stats} level operator"] if stats is not None else []),
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        "    timeout connect 5s",
        "    timeout client 30s",
        "    timeout server 30s",
        "",
        "frontend smtp_in",
        f"    bind {HOST}:{port}",
        "    default_backend relay",
        "",
        "backend relay",
        f"    balance {balance}",
        "    option redispatch 1",
        "    retries 3",
        *(check.backend_lines() if check is not None else []),
        *(
            f"    server {server_name(index)} {host}:{server_port} {send_proxy}{checks}"
            for index, (host, server_port) in enumerate(servers)
        ),
    ]
    return "\n".join(lines) + "\n"


def _addresses(backends: Address | Sequence[Address]) -> list[Address]:
    """One (host, port) or a list of them, as a list; never empty."""
    if backends and isinstance(backends[0], str):
        host, port = cast(Address, backends)
        return [(host, port)]
    servers = [(host, port) for host, port in cast(Sequence[Address], backends)]
    if not servers:
        raise ValueError("no backend server")
    return servers


class HAProxy:
    """``haproxy -db`` with one frontend and one backend server or more; a context manager.

    ``backend`` is the relay's listener address, or a list of addresses (one
    server each, named s1, s2, ...); ``send_proxy`` is ``"send-proxy"``
    (PROXY version 1) or ``"send-proxy-v2"``; ``balance`` and ``check`` as
    in ``haproxy_config``.
    """

    def __init__(
        self,
        folder: Path,
        backend: Address | Sequence[Address],
        *,
        send_proxy: str = "send-proxy",
        balance: str = "roundrobin",
        check: HealthCheck | None = None,
    ) -> None:
        self.binary = require_tool("haproxy")
        self.folder = folder
        self.backends = _addresses(backend)
        self.send_proxy = send_proxy
        self.balance = balance
        self.check = check
        self.config_path = folder / "haproxy.cfg"
        self.log_path = folder / "haproxy.log"
        self.stats = f"smtpwarden-test-haproxy-{os.getpid()}-{next(_names)}"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def backend(self) -> Address:
        """The first (for one relay: the only) backend server."""
        return self.backends[0]

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect: the frontend."""
        return HOST, self.port

    def log(self) -> str:
        """What HAProxy wrote so far: warnings, errors and one line per connection."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Write the configuration, start HAProxy and wait for the relay's banner.

        Whatever fails, no HAProxy process is left running.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            for _ in range(START_ATTEMPTS):
                self.port = free_port()
                self.config_path.write_text(
                    haproxy_config(
                        self.port,
                        self.backends,
                        self.send_proxy,
                        balance=self.balance,
                        check=self.check,
                        stats=self.stats,
                    ),
                    encoding="utf-8",
                )
                with open(self.log_path, "ab") as output:
                    self.process = subprocess.Popen(
                        [self.binary, "-db", "-f", str(self.config_path)],
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                    )
                if self._wait_ready():
                    return
                self.stop()
            raise AssertionError(
                f"HAProxy did not start in {START_ATTEMPTS} attempts:\n{self.log()[-4000:]}"
            )
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> bool:
        """Connect until the relay's 220 comes through; False if HAProxy exited first."""
        process = self.process
        assert process is not None
        return wait_for_banner(
            self.port,
            time.monotonic() + START_TIMEOUT_S,
            process,
            what=" through HAProxy",
            diagnostics=lambda: self.log()[-4000:],
        )

    def _runtime(self, command: str) -> str:
        """Send one command to HAProxy's stats socket; return its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(STATS_TIMEOUT_S)
            sock.connect(abstract_address(self.stats))
            sock.sendall(command.encode("ascii") + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def server_states(self) -> dict[str, str]:
        """Each server's status as HAProxy's ``show stat`` gives it: "UP", "DOWN", ...

        Transitions read "UP 1/2" (up, one check failed) or "DOWN 1/2".
        """
        text = self._runtime("show stat").lstrip("# ")
        return {
            row["svname"]: row["status"]
            for row in csv.DictReader(text.splitlines())
            if row.get("pxname") == "relay" and row.get("svname") not in ("BACKEND", None)
        }

    def wait_server(self, name: str, status: str, timeout: float = STATE_TIMEOUT_S) -> float:
        """Wait until server ``name`` is fully ``status`` ("UP" or "DOWN"); return the seconds."""
        began = time.monotonic()
        deadline = began + timeout
        seen = ""
        while True:
            seen = self.server_states().get(name, "(no such server)")
            if seen == status:
                return time.monotonic() - began
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"HAProxy server {name} is {seen!r}, not {status!r}, after {timeout} s\n"
                    f"{self.log()[-4000:]}"
                )
            time.sleep(POLL_S)

    def stop(self) -> None:
        """Terminate HAProxy, kill it past a deadline; calling it again does nothing."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(STOP_TIMEOUT_S)

    def __enter__(self) -> HAProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
