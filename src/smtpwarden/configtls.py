"""TLS, AUTH, PROXY protocol and networks: how each leg of a session is protected.

`smtpwarden.configendpoints` reads the ``listeners`` and ``upstreams``
lists; this module defines and reads the sections of each entry that say
who may connect and how each connection is protected:

- of a listener: ``tls`` (certificate, STARTTLS or implicit TLS, whether
  TLS is required before MAIL and AUTH, minimum version, ciphers), ``auth``
  (AUTH passed through to the upstream), ``proxy_protocol`` (PROXY v1/v2
  headers accepted from trusted networks) and ``allow`` (client networks);
- of an upstream: ``tls`` towards it (none, STARTTLS or implicit;
  verification, CA file, server name, client certificate).

Certificate, key and CA files are read when the file is loaded, so that a
missing file, a key that does not match its certificate or a cipher list
OpenSSL refuses is a problem at its key, not a failure at the first session.

Rule 1: like `smtpwarden.config`, it never prints, never exits and never
raises `ConfigError`; it reports problems to the checker it is given. The
only I/O is reading those files.

Rule 2: it imports nothing from the project but `smtpwarden.configcheck`, so
that `smtpwarden.configendpoints` and the network modules can import it
without a cycle.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from smtpwarden.configcheck import (
    Checker,
    Choice,
    Flag,
    Text,
    is_domain,
    is_path,
    join_key,
    show,
    suggest,
)

ListenerTlsMode = Literal["starttls", "implicit"]
UpstreamTlsMode = Literal["none", "starttls", "implicit"]
TlsVersion = Literal["1.2", "1.3"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LISTENER_TLS_MODES: Final[tuple[ListenerTlsMode, ...]] = ("starttls", "implicit")
UPSTREAM_TLS_MODES: Final[tuple[UpstreamTlsMode, ...]] = ("none", "starttls", "implicit")
TLS_VERSIONS: Final[tuple[TlsVersion, ...]] = ("1.2", "1.3")
# RFC 4954 and the de-facto XOAUTH2; names as EHLO advertises them.
AUTH_MECHANISMS: Final = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerTls:
    """TLS towards the clients of one listener."""

    certificate: str  # PEM file: the certificate, then any intermediates
    key: str  # PEM file: its private key, unencrypted
    mode: ListenerTlsMode = "starttls"  # implicit: TLS from the first octet (port 465)
    # STARTTLS listeners: MAIL and AUTH are refused (530 5.7.0) until TLS is up.
    require: bool = False
    min_version: TlsVersion = "1.2"  # RFC 8996 retires 1.0 and 1.1
    ciphers: str | None = None  # OpenSSL cipher list for TLS 1.2; None: the library's default


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerAuth:
    """AUTH passed through to the upstream: smtpwarden never checks a secret."""

    # Offered to clients when the upstream offers them too, in this order.
    mechanisms: tuple[str, ...] = AUTH_MECHANISMS
    # RFC 4954 4: plaintext secrets need TLS; AUTH is offered only after it.
    require_tls: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyProtocol:
    """PROXY protocol v1 and v2 headers (HAProxy), from trusted networks only.

    A listener with it expects every connection to start with a header: one
    from an untrusted address, or without a header, is closed.
    """

    trusted: tuple[Network, ...]  # at least one


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamTls:
    """TLS towards one upstream."""

    mode: UpstreamTlsMode = "none"
    # starttls: True fails the upstream (failover) when it does not offer
    # STARTTLS or the handshake fails; False goes on in plaintext when it
    # does not offer STARTTLS. Implicit TLS is always required.
    required: bool = True
    verify: bool = True  # False: no certificate check at all (logged as insecure)
    ca_file: str | None = None  # PEM bundle; None: the system's CAs
    server_name: str | None = None  # SNI and the name checked; None: the upstream's host
    certificate: str | None = None  # client certificate (PEM), with key
    key: str | None = None
    min_version: TlsVersion = "1.2"


# --- What each setting must be ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Version:
    """A TLS version; YAML reads 1.2 and 1.3 unquoted as decimals, so those count too."""

    expected: str = '"1.2" or "1.3"'

    def convert(self, raw: object) -> TlsVersion | None:
        text = repr(raw) if isinstance(raw, float) else raw
        for version in TLS_VERSIONS:
            if text == version:
                return version
        return None


_FILE: Final = Text("a file path", is_path)
_SERVER_NAME: Final = Text("a domain name", is_domain)
_CIPHERS: Final = Text("an OpenSSL cipher list", lambda text: text.strip() != "")
_LISTENER_MODE: Final = Choice(LISTENER_TLS_MODES)
_UPSTREAM_MODE: Final = Choice(UPSTREAM_TLS_MODES)
_VERSION: Final = _Version()
_FLAG: Final = Flag()

# The YAML keys of each section are the fields of its dataclass.
_LISTENER_TLS_KEYS: Final = tuple(field.name for field in dataclasses.fields(ListenerTls))
_AUTH_KEYS: Final = tuple(field.name for field in dataclasses.fields(ListenerAuth))
_PROXY_KEYS: Final = tuple(field.name for field in dataclasses.fields(ProxyProtocol))
_UPSTREAM_TLS_KEYS: Final = tuple(field.name for field in dataclasses.fields(UpstreamTls))

_MECHANISMS_SHOWN: Final = ", ".join(AUTH_MECHANISMS)
_NETWORK_EXAMPLE: Final = "10.0.0.0/8 or 2001:db8::/32"
_NETWORK_EXPECTED: Final = f"a network, as {_NETWORK_EXAMPLE}, or one address"
_UPSTREAM_TLS_EXPECTED: Final = "a mapping or one of " + ", ".join(map(show, UPSTREAM_TLS_MODES))
_NO_TLS_FOR_AUTH: Final = (
    "AUTH would never be offered: this listener has no tls; configure tls or set require_tls: false"
)
# A certificate chain or a CA bundle is far smaller; the cap keeps a wrong
# path (a log file, say) from being read whole.
_MAX_PEM_BYTES: Final = 1048576
_CERTIFICATE_BLOCK: Final = re.compile(
    r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL
)
# PKCS#8 ("PRIVATE KEY", "ENCRYPTED PRIVATE KEY") and the older
# "RSA PRIVATE KEY" and "EC PRIVATE KEY".
_KEY_LINE: Final = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


# --- Files -------------------------------------------------------------------


class _EncryptedKey(Exception):
    """Raised instead of letting OpenSSL prompt on the terminal for a pass phrase."""


def _refuse_password() -> bytes:
    raise _EncryptedKey


def _read_pem(check: Checker, key_path: str, file: str) -> str | None:
    """Return the text of a PEM file, or None once the reason it cannot be read is reported."""
    try:
        # Looked at before opening: opening a FIFO would wait for a writer.
        if not stat.S_ISREG(os.stat(file).st_mode):
            check.report(key_path, f"{show(file)} is not a regular file")
            return None
        with open(file, "rb") as stream:
            content = stream.read(_MAX_PEM_BYTES + 1)
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        check.report(key_path, f"cannot read {show(file)}: {reason}")
        return None
    if len(content) > _MAX_PEM_BYTES:
        check.report(key_path, f"{show(file)} is too large for a PEM file (over 1 MiB)")
        return None
    # PEM is ASCII; any other byte simply fails the checks that follow.
    return content.decode("latin-1")


def _holds_certificate(text: str) -> bool:
    """Say whether `text` holds PEM certificates only, all of which OpenSSL can read."""
    blocks = _CERTIFICATE_BLOCK.findall(text)
    if not blocks or not all(block.isascii() for block in blocks):
        return False
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata="\n".join(blocks))
    except (ssl.SSLError, ValueError):
        return False
    return True


def _check_pair(check: Checker, path: str, certificate: str | None, key: str | None) -> None:
    """Report unless the files at `path`.certificate and `path`.key load as one pair.

    Either may be None when it is missing or invalid (already reported); the
    other is then only checked to be readable.
    """
    certificate_path, key_path = join_key(path, "certificate"), join_key(path, "key")
    certificate_text = key_text = None
    if certificate is not None:
        certificate_text = _read_pem(check, certificate_path, certificate)
        if certificate_text is not None and not _holds_certificate(certificate_text):
            check.report(certificate_path, f"{show(certificate)} is not a PEM certificate")
            certificate_text = None
    if key is not None:
        key_text = _read_pem(check, key_path, key)
        if key_text is not None and not _KEY_LINE.search(key_text):
            check.report(key_path, f"{show(key)} is not a PEM private key")
            key_text = None
    if certificate is None or key is None or certificate_text is None or key_text is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certificate, key, password=_refuse_password)
    except _EncryptedKey:
        check.report(key_path, f"{show(key)} is encrypted; the key must be unencrypted")
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            message = f"the key does not match the certificate {show(certificate)}"
        else:
            message = f"{show(key)} cannot be loaded as the key of {show(certificate)}"
        check.report(key_path, message)
    except (OSError, ValueError) as err:  # the file changed since it was read
        check.report(key_path, f"cannot load {show(key)}: {err}")


def _check_ca_file(check: Checker, key_path: str, file: str) -> None:
    if _read_pem(check, key_path, file) is None:
        return
    try:
        ssl.create_default_context(cafile=file)
    except (ssl.SSLError, OSError, ValueError):
        check.report(key_path, f"{show(file)} holds no PEM certificate")


# --- Values --------------------------------------------------------------------


def _optional(
    check: Checker, section: Mapping[str, object], key: str, path: str, rule: Text = _FILE
) -> str | None:
    """Return a text that may be left out (a file path by default); absent or null is None."""
    if section.get(key) is None:
        return None
    return check.value(section, key, path, rule, None)


def _ciphers(check: Checker, section: Mapping[str, object], path: str) -> str | None:
    if section.get("ciphers") is None:
        return None
    ciphers = check.value(section, "ciphers", path, _CIPHERS, None)
    if ciphers is None:
        return None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
    except (ssl.SSLError, ValueError) as err:
        reason = str(err.args[0] if err.args else err).rstrip(".")
        check.report(
            join_key(path, "ciphers"),
            f"expected an OpenSSL cipher list, got {show(ciphers)} ({reason})",
        )
        return None
    return ciphers


def _network(check: Checker, item_path: str, item: object) -> Network | None:
    # A scope ("fe80::1%eth0") would never match a client's address.
    if isinstance(item, str) and "%" not in item:
        try:
            return ipaddress.ip_network(item)
        except ValueError:
            pass
        try:
            loose = ipaddress.ip_network(item, strict=False)
        except ValueError:
            pass
        else:
            check.report(item_path, f"{item} has host bits set; did you mean {loose}?")
            return None
    check.report(item_path, f"expected {_NETWORK_EXPECTED}, got {show(item)}")
    return None


def read_networks(
    check: Checker, section: Mapping[str, object], key: str, path: str, *, required: bool = False
) -> tuple[Network, ...]:
    """Read the list of networks at `path`.`key`: CIDR networks or single addresses.

    A single address is its /32 or /128. An entry with host bits set, or one
    repeated, is a problem. Absent or null: () unless `required`, which also
    asks for at least one entry.
    """
    key_path = join_key(path, key)
    if required and key not in section:
        check.report(key_path, f"missing required key (a list of networks, as {_NETWORK_EXAMPLE})")
        return ()
    raw = section.get(key)
    if raw is None and not required:
        return ()
    if not isinstance(raw, list) or (required and not raw):
        least = "at least one network" if required else "networks"
        check.report(
            key_path, f"expected a list of {least}, as {_NETWORK_EXAMPLE}, got {show(raw)}"
        )
        return ()
    found: list[tuple[str, Network]] = []
    for j, item in enumerate(raw):
        network = _network(check, f"{key_path}[{j}]", item)
        if network is not None:
            found.append((f"{key_path}[{j}]", network))
    check.unique("network", [(item_path, str(network)) for item_path, network in found])
    return tuple(dict.fromkeys(network for _, network in found))


# --- Listeners -----------------------------------------------------------------


def read_listener_tls(
    check: Checker, listener: Mapping[str, object], path: str
) -> ListenerTls | None:
    """Read `tls` of the listener at `path`; absent or null means no TLS."""
    raw = listener.get("tls")
    if raw is None:
        return None
    tls_path = join_key(path, "tls")
    section = check.mapping(raw, tls_path, _LISTENER_TLS_KEYS)
    if not isinstance(raw, dict):
        return None
    default = ListenerTls(certificate="", key="")
    certificate = check.required(section, "certificate", tls_path, _FILE, "")
    key = check.required(section, "key", tls_path, _FILE, "")
    _check_pair(check, tls_path, certificate or None, key or None)
    mode = check.value(section, "mode", tls_path, _LISTENER_MODE, default.mode)
    require = check.value(section, "require", tls_path, _FLAG, default.require)
    if require and mode == "implicit":
        check.report(
            join_key(tls_path, "require"),
            'only allowed when mode is "starttls"'
            " (implicit TLS encrypts every session from its first byte)",
        )
    return ListenerTls(
        certificate=certificate,
        key=key,
        mode=mode,
        require=require,
        min_version=check.value(section, "min_version", tls_path, _VERSION, default.min_version),
        ciphers=_ciphers(check, section, tls_path),
    )


def _mechanisms(check: Checker, section: Mapping[str, object], path: str) -> tuple[str, ...]:
    raw = section.get("mechanisms")
    if raw is None:
        return AUTH_MECHANISMS
    key_path = join_key(path, "mechanisms")
    if not isinstance(raw, list) or not raw:
        expected = f"a list of at least one of {_MECHANISMS_SHOWN}"
        check.report(key_path, f"expected {expected}, got {show(raw)}")
        return AUTH_MECHANISMS
    found: list[tuple[str, str]] = []
    for j, item in enumerate(raw):
        name = item.upper() if isinstance(item, str) else None
        if name in AUTH_MECHANISMS:
            found.append((f"{key_path}[{j}]", name))
        else:
            hint = suggest(name, AUTH_MECHANISMS)
            check.report(
                f"{key_path}[{j}]", f"expected one of {_MECHANISMS_SHOWN}, got {show(item)}{hint}"
            )
    check.unique("mechanism", found)
    return tuple(dict.fromkeys(name for _, name in found)) or AUTH_MECHANISMS


def read_listener_auth(
    check: Checker, listener: Mapping[str, object], path: str, *, has_tls: bool
) -> ListenerAuth | None:
    """Read `auth` of the listener at `path`: true, false or a mapping.

    Absent, null or false: None. `has_tls` says whether the listener has a
    `tls` section (even an invalid one, already reported): AUTH that
    requires TLS on a listener without it would never be offered.
    """
    raw = listener.get("auth")
    auth_path = join_key(path, "auth")
    if raw is None or raw is False:
        return None
    if raw is True:
        auth = ListenerAuth()
        require_tls_valid = True
    elif isinstance(raw, dict):
        section = check.mapping(raw, auth_path, _AUTH_KEYS)
        mechanisms = _mechanisms(check, section, auth_path)
        before = len(check.found)
        require_tls = check.value(section, "require_tls", auth_path, _FLAG, True)
        require_tls_valid = len(check.found) == before
        auth = ListenerAuth(mechanisms=mechanisms, require_tls=require_tls)
    else:
        check.report(auth_path, f"expected true, false or a mapping, got {show(raw)}")
        return None
    if auth.require_tls and require_tls_valid and not has_tls:
        check.report(join_key(auth_path, "require_tls"), _NO_TLS_FOR_AUTH)
    return auth


def read_proxy_protocol(
    check: Checker, listener: Mapping[str, object], path: str
) -> ProxyProtocol | None:
    """Read `proxy_protocol` of the listener at `path`; absent or null means None."""
    raw = listener.get("proxy_protocol")
    if raw is None:
        return None
    proxy_path = join_key(path, "proxy_protocol")
    section = check.mapping(raw, proxy_path, _PROXY_KEYS)
    if not isinstance(raw, dict):
        return None
    return ProxyProtocol(
        trusted=read_networks(check, section, "trusted", proxy_path, required=True)
    )


# --- Upstreams -----------------------------------------------------------------


def read_upstream_tls(check: Checker, upstream: Mapping[str, object], path: str) -> UpstreamTls:
    """Read `tls` of the upstream at `path`: a mapping, or a mode alone.

    Absent or null: no TLS. A mode alone ("starttls") takes every other default.
    """
    default = UpstreamTls()
    raw = upstream.get("tls")
    tls_path = join_key(path, "tls")
    if raw is None:
        return default
    if not isinstance(raw, dict):
        mode = _UPSTREAM_MODE.convert(raw)
        if mode is None:
            hint = suggest(raw, UPSTREAM_TLS_MODES)
            check.report(tls_path, f"expected {_UPSTREAM_TLS_EXPECTED}, got {show(raw)}{hint}")
            return default
        return UpstreamTls(mode=mode)
    section = check.mapping(raw, tls_path, _UPSTREAM_TLS_KEYS)
    ca_file = _optional(check, section, "ca_file", tls_path)
    if ca_file is not None:
        _check_ca_file(check, join_key(tls_path, "ca_file"), ca_file)
    certificate = _optional(check, section, "certificate", tls_path)
    key = _optional(check, section, "key", tls_path)
    for given, missing in (("certificate", "key"), ("key", "certificate")):
        if section.get(given) is not None and section.get(missing) is None:
            check.report(
                join_key(tls_path, missing),
                f"missing required key when {given} is given (a file path)",
            )
    if certificate is not None or key is not None:
        _check_pair(check, tls_path, certificate, key)
    return UpstreamTls(
        mode=check.value(section, "mode", tls_path, _UPSTREAM_MODE, default.mode),
        required=check.value(section, "required", tls_path, _FLAG, default.required),
        verify=check.value(section, "verify", tls_path, _FLAG, default.verify),
        ca_file=ca_file,
        server_name=_optional(check, section, "server_name", tls_path, _SERVER_NAME),
        certificate=certificate,
        key=key,
        min_version=check.value(section, "min_version", tls_path, _VERSION, default.min_version),
    )
