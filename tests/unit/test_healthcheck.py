"""Pieces of the active health checks that need no network: certificate expiry, probes."""

from __future__ import annotations

import datetime
import ssl

import pytest
import trustme

from smtpwarden.configtls import UpstreamTls
from smtpwarden.net.healthcheck import certificate_expiry, probe_for
from smtpwarden.net.tls import client_context
from smtpwarden.net.upstream import Target

UTC = datetime.UTC


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def der_of(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode("ascii"))


@pytest.mark.parametrize(
    "not_after",
    [
        # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
        pytest.param(datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC), id="utc-time"),
        pytest.param(datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC), id="utc-time-last"),
        pytest.param(datetime.datetime(2051, 1, 2, 3, 4, 5, tzinfo=UTC), id="generalized-time"),
        pytest.param(datetime.datetime(1999, 1, 2, 3, 4, 5, tzinfo=UTC), id="nineteen-hundreds"),
    ],
)
def test_certificate_expiry_reads_not_after(ca: trustme.CA, not_after: datetime.datetime) -> None:
    leaf = ca.issue_cert(
        "mta.example.net",
        not_before=datetime.datetime(1990, 1, 1, tzinfo=UTC),
        not_after=not_after,
    )
    assert certificate_expiry(der_of(leaf)) == not_after.timestamp()


def test_certificate_expiry_of_an_rsa_certificate(ca: trustme.CA) -> None:
    not_after = datetime.datetime(2030, 1, 1, tzinfo=UTC)
    leaf = ca.issue_cert("mta.example.net", not_after=not_after, key_type=trustme.KeyType.RSA)
    assert certificate_expiry(der_of(leaf)) == not_after.timestamp()


@pytest.mark.parametrize(
    "der",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x30", id="one-octet"),
        pytest.param(b"\x30\x05\x30\x03\x02\x01", id="truncated"),
        pytest.param(b"\x31\x00", id="not-a-sequence"),
        pytest.param(b"\x30\x85\x00\x00\x00\x00\x00", id="five-length-octets"),
        pytest.param(b"\x30\x80", id="indefinite-length"),
        pytest.param(b"not a certificate at all", id="text"),
    ],
)
def test_certificate_expiry_of_garbage_is_none(der: bytes) -> None:
    assert certificate_expiry(der) is None


def test_certificate_expiry_of_a_cut_certificate_is_none(ca: trustme.CA) -> None:
    der = der_of(ca.issue_cert("mta.example.net"))
    for cut in range(0, len(der) // 2, 7):
        assert certificate_expiry(der[:cut]) is None


def test_probes_follow_the_upstream_tls() -> None:
    plain = Target(name="plain", host="127.0.0.1", port=25)
    assert probe_for(plain, check_starttls=False).plan is None
    assert probe_for(plain, check_starttls=False).extra is None
    extra = probe_for(plain, check_starttls=True).extra
    assert extra is not None
    assert (extra.mode, extra.starttls, extra.server_name) == (
        "starttls",
        "opportunistic",
        plain.host,
    )

    tls = UpstreamTls(mode="implicit", server_name="mta.example.net")
    implicit = Target(name="tls", host="127.0.0.1", port=465, tls=tls, context=client_context(tls))
    probe = probe_for(implicit, check_starttls=True)
    assert probe.extra is None
    assert probe.plan is not None
    assert (probe.plan.mode, probe.plan.server_name) == ("implicit", "mta.example.net")
