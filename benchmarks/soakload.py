"""The client sessions of benchmarks/soak.py, and the messages they send.

``load`` keeps --sessions sessions going, each EHLO then one or several
messages (1 KB to 1 MB, mostly small), by DATA or, when offered, BDAT,
pipelined or in lockstep. The ``Ledger`` hands out ids: a 250 to the end of
data acknowledges a message; anything else (4xx, 5xx, a lost connection, a
timeout) sends it again later with the same id, at most --max-attempts
times. Every message carries its id in an X-Soak-Id header, which the
upstream (soakupstream.py) reports when it takes the message.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import random
import re
import time
from collections import Counter

from soakupstream import FILLER, HOST

# The clients' waits; the reply to the final dot may follow the relay's replays
# and the spool's fsync.
CONNECT_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 60.0
END_TIMEOUT_S = 120.0
FAILURE_TEXT = re.compile(rb"fail|reject|abort|suspend|denied|timed out", re.IGNORECASE)


def message(ident: int, rng: random.Random) -> bytes:
    """Message ``ident``: mostly 1-4 KB, some to 64 KB, 256 KB and 1 MB; CRLF lines, no dot."""
    roll = rng.random()
    top = 4096 if roll < 0.75 else 65536 if roll < 0.93 else 262144 if roll < 0.99 else 1048576
    size = rng.randint(max(1024, top // 4), top)
    head = (
        b"X-Soak-Id: %d\r\nFrom: <load@client.soak>\r\nTo: <rcpt@upstream.soak>\r\n"
        b"Subject: soak %d\r\nMessage-ID: <%d.soak@client.soak>\r\n\r\n" % (ident, ident, ident)
    )
    return head + FILLER * max(1, (size - len(head)) // len(FILLER))


class Ledger:
    """Ids handed out, attempts, acknowledgements, and the bounds of the load."""

    def __init__(self, args: argparse.Namespace, deadline: float) -> None:
        self.deadline, self.cap, self.max_attempts = deadline, args.max_messages, args.max_attempts
        self.issued = self.sent = self.resends = self.abandoned = 0
        self.attempts: dict[int, int] = {}
        self.history: dict[int, list[str]] = {}  # id -> what happened to its failed attempts
        self.acked: set[int] = set()
        self.due: list[tuple[float, int]] = []  # (when, id) to send again
        self.failures: Counter[str] = Counter()  # not acknowledged, by what happened
        self.sessions: Counter[str] = Counter()  # sessions that failed before a message
        self.odd_acks: Counter[str] = Counter()  # 250s to the dot whose text says failure
        self.stopped = False
        self.rng = random.Random(args.seed + 2)

    def closed(self) -> bool:
        return self.stopped or time.monotonic() >= self.deadline

    def take(self) -> int | None:
        """The id to send next: one due again, else a new one; None when closed."""
        if self.closed():
            return None
        if self.due and self.due[0][0] <= time.monotonic():
            ident = heapq.heappop(self.due)[1]
            self.resends += 1
        elif self.issued < self.cap:
            self.issued += 1
            ident = self.issued
        else:
            return None
        self.attempts[ident] = self.attempts.get(ident, 0) + 1
        self.sent += 1
        return ident

    def settle(self, ident: int, reply: bytes | None, what: str) -> None:
        if reply is not None and reply[:3] == b"250":
            self.acked.add(ident)
            if FAILURE_TEXT.search(reply):
                self.odd_acks[first_line(reply)] += 1
            return
        self.failures[what] += 1
        self.history.setdefault(ident, []).append(what)
        if self.attempts[ident] >= self.max_attempts:
            self.abandoned += 1
        else:
            heapq.heappush(self.due, (time.monotonic() + self.rng.uniform(1.0, 5.0), ident))


class Unexpected(Exception):
    pass


def first_line(reply: bytes) -> str:
    return reply.split(b"\r\n", 1)[0][:72].decode(errors="replace")


async def read_reply(reader: asyncio.StreamReader, seconds: float) -> bytes:
    raw = b""
    while (line := await asyncio.wait_for(reader.readuntil(b"\r\n"), seconds))[3:4] == b"-":
        raw += line
    return raw + line


class Client:
    """One client: sessions one after another until the ledger closes."""

    def __init__(self, port: int, ledger: Ledger, args: argparse.Namespace, seed: int) -> None:
        self.port, self.ledger, self.args, self.rng = port, ledger, args, random.Random(seed)
        self.stage = ""  # the step under way, for the record of a failure

    async def run(self) -> None:
        while not self.ledger.closed():
            await self.session()

    async def session(self) -> None:
        """One connection: EHLO, then one or several messages."""
        rng, ledger = self.rng, self.ledger
        try:
            opening = asyncio.open_connection(HOST, self.port)
            reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as error:
            ledger.sessions[f"connect: {type(error).__name__}"] += 1
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            return
        ident, self.stage, raw = None, "banner", b""
        try:
            for command, code in ((b"", b"220"), (b"EHLO client.soak\r\n", b"250")):
                writer.write(command)
                raw = await read_reply(reader, REPLY_TIMEOUT_S)
                if raw[:3] != code:
                    raise Unexpected(f"{self.stage}: {first_line(raw)}")
                self.stage = "EHLO"
            caps = {line[4:].split(b" ")[0].upper() for line in raw.split(b"\r\n")[1:]}
            for _ in range(1 if rng.random() < self.args.single else rng.randint(2, 10)):
                if (ident := ledger.take()) is None:
                    break
                reply = await self.send(reader, writer, ident, caps)
                ledger.settle(ident, reply, f"end of data: {first_line(reply)}")
                ident = None
            self.stage = "QUIT"
            writer.write(b"QUIT\r\n")
            await read_reply(reader, REPLY_TIMEOUT_S)
        except (Unexpected, OSError, EOFError, TimeoutError, asyncio.LimitOverrunError) as error:
            failure = isinstance(error, Unexpected)
            what = str(error) if failure else f"{self.stage}: {type(error).__name__}"
            if ident is not None:
                ledger.settle(ident, None, what)
            else:
                ledger.sessions[what] += 1
            await asyncio.sleep(rng.uniform(0.1, 0.5))
        finally:
            writer.close()

    async def send(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ident: int,
        caps: set[bytes],
    ) -> bytes:
        """Send message ``ident``; the reply to its end of data."""
        body, rng = message(ident, self.rng), self.rng
        steps = [
            (b"MAIL FROM:<load@client.soak> SIZE=%d\r\n" % len(body), b"250", "MAIL"),
            (b"RCPT TO:<rcpt%d@upstream.soak>\r\n" % (ident % 100), b"250", "RCPT"),
        ]
        bdat = b"CHUNKING" in caps and rng.random() < self.args.bdat
        if bdat:  # in one to three chunks
            cuts = sorted(rng.sample(range(1, len(body)), rng.randint(0, 2)))
            pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
            for i, piece in enumerate(pieces):
                last = b" LAST" if i == len(pieces) - 1 else b""
                steps.append((b"BDAT %d%s\r\n" % (len(piece), last) + piece, b"250", "BDAT"))
        else:
            steps += [(b"DATA\r\n", b"354", "DATA"), (body + b".\r\n", b"250", "dot")]
        # Pipelined (RFC 2920): MAIL, RCPT and DATA in one write, or every BDAT.
        groups = [steps] if bdat else [steps[:3], steps[3:]]
        if not (b"PIPELINING" in caps and rng.random() < self.args.pipelining):
            groups = [[step] for step in steps]
        for group in groups:
            self.stage = f"sending {group[0][2]}"
            writer.write(b"".join(data for data, _, _ in group))
            await asyncio.wait_for(writer.drain(), REPLY_TIMEOUT_S)
            for data, code, what in group:
                end = data is steps[-1][0]
                self.stage = f"no reply to {'end of data' if end else what}"
                reply = await read_reply(reader, END_TIMEOUT_S if end else REPLY_TIMEOUT_S)
                if end:
                    return reply
                if reply[:3] != code:
                    raise Unexpected(f"{what}: {first_line(reply)}")
        raise AssertionError("the last step is the end of data")


async def load(port: int, ledger: Ledger, args: argparse.Namespace) -> None:
    """``args.sessions`` clients until the ledger closes."""
    clients = [Client(port, ledger, args, args.seed * 1000 + n) for n in range(args.sessions)]
    await asyncio.gather(*(client.run() for client in clients))
