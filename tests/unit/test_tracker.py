"""The session tracker: reply order, transactions and their records."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from smtpwarden.protocol.commands import parse_command
from smtpwarden.protocol.errors import LocalProtocolError
from smtpwarden.protocol.events import Bdat, Command, Verb
from smtpwarden.protocol.records import Outcome, Peer, ReplyInfo, SessionInfo, Tls, Upstream
from smtpwarden.protocol.replies import make_reply, parse_reply
from smtpwarden.protocol.tracker import MAX_SESSION_STEPS, MAX_TRANSACTION_STEPS, SessionTracker

INFO = SessionInfo(
    session_id="s1",
    listener="smtp",
    client=Peer(address="192.0.2.7", port=40000),
    upstream=Upstream(name="mta", address="127.0.0.1", port=25),
    tls=Tls(),
)


def command(line: bytes) -> Command:
    event = parse_command(line + b"\r\n")
    assert isinstance(event, Command)
    return event


class Session:
    """Drives a tracker with a clock that advances one millisecond a call."""

    def __init__(self) -> None:
        self.now = 100.0
        self.tracker = SessionTracker(info=INFO, now=self.now, epoch_offset=1_700_000_000.0)
        self.to_client = b""
        self.reply(b"220 mx ESMTP\r\n")

    def tick(self) -> float:
        self.now += 0.001
        return self.now

    def send(self, *lines: bytes) -> None:
        for line in lines:
            self.tracker.forwarded(command(line), self.tick())

    def reply(self, *wires: bytes) -> None:
        for wire in wires:
            entry = self.tracker.upstream_reply(parse_reply(wire), self.tick())
            assert entry is not None
            self.to_client += wire + self.tracker.ready_replies(self.now)

    def body(self, data: bytes) -> None:
        self.tracker.body(data)

    def end(self) -> None:
        self.tracker.end_of_body(self.tick())


def deliver(s: Session, body: bytes = b"hello\r\n") -> None:
    s.send(b"MAIL FROM:<a@example.com> SIZE=10", b"RCPT TO:<b@example.org>", b"DATA")
    s.reply(b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", b"354 go\r\n")
    s.body(body + b".\r\n")
    s.end()
    s.reply(b"250 2.0.0 Ok: queued as X\r\n")


def test_delivered_transaction_record() -> None:
    s = Session()
    deliver(s, b"line\r\n..dot\r\n")
    (record,) = s.tracker.records
    assert record.outcome is Outcome.DELIVERED
    assert record.transaction_id == "s1.1"
    assert record.mail_from.address == "a@example.com"
    assert record.mail_from.params == {"SIZE": "10"}
    assert [r.address for r in record.recipients] == ["b@example.org"]
    assert record.recipients[0].reply is not None
    assert record.recipients[0].reply.enhanced == "2.1.5"
    assert record.body == "data"
    assert record.size == len(b"line\r\n..dot\r\n")
    assert record.body_sha256 == hashlib.sha256(b"line\r\n..dot\r\n").hexdigest()
    assert [step.command for step in record.timeline] == ["MAIL", "RCPT", "DATA", "."]
    assert record.final_reply is not None
    assert (record.final_reply.code, record.final_reply.text) == (250, "Ok: queued as X")
    assert record.time.startswith("2023-11-14T22:1")
    assert record.timeline[0].latency_ms == pytest.approx(3.0)
    doc = orjson.loads(orjson.dumps(record))
    assert doc["outcome"] == "delivered"
    assert doc["client"] == {"address": "192.0.2.7", "port": 40000}


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 7])
def test_body_hash_leaves_out_the_terminator_however_it_is_cut(cut: int) -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA")
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n")
    wire = b"abc\r\n.\r\n"
    for i in range(0, len(wire), cut):
        s.body(wire[i : i + cut])
    s.end()
    s.reply(b"250 ok\r\n")
    (record,) = s.tracker.records
    assert record.size == 5
    assert record.body_sha256 == hashlib.sha256(b"abc\r\n").hexdigest()


@pytest.mark.parametrize(
    ("final", "outcome"),
    [
        (b"250 ok\r\n", Outcome.DELIVERED),
        (b"451 4.3.0 later\r\n", Outcome.DEFERRED),
        (b"554 5.7.1 no\r\n", Outcome.REJECTED),
    ],
    ids=["2xx", "4xx", "5xx"],
)
def test_final_reply_decides_the_outcome(final: bytes, outcome: Outcome) -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA")
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n")
    s.body(b".\r\n")
    s.end()
    s.reply(final)
    assert [r.outcome for r in s.tracker.records] == [outcome]


def test_rejected_mail_is_a_transaction_of_its_own() -> None:
    s = Session()
    s.send(b"MAIL FROM:<spam@x>", b"RCPT TO:<c@d>")
    s.reply(b"550 5.7.1 go away\r\n", b"503 5.5.1 need MAIL\r\n")
    (record,) = s.tracker.records
    assert record.outcome is Outcome.REJECTED
    assert record.recipients == ()
    assert not s.tracker.in_transaction


def test_partial_recipients_are_all_recorded() -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<ok@d>", b"RCPT TO:<full@d>", b"RCPT TO:<no@d>", b"DATA")
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"452 4.2.2 full\r\n", b"550 5.1.1 no\r\n", b"354 go\r\n")
    s.body(b"x\r\n.\r\n")
    s.end()
    s.reply(b"250 ok\r\n")
    (record,) = s.tracker.records
    assert [(r.address, r.reply.code if r.reply else None) for r in record.recipients] == [
        ("ok@d", 250),
        ("full@d", 452),
        ("no@d", 550),
    ]


def test_refused_data_ends_the_transaction() -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA")
    s.reply(b"250 ok\r\n", b"550 no\r\n", b"554 5.5.1 no valid recipients\r\n")
    (record,) = s.tracker.records
    assert record.outcome is Outcome.REJECTED
    assert record.final_reply is not None
    assert record.final_reply.code == 554


def test_pipelined_rset_closes_only_after_earlier_replies() -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"RSET")
    s.reply(b"250 ok\r\n")
    assert s.tracker.records == []
    s.reply(b"250 ok\r\n", b"250 reset\r\n")
    (record,) = s.tracker.records
    assert record.outcome is Outcome.ABORTED
    assert [r.address for r in record.recipients] == ["c@d"]


def test_local_replies_wait_for_earlier_upstream_replies() -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>")
    bad = make_reply(500, "5.5.1", "Command unrecognized")
    assert s.tracker.answered_locally(None, None, bad, s.tick()) == b""
    s.send(b"RCPT TO:<c@d>")
    assert s.tracker.answered_locally(None, Verb.XCLIENT, bad, s.tick()) == b""
    s.reply(b"250 mail\r\n")
    assert s.to_client.endswith(b"250 mail\r\n" + bad.raw)
    s.reply(b"250 rcpt\r\n")
    assert s.to_client.endswith(b"250 rcpt\r\n" + bad.raw)
    assert s.tracker.awaiting == 0
    assert s.tracker.answered_locally(None, None, bad, s.tick()) == bad.raw


def test_a_reply_nobody_asked_for_is_reported() -> None:
    s = Session()
    assert s.tracker.upstream_reply(parse_reply(b"250 surprise\r\n"), s.tick()) is None


def test_bdat_transaction() -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>")
    first, last = command(b"BDAT 4"), command(b"BDAT 3 LAST")
    assert isinstance(first, Bdat)
    s.tracker.forwarded(first, s.tick())
    s.body(b"abcd")
    s.tracker.forwarded(last, s.tick())
    s.body(b"efg")
    s.end()
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"250 4 octets\r\n", b"250 2.0.0 queued\r\n")
    (record,) = s.tracker.records
    assert record.body == "bdat"
    assert record.size == 7
    assert record.body_sha256 == hashlib.sha256(b"abcdefg").hexdigest()
    assert [step.command for step in record.timeline] == ["MAIL", "RCPT", "BDAT", "BDAT LAST"]
    assert record.outcome is Outcome.DELIVERED


def test_failed_chunk_ends_the_transaction() -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"BDAT 4")
    s.body(b"abcd")
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"552 5.2.0 too much\r\n")
    (record,) = s.tracker.records
    assert record.outcome is Outcome.REJECTED


def test_lost_outcome_is_unknown() -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA")
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n")
    s.body(b"x\r\n.\r\n")
    s.end()
    lost = ReplyInfo.of(make_reply(421, "4.4.2", "Upstream connection failed"), local=True)
    session = s.tracker.close(
        reason="upstream_lost", now=s.tick(), client_bytes=1, upstream_bytes=2, failure=lost
    )
    (record,) = s.tracker.records
    assert record.outcome is Outcome.UNKNOWN
    # The message went out: its size and hash identify it for the operator.
    assert record.size == 3
    assert record.body_sha256 == hashlib.sha256(b"x\r\n").hexdigest()
    assert record.timeline[-1].command == "."
    assert record.timeline[-1].code is None
    assert session.end == "upstream_lost"
    assert session.transactions == 1


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        (ReplyInfo.of(make_reply(421, "4.4.2", "lost"), local=False), Outcome.DEFERRED),
        (None, Outcome.ABORTED),
    ],
    ids=["upstream-failed", "client-left"],
)
def test_session_end_mid_transaction(failure: object, outcome: Outcome) -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>")
    s.reply(b"250 ok\r\n")
    s.tracker.close(reason="x", now=s.tick(), client_bytes=0, upstream_bytes=0, failure=failure)  # type: ignore[arg-type]
    (record,) = s.tracker.records
    assert record.outcome is outcome
    assert [r.address for r in record.recipients] == []


def test_mail_still_awaiting_its_reply_gets_a_record_at_session_end() -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA")
    failure = ReplyInfo.of(make_reply(421, "4.4.2", "lost"), local=True)
    s.tracker.close(
        reason="upstream_lost", now=s.tick(), client_bytes=0, upstream_bytes=0, failure=failure
    )
    (record,) = s.tracker.records
    assert record.outcome is Outcome.DEFERRED
    assert record.mail_from.reply is None
    assert record.final_reply is not None
    assert record.final_reply.local


def test_ehlo_resets_a_transaction_and_sets_helo() -> None:
    s = Session()
    s.send(b"EHLO one.example", b"MAIL FROM:<a@b>", b"EHLO two.example")
    s.reply(b"250 hi\r\n", b"250 ok\r\n", b"250 hi again\r\n")
    assert [r.outcome for r in s.tracker.records] == [Outcome.ABORTED]
    assert s.tracker.helo == "two.example"


def test_several_transactions_per_session_and_session_record() -> None:
    s = Session()
    s.send(b"EHLO c.example")
    s.reply(b"250 hi\r\n")
    for _ in range(3):
        deliver(s)
    s.send(b"QUIT")
    s.reply(b"221 bye\r\n")
    session = s.tracker.close(reason="quit", now=s.tick(), client_bytes=10, upstream_bytes=20)
    assert [r.transaction_id for r in s.tracker.records] == ["s1.1", "s1.2", "s1.3"]
    assert session.transactions == 3
    assert [step.command for step in session.timeline] == ["CONNECT", "EHLO", "QUIT"]
    assert session.banner is not None
    assert session.banner.code == 220
    assert session.helo == "c.example"
    assert orjson.loads(orjson.dumps(session))["type"] == "session"


def test_session_timeline_is_bounded() -> None:
    s = Session()
    for _ in range(MAX_SESSION_STEPS * 2):
        s.send(b"NOOP")
        s.reply(b"250 ok\r\n")
    session = s.tracker.close(reason="quit", now=s.tick(), client_bytes=0, upstream_bytes=0)
    assert len(session.timeline) == MAX_SESSION_STEPS


@pytest.mark.parametrize("refused", [b"RSET x", b"EHLO"], ids=["rset", "ehlo"])
def test_a_refused_reset_keeps_the_transaction(refused: bytes) -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>")
    s.tracker.forwarded(
        Command(verb=Verb(refused.split()[0].decode()), argument=b"", line=refused), s.tick()
    )
    s.send(b"DATA")
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"501 5.5.4 Syntax\r\n", b"354 go\r\n")
    s.body(b"x\r\n.\r\n")
    s.end()
    s.reply(b"250 queued\r\n")
    (record,) = s.tracker.records
    assert record.outcome is Outcome.DELIVERED
    assert [step.command for step in record.timeline] == [
        "MAIL",
        "RCPT",
        refused.split()[0].decode(),
        "DATA",
        ".",
    ]


def test_session_end_with_a_mail_pipelined_after_the_dot_writes_two_records() -> None:
    s = Session()
    s.send(b"MAIL FROM:<one@b>", b"RCPT TO:<c@d>", b"DATA")
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n")
    s.body(b"x\r\n.\r\n")
    s.end()
    s.send(b"MAIL FROM:<two@b>", b"RCPT TO:<c@d>")
    failure = ReplyInfo.of(make_reply(421, "4.4.2", "lost"), local=True)
    s.tracker.close(
        reason="upstream_lost", now=s.tick(), client_bytes=0, upstream_bytes=0, failure=failure
    )
    first, second = s.tracker.records
    assert (first.mail_from.address, first.outcome) == ("one@b", Outcome.UNKNOWN)
    assert [step.command for step in first.timeline] == ["MAIL", "RCPT", "DATA", "."]
    assert (second.mail_from.address, second.outcome) == ("two@b", Outcome.DEFERRED)
    assert [step.command for step in second.timeline] == ["MAIL", "RCPT"]
    assert second.transaction_id == "s1.2"


def test_a_transaction_timeline_is_bounded() -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>")
    s.reply(b"250 ok\r\n")
    for _ in range(MAX_TRANSACTION_STEPS + 10):
        s.send(b"NOOP")
        s.reply(b"250 ok\r\n")
    s.tracker.close(reason="quit", now=s.tick(), client_bytes=0, upstream_bytes=0)
    (record,) = s.tracker.records
    assert len(record.timeline) == MAX_TRANSACTION_STEPS


def test_a_local_refusal_leaves_the_transaction_alone() -> None:
    s = Session()
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>")
    s.reply(b"250 ok\r\n", b"250 ok\r\n")
    bdat = command(b"BDAT 3 LAST")
    s.tracker.answered_locally(
        bdat, Verb.BDAT, make_reply(502, "5.5.1", "CHUNKING not offered"), s.tick()
    )
    assert s.tracker.in_transaction
    assert s.tracker.records == []


def transient(reply: object) -> bool:
    return getattr(reply, "code", 0) // 100 == 4


def replaying_session() -> Session:
    s = Session()
    s.tracker = SessionTracker(info=INFO, now=s.now, replays=transient)
    s.reply(b"220 mx ESMTP\r\n")
    s.send(b"MAIL FROM:<a@b> SIZE=5", b"RCPT TO:<ok@d>", b"RCPT TO:<no@d>", b"DATA")
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"550 no\r\n", b"354 go\r\n")
    s.body(b"x\r\n.\r\n")
    s.end()
    return s


def test_a_transient_final_reply_opens_a_replay_instead_of_ending() -> None:
    s = replaying_session()
    s.reply(b"451 4.3.0 try later\r\n")
    assert s.tracker.records == []
    replay = s.tracker.replay
    assert replay is not None
    assert replay.mail.line == b"MAIL FROM:<a@b> SIZE=5\r\n"
    assert [r.path for r in replay.recipients] == [b"ok@d"]
    assert replay.first_failure is not None
    assert replay.first_failure.code == 451
    final = ReplyInfo.of(make_reply(250, "2.0.0", "queued on the second try"), local=False)
    s.tracker.end_replay(final, Outcome.RETRIED, 2, s.tick())
    (record,) = s.tracker.records
    assert record.outcome is Outcome.RETRIED
    assert record.attempts == 2
    assert record.final_reply == final
    assert record.size == 3
    assert s.tracker.replay is None


def test_a_permanent_final_reply_ends_as_usual() -> None:
    s = replaying_session()
    s.reply(b"554 5.7.1 no\r\n")
    assert s.tracker.replay is None
    assert [r.outcome for r in s.tracker.records] == [Outcome.REJECTED]


def test_a_lost_final_reply_becomes_a_replay() -> None:
    s = replaying_session()
    assert s.tracker.lost_message(s.tick())
    replay = s.tracker.replay
    assert replay is not None
    assert replay.first_failure is None
    assert s.tracker.awaiting == 0
    s.tracker.end_replay(None, Outcome.DEFERRED, 3, s.tick())
    (record,) = s.tracker.records
    assert (record.outcome, record.attempts) == (Outcome.DEFERRED, 3)
    assert record.timeline[-1].command == "."
    assert record.timeline[-1].code is None


def test_nothing_to_replay_before_the_message_is_sent() -> None:
    s = Session()
    s.tracker = SessionTracker(info=INFO, now=s.now, replays=transient)
    s.reply(b"220 mx\r\n")
    s.send(b"MAIL FROM:<a@b>")
    assert not s.tracker.lost_message(s.tick())
    with pytest.raises(LocalProtocolError):
        s.tracker.end_replay(None, Outcome.DEFERRED, 1, s.tick())


def test_an_unheld_message_is_never_replayed() -> None:
    s = Session()
    s.tracker = SessionTracker(info=INFO, now=s.now, replays=transient)
    s.reply(b"220 mx\r\n")
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<ok@d>", b"DATA")
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n")
    s.body(b"x\r\n.\r\n")
    s.tracker.end_of_body(s.tick(), replayable=False)
    assert not s.tracker.lost_message(s.tick())
    s.reply(b"451 4.3.0 try later\r\n")
    assert s.tracker.replay is None
    assert [r.outcome for r in s.tracker.records] == [Outcome.DEFERRED]


def contradicts(reply: object) -> bool:
    return b"failed" in b"".join(getattr(reply, "lines", ()))


@pytest.mark.parametrize("bdat", [False, True])
def test_a_contradictory_250_ends_a_transaction_as_deferred(bdat: bool) -> None:
    s = Session()
    s.tracker = SessionTracker(info=INFO, now=s.now, contradicts=contradicts)
    s.reply(b"220 mx\r\n")
    s.send(b"MAIL FROM:<a@b>", b"RCPT TO:<ok@d>")
    s.reply(b"250 ok\r\n", b"250 ok\r\n")
    if bdat:
        s.send(b"BDAT 3 LAST")
        s.body(b"x\r\n")
        s.end()
    else:
        s.send(b"DATA")
        s.reply(b"354 go\r\n")
        s.body(b"x\r\n.\r\n")
        s.end()
    entry = s.tracker.upstream_reply(parse_reply(b"250 Mail transaction failed\r\n"), s.tick())
    assert entry is not None
    assert entry.contradicted
    (record,) = s.tracker.records
    assert record.outcome is Outcome.DEFERRED
    assert record.final_reply is not None
    assert record.final_reply.code == 250
    assert not record.final_reply.local
    assert record.diagnosis is not None
    assert record.diagnosis.pattern.value == "contradictory_250"


def test_a_clean_250_is_not_contradicted() -> None:
    s = Session()
    s.tracker = SessionTracker(info=INFO, now=s.now, contradicts=contradicts)
    s.reply(b"220 mx\r\n")
    deliver(s)
    assert [r.outcome for r in s.tracker.records] == [Outcome.DELIVERED]


def take_over_session(*rcpt_replies: bytes) -> Session:
    """Requeue with take-over: one RCPT per reply, each forwarded as take-over-able."""
    s = Session()
    s.tracker = SessionTracker(info=INFO, now=s.now, replays=transient)
    s.reply(b"220 mx\r\n")
    s.send(b"MAIL FROM:<a@b>")
    s.reply(b"250 ok\r\n")
    for i, wire in enumerate(rcpt_replies):
        s.tracker.forwarded(command(b"RCPT TO:<r%d@d>" % i), s.tick(), takes_over=True)
        entry = s.tracker.upstream_reply(parse_reply(wire), s.tick())
        assert entry is not None
        expected = wire.startswith(b"4") and rcpt_replies[0].startswith(b"250")
        assert entry.takes_over is expected
    return s


def test_a_4xx_recipient_after_an_accepted_one_is_taken_over() -> None:
    s = take_over_session(b"250 ok\r\n", b"451 busy\r\n", b"550 no\r\n", b"452 full\r\n")
    s.send(b"DATA")
    s.reply(b"354 go\r\n")
    s.body(b"x\r\n.\r\n")
    s.end()
    s.reply(b"250 2.0.0 queued\r\n")
    replay = s.tracker.replay
    assert replay is not None
    assert replay.delivered
    assert [r.path for r in replay.recipients] == [b"r0@d"]
    assert [r.path for r in replay.taken_over] == [b"r1@d", b"r3@d"]
    s.tracker.end_replay(None, Outcome.REQUEUED, 1, s.tick())
    (record,) = s.tracker.records
    assert record.taken_over == ("r1@d", "r3@d")
    assert [r.reply.code for r in record.recipients if r.reply] == [250, 451, 550, 452]


def test_a_4xx_recipient_before_any_accepted_one_is_not_taken_over() -> None:
    s = take_over_session(b"451 busy\r\n", b"250 ok\r\n")
    s.send(b"DATA")
    s.reply(b"354 go\r\n")
    s.body(b"x\r\n.\r\n")
    s.end()
    s.reply(b"250 2.0.0 queued\r\n")
    assert s.tracker.replay is None
    (record,) = s.tracker.records
    assert record.taken_over == ()
    assert record.outcome is Outcome.DELIVERED
