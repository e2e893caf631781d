"""Spool benchmark: messages/s with group commit against one commit per message.

Every put fsyncs its two files in its own thread either way; what differs is
the commit step (renames into queue/ and the two folder fsyncs): with group
commit one thread does it for every put that arrived during the previous
fsync, without it each put does its own.

WRITERS threads put MESSAGES messages of SIZE octets between them, through
``Spool.put_sync`` (the async ``Spool.put`` runs the same call in the spool's
threads). Rounds alternate the two modes (A B A B ...) so that drift in the
machine's load affects both alike; the median round is reported.

    python benchmarks/spool_commit.py [--messages 2000] [--writers 1,16,64]
                                      [--size 2048] [--rounds 3] [--dir .]

The spool is made in a temporary folder under --dir (default: the current
folder) and removed afterwards. Point --dir at the disk the spool will live
on: on tmpfs fsync does nothing and both modes measure the same.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from smtpwarden.spool import BodyKind, Envelope, Spool

ENVELOPE = Envelope(
    mail_from=b"MAIL FROM:<bench@example.org>",
    recipients=(b"RCPT TO:<rcpt@example.net>",),
    body=BodyKind.DATA,
    transaction_id="bench",
    dedupe_key="bench",
)


@dataclass(frozen=True, slots=True)
class Round:
    rate: float  # messages per second
    batch: float  # mean puts per commit


def message(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, size // len(line))
    return b"Subject: spool benchmark\r\n\r\n" + body + b".\r\n"


def one_round(folder: Path, *, group: bool, writers: int, messages: int, data: bytes) -> Round:
    shutil.rmtree(folder, ignore_errors=True)
    with Spool(folder, group_commit=group) as spool:
        spool.recover()
        share = [messages // writers + (i < messages % writers) for i in range(writers)]
        start = threading.Barrier(writers + 1)

        def work(count: int) -> None:
            start.wait()
            for _ in range(count):
                spool.put_sync(ENVELOPE, [data])

        threads = [threading.Thread(target=work, args=(n,)) for n in share]
        for thread in threads:
            thread.start()
        start.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        committer = spool.writer.committer
        batch = committer.items / committer.batches if committer and committer.batches else 1.0
    return Round(rate=messages / elapsed, batch=batch)


def calibrate(folder: Path, samples: int = 200) -> tuple[float, float]:
    """Median microseconds of a file put (create, write 2 KiB, fsync) and of a folder fsync.

    Group commit shares only the second; where it is a small part of the
    first (a disk with a fast write cache), it cannot gain much.
    """
    folder.mkdir()
    files: list[float] = []
    folders: list[float] = []
    for n in range(samples):
        began = time.perf_counter()
        fd = os.open(folder / f"f{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x" * 2048)
        os.fsync(fd)
        os.close(fd)
        files.append(time.perf_counter() - began)
        began = time.perf_counter()
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        folders.append(time.perf_counter() - began)
    shutil.rmtree(folder)
    return statistics.median(files) * 1e6, statistics.median(folders) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--writers", default="1,16,64", help="comma-separated thread counts")
    parser.add_argument("--size", type=int, default=2048, help="message octets")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=".", help="where to make the temporary spool")
    args = parser.parse_args()
    data = message(args.size)
    print(f"{platform.python_implementation()} {platform.python_version()}, {platform.system()}")
    print(f"{args.messages} messages of {len(data)} octets, median of {args.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="spool-bench-", dir=args.dir) as top:
        file_us, folder_us = calibrate(Path(top) / "calibrate")
        print(f"file create+write+fsync {file_us:.0f} us, folder fsync {folder_us:.0f} us\n")
        folder = Path(top) / "spool"
        header = ("writers", "one commit each", "group commit", "batch", "gain")
        print("{:>7}  {:>16}  {:>13}  {:>6}  {:>5}".format(*header))
        for writers in (int(w) for w in args.writers.split(",")):
            single: list[Round] = []
            grouped: list[Round] = []
            for _ in range(args.rounds):
                for group, into in ((False, single), (True, grouped)):
                    into.append(
                        one_round(
                            folder,
                            group=group,
                            writers=writers,
                            messages=args.messages,
                            data=data,
                        )
                    )
            one = statistics.median(r.rate for r in single)
            many = statistics.median(r.rate for r in grouped)
            batch = statistics.median(r.batch for r in grouped)
            print(
                f"{writers:>7}  {one:>12.0f} m/s  {many:>9.0f} m/s  {batch:>6.1f}  "
                f"{many / one:>4.2f}x"
            )


if __name__ == "__main__":
    main()
