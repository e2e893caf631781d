"""Active upstream health checks over real sockets, seen through /metrics and /readyz.

Checks run every ``CHECK_S`` with ``health.failures: 1`` and a cool-down
far longer than any test, so that only a check can bring an upstream back.
TLS upstreams serve certificates from a throw-away trustme CA, one of them
close to its expiry.
"""

from __future__ import annotations

import datetime
import logging
import re
import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from integration.prometheus_text import Family, get, request, scrape
from integration.recording_upstreams import RawUpstream
from integration.relay_harness import POLL_S, UPSTREAM, WAIT_S, RunningRelay, StartRelay, free_port
from integration.tls_upstreams import ScriptedTlsUpstream, server_side

CHECK_S = 0.05
HEALTH = {"failures": 1, "cooldown": 600, "check_interval": CHECK_S}
DOWN_BANNER = b"421 4.3.2 upstream.test Service shutting down\r\n"
MESSAGE = "Subject: health\r\n\r\nhello\r\n"

Families = dict[str, Family]


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


def up(name: str, value: float) -> Callable[[Families], bool]:
    return lambda families: get(families, "smtpwarden_upstream_up", upstream=name) == value


def checked(name: str, result: str, at_least: int) -> Callable[[Families], bool]:
    def predicate(families: Families) -> bool:
        found = get(families, "smtpwarden_upstream_checks_total", upstream=name, result=result)
        return (found or 0) >= at_least

    return predicate


def ready(relay: RunningRelay) -> tuple[int, bytes]:
    status, _, body = request(relay.http_address(), "/readyz")
    return status, body


def test_readyz_follows_the_only_upstream(start_relay: StartRelay) -> None:
    upstream = RawUpstream()
    try:
        relay = start_relay(upstream.config, extra={"health": HEALTH})
        wait_scrape(relay, checked(UPSTREAM, "ok", 1))
        assert ready(relay) == (200, b"ok\n")
        upstream.replies["BANNER"] = DOWN_BANNER
        wait_scrape(relay, up(UPSTREAM, 0))
        assert ready(relay) == (503, b"not ready: no usable upstream: up marked down\n")
        del upstream.replies["BANNER"]
        wait_scrape(relay, up(UPSTREAM, 1))
        assert ready(relay) == (200, b"ok\n")
        # The checks said EHLO and QUIT, and never started a transaction.
        verbs = {line.split()[0].upper() for conn in upstream.connections for line in conn.commands}
        assert verbs <= {b"EHLO", b"QUIT"}
    finally:
        upstream.close()


def test_a_dead_upstream_goes_down_and_comes_back(
    start_relay: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpwarden.healthcheck")
    port = free_port()  # nothing listens there yet
    relay = start_relay(
        {"kind": "smtp", "host": "127.0.0.1", "port": port}, extra={"health": HEALTH}
    )
    families = wait_scrape(relay, checked(UPSTREAM, "failed", 3))
    assert get(families, "smtpwarden_upstream_up", upstream=UPSTREAM) == 0
    assert ready(relay)[0] == 503
    failures = [r for r in caplog.records if "health check failed" in r.getMessage()]
    # The same failure is logged once, not at every check.
    assert len(failures) == 1
    assert failures[0].levelno == logging.WARNING
    # Sessions skip an upstream that is down... and have nowhere else to go.
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(*relay.address(), timeout=WAIT_S)
    assert refused.value.smtp_code == 421
    upstream = RawUpstream(port=port)
    try:
        wait_scrape(relay, up(UPSTREAM, 1))
        assert ready(relay) == (200, b"ok\n")
        assert any("passes its health check again" in r.getMessage() for r in caplog.records)
        with smtplib.SMTP(*relay.address(), timeout=WAIT_S) as client:
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        relay.wait_records(lambda records: len(records) == 1, "transaction")
    finally:
        relay.wait_idle()
        upstream.close()


def test_one_usable_upstream_is_enough(start_relay: StartRelay) -> None:
    upstream = RawUpstream()
    try:
        dead = {"name": "dead", "kind": "smtp", "host": "127.0.0.1", "port": free_port()}
        relay = start_relay(
            upstream.config,
            extra={
                "health": HEALTH,
                "upstreams": [{"name": UPSTREAM, **upstream.config}, dead],
            },
        )
        families = wait_scrape(relay, up("dead", 0))
        assert get(families, "smtpwarden_upstream_up", upstream=UPSTREAM) == 1
        assert ready(relay) == (200, b"ok\n")
    finally:
        upstream.close()


# --- TLS and certificate expiry ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("health-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def tls_upstream(
    ca: trustme.CA, days: float, **options: bool
) -> tuple[ScriptedTlsUpstream, datetime.datetime]:
    """A scripted TLS upstream whose certificate expires in ``days``."""
    not_after = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(
        days=days
    )
    leaf = ca.issue_cert("127.0.0.1", "mta.test", not_after=not_after)
    return ScriptedTlsUpstream(server_side(leaf), **options), not_after


@pytest.fixture
def upstreams() -> Iterator[list[ScriptedTlsUpstream]]:
    made: list[ScriptedTlsUpstream] = []
    yield made
    for upstream in made:
        upstream.close()


def expiry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "TLS certificate expire" in r.getMessage()
    ]


def days_left(warning: str) -> float:
    found = re.fullmatch(
        r"upstream up: its TLS certificate expires in ([0-9.]+) days \(.*\)", warning
    )
    assert found is not None, warning
    return float(found[1])


@pytest.mark.parametrize(
    ("mode", "implicit"),
    [pytest.param("starttls", False, id="starttls"), pytest.param("implicit", True, id="implicit")],
)
def test_a_certificate_close_to_expiry_is_warned_about(
    start_relay: StartRelay,
    ca: trustme.CA,
    ca_file: str,
    upstreams: list[ScriptedTlsUpstream],
    caplog: pytest.LogCaptureFixture,
    mode: str,
    implicit: bool,
) -> None:
    caplog.set_level(logging.WARNING, logger="smtpwarden.healthcheck")
    upstream, not_after = tls_upstream(ca, days=3, implicit=implicit)
    upstreams.append(upstream)
    config = {
        "kind": "smtp",
        "host": "127.0.0.1",
        "port": upstream.port,
        "tls": {"mode": mode, "ca_file": ca_file},
    }
    relay = start_relay(config, extra={"health": HEALTH})
    families = wait_scrape(relay, checked(UPSTREAM, "ok", 3))
    expiry = "smtpwarden_upstream_certificate_expiry_timestamp_seconds"
    assert get(families, expiry, upstream=UPSTREAM) == not_after.timestamp()
    warnings = expiry_warnings(caplog)
    # Once per certificate, however many checks saw it.
    assert len(warnings) == 1
    assert 2.9 <= days_left(warnings[0]) <= 3.0
    connections = upstream.wait_all_ended(3)
    assert all(conn.version is not None for conn in connections)
    if mode == "starttls":
        # EHLO again after the handshake (RFC 3207 4.2), then QUIT.
        first = connections[0]
        assert [line.split()[0] for line in first.commands] == [
            b"EHLO",
            b"STARTTLS",
            b"EHLO",
            b"QUIT",
        ]
        assert first.secure == [False, False, True, True]


def test_check_starttls_looks_at_a_plaintext_upstream_certificate(
    start_relay: StartRelay,
    ca: trustme.CA,
    ca_file: str,
    upstreams: list[ScriptedTlsUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="smtpwarden.healthcheck")
    upstream, not_after = tls_upstream(ca, days=1)
    upstreams.append(upstream)
    config = {
        "kind": "smtp",
        "host": "127.0.0.1",
        "port": upstream.port,
        "tls": {"mode": "none", "ca_file": ca_file},
    }
    health = {**HEALTH, "check_starttls": True, "certificate_warning_days": 2}
    relay = start_relay(config, extra={"health": health})
    families = wait_scrape(relay, checked(UPSTREAM, "ok", 2))
    expiry = "smtpwarden_upstream_certificate_expiry_timestamp_seconds"
    assert get(families, expiry, upstream=UPSTREAM) == not_after.timestamp()
    assert 0.9 <= days_left(expiry_warnings(caplog)[0]) <= 1.0


def test_a_failed_extra_starttls_is_logged_but_not_held_against_the_upstream(
    start_relay: StartRelay,
    ca: trustme.CA,
    upstreams: list[ScriptedTlsUpstream],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.WARNING, logger="smtpwarden.healthcheck")
    upstream, _ = tls_upstream(ca, days=365)
    upstreams.append(upstream)
    other = trustme.CA()  # the relay trusts a CA that did not sign the certificate
    ca_file = tmp_path / "other-ca.pem"
    other.cert_pem.write_to_path(str(ca_file))
    config = {
        "kind": "smtp",
        "host": "127.0.0.1",
        "port": upstream.port,
        "tls": {"mode": "none", "ca_file": str(ca_file)},
    }
    relay = start_relay(config, extra={"health": {**HEALTH, "check_starttls": True}})
    families = wait_scrape(relay, checked(UPSTREAM, "ok", 3))
    assert get(families, "smtpwarden_upstream_up", upstream=UPSTREAM) == 1
    assert (
        get(families, "smtpwarden_upstream_checks_total", upstream=UPSTREAM, result="failed")
        is None
    )
    failed = [m for m in (r.getMessage() for r in caplog.records) if "STARTTLS check failed" in m]
    assert len(failed) == 1
    assert "certificate verify failed" in failed[0]
    assert not expiry_warnings(caplog)


def test_a_far_expiry_is_not_warned_about(
    start_relay: StartRelay,
    ca: trustme.CA,
    ca_file: str,
    upstreams: list[ScriptedTlsUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="smtpwarden.healthcheck")
    upstream, _ = tls_upstream(ca, days=90)
    upstreams.append(upstream)
    config = {
        "kind": "smtp",
        "host": "127.0.0.1",
        "port": upstream.port,
        "tls": {"mode": "starttls", "ca_file": ca_file},
    }
    relay = start_relay(config, extra={"health": HEALTH})
    wait_scrape(relay, checked(UPSTREAM, "ok", 2))
    assert not expiry_warnings(caplog)


def test_no_checks_with_interval_zero(start_relay: StartRelay, raw_upstream: RawUpstream) -> None:
    relay = start_relay(raw_upstream.config, extra={"health": {"check_interval": 0}})
    assert relay.relay is not None
    assert relay.relay.checker is None
    families = scrape(relay.http_address())
    assert families["smtpwarden_upstream_checks_total"].samples == []
    assert raw_upstream.connections == []
