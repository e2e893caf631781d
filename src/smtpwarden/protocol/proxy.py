"""The PROXY protocol header that a load balancer puts before the client's bytes.

HAProxy's proxy-protocol.txt defines two versions. Version 1 is one text line,
``PROXY TCP4 <src> <dst> <sport> <dport>`` and CRLF, at most 107 octets.
Version 2 is binary: a 12-octet signature, a version and command octet, a
family and transport octet, a 2-octet length, then that many octets of
addresses and TLVs.

``ProxyHeaderReader`` reads the header (sans-I/O: ``receive_data`` adds bytes,
``next_header`` returns the header or None while more are needed). The spec
forbids guessing whether a header is present (section 2), so anything else
raises ``ProxyProtocolError`` as soon as the received prefix shows it: a
connection that opens with ``EHLO`` fails on its first octet. The reader never
holds more than one header (107 octets for version 1, 16 + 65535 for version
2) plus the chunk that completes it; the octets after the header are the
client's and wait in ``rest``.

What is accepted, beyond the exact grammar of the spec:

- Version 1 ``UNKNOWN`` lines, whatever follows the keyword (section 2.1:
  "the receiver must ignore anything presented before the CRLF"), but never
  a bare CR or LF.
- Version 2 LOCAL headers (the proxy's own health checks): the family and the
  address block are ignored, as section 2.2 requires.
- Version 2 PROXY headers over TCP or a unix stream socket, and with the
  UNSPEC family; only TCP carries addresses smtpwarden can use. Datagram
  transports are refused: SMTP runs over streams. TLVs are skipped unread.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from smtpwarden.protocol.errors import LocalProtocolError, ProxyProtocolError

Address = tuple[str, int]
"""A host (an IP address in its canonical text form) and a port."""

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Section 2.1: "PROXY UNKNOWN" with two full IPv6 addresses and ports.
MAX_V1_LINE_BYTES = 107
V2_FIXED_BYTES = 16

_V2_LOCAL = 0x0
_V2_PROXY = 0x1
# Section 2.2: the family and transport octet, and the size of the address
# block each one needs. DGRAM (0x12, 0x22, 0x32) is known but refused.
_V2_UNSPEC = 0x00
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_UNIX_STREAM = 0x31
_V2_ADDRESS_BYTES = {_V2_UNSPEC: 0, _V2_TCP4: 12, _V2_TCP6: 36, _V2_UNIX_STREAM: 216}
_V2_DGRAM = {0x12: "UDP over IPv4", 0x22: "UDP over IPv6", 0x32: "unix datagram"}

# Section 2.1: no heading zeroes, so that nothing reads as octal.
_V1_PORT = re.compile(rb"(?:0|[1-9][0-9]{0,4})\Z")
_V1_IPV4 = re.compile(rb"[0-9.]{7,15}\Z")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}\Z")
# What may follow "PROXY ", to fail on a bad protocol before the CRLF.
_V1_STARTS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyHeader:
    """One PROXY protocol header.

    ``source`` is the client as the proxy saw it and ``destination`` the
    address the client connected to. Both are None when the header carries
    no usable address (version 1 ``UNKNOWN``, version 2 LOCAL, UNSPEC or unix
    sockets): the connection's own endpoints then apply. ``local`` marks a
    version 2 LOCAL header, a connection the proxy made itself.
    """

    version: int
    source: Address | None
    destination: Address | None
    local: bool = False


class ProxyHeaderReader:
    """Reads the PROXY header at the start of one connection.

    Feed bytes with ``receive_data`` and call ``next_header`` until it
    returns the header; then take the client's first bytes from ``rest``.
    A malformed header raises ``ProxyProtocolError``; the reader is then
    unusable and the connection must be closed without a reply.
    """

    __slots__ = ("_buf", "_header", "_rest")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: ProxyHeader | None = None
        self._rest = b""

    @property
    def rest(self) -> bytes:
        """The bytes received after the header (empty until it is read)."""
        return self._rest

    def receive_data(self, data: bytes) -> None:
        """Add received bytes.

        Raises ``LocalProtocolError`` once the header was returned: what
        follows belongs to the SMTP reader, starting with ``rest``.
        """
        if self._header is not None:
            raise LocalProtocolError("the PROXY header was already read")
        self._buf += data

    def receive_eof(self) -> None:
        """The peer closed its side before the header was complete.

        Raises ``ProxyProtocolError``: a connection without a complete header
        is refused (section 2.2), even one that sent nothing at all.
        """
        if self._header is None:
            raise ProxyProtocolError(
                f"connection closed after {len(self._buf)} octets, before a complete PROXY header"
            )

    def next_header(self) -> ProxyHeader | None:
        """Return the header, or None if more bytes are needed.

        Raises ``ProxyProtocolError`` naming the problem, and
        ``LocalProtocolError`` if the header was already returned.
        """
        if self._header is not None:
            raise LocalProtocolError("the PROXY header was already read")
        buf = self._buf
        if buf[:1] == V2_SIGNATURE[:1]:
            if not V2_SIGNATURE.startswith(buf[:12]):
                raise ProxyProtocolError(
                    f"not a PROXY protocol header: bad v2 signature {bytes(buf[:12])!r}"
                )
            found = _read_v2(buf) if len(buf) >= 12 else None
        elif V1_PREFIX.startswith(buf[:6]):
            found = _read_v1(buf) if len(buf) >= 6 else None
        else:
            raise ProxyProtocolError(
                f"not a PROXY protocol header: connection starts with {bytes(buf[:16])!r}"
            )
        if found is None:
            return None
        header, size = found
        self._header = header
        self._rest = bytes(memoryview(buf)[size:])
        self._buf = bytearray()
        return header


def _read_v1(buf: bytearray) -> tuple[ProxyHeader, int] | None:
    """Parse a version 1 line at the start of ``buf`` (which holds its prefix)."""
    end = buf.find(b"\n", 0, MAX_V1_LINE_BYTES)
    if end < 0:
        if len(buf) >= MAX_V1_LINE_BYTES:
            raise ProxyProtocolError(f"PROXY v1 line without CRLF in {MAX_V1_LINE_BYTES} octets")
        cr = buf.find(b"\r")
        if 0 <= cr < len(buf) - 1:
            raise ProxyProtocolError("bare CR in PROXY v1 line")
        start = bytes(buf[6:14])
        if not any(s.startswith(start) or start.startswith(s) for s in _V1_STARTS):
            raise ProxyProtocolError(f"unknown PROXY v1 protocol at {start!r}")
        return None
    line = bytes(buf[:end])
    if not line.endswith(b"\r") or line.count(b"\r") != 1:
        raise ProxyProtocolError("PROXY v1 line not ended by CRLF or holding a bare CR")
    fields = line[:-1].split(b" ")
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        header = ProxyHeader(version=1, source=None, destination=None)
        return header, end + 1
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"unknown PROXY v1 protocol {protocol!r}")
    if len(fields) != 6:
        raise ProxyProtocolError(
            f"PROXY v1 {protocol.decode()} line needs 6 fields separated by single spaces,"
            f" got {len(fields)}"
        )
    hosts = [_v1_host(text, protocol) for text in fields[2:4]]
    ports = []
    for text in fields[4:6]:
        if not _V1_PORT.match(text) or int(text) > 0xFFFF:
            raise ProxyProtocolError(f"bad port {text!r} in PROXY v1 line")
        ports.append(int(text))
    header = ProxyHeader(version=1, source=(hosts[0], ports[0]), destination=(hosts[1], ports[1]))
    return header, end + 1


def _v1_host(text: bytes, protocol: bytes) -> str:
    """Check a version 1 address against its protocol; return its canonical form."""
    version = 4 if protocol == b"TCP4" else 6
    if (_V1_IPV4 if version == 4 else _V1_IPV6).match(text):
        try:
            ip = ip_address(text.decode("ascii"))
        except ValueError:
            pass
        else:
            if ip.version == version:
                return str(ip)
    raise ProxyProtocolError(f"bad {protocol.decode()} address {text!r} in PROXY v1 line")


def _read_v2(buf: bytearray) -> tuple[ProxyHeader, int] | None:
    """Parse a version 2 header at the start of ``buf`` (which holds its signature).

    Each field is checked as soon as it has arrived.
    """
    if len(buf) < 13:
        return None
    version, command = buf[12] >> 4, buf[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"PROXY v2 header with version {version}, not 2")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"PROXY v2 header with unknown command {command}")
    if len(buf) < 14:
        return None
    family = buf[13]
    need = 0
    if command == _V2_PROXY:
        if family in _V2_DGRAM:
            raise ProxyProtocolError(
                f"PROXY v2 header for {_V2_DGRAM[family]}; only stream connections are accepted"
            )
        if family not in _V2_ADDRESS_BYTES:
            raise ProxyProtocolError(f"PROXY v2 header with unknown family 0x{family:02x}")
        need = _V2_ADDRESS_BYTES[family]
    if len(buf) < V2_FIXED_BYTES:
        return None
    length = int.from_bytes(buf[14:16], "big")
    if length < need:
        raise ProxyProtocolError(
            f"PROXY v2 length {length} is shorter than the {need}-octet address block"
        )
    size = V2_FIXED_BYTES + length
    if len(buf) < size:
        return None
    if command == _V2_LOCAL:
        return ProxyHeader(version=2, source=None, destination=None, local=True), size
    source: Address | None = None
    destination: Address | None = None
    if family == _V2_TCP4:
        src4, dst4, sport, dport = struct.unpack_from("!4s4sHH", buf, V2_FIXED_BYTES)
        source = (str(IPv4Address(src4)), sport)
        destination = (str(IPv4Address(dst4)), dport)
    elif family == _V2_TCP6:
        src6, dst6, sport, dport = struct.unpack_from("!16s16sHH", buf, V2_FIXED_BYTES)
        source = (str(IPv6Address(src6)), sport)
        destination = (str(IPv6Address(dst6)), dport)
    return ProxyHeader(version=2, source=source, destination=destination), size


def _endpoints(
    source: Address | None, destination: Address | None
) -> tuple[IPv4Address | IPv6Address, int, IPv4Address | IPv6Address, int] | None:
    """Check a pair of addresses for an encoder; None if both are None."""
    if source is None and destination is None:
        return None
    if source is None or destination is None:
        raise ValueError("give both addresses or neither")
    src, dst = ip_address(source[0]), ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError(f"{src} and {dst} are not of the same family")
    for ip in (src, dst):
        if isinstance(ip, IPv6Address) and ip.scope_id is not None:
            raise ValueError(f"{ip} has a scope, which a PROXY header cannot carry")
    for port in (source[1], destination[1]):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is out of range")
    return src, source[1], dst, destination[1]


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """Return a version 1 line: TCP4 or TCP6, or UNKNOWN if both are None.

    Raises ``ValueError`` for an invalid address or port, or addresses of
    two families.
    """
    found = _endpoints(source, destination)
    if found is None:
        return b"PROXY UNKNOWN\r\n"
    src, sport, dst, dport = found
    return f"PROXY TCP{src.version} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def encode_v2(
    source: Address | None,
    destination: Address | None,
    *,
    local: bool = False,
    tlvs: bytes = b"",
) -> bytes:
    """Return a version 2 header, ``tlvs`` (already encoded) appended.

    TCP over IPv4 or IPv6, or UNSPEC with no address block if both addresses
    are None. ``local`` makes it a LOCAL header, whose addresses the reader
    ignores. Raises ``ValueError`` like ``encode_v1``, or if the header is
    longer than its 2-octet length can say.
    """
    found = _endpoints(source, destination)
    if found is None:
        family, block = _V2_UNSPEC, b""
    else:
        src, sport, dst, dport = found
        family = _V2_TCP4 if src.version == 4 else _V2_TCP6
        block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    length = len(block) + len(tlvs)
    if length > 0xFFFF:
        raise ValueError(f"PROXY v2 header of {length} octets after the fixed part")
    command = _V2_LOCAL if local else _V2_PROXY
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, length) + block + tlvs
