"""The retry policy: a transient failure after 2xx is replayed, not relayed.

Two scripted upstreams, "a" (the session's) and "b" (the next in the
route). What the client is told, what each upstream received, and what the
record says, for each pattern PRODUCT.md lists.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from integration.external_tools import SmtpSink
from integration.recording_upstreams import RawUpstream
from integration.relay_harness import RunningRelay, StartRelay, WireClient
from integration.test_relay_flow import StallingUpstream
from smtpwarden.spool.store import Spool

BODY = b"Subject: retry\r\n\r\n..a stuffed line\r\nend\r\n"
SECTION = BODY + b".\r\n"


def start_retrying(
    start_relay: StartRelay,
    a: Mapping[str, object],
    b: Mapping[str, object],
    *,
    policy: str = "retry",
    retry: Mapping[str, object] | None = None,
    spool: Mapping[str, object] | None = None,
    timeouts: Mapping[str, float] | None = None,
) -> RunningRelay:
    extra: dict[str, object] = {
        "upstreams": [{"name": "a", **a}, {"name": "b", **b}],
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "a"}],
        "routes": [{"name": "main", "policy": policy, "upstreams": ["a", "b"]}],
        "retry": {"attempts": 3, "budget": 20, **(retry or {})},
    }
    if spool is not None:
        extra["spool"] = dict(spool)
    return start_relay(a, extra=extra, timeouts=timeouts)


def send(relay: RunningRelay) -> tuple[int, bytes]:
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(SECTION)
        code, raw = client.reply()
        client.send(b"QUIT\r\n")
        client.read_to_eof()
        return code, raw


@pytest.mark.parametrize(
    "failure",
    [b"451 4.3.0 Temporary local problem\r\n", b"250 Mail transaction failed: http://x/f.aspx\r\n"],
    ids=["deferred-failure", "contradictory-250"],
)
def test_a_transient_failure_is_replayed_on_the_next_upstream(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], failure: bytes
) -> None:
    a = make_raw_upstream(replies={".": failure})
    b = make_raw_upstream()
    relay = start_retrying(start_relay, a.config, b.config)
    code, raw = send(relay)
    assert (code, raw) == (250, b"250 2.0.0 Ok: queued\r\n")
    assert a.wait_all_ended()[0].data == [SECTION]
    (replayed,) = b.wait_all_ended()
    assert replayed.data == [SECTION]
    assert replayed.commands[1:3] == [
        b"MAIL FROM:<sender@example.org>\r\n",
        b"RCPT TO:<rcpt@example.net>\r\n",
    ]
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert record["outcome"] == "retried"
    assert record["attempts"] == 2
    assert record["duplicate_risk"] is False
    assert record["final_reply"]["code"] == 250
    assert record["final_reply"]["local"] is False
    assert record["timeline"][-1]["command"] == "."


def test_a_permanent_failure_goes_back_unchanged(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    a = make_raw_upstream(replies={".": b"554 5.7.1 Message refused\r\n"})
    b = make_raw_upstream()
    relay = start_retrying(start_relay, a.config, b.config)
    assert send(relay) == (554, b"554 5.7.1 Message refused\r\n")
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert (record["outcome"], record["attempts"]) == ("rejected", 1)
    b.close()
    assert b.connections == []


def test_a_spent_budget_answers_4xx_and_the_client_keeps_the_message(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    failing = {".": b"451 4.3.0 Still failing\r\n"}
    a = make_raw_upstream(replies=failing)
    b = make_raw_upstream(replies=failing)
    relay = start_retrying(start_relay, a.config, b.config, retry={"attempts": 3})
    code, raw = send(relay)
    assert code == 451
    assert raw.startswith(b"451 4.4.0 relay.test Upstream failed after 4 attempts")
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert (record["outcome"], record["attempts"]) == ("deferred", 4)
    assert record["final_reply"]["local"] is True
    # a: the session's attempt and the third replay; b: the first and second.
    assert len(a.wait_all_ended(2)) == 2
    assert len(b.wait_all_ended(2)) == 2


def test_passthrough_relays_the_failure(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    a = make_raw_upstream(replies={".": b"451 4.3.0 Temporary local problem\r\n"})
    b = make_raw_upstream()
    relay = start_retrying(start_relay, a.config, b.config, policy="passthrough")
    assert send(relay) == (451, b"451 4.3.0 Temporary local problem\r\n")
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert record["outcome"] == "deferred"
    assert record["diagnosis"]["pattern"] == "deferred_failure"


def test_the_session_goes_on_after_a_replay(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    a = make_raw_upstream(replies={".": b"451 4.3.0 Temporary local problem\r\n"})
    b = make_raw_upstream()
    relay = start_retrying(start_relay, a.config, b.config)
    with WireClient(relay.address()) as client:
        client.open_data()
        # The next transaction is pipelined behind the end of the message.
        client.send(
            SECTION + b"MAIL FROM:<second@example.org>\r\nRCPT TO:<r2@example.net>\r\nDATA\r\n"
        )
        assert client.reply()[0] == 250
        client.expect(250)
        client.expect(250)
        client.expect(354)
        client.send(SECTION)
        assert client.reply()[0] == 250
        client.command(b"QUIT\r\n", 221)
    records = relay.wait_records(lambda rs: len(rs) == 2, "transaction")
    assert [r["outcome"] for r in records] == ["retried", "retried"]
    assert [r["mail_from"]["address"] for r in records] == [
        "sender@example.org",
        "second@example.org",
    ]
    assert len(b.wait_all_ended(2)) == 2


@pytest.mark.postfix
def test_a_lost_outcome_is_replayed(
    start_relay: StartRelay,
    make_smtp_sink: Callable[..., SmtpSink],
    make_raw_upstream: Callable[..., RawUpstream],
) -> None:
    # smtp-sink -q .: the connection drops after the final dot, no reply.
    a = make_smtp_sink(options=("-q", "."))
    b = make_raw_upstream()
    a_config = {"kind": "smtp", "host": "127.0.0.1", "port": a.port}
    relay = start_retrying(start_relay, a_config, b.config)
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(SECTION)
        assert client.reply() == (250, b"250 2.0.0 Ok: queued\r\n")
        # The session's upstream connection is gone: it ends after the answer.
        assert client.reply()[0] == 421
    (replayed,) = b.wait_all_ended()
    assert replayed.data == [SECTION]
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert (record["outcome"], record["attempts"]) == ("retried", 2)
    assert record["timeline"][-1]["code"] is None
    # The first upstream may have taken it too: flagged, with its key.
    assert record["duplicate_risk"] is True
    assert len(record["dedupe_key"]) == 64


class DropsAfterTheDot(RawUpstream):
    """Closes its first connection after the final dot, without a reply.

    Later connections get 452 to RCPT, so a delivery from the spool never
    sends the message again: whatever risk the entry carries was spooled.
    """

    def _reply(self, key: str, default: bytes) -> bytes:
        if key == "." and "RCPT" not in self.replies:
            self.replies["RCPT"] = b"452 4.3.1 Insufficient system storage\r\n"
            raise ConnectionResetError("dropped after the final dot")
        return super()._reply(key, default)


@pytest.fixture
def dropping() -> Iterator[tuple[DropsAfterTheDot, DropsAfterTheDot]]:
    a, b = DropsAfterTheDot(), DropsAfterTheDot()
    yield a, b
    a.close()
    b.close()


def test_a_message_requeued_after_a_lost_outcome_is_spooled_as_a_duplicate_risk(
    start_relay: StartRelay, dropping: tuple[DropsAfterTheDot, DropsAfterTheDot], tmp_path: Path
) -> None:
    a, b = dropping
    spool = tmp_path / "spool"
    relay = start_retrying(
        start_relay,
        a.config,
        b.config,
        policy="requeue",
        retry={"attempts": 1, "lost_outcome": "retry"},
        spool={"path": str(spool)},
    )
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(SECTION)
        code, raw = client.reply()
        assert code == 250
        # The session's upstream connection is gone: it ends after the answer.
        assert client.reply()[0] == 421
    queue_id = raw.split(b"queued as ")[1].strip().decode()
    # a took the message and dropped; so did b, the replay.
    assert a.wait_all_ended()[0].data == [SECTION]
    assert b.wait_all_ended()[0].data == [SECTION]
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert (record["outcome"], record["duplicate_risk"]) == ("requeued", True)
    relay.stop()
    with Spool(spool) as reopened:
        entry = reopened.get(queue_id)
    assert entry.duplicate_risk is True
    assert [r.line for r in entry.recipients] == [b"RCPT TO:<rcpt@example.net>"]
    # The error, if the spool tried it meanwhile, is the error alone.
    assert entry.last_error is None or entry.last_error.startswith("a: RCPT 452")


def test_a_lost_outcome_is_a_duplicate_risk_even_if_no_replay_sends_the_message(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], tmp_path: Path
) -> None:
    a = DropsAfterTheDot()
    b = make_raw_upstream(replies={"RCPT": b"452 4.3.1 Insufficient system storage\r\n"})
    spool = tmp_path / "spool"
    try:
        relay = start_retrying(
            start_relay,
            a.config,
            b.config,
            policy="requeue",
            retry={"attempts": 1, "lost_outcome": "retry"},
            spool={"path": str(spool)},
        )
        code, raw = send(relay)
        assert code == 250
        # The replay never sent the message (at most the empty one RFC 2920
        # 3.1 has a client end an accepted DATA with when no RCPT succeeded).
        assert SECTION not in b.wait_all_ended()[0].data
        (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
        assert (record["outcome"], record["duplicate_risk"]) == ("requeued", True)
        relay.stop()
    finally:
        a.close()
    queue_id = raw.split(b"queued as ")[1].strip().decode()
    with Spool(spool) as reopened:
        assert reopened.get(queue_id).duplicate_risk is True


def start_requeueing(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], spool: Path
) -> RunningRelay:
    """A requeue route whose two upstreams both keep failing."""
    failing = {".": b"451 4.3.0 Still failing\r\n"}
    a = make_raw_upstream(replies=failing)
    b = make_raw_upstream(replies=failing)
    return start_retrying(
        start_relay,
        a.config,
        b.config,
        policy="requeue",
        retry={"attempts": 1},
        spool={"path": str(spool)},
    )


def test_requeue_spools_what_the_replays_could_not_deliver(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    relay = start_requeueing(start_relay, make_raw_upstream, spool)
    code, raw = send(relay)
    assert code == 250
    queue_id = raw.split(b"queued as ")[1].strip().decode()
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert (record["outcome"], record["attempts"]) == ("requeued", 2)
    assert record["final_reply"]["local"] is True
    # Every attempt got a clear 4xx: nobody has the message.
    assert record["duplicate_risk"] is False
    relay.stop()
    with Spool(spool) as reopened:
        entry = reopened.get(queue_id)
        assert entry.duplicate_risk is False
        # The upstreams just failed it: the first delivery waits the first
        # backoff (300 s by default, with 20% jitter).
        assert entry.attempts == 0
        assert 240 <= entry.next_attempt - entry.created <= 360
        assert entry.mail_from == b"MAIL FROM:<sender@example.org>"
        assert [r.line for r in entry.recipients] == [b"RCPT TO:<rcpt@example.net>"]
        with reopened.open_message(queue_id) as message:
            assert message.read() == SECTION


@pytest.mark.parametrize(
    ("policy", "code", "outcome"), [("requeue", 250, "requeued"), ("retry", 451, "deferred")]
)
def test_no_replays_spool_or_defer_at_the_first_failure(
    start_relay: StartRelay,
    make_raw_upstream: Callable[..., RawUpstream],
    tmp_path: Path,
    policy: str,
    code: int,
    outcome: str,
) -> None:
    a = make_raw_upstream(replies={".": b"451 4.3.0 Try later\r\n"})
    b = make_raw_upstream()
    relay = start_retrying(
        start_relay,
        a.config,
        b.config,
        policy=policy,
        retry={"attempts": 0},
        spool={"path": str(tmp_path / "spool")},
    )
    got, raw = send(relay)
    assert got == code
    if policy == "retry":
        # Nothing to replay: the upstream's own failure, as under passthrough.
        assert raw == b"451 4.3.0 Try later\r\n"
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert (record["outcome"], record["attempts"]) == (outcome, 1)
    assert a.wait_all_ended()[0].data == [SECTION]
    b.close()
    assert b.connections == []


def test_a_spool_that_cannot_take_the_message_leaves_the_client_a_4xx(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    relay = start_requeueing(start_relay, make_raw_upstream, spool)
    # The queue folder is replaced by a file: every put fails.
    shutil.rmtree(spool / "queue")
    (spool / "queue").write_bytes(b"")
    code, raw = send(relay)
    assert code == 451
    assert raw.startswith(b"451 4.3.0 ")
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert record["outcome"] == "deferred"


def test_a_held_copy_never_outlives_its_transaction(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    a = make_raw_upstream(replies={"BDAT LAST": b"451 4.3.0 Temporary local problem\r\n"})
    b = make_raw_upstream()
    relay = start_retrying(start_relay, a.config, b.config)
    with WireClient(relay.address()) as client:
        client.start_transaction()
        client.send(b"BDAT 7\r\nSTALE!\n")
        client.expect(250)
        client.command(b"RSET\r\n", 250)
        client.command(b"MAIL FROM:<sender@example.org>\r\n", 250)
        client.command(b"RCPT TO:<rcpt@example.net>\r\n", 250)
        client.send(b"BDAT %d LAST\r\n" % len(BODY) + BODY)
        assert client.reply()[0] == 250
        client.command(b"QUIT\r\n", 221)
    (replayed,) = b.wait_all_ended()
    assert replayed.bdat_messages == [BODY]


def test_a_421_to_the_dot_is_replayed(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    a = make_raw_upstream(replies={".": b"421 4.3.2 upstream.test closing\r\n"})
    b = make_raw_upstream()
    relay = start_retrying(start_relay, a.config, b.config)
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(SECTION)
        assert client.reply() == (250, b"250 2.0.0 Ok: queued\r\n")
        # The session's upstream said it is closing: the session ends after the answer.
        assert client.reply()[0] == 421
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert record["outcome"] == "retried"


def test_an_upstream_silent_after_the_dot_is_replayed(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    a = StallingUpstream(answer_dot=False)
    a.read_gate.set()
    b = make_raw_upstream()
    try:
        relay = start_retrying(start_relay, a.config, b.config, timeouts={"data_end": 0.5})
        with WireClient(relay.address()) as client:
            client.open_data()
            client.send(SECTION)
            assert client.reply() == (250, b"250 2.0.0 Ok: queued\r\n")
        (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
        assert (record["outcome"], record["duplicate_risk"]) == ("retried", True)
    finally:
        a.close()


def test_a_client_that_half_closes_after_quit_still_gets_the_replay_answer(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    a = make_raw_upstream(replies={".": b"451 4.3.0 Temporary local problem\r\n"})
    b = make_raw_upstream()
    relay = start_retrying(start_relay, a.config, b.config)
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(SECTION + b"QUIT\r\n")
        client.sock.shutdown(socket.SHUT_WR)
        assert client.reply()[0] == 250
        assert client.reply()[0] == 221
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert record["outcome"] == "retried"


def test_no_room_for_the_held_copy_leaves_the_message_unguarded(
    start_relay: StartRelay,
    make_raw_upstream: Callable[..., RawUpstream],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The spill folder is a file: the held copy cannot spill past 1 KiB.
    blocked = tmp_path / "not-a-folder"
    blocked.write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(blocked))
    a = make_raw_upstream(replies={".": b"451 4.3.0 Temporary local problem\r\n"})
    b = make_raw_upstream()
    relay = start_retrying(start_relay, a.config, b.config, retry={"hold_memory_bytes": 1024})
    big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + b"y" * 998 + b"\r\n.\r\n"
    with WireClient(relay.address()) as client:
        client.open_data()
        client.send(big)
        # Unguarded: the upstream's verdict is relayed as it is.
        assert client.reply() == (451, b"451 4.3.0 Temporary local problem\r\n")
        client.command(b"QUIT\r\n", 221)
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert (record["outcome"], record["attempts"]) == ("deferred", 1)
    assert a.wait_all_ended()[0].data == [big]


def test_shutdown_during_a_replay_answers_421(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    a = make_raw_upstream(replies={".": b"451 4.3.0 Temporary local problem\r\n"})
    b = StallingUpstream(answer_dot=False)
    b.read_gate.set()
    try:
        relay = start_retrying(start_relay, a.config, b.config)
        with WireClient(relay.address()) as client:
            client.open_data()
            client.send(SECTION)
            b.done.wait(10)  # the replay has sent the message and waits
            relay.stop(grace=0.5)
            assert client.reply()[0] == 421
        (record,) = relay.records("transaction")
        assert record["outcome"] in ("unknown", "deferred")
    finally:
        b.close()
