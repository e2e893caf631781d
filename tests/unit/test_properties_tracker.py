"""Properties of the session tracker (``protocol/tracker.py``): replies meet commands."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.protocol.commands import parse_command
from smtpwarden.protocol.events import Command, Verb
from smtpwarden.protocol.records import Outcome, Peer, SessionInfo, Tls, Upstream
from smtpwarden.protocol.replies import Reply, make_reply
from smtpwarden.protocol.tracker import SessionTracker
from smtpwarden.protocol.transaction import Awaiting
from strategies import reply_codes, scaled

INFO = SessionInfo(
    session_id="s1",
    listener="smtp",
    client=Peer(address="192.0.2.7", port=40000),
    upstream=Upstream(name="mta", address="127.0.0.1", port=25),
    tls=Tls(),
)

LINES = [
    b"EHLO c.example",
    b"HELO c.example",
    b"MAIL FROM:<a@b.example> SIZE=10",
    b"MAIL FROM:<>",
    b"RCPT TO:<c@d.example>",
    b"RCPT TO:<e@d.example> NOTIFY=NEVER",
    b"DATA",
    b"BDAT 3",
    b"BDAT 2 LAST",
    b"RSET",
    b"NOOP",
    b"VRFY someone",
    b"QUIT",
]


def command(line: bytes) -> Command:
    event = parse_command(line + b"\r\n")
    assert isinstance(event, Command)
    return event


# What a relay does, one step at a time.
Op = tuple[str, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, len(LINES) - 1)),
        st.tuples(st.just("local"), st.integers(-1, len(LINES) - 1)),
        st.tuples(st.sampled_from(["continuation", "hidden", "message"]), st.just(0)),
        st.tuples(st.just("reply"), st.one_of(reply_codes, st.sampled_from([250, 354, 334]))),
    ),
    max_size=40,
)


@dataclass
class Expected:
    """An entry the model expects in the tracker's queue."""

    name: str
    command: Command | None
    relayed: bool  # its reply goes to the client
    local: Reply | None = None


@dataclass
class Run:
    """What the model expects of the tracker, and what came out of it."""

    tracker: SessionTracker
    now: float
    queue: list[Expected] = field(default_factory=lambda: [Expected("CONNECT", None, True)])
    body_kind: Verb | None = None  # of the last MAIL, DATA or BDAT sent
    entries: int = 1  # commands sent or answered locally, the banner included
    answered: int = 0
    to_client: bytes = b""  # what the relay sent the client
    in_order: bytes = b""  # every reply given so far, in the order of its command
    seen: list[Awaiting] = field(default_factory=list)  # kept alive: identities stay unique
    serial: int = 0

    def reply(self, code: int) -> Reply:
        self.serial += 1
        return make_reply(code, None, f"reply {self.serial}")

    def expect(self, entry: Expected) -> None:
        self.queue.append(entry)
        self.entries += 1

    def release_locals(self) -> None:
        # Local answers waiting behind the head go out once it is answered.
        while self.queue and self.queue[0].local is not None:
            done = self.queue.pop(0)
            assert done.local is not None
            self.in_order += done.local.raw
            self.answered += 1

    def step(self, kind: str, arg: int) -> None:
        self.now += 0.001
        tracker, now = self.tracker, self.now
        if kind == "send":
            sent = command(LINES[arg])
            tracker.forwarded(sent, now)
            name = "BDAT LAST" if LINES[arg].endswith(b"LAST") else sent.verb.value
            self.expect(Expected(name, sent, True))
            if sent.verb in (Verb.MAIL, Verb.DATA, Verb.BDAT):
                self.body_kind = sent.verb
        elif kind == "local":
            asked = None if arg < 0 else command(LINES[arg])
            answer = self.reply(500 + max(arg, 0))
            verb = None if asked is None else asked.verb
            out = tracker.answered_locally(asked, verb, answer, now)
            self.to_client += out
            if self.queue:
                assert out == b""  # not before the replies still awaited
                self.expect(Expected("local", asked, True, local=answer))
            else:
                assert out == answer.raw
                self.entries += 1
                self.answered += 1
                self.in_order += answer.raw
        elif kind == "continuation":
            tracker.forwarded_continuation(Verb.AUTH, now)
            self.expect(Expected("AUTH", None, True))
        elif kind == "hidden":
            tracker.forwarded_hidden("XFORWARD", now)
            self.expect(Expected("XFORWARD", None, False))
        elif kind == "message":
            tracker.body(b"Subject: x\r\n\r\nhello\r\n.\r\n")
            tracker.end_of_body(now)
            if self.body_kind is Verb.DATA:
                # The end of a DATA section is answered like a command.
                self.expect(Expected(".", None, True))
        else:
            answer = self.reply(arg)
            entry = tracker.upstream_reply(answer, now)
            if not self.queue:
                # A reply nobody asked for is paired with nothing.
                assert entry is None
                return
            head = self.queue.pop(0)
            self.answered += 1
            assert head.local is None  # local answers never wait at the head
            # The oldest command waiting, and never one answered before.
            assert entry is not None
            assert all(entry is not earlier for earlier in self.seen)
            self.seen.append(entry)
            assert entry.command is head.command
            assert entry.name == head.name
            assert entry.local is None
            assert entry.hidden == (not head.relayed)
            if head.relayed:
                self.to_client += answer.raw
                self.in_order += answer.raw
            self.to_client += tracker.ready_replies(now)
            self.release_locals()
        assert tracker.awaiting == len(self.queue)
        oldest = tracker.oldest()
        assert (oldest is None) == (not self.queue)
        if oldest is not None:
            assert oldest.command is self.queue[0].command


def drive(script: list[Op]) -> Run:
    run = Run(tracker=SessionTracker(info=INFO, now=100.0), now=100.0)
    for kind, arg in script:
        run.step(kind, arg)
    return run


@scaled()
@given(ops)
def test_every_reply_meets_the_oldest_command_waiting_and_goes_out_in_order(
    script: list[Op],
) -> None:
    run = drive(script)  # pairs are checked at every step
    # RFC 2920 3.1: the client reads the replies in the order of its commands.
    assert run.to_client == run.in_order


@scaled()
@given(ops)
def test_every_command_and_transaction_is_recorded_once(script: list[Op]) -> None:
    run = drive(script)
    session = run.tracker.close(reason="test", now=run.now + 1, client_bytes=0, upstream_bytes=0)
    records = run.tracker.records
    # Each transaction ends in exactly one record, numbered in order.
    assert session.transactions == len(records)
    assert [r.transaction_id for r in records] == [f"s1.{n}" for n in range(1, len(records) + 1)]
    assert all(isinstance(r.outcome, Outcome) for r in records)
    # Every command shows once on a timeline: with the code of its reply if
    # it got one, with none if the session ended first.
    steps = [*session.timeline, *(step for r in records for step in r.timeline)]
    assert len(steps) == run.entries
    assert sum(step.code is not None for step in steps) == run.answered
