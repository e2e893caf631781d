"""``workers: 2``: a supervisor and two relay processes on one port, for real.

Each test starts ``python -m smtpwarden run`` with a configuration of two
workers and a listener on port 0, and drives it with real clients over
127.0.0.1: the port is shared (both workers serve sessions, the merged
metrics say which), a killed worker comes back on the same port, SIGTERM
lets a message in progress finish, the spool is delivered once whichever
worker spools and delivers, and workers left without their supervisor stop
on their own.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration.prometheus_text import Family, get, scrape, total
from integration.recording_upstreams import RawUpstream
from integration.relay_harness import (
    TEST_TIMEOUTS,
    WireClient,
    check_log_invariants,
    read_records,
    validate_records,
)
from integration.supervised import POLL_S, WAIT_S, FlakyUpstream, Supervised, wait_gone

WORKERS = 2
SESSIONS = 200
GRACE_S = 30.0  # SIGTERM's grace: no test may come near it
EXIT_S = 20.0  # how long a stop with nothing left to finish may take
SUPERVISOR_FAMILIES = ("smtpwarden_workers", "smtpwarden_worker_")


def workers_config(
    loop_kind: str, upstream: dict[str, object], log: str, **extra: object
) -> dict[str, object]:
    return {
        "workers": WORKERS,
        "event_loop": loop_kind,
        "hostname": "relay.test",
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "up"}],
        "upstreams": [{"name": "up", **upstream}],
        "timeouts": TEST_TIMEOUTS,
        "shutdown": {"grace": GRACE_S, "fast": 2.0},
        "log": {"transactions": log, "sessions": True, "level": "info"},
        "health": {"check_interval": 0},
        "http": {"port": 0},
        **extra,
    }


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Supervised]]:
    """Supervisors a test starts; each is killed afterwards, with its workers."""
    made: list[Supervised] = []
    yield made
    for supervised in made:
        supervised.close()


def start_logging(
    tmp_path: Path, loop_kind: str, upstream: RawUpstream, started: list[Supervised]
) -> Supervised:
    """A supervisor of WORKERS workers in front of ``upstream``, logging to log.jsonl."""
    config = workers_config(loop_kind, upstream.config, str(tmp_path / "log.jsonl"))
    supervised = Supervised(config, tmp_path)
    started.append(supervised)
    return supervised


def send(address: tuple[str, int], number: int) -> None:
    """One short session: one message, then QUIT."""
    message = f"Subject: message {number}\r\n\r\nbody of message {number}\r\n"
    with smtplib.SMTP(*address, timeout=WAIT_S) as client:
        client.sendmail("sender@example.org", ["rcpt@example.net"], message)


def scrape_until(
    address: tuple[str, int], done: Callable[[dict[str, Family]], bool], timeout: float = WAIT_S
) -> dict[str, Family]:
    """Scrape until ``done(families)`` holds: session counts follow the session's end."""
    families = scrape(address)
    deadline = time.monotonic() + timeout
    while not done(families):
        assert time.monotonic() < deadline, families
        time.sleep(POLL_S)
        families = scrape(address)
    return families


def per_worker(families: dict[str, Family], name: str) -> dict[str, float]:
    return {str(i): total(families, name, worker=str(i)) for i in range(WORKERS)}


def test_two_workers_share_one_port_and_one_endpoint(
    tmp_path: Path, loop_kind: str, raw_upstream: RawUpstream, started: list[Supervised]
) -> None:
    stdout_path = tmp_path / "stdout.jsonl"
    with stdout_path.open("wb") as stdout:
        config = workers_config(loop_kind, raw_upstream.config, "-")
        supervised = Supervised(config, tmp_path, stdout)
        started.append(supervised)
        address, http = supervised.wait_ready(WORKERS)
        # SIGHUP is passed on, and a worker handles it (its default would end it).
        supervised.signal(signal.SIGHUP)
        supervised.expect(re.compile(r"SIGHUP: passed on to 2 ready workers"))
        for number in range(SESSIONS):
            send(address, number)
        families = scrape_until(
            http, lambda found: total(found, "smtpwarden_sessions_total") == SESSIONS
        )
        sessions = per_worker(families, "smtpwarden_sessions_total")
        # The kernel spread the connections over both workers' sockets.
        assert all(count > 0 for count in sessions.values()), sessions
        assert sum(per_worker(families, "smtpwarden_transactions_total").values()) == SESSIONS
        assert get(families, "smtpwarden_workers", state="ready") == WORKERS
        assert per_worker(families, "smtpwarden_worker_restarts_total") == {"0": 0, "1": 0}
        assert per_worker(families, "smtpwarden_worker_up") == {"0": 1, "1": 1}
        # One HELP and TYPE per family (parse checks it); every worker sample labelled.
        for family in families.values():
            if family.name.startswith(SUPERVISOR_FAMILIES):
                continue
            for name, labels, _ in family.samples:
                assert dict(labels).get("worker") in ("0", "1"), (name, labels)
        assert get(families, "smtpwarden_sessions_active", listener="main", worker="1") == 0
        supervised.signal(signal.SIGTERM)
        assert supervised.wait_exit(EXIT_S) == 0, supervised.output()
    raw_upstream.wait_for(lambda conns: sum(len(conn.data) for conn in conns) >= SESSIONS)
    assert sum(len(conn.data) for conn in raw_upstream.connections) == SESSIONS
    # Both workers' records reached standard output, whole lines only.
    records = read_records(stdout_path)
    validate_records(records)
    check_log_invariants(records)
    transactions = [record for record in records if record["type"] == "transaction"]
    assert len(transactions) == SESSIONS
    assert {record["outcome"] for record in transactions} == {"delivered"}
    assert len([record for record in records if record["type"] == "session"]) == SESSIONS
    # A session id starts with its process's random prefix: two processes wrote.
    assert len({record["session_id"][:8] for record in transactions}) == WORKERS


def test_a_killed_worker_is_started_again_on_the_same_port(
    tmp_path: Path, loop_kind: str, raw_upstream: RawUpstream, started: list[Supervised]
) -> None:
    supervised = start_logging(tmp_path, loop_kind, raw_upstream, started)
    address, http = supervised.wait_ready(WORKERS)
    first = supervised.worker_pids()
    os.kill(first[0], signal.SIGKILL)
    supervised.expect(re.compile(rf"worker 0 \(pid {first[0]}\) was killed by SIGKILL"))
    supervised.expect(re.compile(r"starting worker 0 again in 1 s"))
    # While worker 0 is down, the other one serves every session.
    for number in range(20):
        send(address, number)
    again = supervised.expect(re.compile(r"worker 0 \(pid (\d+)\) ready"))
    assert int(again.group(1)) != first[0]
    assert supervised.worker_pids()[1] == first[1]
    for number in range(20, 120):
        send(address, number)
    families = scrape_until(
        http, lambda found: sum(per_worker(found, "smtpwarden_sessions_total").values()) >= 100
    )
    assert per_worker(families, "smtpwarden_worker_restarts_total") == {"0": 1, "1": 0}
    assert get(families, "smtpwarden_workers", state="ready") == WORKERS
    # The new worker 0 counts from zero, and has served on the shared port.
    assert per_worker(families, "smtpwarden_sessions_total")["0"] > 0
    raw_upstream.wait_for(lambda conns: sum(len(conn.data) for conn in conns) >= 120)
    supervised.signal(signal.SIGTERM)
    assert supervised.wait_exit(EXIT_S) == 0, supervised.output()
    records = read_records(tmp_path / "log.jsonl")
    validate_records(records)
    check_log_invariants(records)
    assert len([record for record in records if record["type"] == "transaction"]) == 120


@pytest.mark.parametrize("everyone", [False, True], ids=["supervisor", "every-process"])
def test_sigterm_lets_the_message_in_progress_finish(
    tmp_path: Path,
    loop_kind: str,
    raw_upstream: RawUpstream,
    started: list[Supervised],
    everyone: bool,
) -> None:
    supervised = start_logging(tmp_path, loop_kind, raw_upstream, started)
    address, _ = supervised.wait_ready(WORKERS)
    pids = set(supervised.worker_pids().values())
    with WireClient(address, timeout=GRACE_S) as client:
        client.open_data()
        client.send(b"Subject: in progress\r\n\r\nfirst half\r\n")
        supervised.signal(signal.SIGTERM)
        if everyone:
            # As pkill does: the workers get the signal directly too, and
            # must not take the supervisor's stop request for a second one.
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
        shutting = re.compile(r"worker (\d) smtpwarden INFO shutting down, 30\.0 s grace")
        told = {supervised.expect(shutting).group(1) for _ in range(WORKERS)}
        assert told == {"0", "1"}
        client.send(b"second half\r\n.\r\n")
        assert client.expect(250) == b"250 2.0.0 Ok: queued\r\n"
        client.expect(421)
        assert client.read_to_eof() == b""
    assert supervised.wait_exit(EXIT_S) == 0, supervised.output()
    wait_gone(pids)
    (connection,) = raw_upstream.wait_all_ended(1)
    assert connection.data == [b"Subject: in progress\r\n\r\nfirst half\r\nsecond half\r\n.\r\n"]
    (transaction,) = [r for r in read_records(tmp_path / "log.jsonl") if r["type"] == "transaction"]
    assert transaction["outcome"] == "delivered"


def test_a_second_sigterm_ends_the_grace_in_every_worker(
    tmp_path: Path, loop_kind: str, raw_upstream: RawUpstream, started: list[Supervised]
) -> None:
    supervised = start_logging(tmp_path, loop_kind, raw_upstream, started)
    address, _ = supervised.wait_ready(WORKERS)
    with WireClient(address, timeout=GRACE_S) as client:
        client.start_transaction()
        supervised.signal(signal.SIGTERM)
        shutting = re.compile(r"worker (\d) smtpwarden INFO shutting down")
        assert {supervised.expect(shutting).group(1) for _ in range(WORKERS)} == {"0", "1"}
        signalled = time.monotonic()
        supervised.signal(signal.SIGTERM)
        supervised.expect(re.compile(r"SIGTERM again: the workers close every session now"))
        assert client.expect(421) == b"421 4.3.2 relay.test Service shutting down\r\n"
        assert time.monotonic() - signalled < GRACE_S / 2
    assert supervised.wait_exit(EXIT_S) == 0, supervised.output()
    (transaction,) = [r for r in read_records(tmp_path / "log.jsonl") if r["type"] == "transaction"]
    assert transaction["outcome"] == "deferred"


def test_requeued_messages_are_delivered_once_by_competing_workers(
    tmp_path: Path, loop_kind: str, started: list[Supervised]
) -> None:
    upstream = FlakyUpstream()
    try:
        spool = tmp_path / "spool"
        config = workers_config(
            loop_kind,
            upstream.config,
            str(tmp_path / "log.jsonl"),
            routes=[{"name": "main", "policy": "requeue", "upstreams": ["up"]}],
            retry={"attempts": 0},
            spool={
                "path": str(spool),
                "backoff": {"initial": 0.2, "factor": 1, "maximum": 0.2, "jitter": 0},
            },
        )
        supervised = Supervised(config, tmp_path)
        started.append(supervised)
        address, http = supervised.wait_ready(WORKERS)
        messages = 30
        for number in range(messages):
            send(address, number)  # 451 upstream: spooled, then 250 to the client
        assert upstream.refused >= messages
        upstream.accept()
        upstream.wait_accepted(messages)
        # Once the queue is empty nothing is left that could be sent again.
        scrape_until(http, lambda _: not list((spool / "queue").glob("*.env")))
        supervised.signal(signal.SIGTERM)
        assert supervised.wait_exit(EXIT_S) == 0, supervised.output()
    finally:
        upstream.close()
    # The spool was recovered once, by the supervisor, before the workers started.
    recovered = [line for line in supervised.seen if re.search(r"spool \S+: \d+ to resume", line)]
    assert len(recovered) == 1, recovered
    assert " smtpwarden.workers INFO spool " in recovered[0]
    assert len(upstream.accepted) == messages
    subjects = {content.split(b"\r\n", 1)[0] for content in upstream.accepted}
    assert subjects == {f"Subject: message {n}".encode() for n in range(messages)}
    records = read_records(tmp_path / "log.jsonl")
    validate_records(records)
    check_log_invariants(records)
    transactions = [record for record in records if record["type"] == "transaction"]
    assert {record["outcome"] for record in transactions} == {"requeued"}
    # Both workers spooled some (their session ids have two prefixes).
    assert len({record["session_id"][:8] for record in transactions}) == WORKERS
    deliveries = [record for record in records if record["type"] == "delivery"]
    assert len(deliveries) == messages
    assert len({record["queue_id"] for record in deliveries}) == messages
    assert {record["outcome"] for record in deliveries} == {"delivered"}


def test_workers_stop_when_their_supervisor_is_killed(
    tmp_path: Path, loop_kind: str, raw_upstream: RawUpstream, started: list[Supervised]
) -> None:
    supervised = start_logging(tmp_path, loop_kind, raw_upstream, started)
    address, _ = supervised.wait_ready(WORKERS)
    send(address, 0)
    pids = set(supervised.worker_pids().values())
    supervised.process.kill()
    orphaned = re.compile(r"worker (\d) smtpwarden\.worker WARNING the supervisor is gone")
    assert {supervised.expect(orphaned).group(1) for _ in range(WORKERS)} == {"0", "1"}
    wait_gone(pids)
    assert supervised.wait_exit(EXIT_S) == -signal.SIGKILL


def test_a_port_in_use_is_reported_once_by_the_supervisor(
    tmp_path: Path, raw_upstream: RawUpstream, started: list[Supervised]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = workers_config("asyncio", raw_upstream.config, str(tmp_path / "log.jsonl"))
        config["listeners"] = [{"name": "main", "host": "127.0.0.1", "port": port}]
        supervised = Supervised(config, tmp_path)
        started.append(supervised)
        assert supervised.wait_exit(EXIT_S) == 1
    output = supervised.output()
    assert f"cannot start: listener main: cannot bind 127.0.0.1:{port}: " in output
    assert "worker" not in output.replace("workers", "")  # none was started
