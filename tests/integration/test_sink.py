"""The capture sink over real sockets: what it stores, caps and answers.

Most tests run ``start_sink`` on its own event loop in a background thread
(once per loop kind) and talk to it with ``WireClient``; one runs
``smtpwarden sink`` as a process. Every session is read to the end of its
stream (after QUIT, or the sink's own closing reply), so the sink has closed
it before it stops.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from integration.relay_harness import POLL_S, START_TIMEOUT_S, WAIT_S, WireClient
from smtpwarden.net import mailbox
from smtpwarden.net.loop import LoopChoice, loop_factory
from smtpwarden.net.sink import MAX_MESSAGE_BYTES, start_sink

HOSTNAME = "sink.test"
SMALL_CAP = 1000  # octets; small enough for a test to send past it at once

MESSAGE = (
    b"From: sender@example.org\r\n"
    b"To: rcpt@example.net\r\n"
    b"Subject: captured\r\n"
    b"\r\n"
    b".a line starting with one dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"the end\r\n"
)
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as (\S+)\r\n")


def stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency: the DATA section a client sends for ``message``."""
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


class RunningSink:
    """A sink serving on its own event loop in a background thread."""

    def __init__(self, folder: Path, loop_kind: str, **options: Any) -> None:
        self.folder = folder
        self.port = 0
        self._loop_kind = loop_kind
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sink", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise AssertionError("sink did not start")
        if self._error is not None:
            raise self._error

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def _run(self) -> None:
        factory, _ = loop_factory(cast(LoopChoice, self._loop_kind))

        async def serve() -> None:
            server = await start_sink("127.0.0.1", 0, self.folder, HOSTNAME, **self._options)
            self.port = server.sockets[0].getsockname()[1]
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            server.close()
            await server.wait_closed()

        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(serve())
        except BaseException as error:  # reported to the test thread
            self._error = error
            self._ready.set()

    def close(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "sink thread did not end"
        if self._error is not None:
            raise self._error


StartSink = Callable[..., RunningSink]


@pytest.fixture
def start(loop_kind: str, tmp_path: Path) -> Iterator[StartSink]:
    """Start sinks writing to ``tmp_path / "mail"``; each is stopped after the test."""
    started: list[RunningSink] = []

    def make(**options: Any) -> RunningSink:
        sink = RunningSink(tmp_path / "mail", loop_kind, **options)
        started.append(sink)
        return sink

    yield make
    for sink in started:
        sink.close()


def quit_session(client: WireClient) -> None:
    client.command(b"QUIT\r\n", 221)
    assert client.read_to_eof() == b""


def envelope_lines(mail_from: bytes = b"sender@example.org") -> bytes:
    return b"MAIL FROM:<" + mail_from + b">\r\nRCPT TO:<rcpt@example.net>\r\n"


def queued_id(reply: bytes) -> str:
    found = QUEUED.fullmatch(reply)
    assert found is not None, reply
    return found.group(1).decode()


def stored(folder: Path) -> list[str]:
    """Every name in the folder, temporary files included."""
    return sorted(path.name for path in folder.iterdir())


def read_stored(folder: Path, ident: str) -> tuple[bytes, dict[str, Any]]:
    envelope = json.loads((folder / f"{ident}.json").read_bytes())
    return (folder / f"{ident}.eml").read_bytes(), envelope


def test_data_message_stored_without_dot_stuffing(start: StartSink) -> None:
    sink = start()
    with WireClient(sink.address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(b"MAIL FROM:<sender@example.org>\r\n", 250)
        client.command(b"RCPT TO:<one@example.net>\r\n", 250)
        client.command(b"RCPT TO:<two@example.net>\r\n", 250)
        client.command(b"DATA\r\n", 354)
        ident = queued_id(client.command(stuff(MESSAGE), 250))
        quit_session(client)

    assert stored(sink.folder) == [f"{ident}.eml", f"{ident}.json"]
    content, envelope = read_stored(sink.folder, ident)
    assert content == MESSAGE
    assert envelope["id"] == ident
    assert envelope["mail_from"] == "sender@example.org"
    assert envelope["rcpt_to"] == ["one@example.net", "two@example.net"]
    assert envelope["helo"] == "client.test"
    assert envelope["body"] == "data"
    assert envelope["size"] == len(MESSAGE)


def test_empty_data_message_stored_empty(start: StartSink) -> None:
    sink = start()
    with WireClient(sink.address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n" + envelope_lines(), 250)
        client.expect(250)
        client.expect(250)
        client.command(b"DATA\r\n", 354)
        ident = queued_id(client.command(b".\r\n", 250))
        quit_session(client)
    assert read_stored(sink.folder, ident)[0] == b""


@pytest.mark.parametrize("message", [MESSAGE, b".\r\n", b"..\r\n.x\r\n", b"a\r\n"], ids=repr)
def test_draft_unstuffs_whatever_the_split(tmp_path: Path, message: bytes) -> None:
    wire = stuff(message)
    box = mailbox.Mailbox(tmp_path)
    splits = [[wire[:cut], wire[cut:]] for cut in range(1, len(wire))]
    splits.append([wire[i : i + 1] for i in range(len(wire))])
    for pieces in splits:
        draft = box.draft(MAX_MESSAGE_BYTES, unstuff=True)
        for piece in pieces:
            draft.write(memoryview(piece))
        ident = box.new_id()
        box.commit(draft, ident, {})
        assert (tmp_path / f"{ident}.eml").read_bytes() == message, pieces
        assert draft.size == len(message)


def test_bdat_message_stored_as_sent(start: StartSink) -> None:
    sink = start()
    first = b"From: sender@example.org\r\n\r\n.kept as is\r\n"
    second = b"\x00binary\xff\r\n.\r\n"
    with WireClient(sink.address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(envelope_lines(), 250)
        client.expect(250)
        reply = client.command(b"BDAT %d\r\n" % len(first) + first, 250)
        assert reply == b"250 2.0.0 Ok: %d octets received\r\n" % len(first)
        ident = queued_id(client.command(b"BDAT %d LAST\r\n" % len(second) + second, 250))
        quit_session(client)
    content, envelope = read_stored(sink.folder, ident)
    assert content == first + second
    assert envelope["body"] == "bdat"
    assert envelope["size"] == len(first + second)


def test_bdat_zero_last_gets_one_reply(start: StartSink) -> None:
    sink = start()
    with WireClient(sink.address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        # RFC 3030 2: BDAT 0 LAST ends a message; it is answered once.
        client.send(envelope_lines() + b"BDAT 3\r\nabcBDAT 0 LAST\r\nNOOP\r\n")
        client.expect(250)
        client.expect(250)
        client.expect(250)
        ident = queued_id(client.expect(250))
        assert client.expect(250) == b"250 2.0.0 Ok\r\n"  # the NOOP's
        quit_session(client)
    assert read_stored(sink.folder, ident)[0] == b"abc"


@pytest.mark.parametrize("cap", [MAX_MESSAGE_BYTES, SMALL_CAP], ids=["default", "small"])
def test_ehlo_advertises_size(start: StartSink, cap: int) -> None:
    sink = start() if cap == MAX_MESSAGE_BYTES else start(max_message_bytes=cap)
    with WireClient(sink.address) as client:
        client.expect(220)
        ehlo = client.command(b"EHLO client.test\r\n", 250)
        quit_session(client)
    assert b"250-SIZE %d\r\n" % cap in ehlo


def test_declared_size_over_the_cap_is_refused(start: StartSink) -> None:
    sink = start(max_message_bytes=SMALL_CAP)
    with WireClient(sink.address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        refused = client.command(
            b"MAIL FROM:<sender@example.org> SIZE=%d\r\n" % (SMALL_CAP + 1), 552
        )
        assert refused == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        # The refused MAIL started no transaction.
        client.command(b"RCPT TO:<rcpt@example.net>\r\n", 503)
        client.command(b"MAIL FROM:<sender@example.org> SIZE=%d\r\n" % SMALL_CAP, 250)
        quit_session(client)
    assert stored(sink.folder) == []


def test_data_over_the_cap_refused_at_its_end(start: StartSink) -> None:
    sink = start(max_message_bytes=SMALL_CAP)
    big = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n"
    big *= 2 * SMALL_CAP // len(big)
    with WireClient(sink.address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(envelope_lines(), 250)
        client.expect(250)
        client.command(b"DATA\r\n", 354)
        # Body and a NOOP in one write: the 552 comes after the whole body
        # was read, and the NOOP is still taken for a command.
        client.send(stuff(big) + b"NOOP\r\n")
        refused = client.expect(552)
        assert refused == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        client.expect(250)
        assert stored(sink.folder) == []
        # The session goes on: the transaction ended with the 552.
        client.command(b"RSET\r\n", 250)
        client.command(envelope_lines(), 250)
        client.expect(250)
        client.command(b"DATA\r\n", 354)
        ident = queued_id(client.command(stuff(MESSAGE), 250))
        quit_session(client)
    assert stored(sink.folder) == [f"{ident}.eml", f"{ident}.json"]
    assert read_stored(sink.folder, ident)[0] == MESSAGE


def test_message_of_exactly_the_cap_is_stored(start: StartSink) -> None:
    sink = start(max_message_bytes=SMALL_CAP)
    exact = b"y" * (SMALL_CAP - 2) + b"\r\n"
    with WireClient(sink.address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n" + envelope_lines(), 250)
        client.expect(250)
        client.expect(250)
        client.command(b"DATA\r\n", 354)
        ident = queued_id(client.command(stuff(exact), 250))
        quit_session(client)
    assert read_stored(sink.folder, ident)[0] == exact


def test_bdat_over_the_cap_refused_at_the_chunk_end(start: StartSink) -> None:
    sink = start(max_message_bytes=SMALL_CAP)
    chunk = b"z" * (SMALL_CAP // 2 + 1)
    with WireClient(sink.address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(envelope_lines(), 250)
        client.expect(250)
        client.command(b"BDAT %d\r\n" % len(chunk) + chunk, 250)
        # The chunk that passes the cap is read to its end, then refused;
        # RFC 3030 2: chunks pipelined after it are read and discarded.
        client.send(b"BDAT %d\r\n" % len(chunk) + chunk + b"BDAT 5 LAST\r\nhello")
        assert client.expect(552).startswith(b"552 5.3.4 ")
        client.expect(503)
        assert stored(sink.folder) == []
        client.command(b"RSET\r\n", 250)
        client.command(envelope_lines(), 250)
        client.expect(250)
        ident = queued_id(client.command(b"BDAT 5 LAST\r\nhello", 250))
        quit_session(client)
    assert read_stored(sink.folder, ident)[0] == b"hello"


def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll a condition no event signals (a file removed), up to WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {WAIT_S} s")
        time.sleep(POLL_S)


def test_abandoned_messages_leave_no_file(start: StartSink) -> None:
    sink = start()
    with WireClient(sink.address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(envelope_lines(), 250)
        client.expect(250)
        client.command(b"DATA\r\n", 354)
        client.send(b"Subject: smuggled\r\n\r\nhalf\n.\n")
        assert client.expect(521).startswith(b"521 ")
        assert client.read_to_eof() == b""
    with WireClient(sink.address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(envelope_lines(), 250)
        client.expect(250)
        client.send(b"BDAT 100\r\npart")
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_to_eof() == b""
    wait_until(lambda: stored(sink.folder) == [])


def pipelined_messages(count: int, *, bdat: bool) -> tuple[bytes, list[bytes]]:
    """One write holding ``count`` transactions and QUIT, and their messages."""
    messages = [MESSAGE.replace(b"captured", b"message %d" % number) for number in range(count)]
    wire = b"EHLO client.test\r\n"
    for number, message in enumerate(messages):
        wire += envelope_lines(b"sender%d@example.org" % number)
        if bdat:
            wire += b"BDAT %d LAST\r\n" % len(message) + message
        else:
            wire += b"DATA\r\n" + stuff(message)
    return wire + b"QUIT\r\n", messages


@pytest.mark.parametrize("bdat", [False, True], ids=["data", "bdat"])
def test_pipelined_messages_answered_in_order(start: StartSink, bdat: bool) -> None:
    sink = start()
    wire, messages = pipelined_messages(4, bdat=bdat)
    with WireClient(sink.address) as client:
        client.expect(220)
        client.send(wire)
        # The client closes its side after the last command and still
        # reads every reply.
        client.sock.shutdown(socket.SHUT_WR)
        client.expect(250)
        idents = []
        for _ in messages:
            client.expect(250)
            client.expect(250)
            if not bdat:
                client.expect(354)
            idents.append(queued_id(client.expect(250)))
        client.expect(221)
        assert client.read_to_eof() == b""
    assert len(set(idents)) == len(messages)
    for number, (ident, message) in enumerate(zip(idents, messages, strict=True)):
        content, envelope = read_stored(sink.folder, ident)
        assert content == message
        assert envelope["mail_from"] == f"sender{number}@example.org"


def test_store_runs_off_the_event_loop_and_replies_keep_their_order(
    start: StartSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered = threading.Event()
    release = threading.Event()
    commit = mailbox.Mailbox.commit

    def slow_commit(self: mailbox.Mailbox, *args: Any) -> None:
        entered.set()
        assert release.wait(WAIT_S), "the test never released the store"
        commit(self, *args)

    monkeypatch.setattr(mailbox.Mailbox, "commit", slow_commit)
    sink = start()
    try:
        with WireClient(sink.address) as first, WireClient(sink.address) as second:
            first.expect(220)
            first.command(b"EHLO client.test\r\n", 250)
            first.command(envelope_lines(), 250)
            first.expect(250)
            first.command(b"DATA\r\n", 354)
            first.send(stuff(MESSAGE) + b"NOOP\r\n")
            assert entered.wait(WAIT_S), "the store never started"
            # The loop serves another client while the store is blocked.
            second.expect(220)
            second.command(b"EHLO other.test\r\n", 250)
            second.command(b"NOOP\r\n", 250)
            # Nothing is answered before the store has finished.
            first.sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                first.sock.recv(1)
            first.sock.settimeout(WAIT_S)
            release.set()
            ident = queued_id(first.expect(250))
            assert first.expect(250) == b"250 2.0.0 Ok\r\n"
            quit_session(first)
            quit_session(second)
    finally:
        release.set()
    assert read_stored(sink.folder, ident)[0] == MESSAGE


def test_failed_commit_answers_451_and_the_session_goes_on(start: StartSink) -> None:
    sink = start()
    folder = sink.folder
    with WireClient(sink.address) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(envelope_lines(), 250)
        client.expect(250)
        client.command(b"BDAT 5\r\nhello", 250)
        # The folder is replaced by a file between the chunks: the message
        # written so far cannot be renamed into place.
        folder.rename(folder.with_name("moved"))
        folder.write_bytes(b"")
        refused = client.command(b"BDAT 6 LAST\r\n world", 451)
        assert refused == b"451 4.3.0 Error: cannot store message\r\n"
        client.command(b"NOOP\r\n", 250)
        folder.unlink()
        folder.mkdir()
        client.command(envelope_lines(), 250)
        client.expect(250)
        client.command(b"DATA\r\n", 354)
        ident = queued_id(client.command(stuff(MESSAGE), 250))
        quit_session(client)
    assert read_stored(folder, ident)[0] == MESSAGE


SINK_READY = re.compile(r"sink listening on 127\.0\.0\.1:(\d+) ")


def test_sink_process_answers_451_for_an_unwritable_folder_and_stays_up(
    tmp_path: Path, loop_kind: str
) -> None:
    folder = tmp_path / "mail"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smtpwarden",
            "sink",
            "--listen",
            "127.0.0.1:0",
            "--dir",
            str(folder),
            "--event-loop",
            loop_kind,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read_lines() -> None:
        assert process.stderr is not None
        for raw in iter(process.stderr.readline, b""):
            lines.put(raw.decode("utf-8", "replace"))
        lines.put(None)

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while True:
            line = lines.get(timeout=START_TIMEOUT_S)
            assert line is not None, "the sink exited:\n" + "".join(seen)
            seen.append(line)
            found = SINK_READY.search(line)
            if found:
                port = int(found.group(1))
                break
        # Root ignores permissions, so the folder becomes a file instead:
        # every file the sink tries to create in it fails.
        folder.rmdir()
        folder.write_bytes(b"")
        with WireClient(("127.0.0.1", port)) as client:
            client.expect(220)
            client.command(b"EHLO client.test\r\n", 250)
            for _ in range(2):
                client.command(envelope_lines(), 250)
                client.expect(250)
                client.command(b"DATA\r\n", 354)
                refused = client.command(stuff(MESSAGE), 451)
                assert refused == b"451 4.3.0 Error: cannot store message\r\n"
            quit_session(client)
        assert process.poll() is None
        folder.unlink()
        folder.mkdir()
        with WireClient(("127.0.0.1", port)) as client:
            client.expect(220)
            client.command(b"EHLO client.test\r\n", 250)
            client.command(envelope_lines(), 250)
            client.expect(250)
            client.command(b"DATA\r\n", 354)
            ident = queued_id(client.command(stuff(MESSAGE), 250))
            quit_session(client)
        process.send_signal(signal.SIGTERM)
        code = process.wait(WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT_S)
        reader.join(WAIT_S)
        process.stderr.close()
    assert code == 0, "".join(seen)
    assert read_stored(folder, ident)[0] == MESSAGE
