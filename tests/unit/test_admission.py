"""Who may open a session: allowed networks and per-address limits."""

from __future__ import annotations

import ipaddress

import pytest

from smtpwarden.config import LimitsConfig
from smtpwarden.net.admission import (
    RATE_WINDOW_S,
    Admission,
    Refusal,
    allowed,
    client_address,
)

NETWORKS = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("", None),
        ("/run/smtp.sock", None),
    ],
)
def test_client_address(host: str, expected: str | None) -> None:
    address = client_address(host)
    assert (None if address is None else str(address)) == expected


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("192.0.2.200", True),
        ("::ffff:192.0.2.200", True),
        ("2001:db8:1::9", True),
        ("198.51.100.1", False),
        ("", False),
    ],
)
def test_allowed_networks(host: str, ok: bool) -> None:
    assert allowed(client_address(host), NETWORKS) is ok


def test_no_networks_allow_everyone() -> None:
    assert allowed(client_address("198.51.100.1"), ())
    assert allowed(None, ())


def test_connections_per_address_are_counted_and_released() -> None:
    admission = Admission(LimitsConfig(max_connections_per_client=2))
    one, other = client_address("192.0.2.1"), client_address("192.0.2.2")
    assert admission.admit(one, 0.0) is None
    assert admission.admit(one, 0.0) is None
    assert admission.admit(one, 0.0) is Refusal.TOO_MANY
    assert admission.admit(other, 0.0) is None
    admission.release(one)
    assert admission.admit(one, 0.0) is None
    for _ in range(3):
        admission.release(one)
    assert one is not None
    assert admission.open_sessions(one) == 0


def test_connection_rate_per_address_slides_with_time() -> None:
    admission = Admission(LimitsConfig(max_connections_per_client=0, connection_rate_per_minute=3))
    address = client_address("192.0.2.1")
    assert [admission.admit(address, t) for t in (0.0, 1.0, 2.0)] == [None, None, None]
    assert admission.admit(address, 3.0) is Refusal.TOO_FAST
    # The first connection leaves the window; one more fits.
    assert admission.admit(address, RATE_WINDOW_S) is None
    assert admission.admit(address, RATE_WINDOW_S + 0.5) is Refusal.TOO_FAST


def test_zero_means_no_limit() -> None:
    admission = Admission(LimitsConfig(max_connections_per_client=0, connection_rate_per_minute=0))
    address = client_address("192.0.2.1")
    assert all(admission.admit(address, 0.0) is None for _ in range(1000))


def test_prune_forgets_quiet_addresses() -> None:
    admission = Admission(LimitsConfig(connection_rate_per_minute=5))
    for i in range(100):
        admission.admit(client_address(f"192.0.2.{i}"), 0.0)
    admission.prune(RATE_WINDOW_S + 1)
    assert admission._recent == {}
