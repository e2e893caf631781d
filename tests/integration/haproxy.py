"""HAProxy in TCP mode in front of a relay, sending the PROXY protocol header.

``HAProxy`` writes its own configuration into a folder (``defaults`` with
``mode tcp`` and timeouts, one frontend on a free loopback port, one backend
server with ``send-proxy`` or ``send-proxy-v2``) and runs ``haproxy -db -f
FILE`` in the foreground. HAProxy cannot report an ephemeral port, so a port
is found by binding port 0 and closing it, and another is tried if HAProxy
exits at once (another program took it).

Readiness is the relay's 220 banner read through the frontend on a real
connection, tried until a deadline. HAProxy's connection log (``option
tcplog`` to stderr) is kept in the folder for a look after a failure.
Stopping terminates it, and kills it past a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from integration.external_tools import require_tool
from integration.relay_harness import POLL_S, free_port

HOST = "127.0.0.1"
SEND_PROXY = ("send-proxy", "send-proxy-v2")
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
START_ATTEMPTS = 3  # a fresh port each time, in case another program took the last one
PROBE_TIMEOUT_S = 2.0


def haproxy_config(port: int, backend: tuple[str, int], send_proxy: str) -> str:
    """The configuration: a TCP frontend on ``port`` passing to ``backend``."""
    if send_proxy not in SEND_PROXY:
        raise ValueError(f"send_proxy must be one of {SEND_PROXY}, not {send_proxy!r}")
    backend_host, backend_port = backend
    return (
        "global\n"
        "    maxconn 256\n"
        "    log stderr format raw local0\n"
        "\n"
        "defaults\n"
        "    mode tcp\n"
        "    log global\n"
        "    option tcplog\n"
        "    timeout connect 5s\n"
        "    timeout client 30s\n"
        "    timeout server 30s\n"
        "\n"
        "frontend smtp_in\n"
        f"    bind {HOST}:{port}\n"
        "    default_backend relay\n"
        "\n"
        "backend relay\n"
        f"    server s1 {backend_host}:{backend_port} {send_proxy}\n"
    )


class HAProxy:
    """``haproxy -db`` with one frontend and one backend server; a context manager.

    ``backend`` is the relay's listener address; ``send_proxy`` is
    ``"send-proxy"`` (PROXY version 1) or ``"send-proxy-v2"``.
    """

    def __init__(
        self, folder: Path, backend: tuple[str, int], *, send_proxy: str = "send-proxy"
    ) -> None:
        self.binary = require_tool("haproxy")
        self.folder = folder
        self.backend = backend
        self.send_proxy = send_proxy
        self.config_path = folder / "haproxy.cfg"
        self.log_path = folder / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

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
                    haproxy_config(self.port, self.backend, self.send_proxy), encoding="utf-8"
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
        deadline = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                with socket.create_connection(self.address, timeout=PROBE_TIMEOUT_S) as probe:
                    banner = probe.recv(512)
                    if banner.startswith(b"220"):
                        probe.sendall(b"QUIT\r\n")
                        probe.recv(512)
                        return True
                    last = repr(banner)
            except OSError as error:
                last = str(error)
            time.sleep(POLL_S)
        raise AssertionError(
            f"no 220 banner through HAProxy on port {self.port} within {START_TIMEOUT_S} s "
            f"(last: {last})\n{self.log()[-4000:]}"
        )

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
