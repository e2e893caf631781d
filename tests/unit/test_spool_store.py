"""The spool's storage layer: entries, states, crash leftovers, write failures, locks."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.spool import (
    BodyKind,
    CorruptEntry,
    Entry,
    EntryBusy,
    EntryState,
    Envelope,
    InvalidTransition,
    NoSuchEntry,
    RecipientState,
    Spool,
    SpoolError,
    SpoolFull,
    codec,
)
from smtpwarden.spool.files import fsync_dir as real_fsync_dir
from smtpwarden.spool.model import QUEUE_ID

ENVELOPE = Envelope(
    mail_from=b"MAIL FROM:<sender@example.org> SIZE=100 BODY=8BITMIME\r\n",
    recipients=(b"RCPT TO:<a@example.net>\r\n", b"RCPT TO:<b@example.net>", b"RCPT TO:<c@x.test>"),
    body=BodyKind.DATA,
    transaction_id="tx-1",
    dedupe_key="dedupe-1",
    route="main",
)
MESSAGE = b"Subject: hi\r\n\r\n..a stuffed dot\r\nend\r\n.\r\n"
OK = ReplyInfo(code=250, enhanced="2.0.0", text="Ok: queued as X", local=False)
FULL = ReplyInfo(code=552, enhanced="5.2.2", text="Mailbox full", local=False)


class Clock:
    """Epoch seconds that advance one second a call."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spool(tmp_path: Path, clock: Clock) -> Iterator[Spool]:
    with Spool(tmp_path / "spool", clock=clock) as opened:
        yield opened


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_put_then_get_round_trip(spool: Spool, clock: Clock) -> None:
    queue_id = spool.put_sync(ENVELOPE, [MESSAGE[:10], memoryview(MESSAGE[10:])])
    assert QUEUE_ID.match(queue_id)
    entry = spool.get(queue_id)
    assert entry.queue_id == queue_id
    assert entry.state is EntryState.QUEUED
    assert entry.created == clock.now
    assert entry.next_attempt == entry.created
    assert (entry.attempts, entry.last_error) == (0, None)
    assert entry.mail_from == b"MAIL FROM:<sender@example.org> SIZE=100 BODY=8BITMIME"
    assert entry.sender == "sender@example.org"
    assert [r.line for r in entry.recipients] == [
        b"RCPT TO:<a@example.net>",
        b"RCPT TO:<b@example.net>",
        b"RCPT TO:<c@x.test>",
    ]
    assert [r.address for r in entry.recipients] == ["a@example.net", "b@example.net", "c@x.test"]
    assert all(r.state is RecipientState.PENDING and r.reply is None for r in entry.recipients)
    assert entry.pending == (0, 1, 2)
    assert (entry.body, entry.size) == (BodyKind.DATA, len(MESSAGE))
    assert entry.sha256 == hashlib.sha256(MESSAGE).hexdigest()
    assert (entry.transaction_id, entry.dedupe_key, entry.route) == ("tx-1", "dedupe-1", "main")
    with spool.open_message(queue_id) as stream:
        assert stream.read() == MESSAGE
    assert listing(spool.layout.queue) == [f"{queue_id}.env", f"{queue_id}.msg"]
    assert listing(spool.layout.tmp) == []


def test_ids_sort_by_time_and_entries_list_oldest_first(spool: Spool) -> None:
    bdat = replace(ENVELOPE, body=BodyKind.BDAT)
    ids = [spool.put_sync(bdat, [b"octets %d" % n]) for n in range(5)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    assert [e.queue_id for e in spool.entries()] == ids
    spool.hold(ids[1])
    spool.to_dead(ids[3], "too old")
    assert [e.queue_id for e in spool.entries(EntryState.QUEUED)] == [ids[0], ids[2], ids[4]]
    assert [e.queue_id for e in spool.entries(EntryState.HELD)] == [ids[1]]
    assert [e.queue_id for e in spool.entries(EntryState.DEAD)] == [ids[3]]


def test_async_put_shares_commits(spool: Spool) -> None:
    async def main() -> list[str]:
        return await asyncio.gather(*(spool.put(ENVELOPE, [MESSAGE]) for _ in range(40)))

    ids = asyncio.run(main())
    assert len(set(ids)) == 40
    assert sorted(e.queue_id for e in spool.entries()) == sorted(ids)
    committer = spool.writer.committer
    assert committer is not None
    assert committer.items == 40
    assert committer.batches <= 40


def test_lines_that_are_not_utf8_survive(spool: Spool) -> None:
    envelope = replace(
        ENVELOPE,
        mail_from=b"MAIL FROM:<s@example.org> X-TAG=\xff\xfe",
        recipients=(b"RCPT TO:<\xc3\xa9l\xc3\xa8ve@example.net>",),
    )
    queue_id = spool.put_sync(envelope, [MESSAGE])
    entry = spool.get(queue_id)
    assert entry.mail_from == b"MAIL FROM:<s@example.org> X-TAG=\xff\xfe"
    assert entry.recipients[0].address == "élève@example.net"
    raw = spool.layout.envelope(queue_id).read_bytes()
    assert b'"base64"' in raw
    assert "élève".encode() in raw


@pytest.mark.parametrize(
    ("envelope", "chunks"),
    [
        pytest.param(replace(ENVELOPE, recipients=()), [MESSAGE], id="no-recipient"),
        pytest.param(
            replace(ENVELOPE, mail_from=b"MAIL FROM:<a@b>\r\nRSET"), [MESSAGE], id="crlf-inside"
        ),
        pytest.param(replace(ENVELOPE, recipients=(b"RCPT TO:<a@b>\n",)), [MESSAGE], id="bare-lf"),
        pytest.param(ENVELOPE, [b"Subject: x\r\n\r\nno end\r\n"], id="no-terminator"),
        pytest.param(ENVELOPE, [b"Subject: x\r\n\r\nbad end\n.\n"], id="lf-terminator"),
        pytest.param(ENVELOPE, [b"text.\r\n"], id="dot-not-on-its-own-line"),
    ],
)
def test_put_refuses_what_could_not_be_replayed_faithfully(
    spool: Spool, envelope: Envelope, chunks: list[bytes]
) -> None:
    with pytest.raises(ValueError, match=r"recipient|CR or LF|<CRLF>\.<CRLF>"):
        spool.put_sync(envelope, chunks)
    assert listing(spool.layout.queue) == []
    assert listing(spool.layout.tmp) == []


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        pytest.param(BodyKind.DATA, [b".\r\n"], id="empty-data"),
        pytest.param(BodyKind.DATA, [b"a\r\n.", b"\r", b"\n"], id="terminator-split"),
        pytest.param(BodyKind.BDAT, [b"binary\x00\r\nno terminator"], id="bdat"),
        pytest.param(BodyKind.BDAT, [], id="empty-bdat"),
    ],
)
def test_put_accepts_every_body_form(spool: Spool, kind: BodyKind, data: list[bytes]) -> None:
    queue_id = spool.put_sync(replace(ENVELOPE, body=kind), data)
    with spool.open_message(queue_id) as stream:
        assert stream.read() == b"".join(data)


def test_recipients_settle_one_by_one_and_never_twice(spool: Spool) -> None:
    queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
    entry = spool.mark_delivered(queue_id, 0, OK)
    assert entry.recipients[0].state is RecipientState.DELIVERED
    assert entry.recipients[0].reply == OK
    assert entry.pending == (1, 2)
    assert spool.get(queue_id) == entry
    with pytest.raises(InvalidTransition, match="already delivered"):
        spool.mark_delivered(queue_id, 0, OK)
    with pytest.raises(InvalidTransition, match="already delivered"):
        spool.mark_failed(queue_id, [0, 1], FULL)
    assert spool.get(queue_id) == entry  # a refused change writes nothing
    with pytest.raises(IndexError):
        spool.mark_delivered(queue_id, 7, OK)
    # A stale copy cannot turn the delivered recipient back to pending.
    stale = replace(
        entry, recipients=tuple(replace(r, state=RecipientState.PENDING) for r in entry.recipients)
    )
    with pytest.raises(InvalidTransition):
        spool.update(stale)
    entry = spool.mark_failed(queue_id, 1, FULL)
    assert entry.pending == (2,)
    done = spool.mark_delivered(queue_id, [2], OK)
    assert done.finished
    assert [r.state for r in done.recipients] == [
        RecipientState.DELIVERED,
        RecipientState.FAILED,
        RecipientState.DELIVERED,
    ]
    with pytest.raises(NoSuchEntry):
        spool.get(queue_id)
    assert listing(spool.layout.queue) == []


def test_update_keeps_what_identifies_the_message(spool: Spool) -> None:
    entry = spool.get(spool.put_sync(ENVELOPE, [MESSAGE]))
    for change in (
        {"sha256": "0" * 64},
        {"size": 1},
        {"mail_from": b"MAIL FROM:<other@example.org>"},
        {"recipients": entry.recipients[:1]},
        {"created": 0.0},
    ):
        with pytest.raises(ValueError, match="cannot change"):
            spool.update(replace(entry, **change))
    moved = spool.update(replace(entry, route="other", last_error="note"))
    assert spool.get(entry.queue_id) == moved


def test_duplicate_risk_round_trips_through_the_envelope_file(spool: Spool) -> None:
    plain = spool.put_sync(ENVELOPE, [MESSAGE])
    risky = spool.put_sync(replace(ENVELOPE, duplicate_risk=True), [MESSAGE])
    assert spool.get(plain).duplicate_risk is False
    assert spool.get(risky).duplicate_risk is True
    assert orjson.loads(spool.layout.envelope(plain).read_bytes())["duplicate_risk"] is False
    assert orjson.loads(spool.layout.envelope(risky).read_bytes())["duplicate_risk"] is True
    entry = spool.get(risky)
    assert codec.decode(codec.encode(entry), risky) == entry


def test_an_envelope_file_from_before_duplicate_risk_still_loads(spool: Spool) -> None:
    queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
    document = orjson.loads(spool.layout.envelope(queue_id).read_bytes())
    del document["duplicate_risk"]  # as earlier versions wrote it
    spool.layout.envelope(queue_id).write_bytes(orjson.dumps(document))
    entry = spool.get(queue_id)
    assert entry.duplicate_risk is False
    assert [e.queue_id for e in spool.entries()] == [queue_id]
    # The next change writes the key.
    spool.hold(queue_id)
    assert b'"duplicate_risk": false' in spool.layout.envelope(queue_id).read_bytes()


def test_a_duplicate_risk_that_is_not_a_boolean_is_damage(spool: Spool) -> None:
    queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
    document = orjson.loads(spool.layout.envelope(queue_id).read_bytes())
    document["duplicate_risk"] = "yes"
    spool.layout.envelope(queue_id).write_bytes(orjson.dumps(document))
    with pytest.raises(CorruptEntry, match="duplicate_risk should be true or false"):
        spool.get(queue_id)


def test_an_update_sets_the_duplicate_risk_and_nothing_clears_it(
    tmp_path: Path, clock: Clock
) -> None:
    with Spool(tmp_path / "spool", clock=clock) as spool:
        queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
        entry = spool.defer(queue_id, "451 4.3.0 busy", clock.now + 60)
        assert entry.duplicate_risk is False
        entry = spool.defer(queue_id, "up: no reply", clock.now + 60, duplicate_risk=True)
        assert (entry.duplicate_risk, entry.last_error) == (True, "up: no reply")
        # A later clean attempt leaves it set, and so does every other change.
        assert spool.defer(queue_id, "451 4.3.0 busy", clock.now + 60).duplicate_risk
        assert spool.hold(queue_id).duplicate_risk
        assert spool.release(queue_id).duplicate_risk
        assert spool.mark_delivered(queue_id, 0, OK).duplicate_risk
        with pytest.raises(ValueError, match="duplicate_risk cannot be cleared"):
            spool.update(replace(spool.get(queue_id), duplicate_risk=False))
        assert spool.get(queue_id).duplicate_risk is True
        # Set through a plain update too.
        other = spool.get(spool.put_sync(ENVELOPE, [MESSAGE]))
        assert spool.update(replace(other, duplicate_risk=True)).duplicate_risk
        dead = spool.to_dead(
            spool.put_sync(ENVELOPE, [MESSAGE]), "too old", duplicate_risk=True
        ).queue_id
    # What was written survives a restart and its crash recovery.
    with Spool(tmp_path / "spool", clock=clock) as reopened:
        report = reopened.recover()
        assert {e.queue_id: e.duplicate_risk for e in report.resume} == {
            queue_id: True,
            other.queue_id: True,
        }
        assert reopened.get(dead).duplicate_risk is True
        assert reopened.get(queue_id).recipients[0].state is RecipientState.DELIVERED


def test_defer_counts_attempts_and_due_follows_next_attempt(spool: Spool) -> None:
    first = spool.put_sync(ENVELOPE, [MESSAGE])
    second = spool.put_sync(ENVELOPE, [MESSAGE])
    created = spool.get(second).created
    entry = spool.defer(first, "451 4.3.0 try later", created + 300)
    assert entry.state is EntryState.DEFERRED
    assert (entry.attempts, entry.last_error) == (1, "451 4.3.0 try later")
    entry = spool.defer(first, "421 closing", created + 900)
    assert entry.attempts == 2
    assert spool.due(created) == [second]
    assert spool.due(created + 900) == [first, second]


def test_due_reads_an_envelope_again_only_when_its_file_changed(spool: Spool, clock: Clock) -> None:
    first = spool.put_sync(ENVELOPE, [MESSAGE])
    second = spool.put_sync(ENVELOPE, [MESSAGE])
    later = clock.now + 10
    assert spool.due(later) == [first, second]
    # Overwritten in place with the same size and modification time: the
    # file did not change as far as due() can tell, so it is not read again
    # (read, the damaged envelope would leave the entry out).
    path = spool.layout.envelope(first)
    kept, raw = path.stat(), path.read_bytes()
    with open(path, "r+b") as envelope:
        envelope.write(b"x" * len(raw))
    os.utime(path, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert spool.due(later) == [first, second]
    with open(path, "r+b") as envelope:
        envelope.write(raw)
    # Changed through the spool (a new file), an envelope is read again.
    spool.defer(second, "451 4.3.0 try later", later + 600)
    assert spool.due(later) == [first]
    spool.hold(first)
    assert spool.due(later) == []
    assert [seen.state for seen in spool.look().values()] == [
        EntryState.HELD,
        EntryState.DEFERRED,
    ]
    spool.release(first)
    assert spool.due(later) == [first]
    spool.delete(first)
    assert spool.due(later + 600) == [second]


def test_hold_release_retry_dead_delete(spool: Spool, clock: Clock) -> None:
    queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
    assert spool.hold(queue_id).state is EntryState.HELD
    assert spool.hold(queue_id).state is EntryState.HELD
    with pytest.raises(InvalidTransition):
        spool.defer(queue_id, "busy", 0.0)
    assert spool.due(clock.now + 10**6) == []
    assert spool.release(queue_id).state is EntryState.QUEUED  # never tried: queued
    later = clock.now + 10**6
    spool.defer(queue_id, "busy", later)
    spool.hold(queue_id)
    released = spool.release(queue_id)
    assert released.state is EntryState.DEFERRED  # tried before: deferred, same time
    assert released.next_attempt == later
    retried = spool.retry_now(queue_id)
    assert (retried.state, retried.next_attempt) == (EntryState.QUEUED, clock.now)
    dead = spool.to_dead(queue_id, "expired after 5 days")
    assert (dead.state, dead.last_error) == (EntryState.DEAD, "expired after 5 days")
    with pytest.raises(InvalidTransition):
        spool.hold(queue_id)
    with pytest.raises(InvalidTransition):
        spool.release(queue_id)
    assert spool.retry_now(queue_id).state is EntryState.QUEUED  # back from the dead
    removed = spool.delete(queue_id)
    assert removed.queue_id == queue_id
    with pytest.raises(NoSuchEntry):
        spool.delete(queue_id)
    assert listing(spool.layout.queue) == []


@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda s, i: s.get(i), id="get"),
        pytest.param(lambda s, i: s.open_message(i), id="open_message"),
        pytest.param(lambda s, i: s.delete(i), id="delete"),
        pytest.param(lambda s, i: s.hold(i), id="hold"),
        pytest.param(lambda s, i: s.lease(i), id="lease"),
    ],
)
@pytest.mark.parametrize(
    "queue_id", ["../spool.lock", "x/../../etc/passwd", "", "20250101T000000.000000-zzzzzzzz"]
)
def test_malformed_ids_never_reach_a_path(
    spool: Spool, operation: Callable[[Spool, str], object], queue_id: str
) -> None:
    with pytest.raises(NoSuchEntry, match="not a queue id"):
        operation(spool, queue_id)


def test_a_damaged_envelope_is_reported_by_get_and_skipped_by_entries(spool: Spool) -> None:
    good = spool.put_sync(ENVELOPE, [MESSAGE])
    bad = spool.put_sync(ENVELOPE, [MESSAGE])
    spool.layout.envelope(bad).write_bytes(b'{"version": 1, "id": 3}')
    with pytest.raises(SpoolError, match="id should be a string"):
        spool.get(bad)
    assert [e.queue_id for e in spool.entries()] == [good]


def committed(spool: Spool, queue_id: str) -> tuple[bytes, bytes]:
    return (
        spool.layout.message(queue_id).read_bytes(),
        spool.layout.envelope(queue_id).read_bytes(),
    )


def test_recover_removes_leftovers_and_quarantines_damage(spool: Spool, clock: Clock) -> None:
    layout = spool.layout
    queued = spool.put_sync(ENVELOPE, [MESSAGE])
    deferred = spool.put_sync(ENVELOPE, [MESSAGE])
    spool.defer(deferred, "451 later", clock.now + 60)
    held = spool.put_sync(ENVELOPE, [MESSAGE])
    spool.hold(held)
    dead = spool.put_sync(ENVELOPE, [MESSAGE])
    spool.to_dead(dead, "gave up")
    template = spool.get(queued)

    # A put killed at step 1 (tmp/ only) or between its two renames.
    (layout.tmp / "20250101T000000.000001-aaaaaaaa.msg").write_bytes(MESSAGE[:7])
    (layout.tmp / "20250101T000000.000001-aaaaaaaa.env").write_bytes(b"{")
    (layout.tmp / f"{queued}.env.1234abcd").write_bytes(b"{")  # an update killed
    orphan = "20250101T000000.000002-aaaaaaaa"
    layout.message(orphan).write_bytes(MESSAGE)
    # Damage no crash of this code can cause: each goes to quarantine/.
    lonely = "20250101T000000.000003-aaaaaaaa"
    layout.envelope(lonely).write_bytes(codec.encode(replace(template, queue_id=lonely)))
    garbled = "20250101T000000.000004-aaaaaaaa"
    layout.message(garbled).write_bytes(MESSAGE)
    layout.envelope(garbled).write_bytes(b"\x00\x00\x00")
    truncated = "20250101T000000.000005-aaaaaaaa"
    layout.message(truncated).write_bytes(MESSAGE[:-3])
    layout.envelope(truncated).write_bytes(codec.encode(replace(template, queue_id=truncated)))
    (layout.queue / "README").write_text("left alone")

    report = spool.recover()
    assert report.cleaned
    assert report.temp_removed == 3
    assert report.orphans_removed == 1
    assert [q for q, _ in report.quarantined] == [lonely, garbled, truncated]
    assert [e.queue_id for e in report.resume] == [queued, deferred]
    assert (report.held, report.dead) == (1, 1)
    assert listing(layout.tmp) == []
    damaged = [f"{lonely}.env", f"{garbled}.env", f"{garbled}.msg"]
    damaged += [f"{truncated}.env", f"{truncated}.msg"]
    assert listing(layout.quarantine) == sorted(damaged)
    expected = sorted(f"{q}.{s}" for q in (queued, deferred, held, dead) for s in ("env", "msg"))
    assert listing(layout.queue) == sorted([*expected, "README"])
    assert committed(spool, queued)[0] == MESSAGE
    assert spool.recover().quarantined == ()  # nothing left to do


def test_recover_skips_cleanup_while_another_process_has_the_spool(
    spool: Spool, tmp_path: Path
) -> None:
    queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
    leftover = spool.layout.tmp / "20250101T000000.000001-aaaaaaaa.msg"
    leftover.write_bytes(b"x")
    # flock locks belong to an open file, so a second Spool is "another process".
    with Spool(tmp_path / "spool"):
        report = spool.recover(wait=0.05)
        assert not report.cleaned
        assert report.summary().endswith("(no cleanup: another process has the spool open)")
        assert [e.queue_id for e in report.resume] == [queue_id]
        assert leftover.exists()
    assert spool.recover(wait=0.05).temp_removed == 1
    assert spool.put_sync(ENVELOPE, [MESSAGE])  # the shared lock is back


def test_recover_refuses_to_run_beside_a_put(spool: Spool) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"Subject: x\r\n"
        spool.recover()  # a put of this Spool is under way: its tmp/ files must stay
        yield b".\r\n"

    with pytest.raises(SpoolError, match="beside a put"):
        spool.put_sync(ENVELOPE, chunks())
    assert listing(spool.layout.tmp) == []


def test_a_closed_spool_refuses_puts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
    spool.close()
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        spool.put_sync(ENVELOPE, [MESSAGE])
    with pytest.raises(SpoolError, match="closed"):
        asyncio.run(spool.put(ENVELOPE, [MESSAGE]))
    with Spool(tmp_path / "spool") as reopened:
        assert [e.queue_id for e in reopened.entries()] == [queue_id]


def test_a_spool_path_that_is_a_file_raises_spool_error(tmp_path: Path) -> None:
    path = tmp_path / "not-a-folder"
    path.write_bytes(b"")
    with pytest.raises(SpoolError, match="cannot open spool") as caught:
        Spool(path)
    assert caught.value.errno in (errno.EEXIST, errno.ENOTDIR)


def test_an_unwritable_tmp_folder_fails_the_put_and_leaves_nothing(spool: Spool) -> None:
    spool.layout.tmp.rmdir()
    spool.layout.tmp.write_bytes(b"")  # writes into tmp/ now fail with ENOTDIR
    with pytest.raises(SpoolError) as caught:
        spool.put_sync(ENVELOPE, [MESSAGE])
    assert not isinstance(caught.value, SpoolFull)
    assert caught.value.errno == errno.ENOTDIR
    assert listing(spool.layout.queue) == []


def failing_after(calls: int, code: int, real: Callable[..., object]) -> Callable[..., object]:
    """A stand-in for an os function: the first ``calls`` calls pass, then OSError(code)."""
    seen = [0]

    def fake(*args: object) -> object:
        seen[0] += 1
        if seen[0] > calls:
            raise OSError(code, os.strerror(code))
        return real(*args)

    return fake


@pytest.mark.parametrize(
    ("name", "calls", "code", "expected"),
    [
        pytest.param("write", 0, errno.ENOSPC, SpoolFull, id="message-enospc"),
        pytest.param("write", 1, errno.ENOSPC, SpoolFull, id="envelope-enospc"),
        pytest.param("write", 0, errno.EDQUOT, SpoolFull, id="quota"),
        pytest.param("fsync", 0, errno.EIO, SpoolError, id="message-fsync-eio"),
        pytest.param("fsync", 1, errno.EROFS, SpoolError, id="envelope-fsync-erofs"),
        pytest.param("fsync", 2, errno.EIO, SpoolError, id="queue-fsync"),
        pytest.param("fsync", 3, errno.EIO, SpoolError, id="last-queue-fsync"),
        pytest.param("rename", 0, errno.EACCES, SpoolError, id="message-rename"),
        pytest.param("rename", 1, errno.EACCES, SpoolError, id="envelope-rename"),
    ],
)
@pytest.mark.parametrize("group_commit", [True, False], ids=["group", "alone"])
def test_a_failed_write_raises_and_leaves_nothing_in_queue(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    calls: int,
    code: int,
    expected: type[SpoolError],
    group_commit: bool,
) -> None:
    with Spool(tmp_path / "spool", group_commit=group_commit) as spool:
        kept = spool.put_sync(ENVELOPE, [MESSAGE])
        before = listing(spool.layout.queue)
        with monkeypatch.context() as patch:
            patch.setattr(os, name, failing_after(calls, code, getattr(os, name)))
            with pytest.raises(expected) as caught:
                spool.put_sync(ENVELOPE, [MESSAGE])
        assert type(caught.value) is expected
        assert caught.value.errno == code
        assert listing(spool.layout.queue) == before
        assert listing(spool.layout.tmp) == []
        assert [e.queue_id for e in spool.entries()] == [kept]
        assert spool.put_sync(ENVELOPE, [MESSAGE])  # the next put works


def test_an_error_from_the_chunks_propagates_and_leaves_nothing(spool: Spool) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"Subject: x\r\n"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        spool.put_sync(ENVELOPE, chunks())
    assert listing(spool.layout.queue) == []
    assert listing(spool.layout.tmp) == []


def test_a_write_failure_during_update_keeps_the_old_envelope(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
    before = committed(spool, queue_id)
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", failing_after(0, errno.ENOSPC, os.write))
        with pytest.raises(SpoolFull):
            spool.hold(queue_id)
    assert committed(spool, queue_id) == before
    assert listing(spool.layout.tmp) == []


def test_concurrent_puts_share_commits_and_none_returns_before_its_fsync(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each put returns only after a folder fsync that saw its envelope in queue/."""
    log: list[tuple[str, frozenset[str]]] = []
    lock = threading.Lock()
    first = threading.Event()

    def fsync_dir(folder: Path) -> None:
        if not first.is_set():
            first.set()
            threading.Event().wait(0.2)  # let the other writers pile up
        real_fsync_dir(folder)
        with lock:
            log.append(
                ("fsync", frozenset(n[:-4] for n in os.listdir(folder) if n.endswith(".env")))
            )

    monkeypatch.setattr("smtpwarden.spool.put.fsync_dir", fsync_dir)
    writers, each = 8, 5
    start = threading.Barrier(writers)

    def work() -> None:
        start.wait()
        for _ in range(each):
            queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
            with lock:
                log.append(("return", frozenset([queue_id])))

    threads = [threading.Thread(target=work) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    returned = [next(iter(ids)) for kind, ids in log if kind == "return"]
    assert len(set(returned)) == writers * each
    for position, (kind, ids) in enumerate(log):
        if kind == "return":
            (queue_id,) = ids
            seen = [i for k, i in log[:position] if k == "fsync"]
            assert any(queue_id in i for i in seen), f"{queue_id} returned before its fsync"
    committer = spool.writer.committer
    assert committer is not None
    assert committer.items == writers * each
    assert committer.batches < writers * each  # some puts shared a commit
    assert {e.queue_id for e in spool.entries()} == set(returned)


CHILD = """
import sys
from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.spool import NoSuchEntry, Spool

folder, queue_id, role = sys.argv[1:4]
with Spool(folder) as spool:
    if role == "holder":
        lease = spool.lease(queue_id, timeout=None)
        print("locked", flush=True)
        sys.stdin.readline()
        lease.mark_delivered(0, ReplyInfo(code=250, enhanced=None, text="ok", local=False))
        lease.close()
        print("released", flush=True)
    else:
        print("waiting", flush=True)
        try:
            spool.delete(queue_id, timeout=None)
        except NoSuchEntry:
            print("gone", flush=True)
        else:
            print("deleted", flush=True)
"""


@contextlib.contextmanager
def child(folder: Path, queue_id: str, role: str) -> Iterator[subprocess.Popen[str]]:
    """Run CHILD in another process; it is killed (if still running) on exit."""
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), queue_id, role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            yield process
        finally:
            process.kill()


def read_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return process.stdout.readline().strip()


def test_a_delivery_lease_excludes_operators_in_other_processes(
    spool: Spool, tmp_path: Path
) -> None:
    queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
    with child(tmp_path / "spool", queue_id, "holder") as holder:
        assert read_line(holder) == "locked"
        with pytest.raises(EntryBusy):
            spool.lease(queue_id)
        with pytest.raises(EntryBusy):
            spool.delete(queue_id, timeout=0.1)
        with pytest.raises(EntryBusy):
            spool.hold(queue_id, timeout=0)
        result: list[Entry] = []
        deleter = threading.Thread(target=lambda: result.append(spool.delete(queue_id, timeout=30)))
        deleter.start()
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert read_line(holder) == "released"
        deleter.join(30)
        # The delete read the entry only once it had the lock: it saw the
        # holder's change.
        assert result[0].recipients[0].state is RecipientState.DELIVERED
    with pytest.raises(NoSuchEntry):
        spool.get(queue_id)


def test_a_waiter_finds_the_entry_gone_after_the_holder_removed_it(
    spool: Spool, tmp_path: Path
) -> None:
    queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
    with (
        spool.lease(queue_id) as lease,
        child(tmp_path / "spool", queue_id, "waiter") as waiter,
    ):
        assert read_line(waiter) == "waiting"
        threading.Event().wait(0.2)  # the waiter is now blocked in flock (or about to be)
        lease.delete()
        assert not lease.active
        assert read_line(waiter) == "gone"


def test_two_leases_in_one_process_exclude_each_other(spool: Spool) -> None:
    queue_id = spool.put_sync(ENVELOPE, [MESSAGE])
    with spool.lease(queue_id) as lease:
        with pytest.raises(EntryBusy):
            spool.lease(queue_id, timeout=0.05)
        lease.hold()
    assert spool.lease(queue_id).entry.state is EntryState.HELD
