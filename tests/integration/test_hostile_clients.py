"""Hostile clients: the reply each gets, the record, and nobody else harmed.

Every case in ``CASES`` runs while another client (the bystander) is in the
middle of its own message on the same relay: after the hostile client is
done, the bystander's message must still be accepted and reach the upstream
byte for byte (PRODUCT.md, invariant 6). What the hostile client sent must
never reach the upstream where smtpwarden refused it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import POLL_S, WAIT_S, RunningRelay, StartRelay, WireClient

# No SMTPUTF8: 8-bit commands must be refused, not relayed.
EHLO = ("PIPELINING", "SIZE 1000000", "8BITMIME", "CHUNKING", "ENHANCEDSTATUSCODES")
LIMITS = {"max_message_bytes": 50_000}
BYSTANDER_BODY = b"Subject: bystander\r\n\r\nstill here\r\n"


@dataclass(frozen=True)
class Case:
    """Steps of (bytes sent after EHLO, reply prefixes expected for them)."""

    steps: tuple[tuple[bytes, tuple[bytes, ...]], ...]
    never_upstream: tuple[bytes, ...] = ()
    outcomes: tuple[str, ...] = ()  # the transaction records of the hostile session
    replies: dict[str, bytes] = field(default_factory=dict)  # the upstream's, per verb


MAIL = b"MAIL FROM:<a@example.org>\r\n"
RCPT = b"RCPT TO:<b@example.net>\r\n"

CASES: dict[str, Case] = {
    "command-line-over-the-limit": Case(
        steps=((b"MAIL FROM:<" + b"a" * 3000 + b"@x>\r\nNOOP\r\n", (b"500 5.5.2", b"250")),),
        never_upstream=(b"aaaa",),
    ),
    "nul-in-a-command": Case(
        steps=((b"NOOP\x00x\r\nMAIL FROM:<a\x00@x>\r\n", (b"500 5.5.2", b"500 5.5.2")),),
        never_upstream=(b"\x00",),
    ),
    "control-bytes-in-a-command": Case(
        steps=((b"MAIL FROM:<a\x01@x>\r\nNOOP \x1b[0m\r\n", (b"500 5.5.2", b"500 5.5.2")),),
        never_upstream=(b"\x01", b"\x1b"),
    ),
    "8-bit-sender-without-smtputf8": Case(
        steps=(("MAIL FROM:<jöe@example.org>\r\n".encode(), (b"553 5.6.7",)),),
        never_upstream=("jö".encode(),),
    ),
    "8-bit-sender-with-smtputf8-not-offered": Case(
        steps=(("MAIL FROM:<jöe@example.org> SMTPUTF8\r\n".encode(), (b"553 5.6.7",)),),
        never_upstream=("jö".encode(),),
    ),
    "8-bit-recipient-without-smtputf8": Case(
        steps=(
            (
                MAIL + "RCPT TO:<bö@example.net>\r\nRSET\r\n".encode(),
                (b"250", b"553 5.6.7", b"250"),
            ),
        ),
        never_upstream=("bö".encode(),),
        outcomes=("aborted",),
    ),
    "8-bit-helo-and-noop": Case(
        steps=(("EHLO bö.example\r\nNOOP é\r\n".encode(), (b"500 5.5.2", b"500 5.5.2")),),
        never_upstream=("ö".encode(), "é".encode()),
    ),
    "8-bit-starttls-and-auth": Case(
        # Refused before the core waits for a handshake or a 334: the
        # session reads commands again at once.
        steps=(
            (
                "STARTTLS é\r\nAUTH PLAIN é\r\nNOOP\r\n".encode(),
                (b"500 5.5.2", b"500 5.5.2", b"250"),
            ),
        ),
        never_upstream=("é".encode(), b"AUTH"),
    ),
    "8-bit-recipient-with-smtputf8-not-offered": Case(
        steps=(
            (
                b"MAIL FROM:<a@example.org> SMTPUTF8\r\n"
                + "RCPT TO:<bö@example.net>\r\nRSET\r\n".encode(),
                (b"250", b"553 5.6.7", b"250"),
            ),
        ),
        never_upstream=("bö".encode(),),
        outcomes=("aborted",),
    ),
    "unknown-verbs-and-the-relays-own": Case(
        steps=(
            (
                b"FOOBAR x\r\nXCLIENT ADDR=192.0.2.1\r\nXFORWARD ADDR=192.0.2.1\r\n",
                (b"500 5.5.1", b"502 5.5.1", b"502 5.5.1"),
            ),
        ),
        never_upstream=(b"FOOBAR", b"XCLIENT", b"XFORWARD"),
    ),
    "rcpt-before-mail": Case(
        steps=((RCPT, (b"503 5.5.1",)),),
        never_upstream=(b"RCPT",),
    ),
    "data-before-mail": Case(
        steps=((b"DATA\r\n", (b"503 5.5.1",)),),
        never_upstream=(b"DATA",),
    ),
    "data-without-rcpt-pipelined": Case(
        steps=((MAIL + b"DATA\r\nRSET\r\n", (b"250", b"503 5.5.1", b"250")),),
        never_upstream=(b"DATA",),
        outcomes=("aborted",),
    ),
    "data-after-every-rcpt-refused": Case(
        steps=(
            (MAIL, (b"250",)),
            (b"RCPT TO:<nobody@example.net>\r\n", (b"550",)),
            (b"DATA\r\n", (b"554 5.5.1",)),
            (b"RSET\r\n", (b"250",)),
        ),
        never_upstream=(b"DATA",),
        outcomes=("aborted",),
        replies={"RCPT <nobody@example.net>": b"550 5.1.1 No such user\r\n"},
    ),
    "rcpt-and-data-right-after-a-message": Case(
        steps=(
            (MAIL + RCPT + b"DATA\r\n", (b"250", b"250", b"354")),
            (
                b"Subject: x\r\n\r\nx\r\n.\r\nRCPT TO:<second@example.net>\r\nDATA\r\n",
                (b"250", b"503 5.5.1", b"503 5.5.1"),
            ),
        ),
        never_upstream=(b"second@",),
        outcomes=("delivered",),
    ),
    "rcpt-and-data-after-a-mail-refused-here": Case(
        steps=(
            (
                b"NOOP\r\nMAIL FROM:<a@example.org> SIZE=60000\r\n" + RCPT + b"DATA\r\n",
                (b"250", b"552 5.3.4", b"503 5.5.1", b"503 5.5.1"),
            ),
        ),
        never_upstream=(b"RCPT", b"DATA"),
    ),
    "bdat-before-mail": Case(
        steps=((b"BDAT 5 LAST\r\nhelloNOOP\r\n", (b"503 5.5.1", b"250")),),
        never_upstream=(b"BDAT", b"hello"),
    ),
    "bdat-then-data": Case(
        steps=(
            (MAIL + RCPT + b"BDAT 5\r\nhello", (b"250", b"250", b"250")),
            (b"DATA\r\n", (b"503 5.5.1",)),
            (b"BDAT 3 LAST\r\nbye", (b"250",)),
        ),
        never_upstream=(b"DATA",),
        outcomes=("delivered",),
    ),
    "bdat-size-not-a-number": Case(
        steps=(
            (
                MAIL + RCPT + b"BDAT x\r\nBDAT -5\r\nRSET\r\n",
                (b"250", b"250", b"501", b"501", b"250"),
            ),
        ),
        never_upstream=(b"BDAT",),
        outcomes=("aborted",),
    ),
    "bdat-chunk-past-the-size-limit": Case(
        steps=(
            (MAIL + RCPT + b"BDAT 60000 LAST\r\n" + b"x" * 60000, (b"250", b"250", b"552 5.3.4")),
            (b"RSET\r\n" + MAIL + RCPT + b"BDAT 2 LAST\r\nok", (b"250", b"250", b"250", b"250")),
        ),
        never_upstream=(b"BDAT 60000",),
        outcomes=("aborted", "delivered"),
    ),
    "size-parameter-past-the-limit": Case(
        steps=((b"MAIL FROM:<a@example.org> SIZE=60000\r\n", (b"552 5.3.4",)),),
        never_upstream=(b"SIZE=60000",),
    ),
}


@pytest.fixture
def upstream() -> Iterator[RawUpstream]:
    server = RawUpstream(ehlo=EHLO)
    yield server
    server.close()


@contextlib.contextmanager
def bystander(relay: RunningRelay) -> Iterator[WireClient]:
    """A client halfway through its message for as long as the block runs."""
    with WireClient(relay.address()) as client:
        client.start_transaction(b"MAIL FROM:<by@example.org>", b"RCPT TO:<stander@example.net>")
        client.command(b"DATA\r\n", 354)
        client.send(BYSTANDER_BODY[:10])
        yield client
        client.send(BYSTANDER_BODY[10:] + b".\r\n")
        client.expect(250)
        client.command(b"QUIT\r\n", 221)


def delivered_bodies(upstream: RawUpstream) -> list[bytes]:
    return [data for conn in upstream.connections for data in conn.data]


@pytest.mark.parametrize("name", CASES.keys())
def test_a_hostile_client_is_refused_and_harms_nobody(
    start_relay: StartRelay, upstream: RawUpstream, name: str
) -> None:
    case = CASES[name]
    upstream.replies.update(case.replies)
    relay = start_relay(upstream.config, limits=LIMITS)
    with bystander(relay), WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        for data, expected in case.steps:
            client.send(data)
            for prefix in expected:
                _, raw = client.reply()
                assert raw.startswith(prefix), f"expected {prefix!r}, got {raw!r}"
        client.command(b"QUIT\r\n", 221)
    sessions = relay.wait_records(lambda found: len(found) == 2, "session")
    assert [session["end"] for session in sessions] == ["quit", "quit"]
    outcomes = [
        record["outcome"]
        for record in relay.records("transaction")
        if record["mail_from"]["address"] != "by@example.org"
    ]
    assert tuple(outcomes) == case.outcomes
    conns = upstream.wait_all_ended(2)
    sent_upstream = b"".join(
        conn.command_text() for conn in conns if b"by@example.org" not in conn.command_text()
    )
    for forbidden in case.never_upstream:
        assert forbidden not in sent_upstream, forbidden
    assert BYSTANDER_BODY + b".\r\n" in delivered_bodies(upstream)


def test_a_thousand_recipients_pass_in_bounded_pipelined_steps(
    start_relay: StartRelay, upstream: RawUpstream
) -> None:
    # 1002 RCPTs in one write: never more than max_pipelined_commands (100
    # by default) await the upstream, every RCPT past max_recipients gets
    # 452, and the message reaches the upstream with the first 1000.
    relay = start_relay(upstream.config)
    rcpts = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % n for n in range(1002))
    deepest = 0
    with WireClient(relay.address()) as client:
        client.start_transaction()
        client.send(rcpts)
        codes = []
        for _ in range(1002):
            codes.append(client.reply()[0])
            deepest = max(deepest, relay.call(lambda: max_awaiting(relay)))
        assert codes == [250] * 999 + [452] * 3
        client.command(b"DATA\r\n", 354)
        client.command(b"Subject: many\r\n\r\nhi\r\n.\r\n", 250)
        client.command(b"QUIT\r\n", 221)
    assert deepest <= 100
    (conn,) = upstream.wait_all_ended()
    assert conn.command_text().count(b"RCPT TO:") == 1000
    (record,) = relay.wait_records(lambda found: len(found) == 1, "transaction")
    assert len(record["recipients"]) == 1000
    assert record["outcome"] == "delivered"


def max_awaiting(relay: RunningRelay) -> int:
    assert relay.relay is not None
    return max((session.tracker.awaiting for session in relay.relay.sessions), default=0)


def test_endless_pipelining_is_read_in_bounded_steps(
    start_relay: StartRelay, upstream: RawUpstream
) -> None:
    # 100,000 NOOPs in one write, read back as they come: the relay never
    # has more than its limit awaiting the upstream, nor more than a few
    # reads of input waiting in memory.
    relay = start_relay(upstream.config, limits={"max_pipelined_commands": 50})
    count = 100_000
    with WireClient(relay.address()) as client:
        client.expect(220)
        sender = threading.Thread(target=client.send, args=(b"NOOP\r\n" * count,), daemon=True)
        sender.start()
        deepest = buffered = 0
        for n in range(count):
            client.expect(250)
            if n % 997 == 0:
                depth, held = relay.call(lambda: (max_awaiting(relay), max_buffered(relay)))
                deepest, buffered = max(deepest, depth), max(buffered, held)
        sender.join(WAIT_S)
        client.command(b"QUIT\r\n", 221)
    assert 0 < deepest <= 50
    assert buffered <= 512 * 1024


def max_buffered(relay: RunningRelay) -> int:
    assert relay.relay is not None
    return max((session.core.buffered for session in relay.relay.sessions), default=0)


def drip(client: WireClient, data: bytes, every: float, until: float) -> bytes:
    """Send ``data`` a byte at a time; return what the relay answered once it closed."""
    for octet in data:
        if time.monotonic() > until:
            break
        try:
            client.send(bytes([octet]))
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(every)  # the attack itself: one octet, then a pause
    return client.read_to_eof()


SLOW_PHASES = {
    "command": (b"", b"MAIL FROM:<slow@example.org>\r\n" * 10, "command"),
    "data": (b"DATA\r\n", b"x" * 400, "data_block"),
    # A chunk that lies about its size, as far as it goes: its octets come
    # too slowly to ever reach it.
    "bdat": (b"BDAT 1000 LAST\r\n", b"x" * 400, "data_block"),
}


@pytest.mark.parametrize("phase", SLOW_PHASES.keys())
def test_a_client_dripping_bytes_is_closed_after_about_one_timeout(
    start_relay: StartRelay, upstream: RawUpstream, phase: str
) -> None:
    opening, payload, timeout = SLOW_PHASES[phase]
    relay = start_relay(upstream.config, timeouts={timeout: 1.0})
    with WireClient(relay.address()) as client:
        if opening:
            client.start_transaction()
            if opening.startswith(b"DATA"):
                client.command(opening, 354)
            else:
                client.send(opening)  # BDAT is answered once its chunk is in
        else:
            client.expect(220)
        started = time.monotonic()
        rest = drip(client, payload, every=0.05, until=started + 10.0)
        took = time.monotonic() - started
    assert rest.startswith(b"421 4.4.2 "), rest
    # A byte every 50 ms restarted a plain idle timeout forever; at 500
    # octets per second each buys 2 ms, so the session ends after ~1 s
    # (plus up to a second until the deadlines are next looked at).
    assert took < 5.0, took
    (session,) = relay.wait_records(lambda found: len(found) == 1, "session")
    assert session["end"] == "client_timeout"
    if phase != "command":
        (record,) = relay.records("transaction")
        assert record["outcome"] == "aborted"
        assert upstream.wait_all_ended()[0].data == []


def test_without_a_minimum_rate_a_drip_keeps_the_session(
    start_relay: StartRelay, upstream: RawUpstream
) -> None:
    # The setting is what closes the drip above: with 0, every byte restarts
    # the 1 s timeout, and a byte every 50 ms is never late.
    relay = start_relay(upstream.config, timeouts={"command": 1.0}, limits={"min_data_rate": 0})
    with WireClient(relay.address()) as client:
        client.expect(220)
        line = b"NOOP " + b"x" * 40 + b"\r\n"
        started = time.monotonic()
        for octet in line:
            client.send(bytes([octet]))
            time.sleep(0.05)
        assert time.monotonic() - started > 2.0
        client.expect(250)
        client.command(b"QUIT\r\n", 221)


def test_a_pause_between_bdat_chunks_is_the_command_timeouts(
    start_relay: StartRelay, upstream: RawUpstream
) -> None:
    # Between chunks the client is between commands: a pause past
    # data_block (but within command) is allowed, and the next chunk's
    # octets are timed from its own BDAT line.
    relay = start_relay(upstream.config, timeouts={"command": 2.0, "data_block": 1.0})
    with WireClient(relay.address()) as client:
        client.start_transaction()
        client.command(b"BDAT 5\r\nhello", 250)
        time.sleep(1.5)  # the pause under test
        client.send(b"BDAT 5 LAST\r\n")
        time.sleep(0.5)
        client.command(b"world", 250)
        client.command(b"QUIT\r\n", 221)
    (conn,) = upstream.wait_all_ended()
    assert conn.bdat_messages == [b"helloworld"]


def test_bdat_goes_through_with_one_pipelined_command_at_a_time(
    start_relay: StartRelay, upstream: RawUpstream
) -> None:
    relay = start_relay(upstream.config, limits={"max_pipelined_commands": 1})
    with WireClient(relay.address()) as client:
        client.start_transaction()
        client.command(b"BDAT 4 LAST\r\nbody", 250)
        client.command(b"QUIT\r\n", 221)
    (conn,) = upstream.wait_all_ended()
    assert conn.bdat_messages == [b"body"]


def test_a_slow_but_steady_client_is_not_cut_off(
    start_relay: StartRelay, upstream: RawUpstream
) -> None:
    # 20 KB at ~20 KB/s, well above the minimum rate, over a 1 s data_block.
    relay = start_relay(upstream.config, timeouts={"data_block": 1.0})
    with WireClient(relay.address()) as client:
        client.open_data()
        for _ in range(40):
            client.send(b"y" * 510 + b"\r\n")
            time.sleep(0.025)
        client.command(b".\r\n", 250)
        client.command(b"QUIT\r\n", 221)


VANISH_PHASES: dict[str, bytes] = {
    "before-the-banner": b"",
    "after-ehlo": b"EHLO client.test\r\n",
    "after-mail": b"EHLO client.test\r\n" + MAIL,
    "after-rcpt": b"EHLO client.test\r\n" + MAIL + RCPT,
    "after-data": b"EHLO client.test\r\n" + MAIL + RCPT + b"DATA\r\n",
    "mid-body": b"EHLO client.test\r\n" + MAIL + RCPT + b"DATA\r\nSubject: x\r\n\r\nhalf",
    "mid-line-ending": b"EHLO client.test\r\n" + MAIL + RCPT + b"DATA\r\nSubject: x\r\n\r\n.\r",
    "mid-bdat-chunk": b"EHLO client.test\r\n" + MAIL + RCPT + b"BDAT 100 LAST\r\nhalf",
    "after-bdat-chunk": b"EHLO client.test\r\n" + MAIL + RCPT + b"BDAT 4\r\nhalf",
}


GONE = {"client_closed", "client_lost"}  # after a FIN, after a reset


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("phase", VANISH_PHASES.keys())
def test_a_client_vanishing_leaves_no_message_upstream(
    start_relay: StartRelay, upstream: RawUpstream, phase: str, how: str
) -> None:
    relay = start_relay(upstream.config)
    with bystander(relay):
        sock = socket.create_connection(relay.address(), timeout=WAIT_S)
        if phase != "before-the-banner":
            sock.recv(1024)
        sock.sendall(VANISH_PHASES[phase])
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        relay.wait_records(lambda found: any(s["end"] in GONE for s in found), "session")
    sessions = relay.wait_records(lambda found: len(found) == 2, "session")
    assert sorted(session["end"] in GONE for session in sessions) == [False, True]
    vanished = next(s["session_id"] for s in sessions if s["end"] in GONE)
    for record in relay.records("transaction"):
        if record["session_id"] == vanished:
            assert record["outcome"] == "aborted", record
    # Only the bystander's message was completed upstream.
    upstream.wait_all_ended(1 if phase == "before-the-banner" else 2)
    assert delivered_bodies(upstream) == [BYSTANDER_BODY + b".\r\n"]
    assert not any(conn.bdat_messages for conn in upstream.connections)


def test_a_client_gone_right_after_its_dot_still_has_its_message_recorded(
    start_relay: StartRelay, upstream: RawUpstream
) -> None:
    # The message was complete: the upstream takes it, and the record says
    # so even though the client never read the 250.
    relay = start_relay(upstream.config)
    sock = socket.create_connection(relay.address(), timeout=WAIT_S)
    sock.recv(1024)
    sock.sendall(b"EHLO c\r\n" + MAIL + RCPT + b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    # Wait for the 354 (the body is held until it comes), then vanish.
    deadline = time.monotonic() + WAIT_S
    seen = b""
    while b"354" not in seen and time.monotonic() < deadline:
        seen += sock.recv(4096)
    sock.close()
    (record,) = relay.wait_records(lambda found: len(found) == 1, "transaction")
    assert record["outcome"] == "delivered"
    assert delivered_bodies(upstream) == [b"Subject: x\r\n\r\nbody\r\n.\r\n"]


def test_a_half_closed_client_mid_command_is_let_go(
    start_relay: StartRelay, upstream: RawUpstream
) -> None:
    relay = start_relay(upstream.config)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.send(b"EHLO client.test\r\nNOOP")
        client.sock.shutdown(socket.SHUT_WR)
        client.expect(250)
        assert client.read_to_eof() == b""
    (session,) = relay.wait_records(lambda found: len(found) == 1, "session")
    assert session["end"] == "client_closed"
    (conn,) = upstream.wait_all_ended()
    assert b"NOOP" not in conn.command_text()


def test_a_flood_past_every_connection_limit_leaves_the_relay_serving(
    start_relay: StartRelay, upstream: RawUpstream
) -> None:
    relay = start_relay(
        upstream.config, limits={"max_connections": 30, "max_connections_per_client": 20}
    )
    with bystander(relay):
        flood = []
        refused = 0
        for _ in range(200):
            sock = socket.create_connection(relay.address(), timeout=WAIT_S)
            flood.append(sock)
        for sock in flood:
            banner = sock.recv(1024)
            refused += banner.startswith(b"421 4.7.0")
        for sock in flood:
            sock.close()
        assert refused >= 200 - 20
        # Every refused or abandoned session is let go.
        deadline = time.monotonic() + WAIT_S
        while relay.call(lambda: len(relay.relay.sessions) if relay.relay else 0) > 1:
            assert time.monotonic() < deadline, "flood sessions still open"
            time.sleep(POLL_S)
    with WireClient(relay.address()) as client:
        client.open_data()
        client.command(b"Subject: after\r\n\r\nx\r\n.\r\n", 250)
        client.command(b"QUIT\r\n", 221)
