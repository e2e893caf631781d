"""Hostile and broken upstreams, at every phase of a session.

``faulty_upstream.FaultyUpstream`` answers as usual until one phase of the
session (the banner; the replies to EHLO, MAIL, RCPT and DATA, to the final
dot, to a BDAT chunk and to BDAT LAST; the reply to QUIT), where it plays one
fault instead: garbage, a reply nobody asked for, an overlong or endless
reply, a slow drip, silence, a 421, a reset or a close. For each pair of
phase and fault the tables below say what must happen, and each case checks:

- what the client gets: the relay's own "421 4.4.2" (or the upstream's own
  421, relayed), never a reply of a class the command cannot have (RFC 5321
  4.3.2), and never a 250 to the end of a message that the upstream did not
  clearly accept;
- that this answer comes within the phase's deadline (every upstream timeout
  is ``PHASE_TIMEOUT_S`` here) and, when the fault is slowness, not before;
- the session record's end and the transaction record's outcome;
- that a session on a second listener, relayed to a healthy upstream at the
  same time, is answered promptly and delivers its message.

Under policy retry, the faults after the message hand it to the route's
second upstream: the client gets that upstream's 250, and the message reached
it exactly once. With STARTTLS required towards the upstream, a broken
handshake is a failure of that upstream: the route's next one serves the
session, or the client gets "421 4.4.1".
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
import trustme

from integration.faulty_upstream import (
    PHASES,
    QUEUED,
    STARTTLS_READY,
    Fault,
    FaultyConnection,
    FaultyUpstream,
    Wire,
    after_client_hello,
    close,
    cut_line,
    drip,
    endless,
    endless_drip,
    extra_after,
    extra_before,
    extra_later,
    garbage_for_handshake,
    handshake,
    overlong,
    reset,
    send_then_hold,
    silence,
)
from integration.recording_upstreams import RawConnection, RawUpstream
from integration.relay_harness import HOSTNAME, REPLY_LINE, RunningRelay, StartRelay, WireClient
from integration.tls_upstreams import server_side

# Every upstream deadline of the relay under test. Short, so that the slow
# cases stay fast; far longer than any healthy reply on the loopback.
PHASE_TIMEOUT_S = 0.4
# How late past its deadline the relay may answer: the deadline tick
# (a quarter of the shortest timeout) plus a busy machine.
MARGIN_S = 1.5
DEADLINE_S = PHASE_TIMEOUT_S + MARGIN_S
# The client gives up well after DEADLINE_S: a relay that hangs fails the case.
CLIENT_WAIT_S = DEADLINE_S + 2.0
TIMEOUTS = {
    name: PHASE_TIMEOUT_S
    for name in (
        "connect",
        "banner",
        "mail",
        "rcpt",
        "data_init",
        "data_block",
        "data_end",
        "reply",
    )
}
MAX_REPLY_LINE_BYTES = 512
MAX_REPLY_LINES = 32
LIMITS = {"max_reply_line_bytes": MAX_REPLY_LINE_BYTES, "max_reply_lines": MAX_REPLY_LINES}
# A drip slow enough that even the shortest usual reply (14 octets) takes
# 3.5 s, well past DEADLINE_S; an endless reply dripped a line at a time
# reaches MAX_REPLY_LINES only after 3.2 s, past DEADLINE_S too.
DRIP_EVERY_S = 0.25
LINE_EVERY_S = 0.1

UPSTREAM_421 = b"421 4.3.2 faulty.test Service shutting down\r\n"
LOCAL_FAILURE = b"421 4.4.2 "  # the relay's own: upstream failed or timed out
UNREACHABLE = b"421 4.4.1 "  # the relay's own: no upstream could be used
RELAY_EHLO = f"EHLO {HOSTNAME}\r\n".encode("ascii")
# RawUpstream's greeting and its reply to the end of a message: not the faulty one's.
RAW_BANNER = b"220 upstream.test ESMTP raw recorder\r\n"
B_QUEUED = b"250 2.0.0 Ok: queued\r\n"

EHLO = b"EHLO client.test\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
RCPT = b"RCPT TO:<rcpt@example.net>\r\n"
BODY = b"Subject: hostile upstream\r\n\r\n..a stuffed line\r\nend\r\n"
SECTION = BODY + b".\r\n"
CHUNKS = (b"Subject: hostile upstream\r\n\r\nfirst chunk\r\n", b"last chunk\r\n")
SIDE_MAIL = b"MAIL FROM:<side@example.org>\r\n"
SIDE_SECTION = b"Subject: the other session\r\n\r\nunaffected\r\n.\r\n"

Step = tuple[bytes, int]  # a command and the code of its usual reply

STEPS: dict[str, Step] = {
    "ehlo": (EHLO, 250),
    "mail": (MAIL, 250),
    "rcpt": (RCPT, 250),
    "data": (b"DATA\r\n", 354),
    "dot": (SECTION, 250),
    "bdat": (b"BDAT %d\r\n" % len(CHUNKS[0]) + CHUNKS[0], 250),
    "bdat_last": (b"BDAT %d LAST\r\n" % len(CHUNKS[1]) + CHUNKS[1], 250),
    "quit": (b"QUIT\r\n", 221),
}
# What the client sends to reach each phase; the last step is the one whose
# reply the upstream breaks (at "banner", connecting is).
SCRIPTS: dict[str, tuple[str, ...]] = {
    "banner": (),
    "ehlo": ("ehlo",),
    "mail": ("ehlo", "mail"),
    "rcpt": ("ehlo", "mail", "rcpt"),
    "data": ("ehlo", "mail", "rcpt", "data"),
    "dot": ("ehlo", "mail", "rcpt", "data", "dot"),
    "bdat": ("ehlo", "mail", "rcpt", "bdat"),
    "bdat_last": ("ehlo", "mail", "rcpt", "bdat", "bdat_last"),
    "quit": ("ehlo", "mail", "rcpt", "data", "dot", "quit"),
}
END_OF_MESSAGE = ("dot", "bdat_last")


# --- The faults ----------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """A fault, and what the relay must make of it wherever it strikes.

    ``end``: the session record's end reasons that are right. ``timed``: the
    fault is slowness, so the relay answers once the phase's deadline has
    passed, not before. ``own_421``: the client gets the upstream's 421
    itself. ``carries_reply``: the fault sends a well-formed reply along
    with the wrong one, which the relay may pass on before it sees the
    rest. ``phases``: where the fault is played.
    """

    fault: Fault
    end: tuple[str, ...]
    timed: bool = False
    own_421: bool = False
    carries_reply: bool = False
    phases: tuple[str, ...] = PHASES


MALFORMED = ("upstream_malformed",)
UNSOLICITED = ("upstream_unsolicited",)
# A reply the command cannot have (see ``allowed``) may be taken for either.
OUT_OF_PLACE = ("upstream_unsolicited", "upstream_malformed")

HOSTILE: dict[str, Hostile] = {
    # Garbage instead of a reply.
    "not-a-reply": Hostile(Fault("not-a-reply", send_then_hold(b"hello\r\n")), MALFORMED),
    "binary": Hostile(
        Fault("binary", send_then_hold(b"\x00\x16\x03\x01\xfe\xff\x80\r\n")), MALFORMED
    ),
    "code-700": Hostile(Fault("code-700", send_then_hold(b"700 x\r\n")), MALFORMED),
    "cut-line": Hostile(Fault("cut-line", cut_line), MALFORMED),
    # Replies nobody asked for, in the same write as the usual one.
    "extra-before": Hostile(
        Fault("extra-before", extra_before(b"250 2.0.0 extra\r\n"), goes_on=True),
        UNSOLICITED,
        carries_reply=True,
    ),
    "extra-after": Hostile(
        Fault("extra-after", extra_after(b"250 2.0.0 extra\r\n"), goes_on=True),
        UNSOLICITED,
        carries_reply=True,
    ),
    # A stray reply in a later read than the usual one: that one was an
    # answer like any other, the stray alone is the upstream's fault.
    "extra-later": Hostile(
        Fault("extra-later", extra_later(b"250 2.0.0 extra\r\n", 0.2), goes_on=True),
        UNSOLICITED,
        carries_reply=True,
        phases=END_OF_MESSAGE,
    ),
    # The owed reply, then a closing 421 in the same read: RFC 5321 3.8's
    # way to close, relayed as is; but after the end of a message, which of
    # the two answers it is unknown.
    "421-after": Hostile(
        Fault("421-after", extra_after(UPSTREAM_421)),
        ("upstream_421",),
        own_421=True,
        carries_reply=True,
        phases=("ehlo", "mail", "rcpt"),
    ),
    "421-after-the-end": Hostile(
        Fault("421-after-the-end", extra_after(UPSTREAM_421)),
        UNSOLICITED,
        carries_reply=True,
        phases=END_OF_MESSAGE,
    ),
    # A stray 250 right before the real answer to the message, a failure.
    "stray-250-then-451": Hostile(
        Fault("stray-250-then-451", send_then_hold(b"250 2.0.0 stray\r\n451 4.3.0 failed\r\n")),
        ("upstream_unsolicited", "upstream_malformed", "upstream_lost"),
        carries_reply=True,
        phases=END_OF_MESSAGE,
    ),
    # Past the limits on replies.
    "overlong-line": Hostile(
        Fault("overlong-line", overlong(MAX_REPLY_LINE_BYTES + 100)), MALFORMED
    ),
    "endless-multiline": Hostile(Fault("endless-multiline", endless()), MALFORMED),
    # Slowness: a multi-line reply that never ends, a drip, nothing at all.
    "dripped-multiline": Hostile(
        Fault("dripped-multiline", endless_drip(LINE_EVERY_S)), ("upstream_timeout",), timed=True
    ),
    "drip": Hostile(Fault("drip", drip(DRIP_EVERY_S)), ("upstream_timeout",), timed=True),
    "never": Hostile(Fault("never", silence), ("upstream_timeout",), timed=True),
    # The upstream closing, politely or not.
    "421": Hostile(Fault("421", send_then_hold(UPSTREAM_421)), ("upstream_421",), own_421=True),
    "reset": Hostile(Fault("reset", reset), ("upstream_lost",)),
    "close": Hostile(Fault("close", close), ("upstream_lost",)),
}

# The transaction record's outcome when a fault ends the session at each
# phase: None, no transaction had begun.
OUTCOME_AT: dict[str, tuple[str, ...] | None] = {
    "banner": None,
    "ehlo": None,
    "mail": ("deferred",),
    "rcpt": ("deferred",),
    "data": ("deferred",),
    # The message went and no answer came: RFC 1047's window.
    "dot": ("unknown",),
    "bdat": ("deferred",),
    "bdat_last": ("unknown",),
    # The transaction before QUIT went through; QUIT's fault cannot undo it.
    "quit": ("delivered",),
}
# Where a fault calls for another outcome than OUTCOME_AT's.
OUTCOME_OF: dict[tuple[str, str], tuple[str, ...]] = {
    # A 421 is the upstream's answer to the message: a 4xx.
    **{(phase, "421"): ("deferred",) for phase in END_OF_MESSAGE},
    # Two replies in one read where one was owed: which answers the message
    # is unknown, so neither is relayed and its fate is RFC 1047's window.
    **{(phase, "extra-before"): ("unknown",) for phase in END_OF_MESSAGE},
    **{(phase, "extra-after"): ("unknown",) for phase in END_OF_MESSAGE},
    # A 250 to the message on its own: it has the message.
    **{(phase, "extra-later"): ("delivered",) for phase in END_OF_MESSAGE},
    **{(phase, "421-after-the-end"): ("unknown",) for phase in END_OF_MESSAGE},
    # Its two answers contradict each other: not a delivery.
    **{(phase, "stray-250-then-451"): ("deferred", "unknown") for phase in END_OF_MESSAGE},
}
# Where the reply class rule (``allowed``) also decides the session's end,
# and where a race leaves two right answers.
END_OF: dict[tuple[str, str], tuple[str, ...]] = {
    ("banner", "extra-before"): OUT_OF_PLACE,
    ("data", "extra-before"): OUT_OF_PLACE,
    ("quit", "extra-before"): OUT_OF_PLACE,
    # A reset right as the connection opens may reach the relay before its
    # connect has completed: then the upstream was unreachable.
    ("banner", "reset"): ("upstream_lost", "upstream_unreachable"),
}
CLOSING_OF: dict[tuple[str, str], tuple[bytes, ...]] = {
    ("banner", "reset"): (LOCAL_FAILURE, UNREACHABLE),
}

CASES = [
    pytest.param(phase, name, id=f"{phase}-{name}")
    for name, hostile in HOSTILE.items()
    for phase in hostile.phases
]


def allowed(phase: str, code: int) -> bool:
    """Whether the reply at ``phase`` may have ``code`` (RFC 5321 4.3.2 and RFC 3030).

    The greeting is 220 or 554; DATA's positive reply is 354, never a
    completion; QUIT's is 221. The relay's closing 421 is checked apart.
    """
    if phase == "banner":
        return code in (220, 554)
    if phase == "data":
        return code == 354 or code // 100 in (4, 5)
    if phase == "quit":
        return code == 221
    return code // 100 in (2, 4, 5)


# --- Relays, clients and records ----------------------------------------------------


@pytest.fixture
def make_faulty() -> Iterator[Callable[..., FaultyUpstream]]:
    """Start faulty upstreams (``FaultyUpstream``'s arguments); closed after the test."""
    made: list[FaultyUpstream] = []

    def make(phase: str, fault: Fault, **kwargs: Any) -> FaultyUpstream:
        upstream = FaultyUpstream(phase, fault, **kwargs)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


@dataclass(frozen=True)
class Recorder:
    """A healthy upstream shared by the module, seen from one test.

    Each test looks only at the connections that came after it began
    (``since``): starting and closing two recorders per test would cost
    more than most cases.
    """

    upstream: RawUpstream
    since: int

    @property
    def config(self) -> dict[str, object]:
        return self.upstream.config

    def new(self) -> list[RawConnection]:
        """The connections this test made so far."""
        return self.upstream.connections[self.since :]

    def ended(self, count: int) -> list[RawConnection]:
        """Wait until this test made ``count`` connections and all have ended."""
        self.upstream.wait_all_ended(self.since + count)
        return self.new()


@pytest.fixture(scope="module")
def recorders() -> Iterator[tuple[RawUpstream, RawUpstream]]:
    healthy, fallback = RawUpstream(), RawUpstream()
    yield healthy, fallback
    healthy.close()
    fallback.close()


@pytest.fixture
def healthy(recorders: tuple[RawUpstream, RawUpstream]) -> Recorder:
    """Where the session on listener "side" goes."""
    upstream = recorders[0]
    return Recorder(upstream, len(upstream.connections))


@pytest.fixture
def fallback(recorders: tuple[RawUpstream, RawUpstream]) -> Recorder:
    """The route's second upstream, where it has one."""
    upstream = recorders[1]
    return Recorder(upstream, len(upstream.connections))


def start_hostile(
    start_relay: StartRelay,
    faulty: dict[str, object],
    healthy: Recorder,
    *,
    policy: str = "passthrough",
    fallback: Recorder | None = None,
) -> RunningRelay:
    """A relay whose listener "main" goes to ``faulty`` (then ``fallback``, if any),
    and whose listener "side" goes to ``healthy``."""
    upstreams = [{"name": "faulty", **faulty}, {"name": "healthy", **healthy.config}]
    route = ["faulty"]
    if fallback is not None:
        upstreams.append({"name": "fallback", **fallback.config})
        route.append("fallback")
    extra = {
        "upstreams": upstreams,
        "listeners": [
            {"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "faulty"},
            {"name": "side", "host": "127.0.0.1", "port": 0, "upstream": "healthy"},
        ],
        "routes": [
            {"name": "main", "listeners": ["main"], "policy": policy, "upstreams": route},
            {
                "name": "side",
                "listeners": ["side"],
                "policy": "passthrough",
                "upstreams": ["healthy"],
            },
        ],
        "retry": {"attempts": 3, "budget": 10},
    }
    return start_relay(faulty, limits=LIMITS, timeouts=TIMEOUTS, extra=extra)


def reach(relay: RunningRelay, phase: str) -> tuple[WireClient, float]:
    """Take a client on "main" up to ``phase`` and send what the upstream must answer there.

    Every step before gets its usual reply. Returns the client and when the
    last step was sent (at "banner", when the client began to connect).
    """
    started = time.monotonic()
    client = WireClient(relay.address("main"), timeout=CLIENT_WAIT_S)
    try:
        script = SCRIPTS[phase]
        if script:
            client.expect(220)
        for name in script[:-1]:
            command, code = STEPS[name]
            client.command(command, code)
        if script:
            started = time.monotonic()
            client.send(STEPS[script[-1]][0])
    except BaseException:
        client.close()
        raise
    return client, started


def replies_to_the_end(client: WireClient) -> list[tuple[int, bytes]]:
    """Every reply the relay sends until it closes, parsed; each line must be a reply line."""
    replies: list[tuple[int, bytes]] = []
    raw = b""
    for line in client.read_to_eof().splitlines(keepends=True):
        found = REPLY_LINE.match(line)
        assert found is not None, f"not a reply line: {line!r}"
        assert line.endswith(b"\r\n"), f"not a reply line: {line!r}"
        raw += line
        if found.group(2) == b" ":
            replies.append((int(found.group(1)), raw))
            raw = b""
    assert raw == b"", f"a reply cut short: {raw!r}"
    return replies


class Side:
    """A session on listener "side", open while the faulty one runs."""

    def __init__(self, relay: RunningRelay) -> None:
        self.client = WireClient(relay.address("side"))

    def begin(self) -> None:
        self.client.expect(220)
        self.client.command(EHLO, 250)
        self.client.command(SIDE_MAIL, 250)

    def meanwhile(self) -> None:
        """One round trip while the faulty session waits: answered at once."""
        started = time.monotonic()
        self.client.command(RCPT, 250)
        waited = time.monotonic() - started
        assert waited < PHASE_TIMEOUT_S, f"the healthy session waited {waited:.2f} s"

    def finish(self) -> None:
        self.client.command(b"DATA\r\n", 354)
        self.client.command(SIDE_SECTION, 250)
        self.client.command(b"QUIT\r\n", 221)
        self.client.close()


def check_side(relay: RunningRelay, healthy: Recorder) -> None:
    """The session on "side" delivered its message, and only that, to ``healthy``."""
    (conn,) = healthy.ended(1)
    assert conn.data == [SIDE_SECTION]
    assert conn.quit
    side = session_on(relay, "side")
    assert side["end"] == "quit"
    (record,) = transactions_of(relay, side)
    assert (record["outcome"], record["final_reply"]["code"]) == ("delivered", 250)


def session_on(relay: RunningRelay, listener: str) -> dict[str, Any]:
    sessions = relay.wait_records(
        lambda found: any(record["listener"] == listener for record in found), "session"
    )
    (session,) = [record for record in sessions if record["listener"] == listener]
    return session


def transactions_of(relay: RunningRelay, session: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        record
        for record in relay.records("transaction")
        if record["session_id"] == session["session_id"]
    ]


def check_elapsed(elapsed: float, *, timed: bool) -> None:
    """Within the phase's deadline and its margin; a timed fault, not before the deadline."""
    assert elapsed <= DEADLINE_S, f"answered after {elapsed:.2f} s"
    if timed:
        assert elapsed >= PHASE_TIMEOUT_S * 0.9, f"answered after {elapsed:.2f} s only"


def struck(upstream: FaultyUpstream, *, ended: bool = False) -> FaultyConnection:
    """The connection the fault was played on (``ended``: once it has ended).

    What it received before the fault is recorded by then.
    """
    upstream.wait_for(lambda conns: any(c.struck and (c.ended or not ended) for c in conns))
    return next(conn for conn in upstream.connections if conn.struck)


class Received(Protocol):
    """What one connection to a recording upstream received (faulty or raw)."""

    data: list[bytes]
    bdat_messages: list[bytes]


def message_at(conn: Received, phase: str) -> list[bytes]:
    """The messages ``conn`` received whole, DATA's or BDAT's as the phase sends them."""
    return conn.bdat_messages if phase.startswith("bdat") else conn.data


def sent_message(phase: str) -> bytes:
    return b"".join(CHUNKS) if phase.startswith("bdat") else SECTION


# --- Every phase, every fault, policy passthrough -------------------------------------


@pytest.mark.parametrize(("phase", "name"), CASES)
def test_a_hostile_upstream_gets_the_client_a_clean_4xx_in_time(
    start_relay: StartRelay,
    make_faulty: Callable[..., FaultyUpstream],
    healthy: Recorder,
    phase: str,
    name: str,
) -> None:
    hostile = HOSTILE[name]
    faulty = make_faulty(phase, hostile.fault)
    relay = start_hostile(start_relay, faulty.config, healthy)
    outcome = OUTCOME_OF.get((phase, name), OUTCOME_AT[phase])

    side = Side(relay)
    try:
        side.begin()
        client, started = reach(relay, phase)
        with client:
            side.meanwhile()
            replies = replies_to_the_end(client)
            elapsed = time.monotonic() - started
        side.finish()
    finally:
        side.client.close()

    # The client: a closing 4xx last, in time.
    assert replies, "the relay closed without a reply"
    *before, (_, last) = replies
    if hostile.own_421:
        assert last == UPSTREAM_421
    else:
        assert last.startswith(CLOSING_OF.get((phase, name), (LOCAL_FAILURE,))), last
    check_elapsed(elapsed, timed=hostile.timed)
    # Before it, at most a well-formed reply the fault carried, and only one
    # the command may have.
    assert len(before) <= (1 if hostile.carries_reply else 0), replies
    for earlier, raw in before:
        assert allowed(phase, earlier), f"relayed {raw!r} at {phase}"
    if phase in END_OF_MESSAGE and outcome != ("delivered",):
        assert all(earlier // 100 != 2 for earlier, _ in before), f"a 2xx to the message: {replies}"

    # The upstream: the fault was played, the message reached it only if sent.
    conn = struck(faulty)
    expected_messages = [sent_message(phase)] if phase in (*END_OF_MESSAGE, "quit") else []
    assert message_at(conn, phase) == expected_messages

    # The records.
    session = session_on(relay, "main")
    assert session["end"] in END_OF.get((phase, name), hostile.end)
    assert session["upstream"]["name"] == "faulty"
    records = transactions_of(relay, session)
    if outcome is None:
        assert records == []
    else:
        (record,) = records
        assert record["outcome"] in outcome
        if record["outcome"] != "delivered":
            assert record["final_reply"]["code"] // 100 == 4
    check_side(relay, healthy)


# --- After the message, under policy retry ---------------------------------------------

# The faults after which the message's fate is unknown or a failure: the
# retry path must take over.
REPLAYED = [
    name
    for name, hostile in HOSTILE.items()
    if set(END_OF_MESSAGE) <= set(hostile.phases) and name != "extra-later"
]
RETRY_CASES = [
    pytest.param(phase, name, id=f"{phase}-{name}") for name in REPLAYED for phase in END_OF_MESSAGE
]


@pytest.mark.parametrize(("phase", "name"), RETRY_CASES)
def test_after_the_message_a_retry_route_replays_it_on_the_next_upstream(
    start_relay: StartRelay,
    make_faulty: Callable[..., FaultyUpstream],
    healthy: Recorder,
    fallback: Recorder,
    phase: str,
    name: str,
) -> None:
    hostile = HOSTILE[name]
    faulty = make_faulty(phase, hostile.fault)
    relay = start_hostile(start_relay, faulty.config, healthy, policy="retry", fallback=fallback)

    side = Side(relay)
    try:
        side.begin()
        client, started = reach(relay, phase)
        with client:
            side.meanwhile()
            answer = client.reply()
            elapsed = time.monotonic() - started
            rest = replies_to_the_end(client)
        side.finish()
    finally:
        side.client.close()

    # The fallback's own 250, in time; then the session, whose upstream
    # connection is gone, closes.
    assert answer == (250, B_QUEUED)
    check_elapsed(elapsed, timed=hostile.timed)
    assert [raw[: len(LOCAL_FAILURE)] for _, raw in rest] == [LOCAL_FAILURE]

    # The message reached the faulty upstream once, and the fallback once.
    assert message_at(struck(faulty), phase) == [sent_message(phase)]
    replayed = fallback.ended(1)
    received = [message for conn in replayed for message in message_at(conn, phase)]
    assert received == [sent_message(phase)]

    session = session_on(relay, "main")
    # After a replay the session ends as its upstream connection did; the
    # relay reports that as lost, whatever the fault was.
    assert session["end"] in ("upstream_lost", *hostile.end)
    (record,) = transactions_of(relay, session)
    assert (record["outcome"], record["attempts"]) == ("retried", 2)
    assert record["final_reply"]["code"] == 250
    assert record["final_reply"]["local"] is False
    if name == "421":
        assert record["duplicate_risk"] is False  # a clear 4xx: the first upstream has nothing
    elif name != "stray-250-then-451":
        assert record["duplicate_risk"] is True  # the first upstream may have the message
    check_side(relay, healthy)


ACCEPTED_CASES = [
    pytest.param(phase, name, first, id=f"{phase}-{name}")
    for name, first in (("extra-later", QUEUED),)
    for phase in END_OF_MESSAGE
]


@pytest.mark.parametrize(("phase", "name", "first"), ACCEPTED_CASES)
def test_a_retry_route_never_replays_a_message_the_upstream_accepted(
    start_relay: StartRelay,
    make_faulty: Callable[..., FaultyUpstream],
    healthy: Recorder,
    fallback: Recorder,
    phase: str,
    name: str,
    first: bytes,
) -> None:
    """A 250 to the message with a reply nobody asked for: delivered, never twice."""
    faulty = make_faulty(phase, HOSTILE[name].fault)
    relay = start_hostile(start_relay, faulty.config, healthy, policy="retry", fallback=fallback)

    client, started = reach(relay, phase)
    with client:
        replies = replies_to_the_end(client)
        elapsed = time.monotonic() - started

    assert [raw for _, raw in replies[:1]] == [first]
    assert [raw[: len(LOCAL_FAILURE)] for _, raw in replies[1:]] == [LOCAL_FAILURE]
    check_elapsed(elapsed, timed=False)
    assert message_at(struck(faulty), phase) == [sent_message(phase)]
    session = session_on(relay, "main")
    assert session["end"] == "upstream_unsolicited"
    (record,) = transactions_of(relay, session)
    assert (record["outcome"], record["attempts"]) == ("delivered", 1)
    relay.stop()  # nothing can reach the fallback after this
    assert fallback.new() == []


# --- STARTTLS towards the upstream, broken ---------------------------------------------


@dataclass(frozen=True)
class TlsPki:
    ca_file: str  # the CA the relay trusts
    untrusted: ssl.SSLContext  # a server context whose certificate another CA issued


@pytest.fixture(scope="module")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> TlsPki:
    folder = tmp_path_factory.mktemp("hostile-pki")
    ca_file = folder / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    stranger = trustme.CA().issue_cert("127.0.0.1", "faulty.test")
    return TlsPki(ca_file=str(ca_file), untrusted=server_side(stranger))


# Each fault and whether it is slowness (the handshake's deadline is the
# connect timeout).
TLS_FAULTS: dict[str, tuple[Fault, bool]] = {
    "garbage-for-handshake": (
        Fault("garbage-for-handshake", after_client_hello(garbage_for_handshake)),
        False,
    ),
    "untrusted-certificate": (Fault("untrusted-certificate", handshake), False),
    "close-mid-handshake": (Fault("close-mid-handshake", after_client_hello(Wire.close)), False),
    "reset-mid-handshake": (Fault("reset-mid-handshake", after_client_hello(Wire.reset)), False),
    "silent-handshake": (Fault("silent-handshake", after_client_hello(Wire.hold)), True),
    # RFC 3207 5: octets after the 220 would be read as if they came over TLS.
    "octets-after-220": (
        Fault("octets-after-220", send_then_hold(STARTTLS_READY + b"250 2.0.0 injected\r\n")),
        False,
    ),
    "garbage-for-220": (Fault("garbage-for-220", send_then_hold(b"hello\r\n")), False),
    "421-for-220": (Fault("421-for-220", send_then_hold(UPSTREAM_421)), False),
}


@pytest.mark.parametrize("with_fallback", [True, False], ids=["next-upstream", "alone"])
@pytest.mark.parametrize("name", list(TLS_FAULTS))
def test_a_broken_starttls_fails_that_upstream_never_the_session_in_plaintext(
    start_relay: StartRelay,
    make_faulty: Callable[..., FaultyUpstream],
    healthy: Recorder,
    fallback: Recorder,
    tls_pki: TlsPki,
    name: str,
    with_fallback: bool,
) -> None:
    fault, timed = TLS_FAULTS[name]
    faulty = make_faulty("starttls", fault, offer_starttls=True, context=tls_pki.untrusted)
    section = {**faulty.config, "tls": {"mode": "starttls", "ca_file": tls_pki.ca_file}}
    next_upstream = fallback if with_fallback else None
    relay = start_hostile(start_relay, section, healthy, fallback=next_upstream)

    side = Side(relay)
    try:
        side.begin()
        started = time.monotonic()
        with WireClient(relay.address("main"), timeout=CLIENT_WAIT_S) as client:
            side.meanwhile()
            _, greeting = client.reply()
            elapsed = time.monotonic() - started
            if next_upstream is not None:
                assert greeting == RAW_BANNER
                for step in ("ehlo", "mail", "rcpt", "data", "dot", "quit"):
                    client.command(*STEPS[step])
            else:
                assert greeting.startswith(UNREACHABLE), greeting
                assert client.read_to_eof() == b""
        side.finish()
    finally:
        side.client.close()

    check_elapsed(elapsed, timed=timed)
    # Nothing of the client's went to the broken upstream, in plaintext or not.
    conn = struck(faulty, ended=True)
    assert conn.commands == [RELAY_EHLO, b"STARTTLS\r\n"]
    if name == "untrusted-certificate":
        assert conn.handshake_error is not None  # the relay refused the certificate
    session = session_on(relay, "main")
    records = transactions_of(relay, session)
    if next_upstream is not None:
        (relayed,) = next_upstream.ended(1)

        assert relayed.data == [SECTION]
        assert (session["end"], session["upstream"]["name"]) == ("quit", "fallback")
        (record,) = records
        assert record["outcome"] == "delivered"
    else:
        assert session["end"] == "upstream_unreachable"
        assert records == []
    check_side(relay, healthy)
