"""SIGHUP reloads the configuration file of a running relay, for real.

Each test starts ``python -m smtpwarden run --config FILE`` (a lone relay,
or a supervisor of two workers), rewrites the file, sends SIGHUP and waits
for the line that says what became of it. Checked: a valid file serves the
sessions that start afterwards (another upstream, another size limit)
while a session open across the reload keeps what it started with; a file
that does not validate, or changes a setting that needs a restart, is
refused with its problems named and the running configuration kept; the
metrics count both; the transaction log is reopened for rotation; the
workers of a supervisor all take the file the supervisor read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from integration.pki import make_pki
from integration.prometheus_text import get, scrape, total
from integration.recording_upstreams import RawUpstream
from integration.relay_harness import (
    POLL_S,
    TEST_TIMEOUTS,
    WAIT_S,
    StartRelay,
    WireClient,
    free_port,
    read_records,
    validate_records,
)
from integration.supervised import START_TIMEOUT_S, Supervised
from integration.test_certificate_reload import subject_of
from smtpwarden.config import parse_config
from smtpwarden.net.server import Relay

LISTENER_LINE = re.compile(r"listener main on 127\.0\.0\.1:(\d+) relays to")
HTTP_LINE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
APPLIED = re.compile(r"configuration reloaded from \S+: (.*)")
REFUSED = re.compile(r"configuration not reloaded, the running one is kept")
SMALL = 2000  # max_message_bytes after the reload; 10240000 before
BODY = "Subject: big\r\n\r\n" + "x" * 78 + "\r\n"


def relay_document(
    loop_kind: str, log: Path, upstreams: dict[str, RawUpstream], use: str, **extra: Any
) -> dict[str, Any]:
    return {
        "event_loop": loop_kind,
        "hostname": "relay.test",
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": use}],
        "upstreams": [{"name": name, **up.config} for name, up in upstreams.items()],
        "timeouts": TEST_TIMEOUTS,
        "health": {"check_interval": 0},
        "http": {"port": 0},
        "log": {"transactions": str(log), "sessions": True, "level": "info"},
        **extra,
    }


class Reloading:
    """A relay process, its configuration file, and the file's next versions."""

    def __init__(self, document: dict[str, Any], folder: Path) -> None:
        self.document = document
        self.path = folder / "smtpwarden.yaml"
        self.process = Supervised(document, folder)
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.http: tuple[str, int] = ("127.0.0.1", 0)

    def wait_ready(self) -> None:
        http = self.process.expect(HTTP_LINE, START_TIMEOUT_S)
        listener = self.process.expect(LISTENER_LINE, START_TIMEOUT_S)
        self.address = ("127.0.0.1", int(listener.group(1)))
        self.http = ("127.0.0.1", int(http.group(1)))

    def rewrite(self, edit: Callable[[dict[str, Any]], None]) -> None:
        edit(self.document)
        self.path.write_text(yaml.safe_dump(self.document), encoding="utf-8")

    def hup(self, outcome: re.Pattern[str]) -> re.Match[str]:
        self.process.signal(signal.SIGHUP)
        return self.process.expect(outcome)


@pytest.fixture
def upstreams(make_raw_upstream: Callable[..., RawUpstream]) -> dict[str, RawUpstream]:
    return {"first": make_raw_upstream(), "second": make_raw_upstream()}


@pytest.fixture
def relay(tmp_path: Path, loop_kind: str, upstreams: dict[str, RawUpstream]) -> Iterator[Reloading]:
    document = relay_document(loop_kind, tmp_path / "log.jsonl", upstreams, "first")
    running = Reloading(document, tmp_path)
    try:
        running.wait_ready()
        yield running
    finally:
        running.process.close()


def eventually(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate`` holds (a file or a scrape has no event to wait on)."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(POLL_S)


def delivered(upstream: RawUpstream) -> int:
    return sum(len(connection.data) for connection in upstream.connections)


def send(address: tuple[str, int], body: str = BODY) -> None:
    with smtplib.SMTP(*address, timeout=20) as client:
        client.sendmail("sender@example.org", ["rcpt@example.net"], body)


def size_offered(address: tuple[str, int]) -> int:
    with smtplib.SMTP(*address, timeout=20) as client:
        client.ehlo("client.test")
        return int(client.esmtp_features["size"])


def switch(document: dict[str, Any]) -> None:
    """The edit of a valid reload: another upstream, a smaller size limit."""
    document["listeners"][0]["upstream"] = "second"
    document["limits"] = {"max_message_bytes": SMALL}


def test_a_valid_file_serves_new_sessions_while_live_ones_keep_theirs(
    relay: Reloading, upstreams: dict[str, RawUpstream]
) -> None:
    first, second = upstreams["first"], upstreams["second"]
    big = BODY + "y" * 4000 + "\r\n"  # over SMALL, under the size limit at start
    with WireClient(relay.address) as live:
        live.start_transaction()
        relay.rewrite(switch)
        changed = relay.hup(APPLIED)
        assert changed.group(1) == "changed listeners, routes, limits"
        # A new session: the other upstream and the new limit, in EHLO and enforced.
        assert size_offered(relay.address) == SMALL
        send(relay.address)
        second.wait_for(lambda connections: sum(len(c.data) for c in connections) == 1)
        with smtplib.SMTP(*relay.address, timeout=20) as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as caught:
                client.sendmail("sender@example.org", ["rcpt@example.net"], big)
            assert caught.value.smtp_code == 552
        # The session open across the reload still goes to the first upstream,
        # and a message past the new limit is its own to send.
        live.command(b"DATA\r\n", 354)
        live.send(big.encode() + b".\r\n")
        live.expect(250)
        live.command(b"QUIT\r\n", 221)
    first.wait_for(lambda connections: sum(len(c.data) for c in connections) == 1)
    assert delivered(second) == 1
    assert relay.process.process.poll() is None
    log = Path(relay.document["log"]["transactions"])
    # Four sessions: the live one, the EHLO, the message, the one refused.
    eventually(lambda: sum(r["type"] == "session" for r in read_records(log)) == 4)
    records = read_records(log)
    validate_records(records)
    delivered_by = [
        r["upstream"]["name"]
        for r in records
        if r["type"] == "transaction" and r["outcome"] == "delivered"
    ]
    assert sorted(delivered_by) == ["first", "second"]


def test_a_refused_file_keeps_the_running_configuration(
    relay: Reloading, upstreams: dict[str, RawUpstream]
) -> None:
    first = upstreams["first"]
    # Invalid: both problems are named, and nothing changes.
    relay.rewrite(lambda document: document.update(limits={"max_recipients": 5, "nonsense": 1}))
    relay.hup(REFUSED)
    problems = relay.process.output()
    assert "limits.max_recipients: expected an integer >= 100, got 5" in problems
    assert "limits.nonsense: unknown key" in problems
    # Not YAML at all.
    relay.path.write_text("listeners: [\n", encoding="utf-8")
    relay.hup(REFUSED)
    # Settings fixed at start: refused, each named.
    port = free_port()

    def restart_only(document: dict[str, Any]) -> None:
        del document["limits"]
        document["listeners"][0]["port"] = port
        document["workers"] = 2
        document["listeners"][0]["upstream"] = "second"

    relay.rewrite(restart_only)
    relay.hup(REFUSED)
    output = relay.process.output()
    assert f"listeners[main].port: 0, now {port}" in output
    assert "workers: 1, now 2" in output
    send(relay.address)
    first.wait_for(lambda connections: sum(len(c.data) for c in connections) == 1)
    assert delivered(upstreams["second"]) == 0
    families = scrape(relay.http)
    assert get(families, "smtpwarden_config_reloads_total", result="refused") == 3
    assert get(families, "smtpwarden_config_last_reload_successful") == 0
    # A valid file again: applied, and the metrics say so.
    relay.rewrite(
        lambda document: document.update(
            workers=1, listeners=[{**document["listeners"][0], "port": 0}]
        )
    )
    relay.hup(APPLIED)
    send(relay.address)
    upstreams["second"].wait_for(lambda connections: sum(len(c.data) for c in connections) == 1)
    families = scrape(relay.http)
    assert get(families, "smtpwarden_config_reloads_total", result="applied") == 1
    assert get(families, "smtpwarden_config_last_reload_successful") == 1
    assert relay.process.process.poll() is None


def test_sighup_reopens_the_transaction_log_after_a_rotation(relay: Reloading) -> None:
    log = Path(relay.document["log"]["transactions"])
    send(relay.address)
    eventually(lambda: len(read_records(log)) == 2)  # the transaction and the session
    log.rename(log.with_name("log.jsonl.1"))
    relay.hup(APPLIED)
    send(relay.address)
    eventually(lambda: log.exists() and len(read_records(log)) == 2)
    rotated = read_records(log.with_name("log.jsonl.1"))
    assert [r["type"] for r in rotated] == ["transaction", "session"]
    assert [r["type"] for r in read_records(log)] == ["transaction", "session"]


@pytest.fixture
def supervised(
    tmp_path: Path, loop_kind: str, upstreams: dict[str, RawUpstream]
) -> Iterator[Reloading]:
    document = relay_document(loop_kind, tmp_path / "log.jsonl", upstreams, "first", workers=2)
    running = Reloading(document, tmp_path)
    try:
        address, http = running.process.wait_ready(2)
        running.address, running.http = address, http
        yield running
    finally:
        running.process.close()


WORKER_APPLIED = re.compile(r"worker (\d) smtpwarden INFO configuration reloaded")
SESSIONS = 20


def test_every_worker_takes_the_file_its_supervisor_read(
    supervised: Reloading, upstreams: dict[str, RawUpstream]
) -> None:
    supervised.rewrite(switch)
    supervised.hup(
        re.compile(r"configuration read again from \S+: changed listeners, routes, limits")
    )
    applied = {supervised.process.expect(WORKER_APPLIED).group(1) for _ in range(2)}
    assert applied == {"0", "1"}
    for _ in range(SESSIONS):
        send(supervised.address)
    upstreams["second"].wait_for(
        lambda connections: sum(len(c.data) for c in connections) == SESSIONS
    )
    assert delivered(upstreams["first"]) == 0
    families = scrape(supervised.http)
    # The kernel spread the sessions over both workers; each took the reload.
    assert total(families, "smtpwarden_sessions_total", worker="0") > 0
    assert total(families, "smtpwarden_sessions_total", worker="1") > 0
    for worker in ("0", "1"):
        assert get(families, "smtpwarden_config_reloads_total", result="applied", worker=worker)
    # A refused file is reported once, by the supervisor; the workers keep
    # what they run and count the refusal.
    supervised.rewrite(lambda document: document.update(workers=3))
    supervised.hup(REFUSED)
    supervised.process.expect(re.compile(r"SIGHUP: passed on to 2 ready workers"))
    assert "workers: 2, now 3" in supervised.process.output()

    def refused_by_both() -> bool:
        found = scrape(supervised.http)
        return all(
            get(found, "smtpwarden_config_last_reload_successful", worker=worker) == 0
            for worker in ("0", "1")
        )

    eventually(refused_by_both)
    assert len(REFUSED.findall(supervised.process.output())) == 1
    send(supervised.address)
    upstreams["second"].wait_for(
        lambda connections: sum(len(c.data) for c in connections) == SESSIONS + 1
    )


def test_a_file_gone_missing_keeps_its_context_and_the_log_still_reopens(
    tmp_path: Path, loop_kind: str, upstreams: dict[str, RawUpstream]
) -> None:
    """A CA file missing at the reload: the file is refused, the upstream keeps
    the context it has, and the log is reopened all the same (rotation)."""
    pki = make_pki(tmp_path)
    ca_file = tmp_path / "upstream-ca.pem"
    ca_file.write_bytes(pki.ca_file.read_bytes())
    log = tmp_path / "log.jsonl"
    document = relay_document(loop_kind, log, upstreams, "first")
    tls = {"mode": "starttls", "required": False, "ca_file": str(ca_file)}
    document["upstreams"][0]["tls"] = tls  # the raw upstream offers no STARTTLS
    relay = Reloading(document, tmp_path)
    try:
        relay.wait_ready()
        send(relay.address)
        eventually(lambda: len(read_records(log)) == 2)
        log.rename(tmp_path / "log.jsonl.1")
        ca_file.unlink()
        relay.hup(REFUSED)
        relay.process.expect(re.compile(r"upstream first: TLS files not reloaded, the ones"))
        send(relay.address)
        eventually(lambda: log.exists() and len(read_records(log)) == 2)
        assert delivered(upstreams["first"]) == 2
        assert relay.process.process.poll() is None
    finally:
        relay.process.close()


def test_an_implicit_tls_listener_takes_its_renewed_certificate(
    tmp_path: Path, loop_kind: str, upstreams: dict[str, RawUpstream]
) -> None:
    """The event loop does this listener's handshakes with the context it
    started with: a reload hands new handshakes to the renewed certificate,
    here of another key type (ECDSA, then RSA)."""
    ca = trustme.CA()
    first = issue(ca, "first.relay.test")
    (tmp_path / "cert.pem").write_bytes(first[0])
    (tmp_path / "key.pem").write_bytes(first[1])
    document = relay_document(loop_kind, tmp_path / "log.jsonl", upstreams, "first")
    document["listeners"][0]["tls"] = {
        "mode": "implicit",
        "certificate": str(tmp_path / "cert.pem"),
        "key": str(tmp_path / "key.pem"),
    }
    relay = Reloading(document, tmp_path)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:
        relay.wait_ready()
        assert subject(relay.address, context) == "first.relay.test"
        second = issue(ca, "second.relay.test", trustme.KeyType.RSA)
        (tmp_path / "cert.pem").write_bytes(second[0])
        (tmp_path / "key.pem").write_bytes(second[1])
        relay.hup(APPLIED)
        assert subject(relay.address, context) == "second.relay.test"
    finally:
        relay.process.close()


def issue(
    ca: trustme.CA, name: str, key_type: trustme.KeyType = trustme.KeyType.ECDSA
) -> tuple[bytes, bytes]:
    leaf = ca.issue_cert("127.0.0.1", common_name=name, key_type=key_type)
    return b"".join(pem.bytes() for pem in leaf.cert_chain_pems), leaf.private_key_pem.bytes()


def subject(address: tuple[str, int], context: ssl.SSLContext) -> str:
    with smtplib.SMTP_SSL(*address, context=context, timeout=20) as client:
        return subject_of(client)


def test_sessions_of_a_replaced_context_learn_of_the_shutdown(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    """Draining is the relay's, not one context's: a session made from a
    context a reload has since replaced (one still in its TLS handshake, say)
    sees the shutdown too."""
    running = start_relay(raw_upstream.config)
    relay, loop = running.relay, running.loop
    assert relay is not None
    assert loop is not None
    before = running.call(lambda: relay.serving["main"][0])
    other = dataclasses.replace(relay.config, hostname="other.relay.test")
    applied = asyncio.run_coroutine_threadsafe(relay.reloads.reload(other), loop).result(WAIT_S)
    assert applied
    after = running.call(lambda: relay.serving["main"][0])
    assert after is not before
    assert not before.draining
    running.begin_stop(1.0).result(WAIT_S)
    assert before.draining
    assert after.draining


def test_a_worker_opens_the_spool_its_supervisor_recovered(
    tmp_path: Path, raw_upstream: RawUpstream
) -> None:
    """A worker started after a reload removed every requeue route still opens
    and delivers the spool, so that a requeue route may come back."""
    document = relay_document("asyncio", tmp_path / "log.jsonl", {"up": raw_upstream}, "up")
    spool = str(tmp_path / "spool")
    document["http"] = {"enabled": False}
    document["spool"] = {"path": spool}
    config = parse_config(document, source="test")  # no requeue route
    document["routes"] = [{"name": "main", "upstreams": ["up"], "policy": "requeue"}]
    requeue = parse_config(document, source="test")

    async def run() -> tuple[bool, bool, bool]:
        relay = Relay(config, spool_path=spool, recover_spool=False)
        await relay.start()
        try:
            opened = relay.spool is not None and relay.runner is not None
            applied = await relay.reloads.reload(requeue)
            document["spool"] = {"path": str(tmp_path / "other")}
            moved = await relay.reloads.reload(parse_config(document, source="test"))
        finally:
            await relay.stop(0.0)
            relay.close_log()
        return opened, applied, moved

    assert asyncio.run(run()) == (True, True, False)
