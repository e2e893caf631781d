"""The HTTP endpoint over real sockets: metrics under load, liveness, readiness.

Metrics are scraped while clients send mail and parsed with the strict
reader of ``prometheus_text``; once every session has ended, each counter
must equal what the transaction log says. Readiness follows the upstreams'
health, which the active checks (``net.healthcheck``) keep up to date.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import smtplib
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from integration.external_tools import SmtpSink
from integration.prometheus_text import Family, get, request, scrape, series, total
from integration.recording_upstreams import RawUpstream
from integration.relay_harness import LISTENER, POLL_S, UPSTREAM, WAIT_S, RunningRelay, StartRelay
from smtpwarden.net.control import MAX_CONNECTIONS, MAX_PER_ADDRESS, ControlServer, Response

THREADS = 6
SESSIONS_PER_THREAD = 4
MESSAGES_PER_SESSION = 4
REFUSED = "refused@example.net"
MESSAGE = "Subject: metrics\r\n\r\nhello\r\n"
SOURCE_MESSAGES = 2000
SOURCE_SESSIONS = 10
SOURCE_TIMEOUT_S = 120.0
MAX_SCRAPES = 10_000  # bounds the loops that scrape while a load runs
PHASE_OF = {
    "CONNECT": "banner",
    "EHLO": "ehlo",
    "HELO": "ehlo",
    "MAIL": "mail",
    "RCPT": "rcpt",
    "DATA": "data",
    ".": "dot",
    "BDAT LAST": "dot",
}

Families = dict[str, Family]


def send_sessions(address: tuple[str, int], thread: int) -> None:
    """A few sessions of a few messages; every fourth message has a refused recipient."""
    for session in range(SESSIONS_PER_THREAD):
        with smtplib.SMTP(*address, timeout=WAIT_S) as client:
            for message in range(MESSAGES_PER_SESSION):
                sender = f"t{thread}s{session}m{message}@example.org"
                if message == 1:
                    # Both refused: smtplib sends RSET, the transaction is aborted.
                    with pytest.raises(smtplib.SMTPRecipientsRefused):
                        client.sendmail(sender, [REFUSED], MESSAGE)
                elif message == 2:
                    refused = client.sendmail(sender, ["ok@example.net", REFUSED], MESSAGE)
                    assert set(refused) == {REFUSED}
                else:
                    client.sendmail(sender, ["ok@example.net"], MESSAGE)


def scrape_while(address: tuple[str, int], running: Callable[[], bool]) -> list[Families]:
    """Scrape until ``running()`` is false (at most MAX_SCRAPES times)."""
    scrapes: list[Families] = []
    while running() and len(scrapes) < MAX_SCRAPES:
        scrapes.append(scrape(address))
    return scrapes


def assert_counters_never_fall(scrapes: list[Families]) -> None:
    for earlier, later in itertools.pairwise(scrapes):
        for name, family in later.items():
            if family.kind != "counter":
                continue
            before = series(earlier, name)
            after = series(later, name)
            for labels, value in before.items():
                assert after.get(labels, 0) >= value, (name, labels)


def assert_metrics_match_log(families: Families, records: list[dict[str, Any]]) -> None:
    """Every record-fed counter equals what the records say."""
    transactions = [r for r in records if r["type"] == "transaction"]
    sessions = [r for r in records if r["type"] == "session"]
    expected = Counter(
        (r["listener"], r["outcome"], r["diagnosis"]["pattern"]) for r in transactions
    )
    found = {
        (d["listener"], d["outcome"], d["pattern"]): value
        for labels, value in series(families, "smtpwarden_transactions_total").items()
        for d in [dict(labels)]
    }
    assert found == expected
    found = {
        (d["listener"], d["end"]): value
        for labels, value in series(families, "smtpwarden_sessions_total").items()
        for d in [dict(labels)]
    }
    assert found == Counter((r["listener"], r["end"]) for r in sessions)
    for field in ("client_bytes", "upstream_bytes"):
        assert total(families, f"smtpwarden_{field}_total") == sum(r[field] for r in sessions)
    steps = [
        (r["upstream"]["name"], step)
        for r in transactions + sessions
        for step in r["timeline"]
        if step["code"] is not None and not step["local"]
    ]
    replies = Counter((name, f"{step['code'] // 100}xx") for name, step in steps)
    found = {
        (dict(labels)["upstream"], dict(labels)["class"]): value
        for labels, value in series(families, "smtpwarden_replies_total").items()
    }
    assert found == replies
    phases = Counter(PHASE_OF[step["command"]] for _, step in steps if step["command"] in PHASE_OF)
    for phase, count in phases.items():
        assert get(families, "smtpwarden_phase_seconds_count", phase=phase) == count, phase
    connected = sum(1 for r in sessions if r["banner"] is not None)
    assert get(families, "smtpwarden_phase_seconds_count", phase="connect") == connected
    retries = sum(r["attempts"] - 1 for r in transactions)
    assert total(families, "smtpwarden_retries_total", source="replay") == retries


def wait_scrape(
    relay: RunningRelay, predicate: Callable[[Families], bool], timeout: float = WAIT_S
) -> Families:
    """Scrape until ``predicate`` holds; fail after ``timeout``."""
    address = relay.http_address()
    deadline = time.monotonic() + timeout
    while True:
        families = scrape(address)
        if predicate(families):
            return families
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics condition not met within {timeout} s")
        time.sleep(POLL_S)


def wait_ready(relay: RunningRelay, status: int, timeout: float = WAIT_S) -> bytes:
    """Ask /readyz until it answers ``status``; return the body."""
    address = relay.http_address()
    deadline = time.monotonic() + timeout
    while True:
        found, _, body = request(address, "/readyz")
        if found == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz still {found} {body!r} after {timeout} s")
        time.sleep(POLL_S)


# --- Metrics under load ------------------------------------------------------------------


def test_metrics_scraped_under_load_match_the_log(start_relay: StartRelay) -> None:
    upstream = RawUpstream(replies={f"RCPT <{REFUSED}>": b"550 5.1.1 No such user\r\n"})
    try:
        relay = start_relay(upstream.config)
        address, http = relay.address(), relay.http_address()
        errors: list[BaseException] = []

        def client(thread: int) -> None:
            try:
                send_sessions(address, thread)
            except BaseException as error:  # reported to the test thread
                errors.append(error)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        scrapes = scrape_while(http, lambda: any(thread.is_alive() for thread in threads))
        for thread in threads:
            thread.join(WAIT_S)
        assert not errors, errors
        relay.wait_idle()
        scrapes.append(scrape(http))
        assert len(scrapes) >= 2
        assert_counters_never_fall(scrapes)
        final = scrapes[-1]
        records = relay.records()
        assert_metrics_match_log(final, records)
        messages = THREADS * SESSIONS_PER_THREAD * MESSAGES_PER_SESSION
        outcomes = Counter(r["outcome"] for r in records if r["type"] == "transaction")
        assert outcomes == {"delivered": messages * 3 // 4, "aborted": messages // 4}
        partial = {"outcome": "delivered", "pattern": "partial_recipients"}
        assert total(final, "smtpwarden_transactions_total", **partial) == messages // 4
        assert get(final, "smtpwarden_sessions_active", listener=LISTENER) == 0
        assert get(final, "smtpwarden_upstream_up", upstream=UPSTREAM) == 1
        assert get(final, "smtpwarden_records_dropped_total") == 0
        # No route spools, so no spool is counted.
        assert final["smtpwarden_queue_messages"].samples == []
    finally:
        upstream.close()


@pytest.mark.postfix
@pytest.mark.timeout(SOURCE_TIMEOUT_S + 60)
def test_metrics_under_smtp_source_match_the_log(
    start_relay: StartRelay, make_smtp_sink: Callable[..., SmtpSink], smtp_source: str
) -> None:
    sink = make_smtp_sink()
    relay = start_relay(sink.config)
    host, port = relay.address()
    http = relay.http_address()
    # -d: every message of a session over one connection.
    source = subprocess.Popen(
        [
            smtp_source,
            "-d",
            "-s",
            str(SOURCE_SESSIONS),
            "-m",
            str(SOURCE_MESSAGES),
            f"{host}:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        scrapes = scrape_while(http, lambda: source.poll() is None)
        _, stderr = source.communicate(timeout=SOURCE_TIMEOUT_S)
    finally:
        if source.poll() is None:
            source.kill()
            source.communicate()
    assert source.returncode == 0, stderr.decode("utf-8", "replace")
    relay.wait_idle()
    scrapes.append(scrape(http))
    assert_counters_never_fall(scrapes)
    # Scrapes happened while the load ran, not only before or after it.
    during = [
        total(families, "smtpwarden_transactions_total")
        for families in scrapes[:-1]
        if 0 < total(families, "smtpwarden_transactions_total") < SOURCE_MESSAGES
    ]
    assert during, "no scrape saw the load in progress"
    final = scrapes[-1]
    records = relay.records()
    assert_metrics_match_log(final, records)
    delivered = {"listener": LISTENER, "outcome": "delivered", "pattern": "none"}
    assert get(final, "smtpwarden_transactions_total", **delivered) == SOURCE_MESSAGES
    assert total(final, "smtpwarden_sessions_total", end="quit") == SOURCE_SESSIONS


# --- The endpoint itself ------------------------------------------------------------------


def test_healthz_readyz_and_refusals(start_relay: StartRelay, raw_upstream: RawUpstream) -> None:
    relay = start_relay(raw_upstream.config)
    http = relay.http_address()
    assert http[0] == "127.0.0.1"
    status, _, body = request(http, "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, headers, body = request(http, "/readyz")
    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close"
    status, headers, body = request(http, "/metrics", "HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 0
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert request(http, "/metrics?x=1")[0] == 200
    assert request(http, "/nothing-here")[0] == 404
    status, headers, _ = request(http, "/metrics", "POST")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert request(http, "/readyz", "DELETE")[0] == 405


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, id="no-version"),
        pytest.param(b"GET /metrics SPDY/3\r\n\r\n", 400, id="not-http"),
        pytest.param(b"GET /\xff HTTP/1.1\r\n\r\n", 400, id="not-ascii"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431, id="long"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\n" + b"X: a\r\n" * 2000 + b"\r\n", 431, id="many-headers"
        ),
        pytest.param(b"\r\nGET /healthz HTTP/1.0\n\n", 200, id="bare-lf"),
    ],
)
def test_raw_requests(
    start_relay: StartRelay, raw_upstream: RawUpstream, sent: bytes, status: int
) -> None:
    relay = start_relay(raw_upstream.config)
    with socket.create_connection(relay.http_address(), timeout=WAIT_S) as sock:
        sock.sendall(sent)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:100]
    assert b"\r\nConnection: close\r\n" in answer


def test_a_client_that_leaves_mid_request_does_not_hurt(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = start_relay(raw_upstream.config)
    http = relay.http_address()
    for _ in range(5):
        with socket.create_connection(http, timeout=WAIT_S) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    assert request(http, "/healthz")[0] == 200


def test_endpoint_off(start_relay: StartRelay, raw_upstream: RawUpstream) -> None:
    relay = start_relay(raw_upstream.config, extra={"http": {"enabled": False}})
    assert relay.relay is not None
    assert relay.call(relay.relay.http_address) is None
    assert relay.relay.metrics is None
    with smtplib.SMTP(*relay.address(), timeout=WAIT_S) as client:
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    relay.wait_records(lambda records: len(records) == 1, "session")


def test_a_busy_port_leaves_the_relay_relaying(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        relay = start_relay(raw_upstream.config, extra={"http": {"port": port}})
        assert relay.relay is not None
        assert relay.call(relay.relay.http_address) is None
        with smtplib.SMTP(*relay.address(), timeout=WAIT_S) as client:
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        relay.wait_records(lambda records: len(records) == 1, "session")


def test_readyz_is_503_while_draining(start_relay: StartRelay, raw_upstream: RawUpstream) -> None:
    relay = start_relay(raw_upstream.config)
    http = relay.http_address()
    client = smtplib.SMTP(*relay.address(), timeout=WAIT_S)
    try:
        client.ehlo()
        client.mail("a@example.org")
        # In a transaction: the session may finish it within the grace.
        stopping = relay.begin_stop(grace=WAIT_S)
        body = wait_ready(relay, 503)
        assert body == b"not ready: shutting down\n"
        assert request(http, "/healthz")[0] == 200
    finally:
        client.close()
    stopping.result(WAIT_S * 2)
    relay.join(WAIT_S)


# --- The HTTP server on its own ------------------------------------------------------------


async def exchange(
    address: tuple[str, int], data: bytes, local_addr: tuple[str, int] | None = None
) -> bytes:
    """Send ``data`` and read to the end; b"" when the server resets the connection."""
    reader, writer = await asyncio.open_connection(*address, local_addr=local_addr)
    try:
        writer.write(data)
        async with asyncio.timeout(WAIT_S):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def test_a_failing_handler_gives_500_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> Response:
        raise RuntimeError("secret detail")

    async def run() -> bytes:
        server = ControlServer({"/boom": broken})
        await server.start("127.0.0.1", 0)
        try:
            return await exchange(server.address(), b"GET /boom HTTP/1.1\r\n\r\n")
        finally:
            await server.close()

    with caplog.at_level(logging.ERROR, logger="smtpwarden.control"):
        answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert answer.endswith(b"\r\n\r\n500 Internal Server Error\n")
    assert b"secret" not in answer
    assert "/boom failed" in caplog.text


async def ok() -> Response:
    return Response(200, b"ok\n")


OK_REQUEST = b"GET /ok HTTP/1.1\r\n\r\n"


def test_connections_past_the_limit_are_closed_unanswered() -> None:
    async def run() -> tuple[bytes, bytes]:
        server = ControlServer({"/ok": ok})
        await server.start("127.0.0.1", 0)
        address = server.address()
        # From several loopback addresses, each within MAX_PER_ADDRESS.
        idle = [
            await asyncio.open_connection(
                *address, local_addr=(f"127.0.0.{2 + n // MAX_PER_ADDRESS}", 0)
            )
            for n in range(MAX_CONNECTIONS)
        ]
        try:
            # Accepted in order: the idle ones hold every place by then.
            refused = await exchange(address, OK_REQUEST)
        finally:
            for _, writer in idle:
                writer.close()
            # Closing the server ends the idle exchanges too.
            await server.close()
        server = ControlServer({"/ok": ok})
        await server.start("127.0.0.1", 0)
        try:
            served = await exchange(server.address(), OK_REQUEST)
        finally:
            await server.close()
        return refused, served

    refused, served = asyncio.run(run())
    assert refused == b""
    assert served.startswith(b"HTTP/1.1 200 OK\r\n")


def test_one_address_holds_a_few_connections_at_most() -> None:
    async def run() -> tuple[bytes, bytes]:
        server = ControlServer({"/ok": ok})
        await server.start("127.0.0.1", 0)
        address = server.address()
        hog = ("127.0.0.2", 0)
        idle = [
            await asyncio.open_connection(*address, local_addr=hog) for _ in range(MAX_PER_ADDRESS)
        ]
        try:
            refused = await exchange(address, OK_REQUEST, local_addr=hog)
            served = await exchange(address, OK_REQUEST, local_addr=("127.0.0.3", 0))
        finally:
            for _, writer in idle:
                writer.close()
            await server.close()
        return refused, served

    refused, served = asyncio.run(run())
    assert refused == b""
    assert served.startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_relay_with_a_spool_counts_its_entries(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], tmp_path: Any
) -> None:
    # The spool's counts are whole numbers: the text format must take them.
    upstream = make_raw_upstream(replies={".": b"451 4.3.0 Try later\r\n"})
    relay = start_relay(
        upstream.config,
        extra={
            "routes": [{"name": "main", "policy": "requeue", "upstreams": [UPSTREAM]}],
            "retry": {"attempts": 0},
            "spool": {"path": str(tmp_path / "spool")},
        },
    )
    with smtplib.SMTP(*relay.address(), timeout=WAIT_S) as client:
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    http = relay.http_address()
    assert http is not None
    families = scrape(http)
    waiting = [get(families, "smtpwarden_queue_messages", state=s) for s in ("queued", "deferred")]
    assert sum(value or 0 for value in waiting) == 1
