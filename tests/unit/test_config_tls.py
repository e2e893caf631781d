"""Tests for smtpwarden.configtls: TLS, AUTH, PROXY protocol, access and client limits."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpwarden.config import Config, ConfigError, LimitsConfig, load_config, parse_config
from smtpwarden.configcheck import show
from smtpwarden.configtls import (
    AUTH_MECHANISMS,
    UPSTREAM_TLS_MODES,
    ListenerAuth,
    ListenerTls,
    ProxyProtocol,
    UpstreamTls,
    UpstreamTlsMode,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

L = "listeners[0]"
U = "upstreams[0]"
NETWORKS = "10.0.0.0/8 or 2001:db8::/32"
NETWORK_EXPECTED = f"expected a network, as {NETWORKS}, or one address"
MECHANISMS = "PLAIN, LOGIN, CRAM-MD5, XOAUTH2"
NO_TLS_FOR_AUTH = (
    "AUTH would never be offered: this listener has no tls; configure tls or set require_tls: false"
)
SINK = 'only allowed when kind is "smtp" (a sink opens no connection)'


# --- Certificate files -----------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of PEM files: two certificates of one CA, their keys, and broken files.

    a.crt/a.key and b.crt/b.key are pairs; both.pem holds a.key and a.crt;
    enc.key is a.key encrypted; the rest are not what their names say.
    """
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    for name in ("a", "b"):
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        leaf.cert_chain_pems[0].write_to_path(str(folder / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(folder / f"{name}.key"))
        if name == "a":
            leaf.private_key_and_cert_chain_pem.write_to_path(str(folder / "both.pem"))
    key = serialization.load_pem_private_key((folder / "a.key").read_bytes(), password=None)
    (folder / "enc.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    (folder / "junk.txt").write_text("not a certificate\n", encoding="ascii")
    (folder / "bad.crt").write_text(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", encoding="ascii"
    )
    (folder / "bad.key").write_text(
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", encoding="ascii"
    )
    (folder / "folder").mkdir()
    os.mkfifo(folder / "fifo")
    return folder


@pytest.fixture(autouse=True)
def in_pki(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test in the PEM folder: file names are relative, as in a real file."""
    monkeypatch.chdir(pki)


TLS = {"certificate": "a.crt", "key": "a.key"}
BASE: dict[object, object] = {
    "hostname": "relay.test",
    "listeners": [{"port": 2525}],
    "upstreams": [{"host": "mta.test", "port": 25}],
}


def parse(
    listener: Mapping[str, object] | None = None,
    upstream: Mapping[str, object] | None = None,
    **sections: object,
) -> Config:
    """Parse BASE with keys added to its listener and upstream, and top-level keys replaced."""
    data: dict[object, object] = {
        **BASE,
        "listeners": [{"port": 2525, **(listener or {})}],
        "upstreams": [{"host": "mta.test", "port": 25, **(upstream or {})}],
        **sections,
    }
    return parse_config(data, source="test.yaml")


def problems(
    listener: Mapping[str, object] | None = None,
    upstream: Mapping[str, object] | None = None,
    **sections: object,
) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse(listener, upstream, **sections)
    return caught.value.problems


# --- Listeners: valid settings ---------------------------------------------------


def test_listener_tls_defaults() -> None:
    listener = parse({"tls": TLS}).listeners[0]
    assert listener.tls == ListenerTls(certificate="a.crt", key="a.key")
    assert listener.tls.mode == "starttls"
    assert listener.tls.require is False
    assert listener.tls.min_version == "1.2"
    assert listener.tls.ciphers is None


def test_full_listener_values_are_kept() -> None:
    listener = parse(
        {
            "tls": {
                **TLS,
                "mode": "starttls",
                "require": False,
                "min_version": "1.3",
                "ciphers": "ECDHE+AESGCM:ECDHE+CHACHA20",
            },
            "auth": {"mechanisms": ["plain", "Login", "CRAM-md5"], "require_tls": True},
            "proxy_protocol": {"trusted": ["10.0.0.0/24", "2001:db8::/32", "192.0.2.1"]},
            "allow": ["192.0.2.7", "::1", "10.0.0.0/8", "2001:DB8:0:0::/64"],
        }
    ).listeners[0]
    assert listener.tls == ListenerTls(
        certificate="a.crt",
        key="a.key",
        mode="starttls",
        min_version="1.3",
        ciphers="ECDHE+AESGCM:ECDHE+CHACHA20",
    )
    assert listener.auth == ListenerAuth(mechanisms=("PLAIN", "LOGIN", "CRAM-MD5"))
    assert listener.proxy_protocol == ProxyProtocol(
        trusted=(
            ipaddress.ip_network("10.0.0.0/24"),
            ipaddress.ip_network("2001:db8::/32"),
            ipaddress.ip_network("192.0.2.1/32"),
        )
    )
    assert listener.allow == (
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/64"),
    )


@pytest.mark.parametrize(
    ("written", "stored"),
    [("1.2", "1.2"), ("1.3", "1.3"), (1.2, "1.2"), (1.3, "1.3")],
)
def test_min_version_may_be_written_as_a_decimal(written: object, stored: str) -> None:
    config = parse({"tls": {**TLS, "min_version": written}}, {"tls": {"min_version": written}})
    assert config.listeners[0].tls is not None
    assert config.listeners[0].tls.min_version == stored
    assert config.upstreams[0].tls.min_version == stored


def test_min_version_unquoted_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tls.yaml"
    path.write_text(
        "listeners:\n"
        "  - port: 2525\n"
        "    tls: {certificate: a.crt, key: a.key, min_version: 1.3}\n"
        "upstreams:\n"
        "  - {host: mta.test, port: 25, tls: {mode: starttls, min_version: 1.2}}\n",
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.listeners[0].tls == ListenerTls(
        certificate="a.crt", key="a.key", min_version="1.3"
    )
    assert config.upstreams[0].tls == UpstreamTls(mode="starttls")


def test_one_file_may_hold_certificate_and_key() -> None:
    tls = parse({"tls": {"certificate": "both.pem", "key": "both.pem"}}).listeners[0].tls
    assert tls == ListenerTls(certificate="both.pem", key="both.pem")


def test_paths_are_kept_as_written_and_read_from_the_working_directory(pki: Path) -> None:
    tls = parse({"tls": {"certificate": "./a.crt", "key": str(pki / "a.key")}}).listeners[0].tls
    assert tls == ListenerTls(certificate="./a.crt", key=str(pki / "a.key"))


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        pytest.param(None, None, id="null"),
        pytest.param(False, None, id="false"),
        pytest.param(True, ListenerAuth(), id="true"),
        pytest.param({}, ListenerAuth(), id="empty"),
        pytest.param({"mechanisms": None}, ListenerAuth(), id="null-mechanisms"),
        pytest.param(
            {"mechanisms": ["xoauth2", "PLAIN"]},
            ListenerAuth(mechanisms=("XOAUTH2", "PLAIN")),
            id="mechanisms-in-order",
        ),
    ],
)
def test_auth_forms(written: object, expected: ListenerAuth | None) -> None:
    assert parse({"tls": TLS, "auth": written}).listeners[0].auth == expected


def test_auth_without_tls_when_it_need_not_wait_for_tls() -> None:
    auth = parse({"auth": {"require_tls": False}}).listeners[0].auth
    assert auth == ListenerAuth(mechanisms=AUTH_MECHANISMS, require_tls=False)


def test_absent_and_null_security_settings_take_defaults() -> None:
    config = parse(
        {"tls": None, "auth": None, "proxy_protocol": None, "allow": None},
        {"tls": None},
    )
    listener, upstream = config.listeners[0], config.upstreams[0]
    assert (listener.tls, listener.auth, listener.proxy_protocol, listener.allow) == (
        None,
        None,
        None,
        (),
    )
    assert upstream.tls == UpstreamTls()
    assert parse({"allow": []}).listeners[0].allow == ()


# --- Upstreams: valid settings ---------------------------------------------------


@pytest.mark.parametrize("mode", UPSTREAM_TLS_MODES)
def test_upstream_tls_mode_alone(mode: UpstreamTlsMode) -> None:
    assert parse(upstream={"tls": mode}).upstreams[0].tls == UpstreamTls(mode=mode)


def test_full_upstream_values_are_kept() -> None:
    upstream = parse(
        upstream={
            "tls": {
                "mode": "implicit",
                "required": False,
                "verify": False,
                "ca_file": "ca.pem",
                "server_name": "mx.example.com",
                "certificate": "b.crt",
                "key": "b.key",
                "min_version": "1.3",
            },
            "xclient": True,
            "xforward": True,
        }
    ).upstreams[0]
    assert upstream.tls == UpstreamTls(
        mode="implicit",
        required=False,
        verify=False,
        ca_file="ca.pem",
        server_name="mx.example.com",
        certificate="b.crt",
        key="b.key",
        min_version="1.3",
    )
    assert (upstream.xclient, upstream.xforward) == (True, True)


def test_sink_accepts_what_does_not_act() -> None:
    upstream = parse(
        upstream={"kind": "sink", "tls": {"mode": "none"}, "xclient": False, "xforward": False}
    ).upstreams[0]
    assert (upstream.tls, upstream.xclient, upstream.xforward) == (UpstreamTls(), False, False)


def test_client_limits_are_kept() -> None:
    limits = parse(
        limits={
            "max_connections_per_client": 0,
            "connection_rate_per_minute": 600,
            "max_message_bytes": 0,
        }
    ).limits
    assert limits == LimitsConfig(
        max_connections_per_client=0, connection_rate_per_minute=600, max_message_bytes=0
    )


# --- Problems, each at its key ---------------------------------------------------


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        pytest.param(
            {"tls": {"key": "a.key"}},
            [f"{L}.tls.certificate: missing required key (a file path)"],
            id="no-certificate",
        ),
        pytest.param(
            {"tls": {"certificate": "a.crt"}},
            [f"{L}.tls.key: missing required key (a file path)"],
            id="no-key",
        ),
        pytest.param(
            {"tls": {"certificate": "missing.crt", "key": "a.key"}},
            [f'{L}.tls.certificate: cannot read "missing.crt": No such file or directory'],
            id="missing-certificate",
        ),
        pytest.param(
            {"tls": {"certificate": "a.crt", "key": "missing.key"}},
            [f'{L}.tls.key: cannot read "missing.key": No such file or directory'],
            id="missing-key",
        ),
        pytest.param(
            {"tls": {"certificate": "folder", "key": "fifo"}},
            [
                f'{L}.tls.certificate: "folder" is not a regular file',
                f'{L}.tls.key: "fifo" is not a regular file',
            ],
            id="not-files",
        ),
        pytest.param(
            {"tls": {"certificate": "a.crt", "key": "b.key"}},
            [f'{L}.tls.key: the key does not match the certificate "a.crt"'],
            id="key-of-another-certificate",
        ),
        pytest.param(
            {"tls": {"certificate": "junk.txt", "key": "a.key"}},
            [f'{L}.tls.certificate: "junk.txt" is not a PEM certificate'],
            id="certificate-not-pem",
        ),
        pytest.param(
            {"tls": {"certificate": "bad.crt", "key": "a.key"}},
            [f'{L}.tls.certificate: "bad.crt" is not a PEM certificate'],
            id="certificate-broken",
        ),
        pytest.param(
            {"tls": {"certificate": "a.key", "key": "a.crt"}},
            [
                f'{L}.tls.certificate: "a.key" is not a PEM certificate',
                f'{L}.tls.key: "a.crt" is not a PEM private key',
            ],
            id="swapped",
        ),
        pytest.param(
            {"tls": {"certificate": "a.crt", "key": "enc.key"}},
            [f'{L}.tls.key: "enc.key" is encrypted; the key must be unencrypted'],
            id="key-encrypted",
        ),
        pytest.param(
            {"tls": {"certificate": "a.crt", "key": "bad.key"}},
            [f'{L}.tls.key: "bad.key" cannot be loaded as the key of "a.crt"'],
            id="key-broken",
        ),
        pytest.param(
            {"tls": {"certificate": "", "key": 5}},
            [
                f'{L}.tls.certificate: expected a file path, got ""',
                f"{L}.tls.key: expected a file path, got 5",
            ],
            id="not-paths",
        ),
        pytest.param(
            {"tls": {**TLS, "ciphers": "NO-SUCH-CIPHER"}},
            [
                f"{L}.tls.ciphers: expected an OpenSSL cipher list,"
                ' got "NO-SUCH-CIPHER" (No cipher can be selected)'
            ],
            id="bad-ciphers",
        ),
        pytest.param(
            {"tls": {**TLS, "ciphers": " "}},
            [f'{L}.tls.ciphers: expected an OpenSSL cipher list, got " "'],
            id="blank-ciphers",
        ),
        pytest.param(
            {"tls": {**TLS, "mode": "implicit", "require": True}},
            [
                f'{L}.tls.require: only allowed when mode is "starttls"'
                " (implicit TLS encrypts every session from its first byte)"
            ],
            id="implicit-and-require",
        ),
        pytest.param(
            {"tls": {**TLS, "mode": "smtps"}},
            [f'{L}.tls.mode: expected one of "starttls", "implicit", got "smtps"'],
            id="bad-mode",
        ),
        pytest.param(
            {"tls": {**TLS, "min_version": 1.1}},
            [f'{L}.tls.min_version: expected "1.2" or "1.3", got 1.1'],
            id="min-version-1.1",
        ),
        pytest.param(
            {"tls": {**TLS, "min_version": "TLSv1.2"}},
            [f'{L}.tls.min_version: expected "1.2" or "1.3", got "TLSv1.2"'],
            id="min-version-name",
        ),
        pytest.param(
            {"tls": {**TLS, "require": "yes"}},
            [f'{L}.tls.require: expected true or false, got "yes"'],
            id="require-not-flag",
        ),
        pytest.param(
            {"tls": True}, [f"{L}.tls: expected a mapping, got true"], id="tls-not-mapping"
        ),
        pytest.param(
            {"tls": {**TLS, "certficate": "a.crt"}},
            [f'{L}.tls.certficate: unknown key (did you mean "certificate"?)'],
            id="tls-unknown-key",
        ),
        pytest.param(
            {"auth": True}, [f"{L}.auth.require_tls: {NO_TLS_FOR_AUTH}"], id="auth-without-tls"
        ),
        pytest.param(
            {"auth": {"mechanisms": ["PLAIN"]}},
            [f"{L}.auth.require_tls: {NO_TLS_FOR_AUTH}"],
            id="auth-mapping-without-tls",
        ),
        pytest.param(
            {"auth": {"require_tls": "yes"}},
            [f'{L}.auth.require_tls: expected true or false, got "yes"'],
            id="require-tls-not-flag",
        ),
        pytest.param(
            {"tls": TLS, "auth": "plain"},
            [f'{L}.auth: expected true, false or a mapping, got "plain"'],
            id="auth-not-mapping",
        ),
        pytest.param(
            {"tls": TLS, "auth": {"mechanisms": []}},
            [
                f"{L}.auth.mechanisms: expected a list of at least one of {MECHANISMS},"
                " got an empty list"
            ],
            id="no-mechanisms",
        ),
        pytest.param(
            {"tls": TLS, "auth": {"mechanisms": "PLAIN"}},
            [f'{L}.auth.mechanisms: expected a list of at least one of {MECHANISMS}, got "PLAIN"'],
            id="mechanisms-not-list",
        ),
        pytest.param(
            {"tls": TLS, "auth": {"mechanisms": ["PLAIN", "GSSAPI", "plan", 5]}},
            [
                f'{L}.auth.mechanisms[1]: expected one of {MECHANISMS}, got "GSSAPI"',
                f'{L}.auth.mechanisms[2]: expected one of {MECHANISMS}, got "plan"'
                ' (did you mean "PLAIN"?)',
                f"{L}.auth.mechanisms[3]: expected one of {MECHANISMS}, got 5",
            ],
            id="bad-mechanisms",
        ),
        pytest.param(
            {"tls": TLS, "auth": {"mechanisms": ["PLAIN", "LOGIN", "plain"]}},
            [
                f'{L}.auth.mechanisms[2]: duplicate mechanism "PLAIN"'
                f" (first used by {L}.auth.mechanisms[0])"
            ],
            id="duplicate-mechanisms",
        ),
        pytest.param(
            {"allow": ["10.1.2.3/8", "2001:db8::1/32"]},
            [
                f"{L}.allow[0]: 10.1.2.3/8 has host bits set; did you mean 10.0.0.0/8?",
                f"{L}.allow[1]: 2001:db8::1/32 has host bits set; did you mean 2001:db8::/32?",
            ],
            id="host-bits-set",
        ),
        pytest.param(
            {"allow": ["everyone", 10, "10.0.0.0/33", "fe80::1%eth0", "10.0.0.0/8 "]},
            [
                f"{L}.allow[0]: {NETWORK_EXPECTED}, got " + '"everyone"',
                f"{L}.allow[1]: {NETWORK_EXPECTED}, got 10",
                f"{L}.allow[2]: {NETWORK_EXPECTED}, got " + '"10.0.0.0/33"',
                f"{L}.allow[3]: {NETWORK_EXPECTED}, got " + '"fe80::1%eth0"',
                f"{L}.allow[4]: {NETWORK_EXPECTED}, got " + '"10.0.0.0/8 "',
            ],
            id="not-networks",
        ),
        pytest.param(
            {"allow": "10.0.0.0/8"},
            [f'{L}.allow: expected a list of networks, as {NETWORKS}, got "10.0.0.0/8"'],
            id="allow-not-list",
        ),
        pytest.param(
            {"allow": ["10.0.0.1", "10.0.0.1/32"]},
            [f'{L}.allow[1]: duplicate network "10.0.0.1/32" (first used by {L}.allow[0])'],
            id="duplicate-network",
        ),
        pytest.param(
            {"proxy_protocol": {"trusted": []}},
            [
                f"{L}.proxy_protocol.trusted: expected a list of at least one network,"
                f" as {NETWORKS}, got an empty list"
            ],
            id="empty-trusted",
        ),
        pytest.param(
            {"proxy_protocol": {"trusted": None}},
            [
                f"{L}.proxy_protocol.trusted: expected a list of at least one network,"
                f" as {NETWORKS}, got null"
            ],
            id="null-trusted",
        ),
        pytest.param(
            {"proxy_protocol": {}},
            [
                f"{L}.proxy_protocol.trusted: missing required key"
                f" (a list of networks, as {NETWORKS})"
            ],
            id="no-trusted",
        ),
        pytest.param(
            {"proxy_protocol": {"trusted": ["192.0.2.1/24"]}},
            [
                f"{L}.proxy_protocol.trusted[0]: 192.0.2.1/24 has host bits set;"
                " did you mean 192.0.2.0/24?"
            ],
            id="trusted-host-bits",
        ),
        pytest.param(
            {"proxy_protocol": True},
            [f"{L}.proxy_protocol: expected a mapping, got true"],
            id="proxy-not-mapping",
        ),
    ],
)
def test_listener_problem(listener: dict[str, object], expected: list[str]) -> None:
    assert problems(listener) == tuple(expected)


@contextlib.contextmanager
def without_root() -> Iterator[None]:
    """Run as an unprivileged user for a while: root reads any file."""
    if os.geteuid() != 0:
        yield
        return
    nobody = 65534
    os.setegid(nobody)
    os.seteuid(nobody)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_unreadable_key(pki: Path, tmp_path: Path) -> None:
    certificate, key = tmp_path / "open.crt", tmp_path / "locked.key"
    certificate.write_bytes((pki / "a.crt").read_bytes())
    certificate.chmod(0o644)
    key.write_bytes((pki / "a.key").read_bytes())
    key.chmod(0)
    # The parent folders must be searchable for the unprivileged user.
    for folder in (tmp_path, *tmp_path.parents):
        if folder.stat().st_uid == os.geteuid():
            folder.chmod(folder.stat().st_mode | 0o011)
    with without_root():
        found = problems({"tls": {"certificate": str(certificate), "key": str(key)}})
    assert found == (f"{L}.tls.key: cannot read {show(str(key))}: Permission denied",)


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        pytest.param({"kind": "sink", "tls": "starttls"}, [f"{U}.tls: {SINK}"], id="sink-with-tls"),
        pytest.param(
            {"kind": "sink", "tls": {"mode": "implicit"}},
            [f"{U}.tls: {SINK}"],
            id="sink-with-tls-mapping",
        ),
        pytest.param(
            {"kind": "sink", "xclient": True, "xforward": True},
            [f"{U}.xclient: {SINK}", f"{U}.xforward: {SINK}"],
            id="sink-with-xclient-and-xforward",
        ),
        pytest.param(
            {"tls": "startls"},
            [
                f'{U}.tls: expected a mapping or one of "none", "starttls", "implicit",'
                ' got "startls" (did you mean "starttls"?)'
            ],
            id="bad-mode-alone",
        ),
        pytest.param(
            {"tls": True},
            [f'{U}.tls: expected a mapping or one of "none", "starttls", "implicit", got true'],
            id="tls-flag",
        ),
        pytest.param(
            {"tls": {"mode": "ssl", "required": "yes", "verify": 1}},
            [
                f'{U}.tls.mode: expected one of "none", "starttls", "implicit", got "ssl"',
                f'{U}.tls.required: expected true or false, got "yes"',
                f"{U}.tls.verify: expected true or false, got 1",
            ],
            id="bad-values",
        ),
        pytest.param(
            {"tls": {"mode": "starttls", "certificate": "a.crt"}},
            [f"{U}.tls.key: missing required key when certificate is given (a file path)"],
            id="certificate-without-key",
        ),
        pytest.param(
            {"tls": {"mode": "starttls", "key": "a.key", "certificate": None}},
            [f"{U}.tls.certificate: missing required key when key is given (a file path)"],
            id="key-without-certificate",
        ),
        pytest.param(
            {"tls": {"mode": "starttls", "certificate": "b.crt", "key": "a.key"}},
            [f'{U}.tls.key: the key does not match the certificate "b.crt"'],
            id="client-key-of-another-certificate",
        ),
        pytest.param(
            {"tls": {"mode": "starttls", "ca_file": "junk.txt"}},
            [f'{U}.tls.ca_file: "junk.txt" holds no PEM certificate'],
            id="ca-file-not-pem",
        ),
        pytest.param(
            {"tls": {"mode": "starttls", "ca_file": "a.key"}},
            [f'{U}.tls.ca_file: "a.key" holds no PEM certificate'],
            id="ca-file-a-key",
        ),
        pytest.param(
            {"tls": {"mode": "starttls", "ca_file": "missing.pem"}},
            [f'{U}.tls.ca_file: cannot read "missing.pem": No such file or directory'],
            id="ca-file-missing",
        ),
        pytest.param(
            {"tls": {"mode": "starttls", "server_name": "not a name"}},
            [f'{U}.tls.server_name: expected a domain name, got "not a name"'],
            id="bad-server-name",
        ),
        pytest.param(
            {"tls": {"min_version": "1.1"}},
            [f'{U}.tls.min_version: expected "1.2" or "1.3", got "1.1"'],
            id="min-version-1.1",
        ),
        pytest.param(
            {"tls": {"verfy": False}},
            [f'{U}.tls.verfy: unknown key (did you mean "verify"?)'],
            id="unknown-key",
        ),
        pytest.param(
            {"xclient": "yes", "xforward": None},
            [
                f'{U}.xclient: expected true or false, got "yes"',
                f"{U}.xforward: expected true or false, got null",
            ],
            id="flags",
        ),
    ],
)
def test_upstream_problem(upstream: dict[str, object], expected: list[str]) -> None:
    assert problems(upstream=upstream) == tuple(expected)


def test_upstream_of_invalid_kind_still_checks_its_settings() -> None:
    assert problems(upstream={"kind": "relay", "tls": "tls", "xclient": 1}) == (
        f'{U}.kind: expected one of "smtp", "sink", got "relay"',
        f'{U}.tls: expected a mapping or one of "none", "starttls", "implicit", got "tls"',
        f"{U}.xclient: expected true or false, got 1",
    )


@pytest.mark.parametrize(
    "key", ["max_connections_per_client", "connection_rate_per_minute", "max_message_bytes"]
)
@pytest.mark.parametrize("value", [-1, 1.5, "10", True, None])
def test_client_limit_problem(key: str, value: object) -> None:
    assert problems(limits={key: value}) == (
        f"limits.{key}: expected an integer >= 0, got {show(value)}",
    )


def test_every_problem_of_one_file_is_reported_at_once() -> None:
    data: dict[object, object] = {
        "hostname": "relay.test",
        "listeners": [
            {
                "port": 25,
                "tls": {
                    "certificate": "a.crt",
                    "key": "b.key",
                    "mode": "implicit",
                    "require": True,
                },
                "auth": {"mechanisms": ["PLAIN", "PLAIN"]},
                "proxy_protocol": {"trusted": []},
                "allow": ["10.1.2.3/8"],
            },
            {"port": 26, "auth": True, "tls": {"certificate": "junk.txt", "key": "missing.key"}},
            {"port": 27, "auth": True},
        ],
        "upstreams": [
            {"host": "mta.test", "port": 25, "tls": {"mode": "starttls", "ca_file": "junk.txt"}},
            {"name": "capture", "kind": "sink", "tls": "implicit", "xclient": True},
        ],
        "limits": {"connection_rate_per_minute": -5, "max_message_bytes": -1},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="test.yaml")
    assert caught.value.problems == (
        'listeners[0].tls.key: the key does not match the certificate "a.crt"',
        'listeners[0].tls.require: only allowed when mode is "starttls"'
        " (implicit TLS encrypts every session from its first byte)",
        'listeners[0].auth.mechanisms[1]: duplicate mechanism "PLAIN"'
        " (first used by listeners[0].auth.mechanisms[0])",
        "listeners[0].proxy_protocol.trusted: expected a list of at least one network,"
        f" as {NETWORKS}, got an empty list",
        "listeners[0].proxy_protocol: not supported with tls.mode implicit; use mode starttls"
        " behind a PROXY-protocol balancer, or terminate implicit TLS on the balancer",
        "listeners[0].allow[0]: 10.1.2.3/8 has host bits set; did you mean 10.0.0.0/8?",
        'listeners[1].tls.certificate: "junk.txt" is not a PEM certificate',
        'listeners[1].tls.key: cannot read "missing.key": No such file or directory',
        f"listeners[2].auth.require_tls: {NO_TLS_FOR_AUTH}",
        'upstreams[0].tls.ca_file: "junk.txt" holds no PEM certificate',
        f"upstreams[1].tls: {SINK}",
        f"upstreams[1].xclient: {SINK}",
        "limits.connection_rate_per_minute: expected an integer >= 0, got -5",
        "limits.max_message_bytes: expected an integer >= 0, got -1",
    )


# --- Anything at all: a ConfigError or a Config ----------------------------------

FILES = ["a.crt", "a.key", "b.key", "both.pem", "enc.key", "junk.txt", "folder", "fifo", "nope"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True),
    st.sampled_from(
        [*FILES, "starttls", "implicit", "none", "PLAIN", "login", "1.2", "10.0.0.0/8", "::1"]
    ),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "certificate",
                    "key",
                    "mode",
                    "require",
                    "required",
                    "verify",
                    "ca_file",
                    "server_name",
                    "min_version",
                    "ciphers",
                    "mechanisms",
                    "require_tls",
                    "trusted",
                ]
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=8,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    listener=st.dictionaries(
        st.sampled_from(["tls", "auth", "proxy_protocol", "allow"]), values, max_size=4
    ),
    upstream=st.dictionaries(
        st.sampled_from(["kind", "tls", "xclient", "xforward"]), values, max_size=4
    ),
)
def test_any_settings_give_a_config_or_a_config_error(
    listener: dict[str, object], upstream: dict[str, object]
) -> None:
    try:
        parse(listener, upstream)
    except ConfigError as err:
        found = err.problems
    else:
        return
    assert found
    assert all(problem.startswith(("listeners[0]", "upstreams[0]")) for problem in found)


# --- The full example's commented listeners and upstream ---------------------------


def commented_items(text: str, names: list[str]) -> Iterator[object]:
    """Yield the commented list items of the full example named `names`, loaded."""
    lines = text.splitlines()
    for name in names:
        start = lines.index(f"  # - name: {name}")
        end = start + 1
        while end < len(lines) and lines[end].startswith("  #   "):
            end += 1
        item = yaml.safe_load("\n".join(line.removeprefix("  # ") for line in lines[start:end]))
        assert isinstance(item, list)
        yield item[0]


def test_full_example_commented_listeners_and_upstream_are_valid(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (CONFIGS / "smtpwarden.yaml").read_text(encoding="utf-8")
    (tmp_path / "tls").mkdir()
    for source, target in [
        ("a.crt", "relay.example.com.crt"),
        ("a.key", "relay.example.com.key"),
        ("ca.pem", "internal-ca.pem"),
    ]:
        (tmp_path / "tls" / target).write_bytes((pki / source).read_bytes())
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(text)
    data["listeners"].extend(commented_items(text, ["submission-tls", "submissions"]))
    data["upstreams"].extend(commented_items(text, ["mta-tls"]))
    config = parse_config(data, source="smtpwarden.yaml")
    starttls, implicit = config.listeners[-2:]
    assert starttls.tls == ListenerTls(
        certificate="tls/relay.example.com.crt", key="tls/relay.example.com.key", require=True
    )
    assert starttls.auth == ListenerAuth(mechanisms=("PLAIN", "LOGIN"))
    assert starttls.proxy_protocol == ProxyProtocol(trusted=(ipaddress.ip_network("10.0.0.0/24"),))
    assert implicit.tls is not None
    assert (implicit.port, implicit.tls.mode, implicit.tls.min_version) == (465, "implicit", "1.3")
    assert implicit.auth == ListenerAuth()
    assert implicit.proxy_protocol is None
    assert implicit.allow == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    upstream = config.upstreams[-1]
    assert upstream.tls == UpstreamTls(
        mode="starttls", ca_file="tls/internal-ca.pem", server_name="mta.example.com"
    )
    assert (upstream.xclient, upstream.xforward) == (True, False)
