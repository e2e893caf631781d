"""Flow control and upstream stalls, on real sockets.

A message larger than every buffer on the way must not pile up in the relay
when the upstream stops reading: reading from the client pauses instead, and
everything arrives once the upstream reads again. An upstream that goes
silent after the final dot leaves an "unknown" outcome (the RFC 1047
window) and a 421 for the client; an upstream 421 ends the session.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import WAIT_S, RunningRelay, StartRelay, WireClient
from smtpwarden.net.flow import WRITE_HIGH_WATER_BYTES, Hold

# Far beyond what loopback socket buffers hold on both legs together, so a
# relay that kept reading would have to hold most of it in memory.
BIG_BODY_BYTES = 64 * 1024 * 1024
# What the relay may hold for the upstream while paused: the high-water mark
# plus one read from the client (asyncio and uvloop read at most 256 KiB).
MAX_HELD_BYTES = WRITE_HIGH_WATER_BYTES + 256 * 1024
POLL_S = 0.01


class StallingUpstream:
    """Answers like an MTA, but stalls on DATA until told to go on.

    ``read_gate`` holds back reading the DATA section; ``verdict_gate`` and
    ``banner_gate``, when cleared, hold back the 354 and the banner; with
    ``answer_dot`` unset it reads the message and never answers the final
    dot.
    """

    def __init__(self, *, answer_dot: bool = True) -> None:
        self.read_gate = threading.Event()
        self.verdict_gate = threading.Event()
        self.verdict_gate.set()
        self.banner_gate = threading.Event()
        self.banner_gate.set()
        self.answer_dot = answer_dot
        self.received = bytearray()
        self.done = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def config(self) -> dict[str, object]:
        return {"kind": "smtp", "host": "127.0.0.1", "port": self.port}

    def _serve(self) -> None:
        self._listener.settimeout(WAIT_S)
        sock, _ = self._listener.accept()
        sock.settimeout(WAIT_S * 3)
        with sock:
            self.banner_gate.wait(WAIT_S * 3)
            sock.sendall(b"220 upstream.test ESMTP\r\n")
            pending = b""
            while True:
                while b"\r\n" not in pending:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return
                    pending += chunk
                line, _, pending = pending.partition(b"\r\n")
                verb = line.split(b" ")[0].upper()
                if verb == b"EHLO":
                    sock.sendall(b"250-upstream.test\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    self.verdict_gate.wait(WAIT_S * 3)
                    sock.sendall(b"354 go ahead\r\n")
                    self.received += pending
                    self._read_data(sock)
                    if not self.answer_dot:
                        sock.recv(1)  # until the relay gives up and closes
                        return
                    sock.sendall(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    sock.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    sock.sendall(b"250 2.0.0 Ok\r\n")

    def _read_data(self, sock: socket.socket) -> None:
        if not self.read_gate.wait(WAIT_S * 3):
            return
        while not self.received.endswith(b"\r\n.\r\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            self.received += chunk
        self.done.set()

    def close(self) -> None:
        self.read_gate.set()
        self._listener.close()
        self._thread.join(WAIT_S * 3)


@pytest.fixture
def stalling_upstream() -> Iterator[StallingUpstream]:
    upstream = StallingUpstream()
    yield upstream
    upstream.close()


def relay_state(relay: RunningRelay) -> tuple[bool, int, int]:
    """Whether the only session holds reading for FLOW, and what it buffers."""

    def look() -> tuple[bool, int, int]:
        assert relay.relay is not None
        (session,) = relay.relay.sessions
        held = session.upstream.get_write_buffer_size() if session.upstream else 0
        return session.gate.holds(Hold.FLOW), held, session.core.buffered

    return relay.call(look)


def test_a_stalled_upstream_pauses_the_client_instead_of_buffering(
    start_relay: StartRelay, stalling_upstream: StallingUpstream
) -> None:
    relay = start_relay(stalling_upstream.config, limits={"max_message_bytes": 0})
    line = b"x" * 998 + b"\r\n"
    body = line * (BIG_BODY_BYTES // len(line))
    with WireClient(relay.address(), timeout=WAIT_S * 3) as client:
        client.open_data()
        sender = threading.Thread(target=client.send, args=(body + b".\r\n",), daemon=True)
        sender.start()
        deadline = time.monotonic() + WAIT_S
        while not relay_state(relay)[0]:
            assert time.monotonic() < deadline, "reading from the client never paused"
            time.sleep(POLL_S)
        paused, held, buffered = relay_state(relay)
        assert paused
        assert held <= MAX_HELD_BYTES
        assert buffered == 0
        # The client cannot finish: the relay is not reading its bytes.
        assert sender.is_alive()
        stalling_upstream.read_gate.set()
        sender.join(WAIT_S * 3)
        assert not sender.is_alive()
        assert client.reply()[0] == 250
        client.command(b"QUIT\r\n", 221)
    assert stalling_upstream.done.is_set()
    assert bytes(stalling_upstream.received) == body + b".\r\n"
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert record["outcome"] == "delivered"
    assert record["size"] == len(body)
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_a_client_that_sends_its_message_before_the_354_is_paused(
    start_relay: StartRelay, stalling_upstream: StallingUpstream
) -> None:
    # DATA awaits its verdict without pausing the socket; input past a
    # bound then pauses it, and the message goes on once the 354 comes.
    stalling_upstream.verdict_gate.clear()
    stalling_upstream.read_gate.set()
    relay = start_relay(stalling_upstream.config, limits={"max_message_bytes": 0})
    line = b"y" * 998 + b"\r\n"
    body = line * (8 * 1024 * 1024 // len(line))

    def paused() -> tuple[bool, int]:
        def look() -> tuple[bool, int]:
            assert relay.relay is not None
            (session,) = relay.relay.sessions
            return session.gate._paused, session.core.buffered

        return relay.call(look)

    with WireClient(relay.address(), timeout=WAIT_S * 3) as client:
        client.start_transaction()
        message = b"DATA\r\n" + body + b".\r\n"
        sender = threading.Thread(target=client.send, args=(message,), daemon=True)
        sender.start()
        deadline = time.monotonic() + WAIT_S
        while not paused()[0]:
            assert time.monotonic() < deadline, "reading from the client never paused"
            time.sleep(POLL_S)
        assert paused()[1] <= 256 * 1024  # one read at most
        assert sender.is_alive()
        stalling_upstream.verdict_gate.set()
        sender.join(WAIT_S * 3)
        assert not sender.is_alive()
        assert client.reply()[0] == 354
        assert client.reply()[0] == 250
        client.command(b"QUIT\r\n", 221)
    assert stalling_upstream.done.is_set()
    assert bytes(stalling_upstream.received).endswith(body + b".\r\n")


@pytest.mark.parametrize("gate", ["banner", "verdict"])
def test_a_client_that_sends_everything_and_half_closes_is_served(
    start_relay: StartRelay, stalling_upstream: StallingUpstream, gate: str
) -> None:
    # Its commands (or its message) in one write, then EOF, while the relay
    # waits for the upstream's banner (or 354): the EOF must wait its turn
    # behind the input already read, not end the session.
    stalling_upstream.read_gate.set()
    held = stalling_upstream.banner_gate if gate == "banner" else stalling_upstream.verdict_gate
    held.clear()
    relay = start_relay(stalling_upstream.config)
    body = b"Subject: all at once\r\n\r\nhello\r\n"
    with WireClient(relay.address()) as client:
        if gate == "verdict":
            client.start_transaction()
            client.send(b"DATA\r\n" + body + b".\r\n")
        else:
            client.send(
                b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n"
                b"RCPT TO:<b@example.net>\r\nRSET\r\nQUIT\r\n"
            )
        client.sock.shutdown(socket.SHUT_WR)

        def read_ahead() -> bool:
            assert relay.relay is not None
            sessions = relay.relay.sessions
            return not sessions or any(session.core.buffered for session in sessions)

        deadline = time.monotonic() + WAIT_S
        while not relay.call(read_ahead):
            assert time.monotonic() < deadline, "the relay never read the client's input"
            time.sleep(POLL_S)
        held.set()
        raw = client.read_to_eof()
    codes = [int(line[:3]) for line in raw.split(b"\r\n") if line[3:4] == b" "]
    if gate == "verdict":
        assert codes == [354, 250]
        assert stalling_upstream.done.wait(WAIT_S)
        assert bytes(stalling_upstream.received).endswith(body + b".\r\n")
    else:
        assert codes == [220, 250, 250, 250, 250, 221]


def test_silence_after_the_dot_is_an_unknown_outcome(start_relay: StartRelay) -> None:
    upstream = StallingUpstream(answer_dot=False)
    upstream.read_gate.set()
    try:
        relay = start_relay(upstream.config, timeouts={"data_end": 0.5})
        with WireClient(relay.address()) as client:
            client.open_data()
            client.send(b"hello\r\n.\r\n")
            raw = client.expect(421)
            assert raw.startswith(b"421 4.4.2 ")
            assert client.read_to_eof() == b""
        (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
        assert record["outcome"] == "unknown"
        assert record["size"] == len(b"hello\r\n")
        assert record["timeline"][-1]["command"] == "."
        assert record["timeline"][-1]["code"] is None
        (session,) = relay.wait_records(lambda rs: len(rs) == 1, "session")
        assert session["end"] == "upstream_timeout"
    finally:
        upstream.close()


def test_an_upstream_421_reaches_the_client_and_ends_the_session(
    start_relay: StartRelay, make_raw_upstream: type[RawUpstream]
) -> None:
    upstream = make_raw_upstream(replies={"RCPT": b"421 4.3.2 upstream.test shutting down\r\n"})
    relay = start_relay(upstream.config)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(b"MAIL FROM:<a@example.org>\r\n", 250)
        assert client.command(b"RCPT TO:<b@example.net>\r\n", 421) == (
            b"421 4.3.2 upstream.test shutting down\r\n"
        )
        assert client.read_to_eof() == b""
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert record["outcome"] == "deferred"
    assert record["final_reply"]["code"] == 421
    assert record["final_reply"]["local"] is False
    (session,) = relay.wait_records(lambda rs: len(rs) == 1, "session")
    assert session["end"] == "upstream_421"
