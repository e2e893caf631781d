"""TLS on both legs: contexts built from the settings, and what a link negotiated.

Towards upstreams: ``client_context`` (built once per upstream and shared by
its connections), ``server_name`` (SNI and the name checked) and
``starttls_policy`` (what ``protocol.preamble`` is told). Towards clients:
``server_context``, and ``Switchable`` for a listener whose handshakes the
event loop does, to take a renewed certificate on SIGHUP.
``describe`` says what a connection negotiated, for the logs.

For the streams client (``net.delivery``): ``open_stream`` opens the
connection with a reader that counts unread octets, and ``start_tls``
upgrades it after a 220 to STARTTLS only if the upstream sent nothing past
that 220. Octets received before the handshake would otherwise be read as
if they came over TLS (STARTTLS command injection, RFC 3207 5).

Rule: a handshake failure is never followed by plaintext; the caller ends
the attempt.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, SupportsIndex

from smtpwarden.configtls import ListenerTls, TlsVersion, UpstreamTls
from smtpwarden.net.upstream import Target
from smtpwarden.protocol.preamble import StartTlsPolicy

_VERSIONS: Final[dict[TlsVersion, ssl.TLSVersion]] = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
# RFC 4514 3: the short names of the attribute types a subject usually holds.
_SHORT_NAMES: Final = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}
# RFC 4514 2.4: characters escaped with a backslash anywhere in a value.
_SPECIAL: Final = frozenset(',+"\\<>;')
# A peer subject in a log line is a name, not a document.
PEER_CHARS: Final = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsInfo:
    """What one TLS connection negotiated.

    ``peer`` is the peer certificate's subject ("CN=mx.example.net", or the
    RFC 4514 form when it has no CN); None when the peer sent no certificate
    or it was not verified.
    """

    version: str  # "TLSv1.3"
    cipher: str  # "TLS_AES_256_GCM_SHA384"
    peer: str | None

    @property
    def summary(self) -> str:
        """Version and cipher, as logged: "TLSv1.3 TLS_AES_256_GCM_SHA384"."""
        return f"{self.version} {self.cipher}"

    def __str__(self) -> str:
        return self.summary


class TlsFailure(Exception):
    """STARTTLS did not secure the connection; the message says why."""


class CountingReader(asyncio.StreamReader):
    """A stream reader that knows how many received octets are still unread.

    Only ``read`` takes octets out of the count: the other read methods are
    not used with it.
    """

    unread: int = 0

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        chunk = data if isinstance(data, bytes | bytearray) else bytes(data)
        super().feed_data(chunk)
        self.unread += len(chunk)

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self.unread -= len(data)
        return data


def client_context(tls: UpstreamTls) -> ssl.SSLContext | None:
    """The context for connections to one upstream; None for mode "none".

    With ``verify`` the peer's chain is checked against ``ca_file`` (the
    system's CAs when None) and its name against ``server_name``; without,
    nothing is checked. Raises OSError or ssl.SSLError for a CA file or
    client certificate that cannot be loaded.
    """
    if tls.mode == "none":
        return None
    if tls.verify:
        context = ssl.create_default_context(cafile=tls.ca_file)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = _VERSIONS[tls.min_version]
    if tls.certificate is not None:
        context.load_cert_chain(tls.certificate, tls.key)
    return context


def server_context(tls: ListenerTls) -> ssl.SSLContext:
    """The context for a listener's TLS connections.

    Raises OSError or ssl.SSLError for files that cannot be loaded, a key
    that does not match the certificate, or a cipher list that selects none.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    if tls.ciphers is not None:
        context.set_ciphers(tls.ciphers)
    context.load_cert_chain(tls.certificate, tls.key)
    return context


class Switchable:
    """A listening context whose handshakes use whichever context is current.

    For a listener whose handshakes the event loop does: the server keeps the
    context it was started with (``front``), and a reload cannot replace it.
    Its SNI callback, which OpenSSL calls for every ClientHello, SNI or not,
    hands each new handshake to ``current`` instead: a renewed certificate,
    of any key type, replaces the old one, where loading it into the same
    context would add it beside the old one. Live sessions keep theirs.
    """

    __slots__ = ("current", "front")

    def __init__(self, tls: ListenerTls) -> None:
        self.front = server_context(tls)
        self.current = self.front
        self.front.sni_callback = self._choose

    def _choose(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
    ) -> None:
        if self.current is not context:
            connection.context = self.current


def server_name(target: Target, tls: UpstreamTls) -> str:
    """The name sent as SNI and checked in the upstream's certificate.

    ``tls.server_name`` if set, else the upstream's host. For an IP address
    the ssl module sends no SNI and checks the certificate's IP addresses.
    """
    return tls.server_name or target.host


def starttls_policy(tls: UpstreamTls | None) -> StartTlsPolicy:
    """What the preamble does about STARTTLS for an upstream with ``tls``."""
    if tls is None or tls.mode != "starttls":
        return "none"
    return "required" if tls.required else "opportunistic"


def describe(
    source: asyncio.BaseTransport | asyncio.StreamWriter | ssl.SSLObject | ssl.SSLSocket | None,
) -> TlsInfo | None:
    """What a transport, stream writer or ssl object negotiated; None without TLS."""
    if source is None:
        return None
    if isinstance(source, ssl.SSLObject | ssl.SSLSocket):
        link: object = source
    else:
        link = source.get_extra_info("ssl_object")
    if not isinstance(link, ssl.SSLObject | ssl.SSLSocket):
        return None
    version, cipher = link.version(), link.cipher()
    if version is None or cipher is None:
        return None  # no handshake yet
    return TlsInfo(version=version, cipher=cipher[0], peer=_subject(link.getpeercert()))


def handshake_failure(error: ssl.SSLError) -> str:
    """Why a handshake failed, in a few words for ``Attempt.error``."""
    if isinstance(error, ssl.SSLCertVerificationError):
        detail = getattr(error, "verify_message", None) or error.reason or "no detail"
        return f"certificate verify failed: {detail}"
    return str(error.reason or error.strerror or error)


async def open_stream(
    host: str,
    port: int,
    *,
    context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[CountingReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` with a ``CountingReader``.

    With ``context`` the connection is TLS from the first octet (implicit
    TLS), ``server_hostname`` being the name sent and checked. Raises
    OSError (ssl.SSLError for a failed handshake).
    """
    loop = asyncio.get_running_loop()
    reader = CountingReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    if context is None:
        transport, _ = await loop.create_connection(lambda: protocol, host, port)
    else:
        transport, _ = await loop.create_connection(
            lambda: protocol, host, port, ssl=context, server_hostname=server_hostname
        )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def start_tls(
    reader: CountingReader,
    writer: asyncio.StreamWriter,
    context: ssl.SSLContext,
    *,
    server_hostname: str,
    buffered: int = 0,
) -> TlsInfo | None:
    """Run the client handshake on a connection whose STARTTLS got a 220.

    ``buffered`` counts the octets past that 220 in the caller's own reply
    parser. Returns what was negotiated. Raises ``TlsFailure`` if any octet
    came after the 220, the handshake failed or the connection was lost;
    timeouts are the caller's.
    """
    if buffered or reader.unread:
        raise TlsFailure("upstream sent data after its 220 to STARTTLS, before the TLS handshake")
    try:
        await writer.start_tls(context, server_hostname=server_hostname)
    except ssl.SSLError as error:
        raise TlsFailure(f"TLS handshake failed: {handshake_failure(error)}") from None
    except (OSError, EOFError):
        raise TlsFailure("connection lost in the TLS handshake") from None
    return describe(writer)


def _subject(cert: object) -> str | None:
    """The subject of a verified peer certificate, as a short string."""
    subject = cert.get("subject") if isinstance(cert, dict) else None
    if not isinstance(subject, tuple):
        return None  # no certificate, or not verified: getpeercert() gives {}
    rdns: list[list[tuple[str, str]]] = []
    for rdn in subject:
        pairs = []
        for pair in rdn if isinstance(rdn, tuple) else ():
            if isinstance(pair, tuple) and len(pair) == 2:
                name, value = pair
                if isinstance(name, str) and isinstance(value, str):
                    pairs.append((name, value))
        rdns.append(pairs)
    names = [value for pairs in rdns for name, value in pairs if name == "commonName"]
    if names:
        text = "CN=" + _escape(names[-1])  # the last is the most specific
    else:
        text = ",".join(
            "+".join(f"{_SHORT_NAMES.get(name, name)}={_escape(value)}" for name, value in pairs)
            for pairs in reversed(rdns)
            if pairs
        )
    return text[:PEER_CHARS] or None


def _escape(value: str) -> str:
    """RFC 4514 2.4: escape a value; control characters as hex pairs."""
    out = []
    last = len(value) - 1
    for i, char in enumerate(value):
        if char in _SPECIAL or (char == "#" and i == 0) or (char == " " and i in (0, last)):
            out.append("\\" + char)
        elif char < " " or char == "\x7f":
            out.append(f"\\{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)
