"""Three relay replicas behind HAProxy: one is SIGKILLed under load, nothing acknowledged is lost.

HAProxy (Debian's, ``haproxy -db``) balances one TCP frontend over three
``python -m smtpwarden run`` processes, each with its own spool and record
log, sending PROXY v2 headers and checking each replica (``option
smtpchk`` every 200 ms, behind the LOCAL header HAProxy sends with each
check; a plain connect check works too) so that a dead one leaves the
rotation at once.
Every replica relays to one upstream (aiosmtpd in this process) under the
requeue policy. The upstream knows each message by its ``X-Test-Id`` and
defers every fifth message twice, so the replicas keep a stream of messages
in their spools.

CLIENTS threads send MESSAGES numbered messages through HAProxy, a few per
connection, each from a loopback address of its own. A message is
acknowledged only by a 250 to its end of data; on anything else (a 4xx, a
reset, a timeout) the client sends it again on a new connection, at most
MAX_ATTEMPTS times. Once a third of the messages are acknowledged and the
victim holds some in its spool, it is SIGKILLed; once a tenth more are
acknowledged it is started again on the same port and spool.

Then, once every spool is empty: every acknowledged message reached the
upstream; a message that reached it twice was in flight at the kill; every
replica served client sessions, the restarted one too, and resumed and
delivered what its killed predecessor had spooled; and each session record
names the client's own address and port, as the PROXY header said, not
HAProxy's.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from integration.haproxy import HAProxy, HealthCheck, server_name
from integration.relay_harness import WireClient, check_log_invariants, validate_records
from integration.replicas import IdUpstream, Replica, wait_for

MESSAGES = 3000
CLIENTS = 8
REPLICAS = 3
VICTIM = 1  # the replica that is killed and restarted
MESSAGES_PER_CONNECTION = 4
MAX_ATTEMPTS = 10  # failed tries of one message before its client gives up
CLIENT_TIMEOUT_S = 10.0  # a read or write of a client; a killed replica resets at once
RETRY_PAUSE_S = 0.02  # after a failed connection, before the next one
CLIENT_SOURCES = [f"127.0.0.{20 + index}" for index in range(CLIENTS)]
TRUSTED = "127.0.0.1/32"  # HAProxy connects to the replicas from 127.0.0.1
DEFER_EVERY = 5
DEFERRALS = 2  # the replica's own attempt, then the spool's first
SPOOL_WORKERS = 2
BACKOFF = {"initial": 0.3, "factor": 2, "maximum": 0.6, "jitter": 0.1}
CHECK = HealthCheck(interval_ms=200, fall=2, rise=2, timeout_ms=2000, smtp=True)
KILL_AT = MESSAGES // 3  # acknowledged messages before the kill
RESTART_AFTER = MESSAGES // 10  # more acknowledged messages before the restart
SPOOLED_AT_KILL = 3  # entries the victim must hold when it is killed
DOWN_WITHIN_S = 3.0  # HAProxy must take the dead replica out in this time
STEP_TIMEOUT_S = 30.0
LOAD_TIMEOUT_S = 90.0
DRAIN_TIMEOUT_S = 30.0
# A duplicate must be a message in flight at the kill: one whose client got
# no 250 from the victim and sent it again (the victim had delivered or
# spooled it), its try failing this soon after the kill; or one the victim
# delivered from its spool this soon before the kill, whose entry outlived
# the delivery and was delivered again after the restart.
IN_FLIGHT_S = 5.0
MAX_DUPLICATES = CLIENTS + SPOOL_WORKERS
MIN_SESSIONS_MATCHED = 0.8  # of the client connections that got a 250
MALFORMED = "malformed reply"  # WireClient's AssertionError: never allowed


def message(number: int) -> bytes:
    """Message ``number`` with its DATA terminator; about 600 octets."""
    head = (
        f"From: <load@client.test>\r\nTo: <rcpt@upstream.test>\r\n"
        f"Subject: replica load {number}\r\nX-Test-Id: {number}\r\n"
        f"Message-ID: <{number}.replicas@client.test>\r\n\r\n"
    ).encode("ascii")
    line = b"The quick brown fox jumps over the lazy dog, 0123456789.\r\n"
    return head + line * 8 + b".\r\n"


class Refused(Exception):
    """A reply other than the one the client needs."""


class SourcedWire(WireClient):
    """A ``WireClient`` from a chosen loopback address."""

    def __init__(self, address: tuple[str, int], source: str) -> None:
        self.sock = socket_from(address, source)
        self.timeout = CLIENT_TIMEOUT_S
        self.buf = b""
        host, port = self.sock.getsockname()[:2]
        self.source: tuple[str, int] = (host, port)

    def step(self, line: bytes, code: int) -> bytes:
        if line:
            self.send(line)
        got, raw = self.reply()
        if got != code:
            raise Refused(raw.decode("ascii", "replace").strip())
        return raw


def socket_from(address: tuple[str, int], source: str) -> socket.socket:
    """A connection to ``address`` from ``source``, small writes sent at once."""
    sock = socket.create_connection(address, timeout=CLIENT_TIMEOUT_S, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@dataclass
class Connection:
    """One client connection: where it came from and what it got acknowledged."""

    source: tuple[str, int]
    acknowledged: list[int] = field(default_factory=list)


class Load:
    """The client threads and what they saw, behind one lock."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.changed = threading.Condition()
        self.next_number = 0
        self.acknowledged: dict[int, float] = {}  # number -> monotonic time of its 250
        self.failed_at: defaultdict[int, list[float]] = defaultdict(list)  # monotonic times
        self.gave_up: list[int] = []
        self.failures: Counter[str] = Counter()
        self.connections: list[Connection] = []
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(
                target=self._client, args=(source,), name=f"client-{source}", daemon=True
            )
            for source in CLIENT_SOURCES
        ]
        self.began = 0.0
        self.ended = 0.0

    def start(self) -> None:
        self.began = time.monotonic()
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(CLIENT_TIMEOUT_S * 2)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self.threads):
            self.stopping.set()
            raise AssertionError(f"the clients did not finish in {timeout} s: {self.summary()}")
        self.ended = time.monotonic()

    def wait_acknowledged(self, count: int, timeout: float = STEP_TIMEOUT_S) -> None:
        """Wait until ``count`` messages are acknowledged."""
        with self.changed:
            reached = self.changed.wait_for(lambda: len(self.acknowledged) >= count, timeout)
        if not reached:
            raise AssertionError(f"{count} acknowledged not within {timeout} s: {self.summary()}")

    def count(self) -> int:
        """Messages acknowledged so far."""
        with self.changed:
            return len(self.acknowledged)

    def summary(self) -> str:
        with self.changed:
            return (
                f"{len(self.acknowledged)} acknowledged of {MESSAGES}, "
                f"{len(self.gave_up)} given up, failures {dict(self.failures)}"
            )

    def _take(self, pending: list[int]) -> None:
        """Fill ``pending`` with new numbers, up to a connection's worth."""
        with self.changed:
            while len(pending) < MESSAGES_PER_CONNECTION and self.next_number < MESSAGES:
                pending.append(self.next_number)
                self.next_number += 1

    def _client(self, source: str) -> None:
        pending: list[int] = []
        while not self.stopping.is_set():
            self._take(pending)
            if not pending:
                return
            try:
                self._session(source, pending)
            except (OSError, Refused, AssertionError) as error:
                self._failed(pending, error)
                self.stopping.wait(RETRY_PAUSE_S)

    def _session(self, source: str, pending: list[int]) -> None:
        """Send ``pending`` on one connection; each acknowledged one leaves the list."""
        with SourcedWire(self.address, source) as wire:
            connection = Connection(wire.source)
            with self.changed:
                self.connections.append(connection)
            wire.step(b"", 220)
            wire.step(b"EHLO client.test\r\n", 250)
            while pending:
                number = pending[0]
                wire.step(b"MAIL FROM:<load@client.test>\r\n", 250)
                wire.step(b"RCPT TO:<rcpt@upstream.test>\r\n", 250)
                wire.step(b"DATA\r\n", 354)
                wire.step(message(number), 250)
                with self.changed:
                    self.acknowledged[number] = time.monotonic()
                    connection.acknowledged.append(number)
                    self.changed.notify_all()
                pending.pop(0)
            with contextlib.suppress(OSError, Refused, AssertionError):
                wire.step(b"QUIT\r\n", 221)

    def _failed(self, pending: list[int], error: BaseException) -> None:
        kind = type(error).__name__
        if isinstance(error, Refused):
            kind = f"reply {str(error)[:3]}"
        elif isinstance(error, AssertionError):
            kind = MALFORMED
        with self.changed:
            self.failures[kind] += 1
            if pending:
                # The first message left is the one the connection failed on.
                self.failed_at[pending[0]].append(time.monotonic())
                if len(self.failed_at[pending[0]]) >= MAX_ATTEMPTS:
                    self.gave_up.append(pending.pop(0))


def client_sessions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The session records of the load's clients (not HAProxy's checks nor probes)."""
    return [
        record
        for record in records
        if record["type"] == "session" and record["client"]["address"] in CLIENT_SOURCES
    ]


def test_replicas_behind_haproxy_lose_nothing_when_one_is_killed(tmp_path: Path) -> None:
    began = time.monotonic()
    with contextlib.ExitStack() as cleanup:
        upstream = IdUpstream(defer_every=DEFER_EVERY, deferrals=DEFERRALS)
        cleanup.callback(upstream.close)
        replicas = [
            Replica(
                f"replica-{index + 1}",
                tmp_path / f"replica-{index + 1}",
                upstream.config,
                trusted=TRUSTED,
                spool_workers=SPOOL_WORKERS,
                backoff=BACKOFF,
            )
            for index in range(REPLICAS)
        ]
        for replica in replicas:
            cleanup.callback(replica.kill)
            replica.start()
        proxy = HAProxy(
            tmp_path / "haproxy",
            [replica.address for replica in replicas],
            send_proxy="send-proxy-v2",
            balance="roundrobin",
            check=CHECK,
        )
        cleanup.callback(proxy.stop)
        proxy.start()
        for index in range(REPLICAS):
            proxy.wait_server(server_name(index), "UP")

        load = Load(proxy.address)
        cleanup.callback(load.stop)
        load.start()

        victim = replicas[VICTIM]
        victim_server = server_name(VICTIM)
        load.wait_acknowledged(KILL_AT)
        wait_for(
            lambda: victim.queued() >= SPOOLED_AT_KILL,
            STEP_TIMEOUT_S,
            f"{victim.name} holding {SPOOLED_AT_KILL} spooled messages",
        )
        killed_at = time.monotonic()
        victim.kill()
        acknowledged_at_kill = load.count()
        left_by_kill = victim.queue_ids()  # what the restarted replica must deliver
        down_after = proxy.wait_server(victim_server, "DOWN")

        load.wait_acknowledged(acknowledged_at_kill + RESTART_AFTER)
        victim.start()
        restarted_at = time.monotonic()
        up_after = proxy.wait_server(victim_server, "UP")

        load.join(LOAD_TIMEOUT_S)
        drained_after = wait_for(
            lambda: all(replica.queued() == 0 for replica in replicas),
            DRAIN_TIMEOUT_S,
            "every spool empty",
        )
        proxy.stop()
        statuses = {replica.name: replica.stop() for replica in replicas}
    duration = time.monotonic() - began

    accepted = upstream.snapshot()
    acknowledged = set(load.acknowledged)
    delivered = set(accepted)
    duplicates = {number: got for number, got in accepted.items() if len(got) > 1}
    resumed = victim.resumed(run=1)
    spool_deliveries = sum(
        1
        for got in accepted.values()
        for acceptance in got
        if acceptance.helo == victim.hostname and acceptance.at > restarted_at
    )
    records = {replica.name: replica.records() for replica in replicas}
    sessions = {name: client_sessions(found) for name, (found, _) in records.items()}
    matched, served = match_sessions(load.connections, sessions)
    counts = {name: len(found) for name, found in sessions.items()}
    print(
        f"\nreplicas: {MESSAGES} messages, {len(acknowledged)} acknowledged, "
        f"{len(delivered)} delivered, {sum(len(got) - 1 for got in duplicates.values())} "
        f"duplicates {sorted(duplicates)[:10]}, {sum(upstream.refused.values())} deferred "
        f"by the upstream; client failures {dict(load.failures)}; load "
        f"{load.ended - load.began:.1f} s, drain {drained_after:.1f} s, whole {duration:.1f} s; "
        f"killed after {acknowledged_at_kill} acknowledged, {len(left_by_kill)} spooled; "
        f"down after {down_after:.2f} s; restarted {restarted_at - killed_at:.2f} s after "
        f"the kill, up after {up_after:.2f} s, {resumed} resumed, {spool_deliveries} spool "
        f"deliveries since; client sessions {counts}, {matched} of {served} connections "
        f"with a 250 found in the records"
    )

    # Every message was acknowledged in the end, and nothing acknowledged is lost.
    assert not load.gave_up, f"given up after {MAX_ATTEMPTS} attempts: {load.gave_up[:20]}"
    assert len(acknowledged) == MESSAGES, load.summary()
    lost = sorted(acknowledged - delivered)
    assert not lost, f"{len(lost)} acknowledged and never delivered: {lost[:20]}"
    assert upstream.unidentified == 0
    assert MALFORMED not in load.failures, load.failures
    assert delivered <= acknowledged

    # Duplicates only for messages in flight at the kill, and few.
    assert len(duplicates) <= MAX_DUPLICATES, sorted(duplicates)
    for number, got in duplicates.items():
        resent = any(killed_at <= at <= killed_at + IN_FLIGHT_S for at in load.failed_at[number])
        spooled_again = got[0].helo == victim.hostname and (
            killed_at - IN_FLIGHT_S <= got[0].at <= killed_at
        )
        assert resent or spooled_again, (
            f"message {number} delivered {len(got)} times, not in flight at the kill: "
            f"accepted {[(a.helo, round(a.at - killed_at, 2)) for a in got]} s from the kill, "
            f"its tries failed {[round(at - killed_at, 2) for at in load.failed_at[number]]}"
        )

    # HAProxy took the dead replica out quickly (and put it back: wait_server).
    assert down_after <= DOWN_WITHIN_S, f"{victim_server} marked down after {down_after:.2f} s"

    # The restarted replica found the killed one's spool and delivered it.
    restarted_records, _ = victim.records(run=1)
    assert resumed == len(left_by_kill), victim.stderr(run=1)
    assert left_by_kill, "the victim held nothing in its spool when it was killed"
    redelivered = {
        record["queue_id"]
        for record in restarted_records
        if record["type"] == "delivery" and record["outcome"] == "delivered"
    }
    undelivered = sorted(left_by_kill - redelivered)
    assert not undelivered, f"{victim.name} restarted and did not deliver {undelivered[:10]}"
    assert spool_deliveries >= len(left_by_kill)
    assert all(replica.quarantined() == 0 for replica in replicas)
    # The processes running at the end stopped cleanly on SIGTERM.
    assert all(status == 0 for status in statuses.values()), statuses

    # Every replica served clients, the restarted one after its restart too;
    # every record is well-formed, each session and transaction recorded once.
    for name, found in sessions.items():
        assert found, f"{name} recorded no client session"
    assert client_sessions(restarted_records), f"{victim.name} served no client after its restart"
    for name, (found, broken) in records.items():
        # Only the killed run may have left a cut line behind.
        assert broken <= (1 if name == victim.name else 0), f"{name}: {broken} broken lines"
        validate_records(found)
        check_log_invariants(found)

    # The PROXY header carried each client's own address and port into the
    # records (HAProxy's side of the connection would be 127.0.0.1 and
    # another port): most connections that got a 250 are found. The killed
    # run's last records may be lost with it.
    assert matched >= MIN_SESSIONS_MATCHED * served, (
        f"only {matched} of {served} client connections with a 250 have a session record"
    )


def match_sessions(
    connections: list[Connection], sessions: dict[str, list[dict[str, Any]]]
) -> tuple[int, int]:
    """Match client connections and session records by the client's address and port.

    Every record must name a connection a client made, and say at least as
    many transactions as that connection got 250s (checked where the pair
    is unique: the system may give a port again once its connection is
    over). Returns how many connections that got a 250 have a record, and
    how many got a 250.
    """
    made = Counter(connection.source for connection in connections)
    recorded: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for found in sessions.values():
        for record in found:
            recorded[record["client"]["address"], record["client"]["port"]].append(record)
    strangers = sorted(set(recorded) - set(made))
    assert not strangers, f"session records of connections no client made: {strangers[:10]}"
    served = [connection for connection in connections if connection.acknowledged]
    matched = [connection for connection in served if connection.source in recorded]
    for connection in matched:
        if made[connection.source] == 1 and len(recorded[connection.source]) == 1:
            (record,) = recorded[connection.source]
            assert record["transactions"] >= len(connection.acknowledged), record
    return len(matched), len(served)
