"""Resources running out: a full spool disk, a read-only one, too few descriptors.

Each must cost only a 4xx to the client whose message could not be kept:
the process stays up, other sessions go on, and once the resource is back
the same message is accepted (PRODUCT.md, invariants 1 and 6).

The full disk is real, a small tmpfs mounted for the test and filled; the
unwritable spool is made immutable with chattr. Both need root, as CI has;
without it the tests fail rather than skip.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from integration.external_tools import SmtpSink
from integration.recording_upstreams import RawUpstream
from integration.relay_harness import WAIT_S, RunningRelay, StartRelay, WireClient, free_port
from smtpwarden.spool.store import Spool

SECTION = b"Subject: resources\r\n\r\n" + b"z" * 200_000 + b"\r\n.\r\n"


class SmallDisk:
    """A tmpfs of ``size`` mounted at ``path`` for one test."""

    def __init__(self, path: Path, size: str) -> None:
        path.mkdir()
        self.path = path
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            check=False,
        )
        if mounted.returncode != 0:
            pytest.fail(
                "a small tmpfs is needed to fill a disk for real (root and mount): "
                + mounted.stderr.decode(errors="replace")
            )

    def fill(self, leave: int) -> Path:
        """Fill the disk up to ``leave`` free octets; return the filler file."""
        filler = self.path / "filler"
        free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
        with filler.open("wb") as out:
            out.write(b"\0" * max(0, free - leave))
        return filler

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "disk", "4m")
    yield disk
    disk.close()


def requeue_everything(start_relay: StartRelay, upstream: RawUpstream, spool: Path) -> RunningRelay:
    """A relay that spools every message: its upstream defers them all."""
    return start_relay(
        upstream.config,
        extra={
            "routes": [{"name": "all", "policy": "requeue", "upstreams": ["up"]}],
            "retry": {"attempts": 0},
            # No delivery from the spool during the test.
            "spool": {"path": str(spool), "backoff": {"initial": 3600, "maximum": 3600}},
        },
    )


def send(relay: RunningRelay) -> tuple[int, bytes]:
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(SECTION)
        code, raw = client.reply()
        client.command(b"QUIT\r\n", 221)
    return code, raw


def queued(spool: Path) -> int:
    with Spool(spool) as opened:
        return len(opened.look())


@pytest.fixture
def deferring() -> Iterator[RawUpstream]:
    upstream = RawUpstream(replies={".": b"451 4.3.0 Try again later\r\n"})
    yield upstream
    upstream.close()


def test_a_full_spool_disk_answers_4xx_and_recovers(
    start_relay: StartRelay, deferring: RawUpstream, small_disk: SmallDisk
) -> None:
    spool = small_disk.path / "spool"
    relay = requeue_everything(start_relay, deferring, spool)
    filler = small_disk.fill(leave=64 * 1024)
    code, raw = send(relay)
    assert raw.startswith(b"451 4.3.0 "), raw  # never a 250 for a message not kept
    # Nothing half-written is left to be delivered later.
    filler.unlink()
    assert queued(spool) == 0
    code, raw = send(relay)
    assert code == 250, raw
    assert b"queued as" in raw, raw
    assert queued(spool) == 1
    outcomes = [r["outcome"] for r in relay.wait_records(lambda rs: len(rs) == 2, "transaction")]
    assert outcomes == ["deferred", "requeued"]


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """Make every folder of ``folder`` immutable: not even root may add a file.

    (A read-only remount would fail while the spool holds files open for
    writing; the kernel does it anyway after disk errors, with the same
    effect on the relay: every new file is refused.)
    """
    folders = [str(path) for path in (folder, *folder.rglob("*")) if path.is_dir()]
    changed = subprocess.run(["chattr", "+i", *folders], capture_output=True, check=False)
    if changed.returncode != 0:
        pytest.fail("chattr (root, ext4) is needed: " + changed.stderr.decode(errors="replace"))
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *folders], check=True)


def test_an_unwritable_spool_answers_4xx_and_recovers(
    start_relay: StartRelay, deferring: RawUpstream, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    relay = requeue_everything(start_relay, deferring, spool)
    with unwritable(spool):
        code, raw = send(relay)
        assert raw.startswith(b"451 4.3.0 "), raw
    code, raw = send(relay)
    assert code == 250, raw
    assert queued(spool) == 1
    outcomes = [r["outcome"] for r in relay.wait_records(lambda rs: len(rs) == 2, "transaction")]
    assert outcomes == ["deferred", "requeued"]


def relay_process(
    tmp_path: Path,
    upstream_port: int,
    *,
    descriptors: int = 0,
    extra: dict[str, object] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """A relay process (with at most ``descriptors`` open files, if not 0)."""
    port = free_port()
    config = {
        "hostname": "relay.test",
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": port, "upstream": "up"}],
        "upstreams": [{"name": "up", "kind": "smtp", "host": "127.0.0.1", "port": upstream_port}],
        "limits": {"max_connections_per_client": 0},
        "log": {"transactions": str(tmp_path / "log.jsonl"), "level": "info"},
        "health": {"check_interval": 0},
        "http": {"port": 0},
        **(extra or {}),
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))

    def limit() -> None:
        if descriptors:
            resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))

    with (tmp_path / "relay.err").open("wb") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "smtpwarden", "run", "--config", str(path)],
            preexec_fn=limit,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            assert process.poll() is None, (tmp_path / "relay.err").read_text()
            assert time.monotonic() < deadline, "the relay did not start"
            time.sleep(0.05)


def test_running_out_of_descriptors_costs_only_the_new_sessions(
    tmp_path: Path, make_smtp_sink: Callable[..., SmtpSink]
) -> None:
    sink = make_smtp_sink()
    process, port = relay_process(tmp_path, sink.port, descriptors=64)
    try:
        # A session in progress before the descriptors run out.
        with WireClient(("127.0.0.1", port)) as first:
            first.open_data()
            # Far more connections than descriptors: each session needs two.
            crowd = [
                socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) for _ in range(80)
            ]
            answers = []
            for sock in crowd:
                sock.settimeout(3.0)
                try:
                    answers.append(sock.recv(1024)[:9])
                except TimeoutError:
                    answers.append(b"(waiting)")
            # Some were served, the rest refused or kept waiting; none broke
            # the session already running.
            assert any(answer.startswith(b"220") for answer in answers)
            assert all(
                a.startswith((b"220", b"421 4.", b"(waiting)")) or a == b"" for a in answers
            ), answers
            first.command(b"Subject: first\r\n\r\nkept\r\n.\r\n", 250)
            first.command(b"QUIT\r\n", 221)
            for sock in crowd:
                sock.close()
        # The descriptors are back: a new client is served in full.
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with WireClient(("127.0.0.1", port)) as later:
                    later.open_data()
                    later.command(b"Subject: later\r\n\r\nx\r\n.\r\n", 250)
                    later.command(b"QUIT\r\n", 221)
                break
            except (AssertionError, OSError):
                assert time.monotonic() < deadline, "the relay did not recover"
                time.sleep(0.1)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(WAIT_S)


def peak_rss_kib(pid: int) -> int:
    """The process's resident set at its highest so far (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc")


BIG_MESSAGE_MIB = 64
POLICIES = {
    "passthrough": {},
    # A held copy past retry.hold_memory_bytes (1 MiB) is spilled to disk.
    "retry": {
        "routes": [{"name": "all", "policy": "retry", "upstreams": ["up"]}],
        "retry": {"attempts": 1},
    },
}


BLOCKS = {
    "lines": (b"x" * 998 + b"\r\n") * 1024,  # 1 MiB of 1000-octet lines
    # One 64 MiB line: far past RFC 5321's 1000 octets, relayed as sent (as
    # Postfix's smtpd takes it) but never gathered whole.
    "one-line": b"x" * (1 << 20),
}


@pytest.mark.parametrize("shape", BLOCKS.keys())
@pytest.mark.parametrize("policy", POLICIES.keys())
def test_a_large_message_streams_in_bounded_memory(
    tmp_path: Path, make_smtp_sink: Callable[..., SmtpSink], policy: str, shape: str
) -> None:
    sink = make_smtp_sink()
    extra: dict[str, object] = {"limits": {"max_message_bytes": 0}, **POLICIES[policy]}
    process, port = relay_process(tmp_path, sink.port, extra=extra)
    block = BLOCKS[shape]
    try:
        with WireClient(("127.0.0.1", port)) as client:
            client.open_data()
            client.command(b"Subject: warm-up\r\n\r\nx\r\n.\r\n", 250)
            before = peak_rss_kib(process.pid)
            client.command(b"MAIL FROM:<big@example.org>\r\n", 250)
            client.command(b"RCPT TO:<sink@example.net>\r\n", 250)
            client.command(b"DATA\r\n", 354)
            client.send(b"Subject: big\r\n\r\n")
            for _ in range(BIG_MESSAGE_MIB):
                client.send(block)
            client.command(b"\r\n.\r\n", 250)
            client.command(b"QUIT\r\n", 221)
        growth_mib = (peak_rss_kib(process.pid) - before) / 1024
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(WAIT_S)
    # Shown with pytest -s; docs/reliability.md quotes it.
    print(f"{policy}, {shape}: {BIG_MESSAGE_MIB} MiB message, peak RSS +{growth_mib:.1f} MiB")
    # The message is four times the bound: it streamed, it was not buffered.
    assert growth_mib < 16, f"{policy}: peak memory grew {growth_mib:.1f} MiB"
