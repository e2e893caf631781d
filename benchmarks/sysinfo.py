"""What the matrix reads from the system: /proc (CPU, memory, process trees, sockets) and facts.

Used by matrix.py and its helpers. Linux only.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import time
from collections.abc import Sequence
from contextlib import suppress
from importlib import metadata
from pathlib import Path

import smtpwarden

HAPROXY = "/usr/sbin/haproxy"


def find_tool(name: str, default: str) -> str | None:
    """The program's path: the Debian location, else the PATH."""
    if os.access(default, os.X_OK):
        return default
    return shutil.which(name)


# -- /proc -----------------------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 is index 0), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a relay with worker processes), from /proc."""
    found = [pid]
    if not Path(f"/proc/{pid}/task/{pid}/children").exists():
        return _tree_by_parent(pid)  # a kernel without CONFIG_PROC_CHILDREN
    pos = 0
    while pos < len(found) and len(found) < 4096:
        parent = found[pos]
        pos += 1
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with suppress(OSError):
                found.extend(int(child) for child in children.read_text().split())
    return found


def _tree_by_parent(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None:  # ppid: field 4 of proc(5)
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found = [pid]
    pos = 0
    while pos < len(found):
        found.extend(parents.get(found[pos], ()))
        pos += 1
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` and its descendants alive now."""
    ticks = 0
    for member in tree(pid):
        fields = stat_fields(member)
        if fields is not None:  # utime and stime: fields 14 and 15 of proc(5)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> tuple[int, int]:
    """VmRSS and Pss (KiB) of ``pid`` and its descendants."""
    rss = pss = 0
    for member in tree(pid):
        with suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        with suppress(OSError):
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss, pss


def time_wait_sockets() -> int:
    """IPv4 TCP sockets in TIME_WAIT (state 06 in /proc/net/tcp)."""
    try:
        with open("/proc/net/tcp", "rb") as table:
            next(table, None)
            return sum(1 for line in table if line.split()[3:4] == [b"06"])
    except OSError:
        return -1


def filesystem_of(path: Path) -> str:
    """The type of the filesystem ``path`` is on, from /proc/mounts ("?" if unknown)."""
    best, kind = "", "?"
    target = str(path.resolve())
    with suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1].replace("\\040", " ")
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def wait_quiet(pid: int | None, limit_s: float, interval_s: float = 0.2) -> tuple[float, bool]:
    """Wait until ``pid``'s tree uses at most one clock tick in ``interval_s``.

    A relay may go on working after its client is done: the spool's
    delivery workers. Returns (seconds waited, whether it went quiet in
    ``limit_s``).
    """
    if pid is None:
        return 0.0, True
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    started = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - started < limit_s:
        time.sleep(interval_s)
        now = cpu_seconds(pid)
        if now - last <= tick + 1e-9:
            return time.monotonic() - started, True
        last = now
    return time.monotonic() - started, False


# -- machine facts ---------------------------------------------------------------


def _first_line(command: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


_PORTS = "/proc/sys/net/ipv4/ip_local_port_range"


def _haproxy_version(haproxy: str | None) -> str | None:
    line = _first_line([haproxy, "-v"]) if haproxy else None
    # "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
    return " ".join(line.split()[:3]) if line else None


def machine_facts() -> dict[str, object]:
    model = None
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    haproxy = find_tool("haproxy", HAPROXY)
    postconf = find_tool("postconf", "/usr/sbin/postconf")
    mail_version = _first_line([postconf, "-d", "mail_version"]) if postconf else None
    source = Path(smtpwarden.__file__).resolve().parents[2]
    commit = _first_line(["git", "-C", str(source), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(source), "status", "--porcelain", "--", "src"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "smtpwarden": _version("smtpwarden"),
        "smtpwarden_commit": None if commit is None else commit + ("+changes" if dirty else ""),
        "uvloop": _version("uvloop"),
        "aiosmtpd": _version("aiosmtpd"),
        "haproxy": _haproxy_version(haproxy),
        "postfix": mail_version.split("=")[-1].strip() if mail_version else None,
        "tcp_tw_reuse": _read("/proc/sys/net/ipv4/tcp_tw_reuse"),
        "ip_local_port_range": " ".join((_read(_PORTS) or "?").split()),
        "somaxconn": _read("/proc/sys/net/core/somaxconn"),
        "rlimit_nofile": [soft, hard],
    }
