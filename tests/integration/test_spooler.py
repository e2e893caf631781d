"""Delivering from the spool over real sockets: what reaches the upstream, what stays.

Entries are put into a spool in a temporary folder with ``put_sync``, then
``QueueRunner.deliver_one`` or ``run`` delivers them, once per event loop
kind. The spool and the runner share a clock the tests move by hand, so
backoff and maximum age are checked without waiting for them. Upstreams:
the recording one (exact bytes), aiosmtpd, and a small scripted server on
the test's own loop that answers each recipient as the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
import pytest

from integration.recording_upstreams import AiosmtpdUpstream, RawUpstream
from smtpwarden.config import Config, parse_config
from smtpwarden.net.loop import LoopChoice, loop_factory
from smtpwarden.net.spooler import QueueRunner
from smtpwarden.net.upstream import Target
from smtpwarden.observe.txlog import RecordLog
from smtpwarden.spool import (
    BodyKind,
    EntryBusy,
    EntryState,
    Envelope,
    Lease,
    NoSuchEntry,
    RecipientState,
    Spool,
    SpoolFull,
)

T = TypeVar("T")
Json = dict[str, Any]
Run = Callable[[Coroutine[Any, Any, T]], T]

WAIT_S = 10.0  # the bound on every wait for something to happen
TIMEOUTS = {
    "connect": 10.0,
    "banner": 10.0,
    "mail": 10.0,
    "rcpt": 10.0,
    "data_init": 10.0,
    "data_block": 10.0,
    "data_end": 10.0,
    "reply": 10.0,
}
INITIAL_S = 60.0  # the first backoff delay in these tests
MAX_AGE_S = 3600.0
START = 1_700_000_000.0

MAIL = b"MAIL FROM:<sender@example.org> SIZE=200"
RCPTS = (b"RCPT TO:<one@example.net>", b"RCPT TO:<two@example.net> NOTIFY=NEVER")
MESSAGE = (
    b"From: sender@example.org\r\n"
    b"Subject: spooled\r\n"
    b"\r\n"
    b".a line starting with one dot\r\n"
    b"..two dots\r\n"
    b"the end\r\n"
)
EHLO = b"EHLO relay.test\r\n"
MESSAGE_ID = re.compile(rb"Message-Id: <(\d+)@test>")


def stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2: the DATA section a client sends for ``message``."""
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


class Clock:
    """Epoch seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class Records(RecordLog):
    """The transaction log, also kept in memory as parsed JSON lines."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.items: list[Json] = []
        self._wanted = 0
        self._enough: asyncio.Event | None = None

    def write(self, record: object) -> None:
        super().write(record)
        self.items.append(orjson.loads(orjson.dumps(record)))
        if self._enough is not None and len(self.items) >= self._wanted:
            self._enough.set()

    async def wait_for(self, count: int) -> None:
        """Wait until ``count`` records were written; fail after WAIT_S."""
        self._wanted, self._enough = count, asyncio.Event()
        if len(self.items) < count:
            async with asyncio.timeout(WAIT_S):
                await self._enough.wait()


def make_config(
    *,
    workers: int = 4,
    max_age: float = MAX_AGE_S,
    jitter: float = 0.0,
    timeouts: dict[str, float] | None = None,
) -> Config:
    document = {
        "hostname": "relay.test",
        "listeners": [{"name": "in", "port": 0}],
        "upstreams": [{"name": "up", "kind": "smtp", "host": "127.0.0.1", "port": 25}],
        "spool": {
            "max_age": max_age,
            "workers": workers,
            "backoff": {"initial": INITIAL_S, "factor": 2, "maximum": 600, "jitter": jitter},
        },
        "timeouts": {**TIMEOUTS, **(timeouts or {})},
    }
    return parse_config(document, source="<test>")


def target(port: int, name: str = "up") -> Target:
    return Target(name=name, host="127.0.0.1", port=port)


def put(
    spool: Spool,
    *,
    recipients: tuple[bytes, ...] = RCPTS,
    message: bytes = MESSAGE,
    body: BodyKind = BodyKind.DATA,
    route: str = "main",
    duplicate_risk: bool = False,
) -> str:
    section = stuff(message) if body is BodyKind.DATA else message
    envelope = Envelope(
        mail_from=MAIL,
        recipients=recipients,
        body=body,
        transaction_id="tx-" + str(len(list(spool.entries()))),
        dedupe_key="dedupe",
        route=route,
        duplicate_risk=duplicate_risk,
    )
    return spool.put_sync(envelope, [section[:9], section[9:]])


@pytest.fixture
def run(loop_kind: str) -> Run[Any]:
    """Run a coroutine to completion on a fresh loop of the test's kind."""
    factory, _ = loop_factory(cast(LoopChoice, loop_kind))

    def run_on_loop(coroutine: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coroutine)

    return run_on_loop


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spool(tmp_path: Path, clock: Clock) -> Iterator[Spool]:
    with Spool(tmp_path / "spool", clock=clock) as opened:
        yield opened


@pytest.fixture
def records(tmp_path: Path) -> Iterator[Records]:
    log = Records(tmp_path / "transactions.jsonl")
    yield log
    log.close()
    written = [
        orjson.loads(line) for line in (tmp_path / "transactions.jsonl").read_bytes().splitlines()
    ]
    assert written == log.items


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port that refuses connections: bound, never listening, kept until the end."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def runner(
    spool: Spool,
    clock: Clock,
    records: Records | None,
    targets: list[Target],
    config: Config | None = None,
) -> QueueRunner:
    return QueueRunner(
        spool,
        targets={"main": targets},
        config=config or make_config(),
        records=records,
        clock=clock,
    )


def recipient_states(record: Json) -> list[tuple[str, str, int | None]]:
    return [
        (r["address"], r["state"], r["reply"]["code"] if r["reply"] else None)
        for r in record["recipients"]
    ]


# --- One entry, one upstream -----------------------------------------------------


def test_delivered_entry_arrives_byte_for_byte_and_leaves_the_spool(
    run: Run[None], spool: Spool, clock: Clock, records: Records, raw_upstream: RawUpstream
) -> None:
    queue_id = put(spool)
    clock.now += 5
    run(runner(spool, clock, records, [target(raw_upstream.port)]).deliver_one(queue_id))

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.commands == [
        EHLO,
        MAIL + b"\r\n",
        *(line + b"\r\n" for line in RCPTS),
        b"DATA\r\n",
        b"QUIT\r\n",
    ]
    assert conn.data == [stuff(MESSAGE)]
    with pytest.raises(NoSuchEntry):
        spool.get(queue_id)
    (record,) = records.items
    assert record["type"] == "delivery"
    assert record["queue_id"] == queue_id
    assert record["transaction_id"] == "tx-0"
    assert record["route"] == "main"
    assert record["outcome"] == "delivered"
    assert record["attempts"] == 1
    assert record["duplicate_risk"] is False
    assert record["reason"] is None
    assert record["upstream"] == {"name": "up", "address": "127.0.0.1", "port": raw_upstream.port}
    assert record["mail_from"] == "sender@example.org"
    assert record["queued_s"] == 5.0
    assert record["size"] == len(stuff(MESSAGE))
    assert recipient_states(record) == [
        ("one@example.net", "delivered", 250),
        ("two@example.net", "delivered", 250),
    ]
    assert record["recipients"][0]["reply"]["text"] == "Ok: queued"


def test_bdat_entry_reaches_a_server_without_chunking_unchanged(
    run: Run[None],
    spool: Spool,
    clock: Clock,
    records: Records,
    aiosmtpd_upstream: AiosmtpdUpstream,
) -> None:
    # aiosmtpd offers no DSN: it would refuse NOTIFY=NEVER.
    recipients = (b"RCPT TO:<one@example.net>", b"RCPT TO:<two@example.net>")
    queue_id = put(spool, body=BodyKind.BDAT, recipients=recipients)
    run(runner(spool, clock, records, [target(aiosmtpd_upstream.port)]).deliver_one(queue_id))

    aiosmtpd_upstream.wait_for(lambda: len(aiosmtpd_upstream.deliveries) == 1)
    (delivery,) = aiosmtpd_upstream.deliveries
    assert delivery.content == MESSAGE  # stuffed for DATA, unstuffed by the server
    assert delivery.rcpt_tos == ["one@example.net", "two@example.net"]
    assert [r["outcome"] for r in records.items] == ["delivered"]


def test_451_defers_with_backoff_and_the_entry_stays(
    run: Run[None], spool: Spool, clock: Clock, records: Records
) -> None:
    upstream = RawUpstream(replies={".": b"451 4.3.0 Try again later\r\n"})
    try:
        queue_id = put(spool)
        queue = runner(spool, clock, records, [target(upstream.port)], make_config(jitter=0.2))
        run(queue.deliver_one(queue_id))
        entry = spool.get(queue_id)
        assert entry.state is EntryState.DEFERRED
        assert entry.attempts == 1
        assert START + INITIAL_S * 0.8 <= entry.next_attempt <= START + INITIAL_S * 1.2
        assert entry.last_error == "up: 451 4.3.0 Try again later"
        assert [r.state for r in entry.recipients] == [RecipientState.PENDING] * 2
        assert records.items == []

        clock.now = entry.next_attempt - 1  # not due yet: nothing happens
        run(queue.deliver_one(queue_id))
        assert len(upstream.wait_all_ended()) == 1
        assert spool.get(queue_id).attempts == 1

        clock.now = entry.next_attempt  # due: tried again, deferred longer
        run(queue.deliver_one(queue_id))
        again = spool.get(queue_id)
        assert again.attempts == 2
        assert again.next_attempt >= clock.now + 2 * INITIAL_S * 0.8
        assert len(upstream.wait_all_ended(2)) == 2
    finally:
        upstream.close()


class ScriptedUpstream:
    """An SMTP server on the test's own loop that answers each RCPT as told.

    ``rcpt`` maps an address to its reply line (default 250). ``before_final``
    is awaited before the reply to the end of data. ``sessions`` holds, per
    connection, the addresses in its RCPT commands; ``messages`` each
    accepted message with the recipients it was accepted for; ``peak_open``
    the most connections open at once.
    """

    def __init__(
        self,
        rcpt: Callable[[str], bytes] | None = None,
        before_final: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._rcpt = rcpt or (lambda _address: b"250 2.1.5 Ok\r\n")
        self._before_final = before_final
        self.sessions: list[list[str]] = []
        self.messages: list[tuple[tuple[str, ...], bytes]] = []
        self.open = 0
        self.peak_open = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        counted = True
        asked: list[str] = []
        self.sessions.append(asked)
        accepted: list[str] = []
        try:
            writer.write(b"220 scripted.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-scripted.test\r\n250 ENHANCEDSTATUSCODES\r\n")
                elif verb == b"MAIL":
                    accepted = []
                    writer.write(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                    asked.append(address)
                    reply = self._rcpt(address)
                    if reply.startswith(b"2"):
                        accepted.append(address)
                    writer.write(reply)
                elif verb == b"DATA":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    section = await reader.readuntil(b"\r\n.\r\n")
                    if self._before_final is not None:
                        await self._before_final()
                    self.messages.append((tuple(accepted), section))
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    # Counted closed before the client can see the 221 and move on.
                    self.open -= 1
                    counted = False
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"502 5.5.2 Error: command not recognized\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if counted:
                self.open -= 1
            writer.close()


def test_partial_recipients_the_accepted_one_is_never_sent_again(
    run: Run[None], spool: Spool, clock: Clock, records: Records
) -> None:
    refused_once: set[str] = set()

    def rcpt(address: str) -> bytes:
        if address == "busy@example.net" and address not in refused_once:
            refused_once.add(address)
            return b"450 4.2.1 Mailbox busy, try later\r\n"
        if address == "gone@example.net":
            return b"550 5.1.1 No such user\r\n"
        return b"250 2.1.5 Ok\r\n"

    recipients = (
        b"RCPT TO:<ok@example.net>",
        b"RCPT TO:<busy@example.net>",
        b"RCPT TO:<gone@example.net>",
    )
    queue_id = put(spool, recipients=recipients)

    async def scenario() -> ScriptedUpstream:
        async with ScriptedUpstream(rcpt) as upstream:
            queue = runner(spool, clock, records, [target(upstream.port, "scripted")])
            await queue.deliver_one(queue_id)
            entry = spool.get(queue_id)
            assert entry.state is EntryState.DEFERRED
            assert entry.attempts == 1
            assert [r.state for r in entry.recipients] == [
                RecipientState.DELIVERED,
                RecipientState.PENDING,
                RecipientState.FAILED,
            ]
            assert entry.last_error == "scripted: RCPT 450 4.2.1 Mailbox busy, try later"
            assert records.items == []
            clock.now = entry.next_attempt
            await queue.deliver_one(queue_id)
            return upstream

    upstream = run(scenario())
    assert upstream.sessions == [
        ["ok@example.net", "busy@example.net", "gone@example.net"],
        ["busy@example.net"],
    ]
    section = stuff(MESSAGE)
    assert upstream.messages == [(("ok@example.net",), section), (("busy@example.net",), section)]
    with pytest.raises(NoSuchEntry):
        spool.get(queue_id)
    (record,) = records.items
    assert record["outcome"] == "delivered"
    assert record["attempts"] == 2
    assert recipient_states(record) == [
        ("ok@example.net", "delivered", 250),
        ("busy@example.net", "delivered", 250),
        ("gone@example.net", "failed", 550),
    ]


@pytest.mark.parametrize(
    ("verb", "reply", "code"),
    [
        ("RCPT", b"550 5.1.1 No such user\r\n", 550),
        (".", b"554 5.7.1 Message refused\r\n", 554),
        ("MAIL", b"553 5.7.1 Sender refused\r\n", 553),
    ],
    ids=["rcpt-550", "end-of-data-554", "mail-553"],
)
def test_permanent_refusal_fails_the_recipients_and_ends_the_entry(
    run: Run[None],
    spool: Spool,
    clock: Clock,
    records: Records,
    verb: str,
    reply: bytes,
    code: int,
) -> None:
    upstream = RawUpstream(replies={verb: reply})
    try:
        queue_id = put(spool)
        run(runner(spool, clock, records, [target(upstream.port)]).deliver_one(queue_id))
        assert len(upstream.wait_all_ended()) == 1
    finally:
        upstream.close()
    with pytest.raises(NoSuchEntry):
        spool.get(queue_id)
    (record,) = records.items
    assert record["outcome"] == "rejected"
    assert recipient_states(record) == [
        ("one@example.net", "failed", code),
        ("two@example.net", "failed", code),
    ]


def test_contradictory_250_is_not_a_delivery(
    run: Run[None], spool: Spool, clock: Clock, records: Records
) -> None:
    upstream = RawUpstream(replies={".": b"250 Mail transaction failed: see log\r\n"})
    try:
        queue_id = put(spool)
        run(runner(spool, clock, records, [target(upstream.port)]).deliver_one(queue_id))
    finally:
        upstream.close()
    entry = spool.get(queue_id)
    assert entry.state is EntryState.DEFERRED
    assert [r.state for r in entry.recipients] == [RecipientState.PENDING] * 2
    assert entry.last_error is not None
    assert entry.last_error.startswith("up: 250 Mail transaction failed")
    assert entry.duplicate_risk is True
    assert records.items == []


def test_lost_outcome_defers_and_the_final_record_flags_the_duplicate_risk(
    run: Run[None], spool: Spool, clock: Clock, records: Records
) -> None:
    # No reply to the end of data: the runner gives up after data_end.
    upstream = RawUpstream(replies={".": b""})
    try:
        queue_id = put(spool)
        config = make_config(timeouts={"data_end": 0.3})
        queue = runner(spool, clock, records, [target(upstream.port)], config)
        run(queue.deliver_one(queue_id))
        entry = spool.get(queue_id)
        assert entry.state is EntryState.DEFERRED
        assert entry.attempts == 1
        assert [r.state for r in entry.recipients] == [RecipientState.PENDING] * 2
        assert entry.last_error == "up: timeout waiting for reply to end of data"
        assert entry.duplicate_risk is True
        assert queue.lost_outcomes == 1
        assert records.items == []

        upstream.replies.clear()  # the upstream answers again
        clock.now = entry.next_attempt
        run(queue.deliver_one(queue_id))
        conns = upstream.wait_all_ended(2)
    finally:
        upstream.close()
    assert [conn.data for conn in conns] == [[stuff(MESSAGE)], [stuff(MESSAGE)]]
    assert not conns[0].quit  # the lost attempt's connection was aborted
    (record,) = records.items
    assert record["outcome"] == "delivered"
    assert record["attempts"] == 2
    assert record["duplicate_risk"] is True


def test_a_risk_from_before_spooling_survives_clean_attempts_and_reaches_the_record(
    run: Run[None], spool: Spool, clock: Clock, records: Records
) -> None:
    # Spooled by a relay whose replays may have delivered it already.
    upstream = RawUpstream(replies={".": b"451 4.3.0 Try again later\r\n"})
    try:
        queue_id = put(spool, duplicate_risk=True)
        queue = runner(spool, clock, records, [target(upstream.port)])
        run(queue.deliver_one(queue_id))
        entry = spool.get(queue_id)
        assert entry.state is EntryState.DEFERRED
        assert entry.last_error == "up: 451 4.3.0 Try again later"
        assert entry.duplicate_risk is True  # a clean 4xx does not clear it

        upstream.replies.clear()
        clock.now = entry.next_attempt
        run(queue.deliver_one(queue_id))
        assert len(upstream.wait_all_ended(2)) == 2
    finally:
        upstream.close()
    (record,) = records.items
    assert (record["outcome"], record["attempts"]) == ("delivered", 2)
    assert record["duplicate_risk"] is True


def test_outcome_that_cannot_be_written_is_kept_in_memory(
    run: Run[None],
    spool: Spool,
    clock: Clock,
    records: Records,
    raw_upstream: RawUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def full(self: Lease, entry: object) -> object:
        raise SpoolFull("cannot update: No space left on device")

    queue_id = put(spool)
    queue = runner(spool, clock, records, [target(raw_upstream.port)])
    with monkeypatch.context() as patch:
        patch.setattr(Lease, "update", full)
        with pytest.raises(SpoolFull):
            run(queue.deliver_one(queue_id))
        assert spool.get(queue_id).attempts == 0  # nothing written
        run(queue.deliver_one(queue_id))  # not again before the deferral ends
        assert len(raw_upstream.wait_all_ended()) == 1

    clock.now += INITIAL_S
    run(queue.deliver_one(queue_id))
    assert len(raw_upstream.wait_all_ended(2)) == 2  # delivered twice: at least once
    (record,) = records.items
    assert record["outcome"] == "delivered"
    assert record["duplicate_risk"] is True


# --- Age, leases, routes ---------------------------------------------------------


def test_entry_past_max_age_goes_to_dead_letters_untried(
    run: Run[None], spool: Spool, clock: Clock, records: Records, raw_upstream: RawUpstream
) -> None:
    queue_id = put(spool)
    clock.now = START + MAX_AGE_S
    run(runner(spool, clock, records, [target(raw_upstream.port)]).deliver_one(queue_id))

    assert raw_upstream.connections == []
    entry = spool.get(queue_id)
    assert entry.state is EntryState.DEAD
    assert entry.last_error == "older than max_age (3600 s); last error: None"
    (record,) = records.items
    assert record["outcome"] == "dead"
    assert record["reason"] == entry.last_error
    assert record["upstream"] is None
    assert record["attempts"] == 0
    assert recipient_states(record) == [
        ("one@example.net", "pending", None),
        ("two@example.net", "pending", None),
    ]


def test_last_deferral_ends_at_max_age_and_the_entry_dies_then(
    run: Run[None], spool: Spool, clock: Clock, records: Records
) -> None:
    upstream = RawUpstream(replies={"RCPT": b"452 4.2.2 Mailbox full\r\n"})
    try:
        queue_id = put(spool)
        queue = runner(spool, clock, records, [target(upstream.port)], make_config(max_age=100))
        clock.now = START + 50
        run(queue.deliver_one(queue_id))
        entry = spool.get(queue_id)
        assert entry.next_attempt == START + 100  # not START + 50 + INITIAL_S
        clock.now = entry.next_attempt
        run(queue.deliver_one(queue_id))
        assert len(upstream.wait_all_ended()) == 1
    finally:
        upstream.close()
    assert spool.get(queue_id).state is EntryState.DEAD
    (record,) = records.items
    assert record["outcome"] == "dead"
    assert record["attempts"] == 1
    assert (
        record["reason"]
        == "older than max_age (100 s); last error: up: RCPT 452 4.2.2 Mailbox full"
    )
    assert recipient_states(record) == [
        ("one@example.net", "pending", 452),
        ("two@example.net", "pending", 452),
    ]


def test_entry_held_by_another_lease_or_on_hold_is_skipped(
    run: Run[None], spool: Spool, clock: Clock, records: Records, raw_upstream: RawUpstream
) -> None:
    queue_id = put(spool)
    queue = runner(spool, clock, records, [target(raw_upstream.port)])
    with spool.lease(queue_id):
        run(queue.deliver_one(queue_id))
    assert raw_upstream.connections == []
    assert spool.get(queue_id).attempts == 0

    spool.hold(queue_id)
    run(queue.deliver_one(queue_id))
    assert raw_upstream.connections == []

    spool.release(queue_id)
    run(queue.deliver_one(queue_id))
    assert len(raw_upstream.wait_all_ended()) == 1
    assert [r["outcome"] for r in records.items] == ["delivered"]


def test_unreachable_first_upstream_fails_over_to_the_second(
    run: Run[None],
    spool: Spool,
    clock: Clock,
    records: Records,
    raw_upstream: RawUpstream,
    refused_port: int,
) -> None:
    queue_id = put(spool)
    targets = [target(refused_port, "down"), target(raw_upstream.port, "up")]
    run(runner(spool, clock, records, targets).deliver_one(queue_id))

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.data == [stuff(MESSAGE)]
    (record,) = records.items
    assert record["outcome"] == "delivered"
    assert record["upstream"]["name"] == "up"


def test_every_upstream_unreachable_defers_naming_each(
    run: Run[None], spool: Spool, clock: Clock, records: Records, refused_port: int
) -> None:
    queue_id = put(spool)
    targets = [target(refused_port, "first"), target(refused_port, "second")]
    run(runner(spool, clock, records, targets).deliver_one(queue_id))

    entry = spool.get(queue_id)
    assert entry.state is EntryState.DEFERRED
    assert entry.last_error is not None
    assert re.fullmatch(r"first: connect: .+; second: connect: .+", entry.last_error)
    assert entry.duplicate_risk is False


def test_entry_of_an_unknown_route_is_deferred(
    run: Run[None], spool: Spool, clock: Clock, records: Records
) -> None:
    queue_id = put(spool, route="gone")
    run(runner(spool, clock, records, []).deliver_one(queue_id))
    entry = spool.get(queue_id)
    assert entry.state is EntryState.DEFERRED
    assert entry.last_error == "no upstream for route 'gone'"


# --- The runner ----------------------------------------------------------------------


class Batches:
    """Holds each final reply until ``size`` messages wait for theirs (or all are in).

    With N workers the gate opens only if N deliveries run at once; ``peak``
    is the most that ever waited together.
    """

    def __init__(self, size: int, total: int) -> None:
        self.size = size
        self.total = total
        self.waiting = 0
        self.released = 0
        self.peak = 0
        self._generation = 0
        self._changed = asyncio.Condition()

    async def __call__(self) -> None:
        async with self._changed:
            generation = self._generation
            self.waiting += 1
            self.peak = max(self.peak, self.waiting)
            if self.waiting >= self.size or self.released + self.waiting >= self.total:
                self.released += self.waiting
                self.waiting = 0
                self._generation += 1
                self._changed.notify_all()
            else:
                await self._changed.wait_for(lambda: self._generation != generation)


def test_run_delivers_a_batch_with_four_workers_each_message_once(
    run: Run[None], spool: Spool, clock: Clock, records: Records
) -> None:
    count, workers = 50, 4
    ids = [
        put(spool, message=b"Message-Id: <%d@test>\r\n\r\nbody %d\r\n" % (n, n))
        for n in range(count)
    ]

    async def scenario() -> tuple[ScriptedUpstream, Batches]:
        gate = Batches(workers, count)
        async with ScriptedUpstream(before_final=gate) as upstream:
            queue = runner(
                spool, clock, records, [target(upstream.port)], make_config(workers=workers)
            )
            task = asyncio.get_running_loop().create_task(queue.run())
            try:
                await records.wait_for(count)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            return upstream, gate

    upstream, gate = run(scenario())
    assert gate.peak == workers
    assert upstream.peak_open == workers
    numbers = sorted(int(n) for _, m in upstream.messages for n in MESSAGE_ID.findall(m))
    assert numbers == list(range(count))  # each message once, none lost
    assert list(spool.entries()) == []
    assert sorted(r["queue_id"] for r in records.items) == sorted(ids)
    assert {r["outcome"] for r in records.items} == {"delivered"}


def test_run_picks_up_a_new_entry_when_woken(
    run: Run[None], spool: Spool, clock: Clock, records: Records, raw_upstream: RawUpstream
) -> None:
    async def scenario() -> str:
        queue = runner(spool, clock, records, [target(raw_upstream.port)])
        task = asyncio.get_running_loop().create_task(queue.run())
        try:
            queue_id = await asyncio.to_thread(put, spool)
            queue.wake()
            await records.wait_for(1)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return queue_id

    queue_id = run(scenario())
    assert [r["queue_id"] for r in records.items] == [queue_id]
    assert len(raw_upstream.wait_all_ended()) == 1


def test_cancelling_run_aborts_the_delivery_and_releases_the_lease(
    run: Run[None], spool: Spool, clock: Clock, records: Records
) -> None:
    upstream = RawUpstream(replies={".": b""})  # the final reply never comes
    try:
        queue_id = put(spool)

        async def scenario() -> None:
            queue = runner(spool, clock, records, [target(upstream.port)])
            task = asyncio.get_running_loop().create_task(queue.run())
            await asyncio.to_thread(
                upstream.wait_for, lambda conns: bool(conns) and bool(conns[0].data)
            )
            with pytest.raises(EntryBusy):
                spool.lease(queue_id, timeout=0).close()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run(scenario())
        (conn,) = upstream.wait_all_ended()
    finally:
        upstream.close()
    assert not conn.quit
    with spool.lease(queue_id, timeout=0) as lease:  # released
        assert lease.entry.state is EntryState.QUEUED
        assert lease.entry.attempts == 0
    assert records.items == []


def test_cancelled_while_taking_the_lease_releases_it(
    run: Run[None],
    spool: Spool,
    clock: Clock,
    records: Records,
    raw_upstream: RawUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue_id = put(spool)
    entered, proceed = threading.Event(), threading.Event()
    taken: list[Lease] = []
    real_lease = spool.lease

    def slow_lease(queue_id: str, *, timeout: float | None = 0.0) -> Lease:
        entered.set()
        proceed.wait(WAIT_S)
        lease = real_lease(queue_id, timeout=timeout)
        taken.append(lease)
        return lease

    monkeypatch.setattr(spool, "lease", slow_lease)

    async def scenario() -> None:
        queue = runner(spool, clock, records, [target(raw_upstream.port)])
        task = asyncio.get_running_loop().create_task(queue.deliver_one(queue_id))
        assert await asyncio.to_thread(entered.wait, WAIT_S)
        task.cancel()  # while the lease is being taken in its thread
        proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    (lease,) = taken
    assert not lease.active
    assert raw_upstream.connections == []
    assert spool.get(queue_id).attempts == 0
