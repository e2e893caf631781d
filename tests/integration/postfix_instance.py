"""A private Postfix on loopback, as a real upstream for the relay.

``PostfixInstance`` writes its own ``conf/main.cf`` and ``conf/master.cf``
into a folder of its own, with the queue, data directory and mail log in the
same folder, and starts it with ``postfix -c FOLDER/conf start``. The system
Postfix (its configuration and spool) is never read or written: this works
when Postfix is installed with no configuration at all.

Its smtpd listens on a free loopback port, trusts 127.0.0.1 for XCLIENT and
XFORWARD, relays the test domains and hands every accepted message on to
``relayhost`` (a recorder such as ``AiosmtpdUpstream``), or discards it when
there is none. Debian's defaults are kept otherwise; in particular
``smtpd_forbid_bare_newline`` is left unset, so bare LF line endings are
accepted, as they are on a default install.

Postfix must be started as root. Readiness is the 220 banner on a real
connection; stopping waits until no process of the instance is left, and
kills what is left past a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

import pytest

from integration.external_tools import SYSTEM_SBIN, on_ci
from integration.relay_harness import POLL_S, free_port

HOST = "127.0.0.1"
HOSTNAME = "postfix.test"
MAIL_OWNER = "postfix"
DEFAULT_RELAY_DOMAINS = ("example.net", "example.com", "example.org")
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0
START_ATTEMPTS = 3  # a fresh port each time, in case another program took the last one
LOG_TIMEOUT_S = 10.0
CONFIG_AGE_S = 60.0

# One line per service: name, type, private, unpriv, chroot, wakeup, maxproc, command.
# The smtpd line is added with its port. No service runs chrooted, so no
# copies of system files are needed in the queue directory.
SERVICES = (
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
)


def require_postfix() -> str:
    """Return the ``postfix`` command; fail on CI, skip elsewhere, if it cannot run.

    Follows ``external_tools.require_tool``; a private instance also needs root.
    """
    found = shutil.which("postfix", path=os.environ.get("PATH", "") + os.pathsep + SYSTEM_SBIN)
    if found is None:
        message = "postfix is not installed (Debian: apt-get install postfix)"
    elif os.geteuid() != 0:
        message = "a private Postfix instance must be started as root"
    else:
        return found
    if on_ci():
        pytest.fail(f"CI is set and {message}", pytrace=False)
    pytest.skip(message)


def private_folder() -> Path:
    """A new folder for an instance, under the system's temporary directory.

    pytest's ``tmp_path`` lies under a folder only its owner may enter, which
    the Postfix daemons (running as the mail owner) could not reach.
    """
    folder = Path(tempfile.mkdtemp(prefix="smtpwarden-postfix-"))
    folder.chmod(0o755)
    return folder


def _main_cf(settings: Mapping[str, str]) -> str:
    return "".join(f"{name} = {value}\n" for name, value in settings.items())


def _master_cf(port: int) -> str:
    lines = [f"{HOST}:{port} inet n - n - - smtpd"]
    lines += [" ".join(service) for service in SERVICES]
    return "\n".join(lines) + "\n"


def _process_state(pid: int) -> tuple[str, int] | None:
    """The command name and process group of a live (not zombie) process."""
    try:
        line = (Path("/proc") / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # "PID (NAME) STATE PPID PGRP ...": the name may hold spaces and parentheses.
    name = line[line.find("(") + 1 : line.rfind(")")]
    fields = line[line.rfind(")") + 1 :].split()
    if len(fields) < 3 or fields[0] == "Z":
        return None
    return name, int(fields[2])


class PostfixInstance:
    """A private Postfix serving SMTP on a loopback port; a context manager.

    ``relayhost`` is where accepted mail goes (host, port); with none it is
    discarded. ``cert_file`` and ``key_file`` offer STARTTLS on the smtpd.
    ``settings`` adds or replaces main.cf parameters.
    """

    def __init__(
        self,
        folder: Path,
        *,
        relayhost: tuple[str, int] | None = None,
        relay_domains: Iterable[str] = DEFAULT_RELAY_DOMAINS,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        self.postfix = require_postfix()
        self.folder = folder
        self.conf_dir = folder / "conf"
        self.queue_dir = folder / "queue"
        self.data_dir = folder / "data"
        self.maillog_path = folder / "maillog"
        self.command_log_path = folder / "commands.out"
        self.relayhost = relayhost
        self.relay_domains = tuple(relay_domains)
        self.cert_file = cert_file
        self.key_file = key_file
        self.extra_settings = dict(settings or {})
        self.port = 0
        self.master_pid: int | None = None

    # Configuration

    def main_settings(self) -> dict[str, str]:
        """The main.cf parameters of this instance."""
        folder = str(self.folder)
        settings = {
            "compatibility_level": "3.6",
            "config_directory": str(self.conf_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": MAIL_OWNER,
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": folder,
            "myhostname": HOSTNAME,
            "mydomain": "test",
            "myorigin": "$myhostname",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": ", ".join(self.relay_domains),
            "smtpd_authorized_xclient_hosts": HOST,
            "smtpd_authorized_xforward_hosts": HOST,
            # No local delivery, no aliases, no DNS: nothing outside the folder.
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "local_transport": "error:local delivery is disabled",
            "smtpd_peername_lookup": "no",
            "biff": "no",
            # Fast retries and no waits that slow a test down.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "in_flow_delay": "0s",
            "smtpd_error_sleep_time": "0s",
            "smtp_connection_cache_on_demand": "no",
        }
        if self.relayhost is None:
            settings["relay_transport"] = "discard:no relayhost"
            settings["default_transport"] = "discard:no relayhost"
        else:
            host, port = self.relayhost
            settings["relayhost"] = f"[{host}]:{port}"
        if self.cert_file is not None and self.key_file is not None:
            settings["smtpd_tls_cert_file"] = str(self.cert_file)
            settings["smtpd_tls_key_file"] = str(self.key_file)
            settings["smtpd_tls_security_level"] = "may"
        settings.update(self.extra_settings)
        return settings

    def _write_config(self) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "main.cf").write_text(_main_cf(self.main_settings()), encoding="utf-8")
        (self.conf_dir / "master.cf").write_text(_master_cf(self.port), encoding="utf-8")
        # Postfix waits for a main.cf written in the last two seconds to "cool
        # down" (it could still be being edited); backdate both files instead.
        past = time.time() - CONFIG_AGE_S
        for name in ("main.cf", "master.cf"):
            os.utime(self.conf_dir / name, (past, past))

    # Commands

    def _command(self, *args: str) -> int:
        """Run ``postfix -c CONF ARGS``; return its exit status.

        Its output goes to a file, not a pipe, so that no daemon it starts can
        hold the pipe open; its diagnostics also go to the mail log.
        """
        with open(self.command_log_path, "ab") as output:
            result = subprocess.run(
                [self.postfix, "-c", str(self.conf_dir), *args],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
        return result.returncode

    def _failure(self, what: str, returncode: int) -> AssertionError:
        try:
            output = self.command_log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            output = ""
        return AssertionError(
            f"{what} exited with {returncode}\noutput: {output[-2000:]}\n"
            f"maillog:\n{self.maillog()[-4000:]}"
        )

    # Lifecycle

    def start(self) -> None:
        """Write the configuration, start the instance and wait for its banner.

        Whatever fails, nothing of the instance is left running.
        """
        self._check_reachable()
        self.folder.mkdir(parents=True, exist_ok=True)
        # The daemons run as the mail owner and open paths inside the folder.
        self.folder.chmod(0o755)
        # postfix changes into the queue before it creates what is missing in it.
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        try:
            for _ in range(START_ATTEMPTS):
                self.port = free_port()
                self._write_config()
                before = len(self.maillog())
                returncode = self._command("start")
                self.master_pid = self._find_master()
                if returncode == 0 and self.master_pid is not None:
                    self._wait_ready()
                    return
                self.stop()
                if "Address already in use" not in self.maillog()[before:]:
                    raise self._failure("postfix start", returncode)
            raise AssertionError(f"no free port for Postfix after {START_ATTEMPTS} attempts")
        except BaseException:
            self.stop()
            raise

    def _check_reachable(self) -> None:
        """Fail clearly if the mail owner could not reach the folder."""
        for parent in self.folder.resolve().parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                raise AssertionError(
                    f"{parent} is not searchable by others, so the {MAIL_OWNER} user "
                    f"cannot reach {self.folder}; use a folder made by private_folder()"
                )

    def _find_master(self) -> int | None:
        """The pid of this instance's master process, if it is running."""
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text(encoding="ascii")
            pid = int(text.split()[0])
        except (OSError, ValueError, IndexError):
            return None
        found = _process_state(pid)
        if found is None:
            return None
        name, group = found
        # The master leads its own process group, which all its children share.
        return pid if name == "master" and group == pid else None

    def _wait_ready(self) -> None:
        """Connect until the smtpd answers 220; fail past the deadline."""
        deadline = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(self.address, timeout=2.0) as probe:
                    banner = probe.recv(512)
                    if banner.startswith(b"220"):
                        probe.sendall(b"QUIT\r\n")
                        probe.recv(512)
                        return
                    last = banner.decode("ascii", "replace")
            except OSError as error:
                last = str(error)
            time.sleep(POLL_S)
        raise AssertionError(
            f"no 220 banner from Postfix on port {self.port} within {START_TIMEOUT_S} s "
            f"(last: {last})\nmaillog:\n{self.maillog()[-4000:]}"
        )

    def stop(self) -> None:
        """Stop the instance and wait until none of its processes is left.

        ``postfix stop`` first; whatever is still running past a deadline is
        killed. Calling it again does nothing.
        """
        if self.master_pid is None:
            return
        try:
            if self.processes():
                returncode = self._command("stop")
                if returncode != 0 and self.processes():
                    raise self._failure("postfix stop", returncode)
        finally:
            self._end_processes()
            self.master_pid = None

    def processes(self) -> list[int]:
        """The running processes of this instance: the master's process group."""
        if self.master_pid is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                state = _process_state(int(entry.name))
                if state is not None and state[1] == self.master_pid:
                    found.append(int(entry.name))
        return found

    def _end_processes(self) -> None:
        """Wait for the instance's processes to end; kill them past a deadline."""
        master = self.master_pid
        if master is None:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.processes():
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(master, signal.SIGKILL)
                kill_deadline = time.monotonic() + STOP_TIMEOUT_S
                while left := self.processes():
                    if time.monotonic() > kill_deadline:
                        raise AssertionError(f"Postfix processes left after SIGKILL: {left}")
                    time.sleep(POLL_S)
                raise AssertionError(
                    f"Postfix did not stop within {STOP_TIMEOUT_S} s and was killed\n"
                    f"maillog:\n{self.maillog()[-4000:]}"
                )
            time.sleep(POLL_S)

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # What a test looks at

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def config(self) -> dict[str, object]:
        """The relay's upstream section for this instance."""
        return {"kind": "smtp", "host": HOST, "port": self.port}

    def maillog(self) -> str:
        """The mail log so far."""
        try:
            data = self.maillog_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace")

    def save_maillog(self, target: Path) -> None:
        """Copy the whole mail log to ``target``, if there is one."""
        if self.maillog_path.exists():
            shutil.copyfile(self.maillog_path, target)

    def wait_log(
        self, pattern: str | re.Pattern[str], timeout: float = LOG_TIMEOUT_S
    ) -> re.Match[str]:
        """Poll the mail log until ``pattern`` is found in it; fail after ``timeout``."""
        compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            found = compiled.search(self.maillog())
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{compiled.pattern!r} not in the Postfix mail log within {timeout} s:\n"
                    f"{self.maillog()[-4000:]}"
                )
            time.sleep(POLL_S)
