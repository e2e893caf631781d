"""External programs used as real peers: Postfix's smtp-sink and smtp-source, swaks.

``require_tool`` is the one place that decides what happens when a program
is missing: on CI (environment variable CI set) the test fails, because CI
must install it; elsewhere the test is skipped with the reason.

``SmtpSink`` runs smtp-sink on a free loopback port. smtp-sink cannot report
an ephemeral port, so a port is found by binding port 0 and closing it, and
readiness is the 220 banner on a real connection, tried until a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.relay_harness import POLL_S, free_port

# Postfix installs its test programs outside the usual PATH of a non-root user.
SYSTEM_SBIN = "/usr/sbin"
PACKAGES = {
    "smtp-sink": "postfix",
    "smtp-source": "postfix",
    "swaks": "swaks",
    "haproxy": "haproxy",
    "chromium": "chromium",
}
START_TIMEOUT_S = 10.0
START_ATTEMPTS = 3  # a fresh port each time, in case another program took the last one
STOP_TIMEOUT_S = 5.0


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str) -> str:
    """Return the path of program ``name``; fail on CI, skip elsewhere, if missing."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SYSTEM_SBIN)
    if found is not None:
        return found
    package = PACKAGES.get(name, name)
    message = f"{name} is not installed (Debian: apt-get install {package})"
    if on_ci():
        pytest.fail(f"CI is set and {message}", pytrace=False)
    pytest.skip(message)


def wait_for_banner(
    port: int,
    deadline: float,
    process: subprocess.Popen[bytes],
    *,
    preamble: bytes = b"",
    what: str = "",
    diagnostics: Callable[[], str] = str,
) -> bool:
    """Connect until a 220 banner arrives; False if the process exited first.

    ``preamble`` is sent first on each connection (a PROXY header);
    ``what`` and ``diagnostics()`` go into the error raised at the deadline.
    """
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as probe:
                if preamble:
                    probe.sendall(preamble)
                banner = probe.recv(512)
                if banner.startswith(b"220"):
                    probe.sendall(b"QUIT\r\n")
                    return True
                last = repr(banner)
        except OSError as error:
            last = str(error)
        time.sleep(POLL_S)
    raise AssertionError(
        f"no 220 banner{what} on port {port} before the deadline (last: {last})\n{diagnostics()}"
    )


_COUNTER = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


class SmtpSink:
    """Postfix's smtp-sink with running counters (-c) and the dialogue (-v).

    ``dump`` asks for every received message to be written to a folder
    (-d); the folder is made world-writable because smtp-sink drops root
    privileges to the postfix user.
    """

    def __init__(self, *, options: tuple[str, ...] = (), dump: bool = False) -> None:
        self.binary = require_tool("smtp-sink")
        self.workdir = Path(tempfile.mkdtemp(prefix="smtpwarden-sink-"))
        self.workdir.chmod(0o755)
        self.dump_dir: Path | None = None
        args = [self.binary, "-c", "-v"]
        if os.geteuid() == 0:
            args += ["-u", "postfix"]
        if dump:
            self.dump_dir = self.workdir / "dump"
            self.dump_dir.mkdir()
            self.dump_dir.chmod(0o777)
            args += ["-d", f"{self.dump_dir}/%Y%m%d%H%M%S."]
        args += list(options)
        self.stdout_path = self.workdir / "counters.out"
        self.stderr_path = self.workdir / "dialogue.err"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
                self.process = subprocess.Popen(
                    [*args, f"127.0.0.1:{self.port}", "256"], stdout=out, stderr=err
                )
            if wait_for_banner(self.port, time.monotonic() + START_TIMEOUT_S, self.process):
                return
        raise AssertionError(f"smtp-sink did not start: {self.stderr_path.read_text()}")

    @property
    def config(self) -> dict[str, object]:
        return {"kind": "smtp", "host": "127.0.0.1", "port": self.port}

    def counters(self) -> tuple[int, int, int]:
        """The last (sessions, quits, messages) smtp-sink printed."""
        found = _COUNTER.findall(self.stdout_path.read_bytes())
        if not found:
            return 0, 0, 0
        sess, quit_, mesg = found[-1]
        return int(sess), int(quit_), int(mesg)

    def dialogue(self) -> bytes:
        """The commands smtp-sink read (its -v output)."""
        return self.stderr_path.read_bytes()

    def dumped(self) -> list[bytes]:
        """The messages written to the dump folder."""
        if self.dump_dir is None:
            return []
        return [path.read_bytes() for path in sorted(self.dump_dir.rglob("*")) if path.is_file()]

    def wait_counters(self, *, sessions: int = 0, messages: int = 0, timeout: float = 10.0) -> None:
        """Wait until smtp-sink has counted at least so many ended sessions and messages."""
        deadline = time.monotonic() + timeout
        while True:
            sess, _, mesg = self.counters()
            if sess >= sessions and mesg >= messages:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"smtp-sink counted sess={sess} mesg={mesg}, "
                    f"wanted sess>={sessions} mesg>={messages} within {timeout} s"
                )
            time.sleep(POLL_S)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.workdir)
