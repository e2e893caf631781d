"""The PROXY protocol header reader and encoders (HAProxy's proxy-protocol.txt)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corehelpers import splits
from smtpwarden.protocol.errors import LocalProtocolError, ProtocolError, ProxyProtocolError
from smtpwarden.protocol.proxy import (
    MAX_V1_LINE_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderReader,
    encode_v1,
    encode_v2,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
CLIENT = b"EHLO client.example\r\n"
V6_SRC = IPv6Address("2001:db8::1").packed
V6_DST = IPv6Address("2001:db8:0:1::25").packed
TLVS = b"\x04\x00\x03abc" + b"\x02\x00\x0amx.example"
V2_TCP4_WIRE = (
    SIG + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 1, 198, 51, 100, 7]) + b"\xdb\x04\x00\x19"
)
V2_TCP6_WIRE = SIG + b"\x21\x21\x00\x24" + V6_SRC + V6_DST + b"\xdb\x04\x00\x19"
V2_TLVS_WIRE = SIG + b"\x21\x11\x00\x1f" + V2_TCP4_WIRE[16:] + TLVS
LONGEST_V1 = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"

V1 = ProxyHeader(version=1, source=("192.168.0.1", 56324), destination=("192.168.0.11", 443))
V1_6 = ProxyHeader(version=1, source=("2001:db8::1", 1024), destination=("2001:db8:0:1::25", 25))
V1_NONE = ProxyHeader(version=1, source=None, destination=None)
V2 = ProxyHeader(version=2, source=("192.0.2.1", 56068), destination=("198.51.100.7", 25))
V2_6 = ProxyHeader(version=2, source=("2001:db8::1", 56068), destination=("2001:db8:0:1::25", 25))
V2_NONE = ProxyHeader(version=2, source=None, destination=None)
V2_LOCAL = ProxyHeader(version=2, source=None, destination=None, local=True)

VECTORS = [
    pytest.param(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", V1, id="v1-tcp4"),
    pytest.param(b"PROXY TCP6 2001:db8::1 2001:db8:0:1::25 1024 25\r\n", V1_6, id="v1-tcp6"),
    pytest.param(
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 2001:db8:0:1:0:0:0:25 1024 25\r\n",
        V1_6,
        id="v1-tcp6-long-form",
    ),
    pytest.param(
        b"PROXY TCP6 ::ffff:192.0.2.1 ::1 0 0\r\n",
        ProxyHeader(version=1, source=("::ffff:c000:201", 0), destination=("::1", 0)),
        id="v1-tcp6-mapped-port-0",
    ),
    pytest.param(
        b"PROXY TCP4 255.255.255.255 10.0.0.0 65535 0\r\n",
        ProxyHeader(version=1, source=("255.255.255.255", 65535), destination=("10.0.0.0", 0)),
        id="v1-tcp4-extremes",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", V1_NONE, id="v1-unknown"),
    pytest.param(b"PROXY UNKNOWN whatever \x00 \xff\r\n", V1_NONE, id="v1-unknown-rest"),
    pytest.param(LONGEST_V1, V1_NONE, id="v1-longest"),
    pytest.param(V2_TCP4_WIRE, V2, id="v2-tcp4"),
    pytest.param(V2_TCP6_WIRE, V2_6, id="v2-tcp6"),
    pytest.param(V2_TLVS_WIRE, V2, id="v2-tcp4-tlvs"),
    pytest.param(SIG + b"\x20\x00\x00\x00", V2_LOCAL, id="v2-local"),
    pytest.param(
        SIG + b"\x20\x11\x00\x0c" + bytes(12),
        V2_LOCAL,
        id="v2-local-with-addresses",
    ),
    pytest.param(SIG + b"\x20\x32\x00\x03" + b"abc", V2_LOCAL, id="v2-local-family-ignored"),
    pytest.param(SIG + b"\x21\x00\x00\x00", V2_NONE, id="v2-unspec"),
    pytest.param(SIG + b"\x21\x00\x00\x05" + b"\x04\x00\x02hi", V2_NONE, id="v2-unspec-tlv"),
    pytest.param(
        SIG + b"\x21\x31\x00\xd8" + b"/run/a.sock".ljust(108, b"\x00") + bytes(108),
        V2_NONE,
        id="v2-unix-stream",
    ),
]


def read(chunks: list[bytes]) -> tuple[ProxyHeader, bytes]:
    """Feed the chunks; return the header and every byte that followed it."""
    reader = ProxyHeaderReader()
    for index, chunk in enumerate(chunks):
        reader.receive_data(chunk)
        header = reader.next_header()
        if header is not None:
            return header, reader.rest + b"".join(chunks[index + 1 :])
    raise AssertionError("no header in the input")


def outcome(chunks: list[bytes]) -> tuple[ProxyHeader, bytes] | str | None:
    """The header and the bytes after it, "error", or None if incomplete."""
    reader = ProxyHeaderReader()
    try:
        for index, chunk in enumerate(chunks):
            reader.receive_data(chunk)
            header = reader.next_header()
            if header is not None:
                return header, reader.rest + b"".join(chunks[index + 1 :])
    except ProxyProtocolError:
        return "error"
    return None


def failing_offset(data: bytes) -> int:
    """Feed ``data`` byte by byte; return the offset of the octet that fails."""
    reader = ProxyHeaderReader()
    for offset in range(len(data)):
        reader.receive_data(data[offset : offset + 1])
        try:
            assert reader.next_header() is None
        except ProxyProtocolError:
            return offset
    raise AssertionError("no error")


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (empty chunks included)."""
    bounds = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


def test_the_signature_is_the_spec_one() -> None:
    assert V2_SIGNATURE == SIG
    assert len(LONGEST_V1) == MAX_V1_LINE_BYTES


@pytest.mark.parametrize(("wire", "expected"), VECTORS)
def test_vectors_in_every_split_keep_the_client_bytes(wire: bytes, expected: ProxyHeader) -> None:
    for chunks in splits(wire + CLIENT):
        assert read(chunks) == (expected, CLIENT)


@pytest.mark.parametrize(("wire", "expected"), VECTORS)
def test_vectors_alone_leave_nothing(wire: bytes, expected: ProxyHeader) -> None:
    for chunks in splits(wire):
        assert read(chunks) == (expected, b"")


@pytest.mark.parametrize(("wire", "expected"), VECTORS)
def test_every_proper_prefix_needs_more(wire: bytes, expected: ProxyHeader) -> None:
    for end in range(len(wire)):
        assert outcome([wire[:end]]) is None


def test_encoders_produce_the_vectors() -> None:
    tcp4 = (("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert encode_v1(*tcp4) == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    tcp6 = (("2001:DB8:0::1", 1024), ("2001:db8:0:1::25", 25))
    assert encode_v1(*tcp6) == b"PROXY TCP6 2001:db8::1 2001:db8:0:1::25 1024 25\r\n"
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(("192.0.2.1", 56068), ("198.51.100.7", 25)) == V2_TCP4_WIRE
    assert encode_v2(("192.0.2.1", 56068), ("198.51.100.7", 25), tlvs=TLVS) == V2_TLVS_WIRE
    assert encode_v2(("2001:db8::1", 56068), ("2001:db8:0:1::25", 25)) == V2_TCP6_WIRE
    assert encode_v2(None, None) == SIG + b"\x21\x00\x00\x00"
    assert encode_v2(None, None, local=True) == SIG + b"\x20\x00\x00\x00"


@pytest.mark.parametrize(
    ("source", "destination", "problem"),
    [
        (("192.0.2.1", 25), None, "both addresses or neither"),
        (("192.0.2.1", 25), ("2001:db8::1", 25), "same family"),
        (("192.0.2.256", 25), ("192.0.2.1", 25), "192.0.2.256"),
        (("192.0.2.1", 65536), ("192.0.2.1", 25), "out of range"),
        (("192.0.2.1", -1), ("192.0.2.1", 25), "out of range"),
        (("fe80::1%eth0", 25), ("fe80::2", 25), "scope"),
    ],
    ids=["one-missing", "mixed-families", "bad-address", "port-too-big", "negative-port", "scope"],
)
def test_encoders_refuse_bad_arguments(
    source: tuple[str, int] | None, destination: tuple[str, int] | None, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        encode_v1(source, destination)
    with pytest.raises(ValueError, match=problem):
        encode_v2(source, destination)


def test_encode_v2_refuses_a_header_its_length_cannot_say() -> None:
    assert len(encode_v2(None, None, tlvs=bytes(0xFFFF))) == 16 + 0xFFFF
    with pytest.raises(ValueError, match="octets after the fixed part"):
        encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=bytes(0xFFFF - 11))


def test_the_longest_v2_header_is_read_and_no_further() -> None:
    wire = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=bytes(0xFFFF - 12))
    assert len(wire) == 16 + 0xFFFF
    after = b"\r\n\r\n\x00\r\nQUIT\n" + CLIENT * 1000
    for chunks in ([wire + after], [wire[:20], wire[20:-1], wire[-1:] + after]):
        header, rest = read(chunks)
        assert header.source == ("192.0.2.1", 1)
        assert rest == after


@pytest.mark.parametrize(
    ("wire", "problem", "offset"),
    [
        (b"EHLO client.example\r\n", "connection starts with b'E'", 0),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not a PROXY protocol header", 0),
        (b"PROXYTCP4 ", "connection starts with b'PROXYT'", 5),
        (b"proxy TCP4 ", "not a PROXY protocol header", 0),
        (b"\r\n\r\n\x00\r\nQUIT\r\n", "bad v2 signature", 11),
        (b"\r\nEHLO", "bad v2 signature", 2),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown PROXY v1 protocol", 9),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown PROXY v1 protocol", 6),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown PROXY v1 protocol", 6),
        (b"PROXY TCP4\r\n", "unknown PROXY v1 protocol", 10),
        (b"PROXY UNKNOWNX\r\n", "unknown PROXY v1 protocol", 13),
        (b"PROXY UNKNOWN " + b"x" * 200, "without CRLF in 107 octets", 106),
        (b"PROXY UNKNOWN x\ry\r\n", "bare CR", 16),
        (b"PROXY UNKNOWN\r\r\n", "bare CR", 14),
        (SIG + b"\x11\x11\x00\x0c" + bytes(12), "version 1, not 2", 12),
        (SIG + b"\x01\x11\x00\x0c" + bytes(12), "version 0, not 2", 12),
        (SIG + b"\x22\x11\x00\x0c" + bytes(12), "unknown command 2", 12),
        (SIG + b"\x2f\x11\x00\x0c" + bytes(12), "unknown command 15", 12),
        (SIG + b"\x21\x12\x00\x0c" + bytes(12), "UDP over IPv4", 13),
        (SIG + b"\x21\x22\x00\x24" + bytes(36), "UDP over IPv6", 13),
        (SIG + b"\x21\x32\x00\xd8" + bytes(216), "unix datagram", 13),
        (SIG + b"\x21\x01\x00\x00", "unknown family 0x01", 13),
        (SIG + b"\x21\x10\x00\x00", "unknown family 0x10", 13),
        (SIG + b"\x21\x41\x00\x00", "unknown family 0x41", 13),
        (SIG + b"\x21\x11\x00\x0b" + bytes(11), "length 11 is shorter than the 12-octet", 15),
        (SIG + b"\x21\x21\x00\x0c" + bytes(12), "shorter than the 36-octet", 15),
        (SIG + b"\x21\x31\x00\x24" + bytes(36), "shorter than the 216-octet", 15),
    ],
    ids=[
        "ehlo",
        "tls-hello",
        "no-space",
        "lowercase",
        "v2-signature-last-octet",
        "v2-signature-early",
        "tcp5",
        "lowercase-protocol",
        "double-space-first",
        "tcp4-without-fields",
        "unknown-suffix",
        "no-crlf-in-107",
        "bare-cr-unknown",
        "cr-cr-lf",
        "v2-version-1",
        "v2-version-0",
        "v2-command-2",
        "v2-command-15",
        "v2-udp4",
        "v2-udp6",
        "v2-unix-dgram",
        "v2-unspec-stream",
        "v2-inet-unspec",
        "v2-family-4",
        "v2-short-tcp4",
        "v2-short-tcp6",
        "v2-short-unix",
    ],
)
def test_malformed_headers_fail_at_the_first_bad_octet(
    wire: bytes, problem: str, offset: int
) -> None:
    assert failing_offset(wire) == offset
    reader = ProxyHeaderReader()
    reader.receive_data(wire[: offset + 1])
    with pytest.raises(ProxyProtocolError, match=problem):
        reader.next_header()
    for chunks in splits(wire):
        assert outcome(chunks) == "error"


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", r"protocol b'TCP5'"),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", r"protocol b''"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "6 fields separated by single spaces, got 7"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "6 fields separated by single spaces, got 7"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "6 fields separated by single spaces, got 5"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\t2\r\n", "got 5"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", r"bad TCP4 address b'1.2.3'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", r"bad TCP4 address b'5.6.7.256'"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", r"bad TCP4 address b'::1'"),
        (b"PROXY TCP4 0x1.2.3.4 5.6.7.8 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP4 \xd9\xa1.2.3.4 5.6.7.8 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", r"bad TCP6 address b'1.2.3.4'"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad TCP6 address"),
        (b"PROXY TCP6 1:2:3:4:5:6:7 ::1 1 2\r\n", "bad TCP6 address"),
        (b"PROXY TCP6 12345::1 ::1 1 2\r\n", "bad TCP6 address"),
        (b"PROXY TCP6 ::ffff:01.2.3.4 ::1 1 2\r\n", "bad TCP6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 25\r\n", r"bad port b'65536'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 25 99999\r\n", r"bad port b'99999'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 025 25\r\n", r"bad port b'025'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 00 25\r\n", r"bad port b'00'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 25\r\n", r"bad port b'-1'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +25 25\r\n", r"bad port b'\+25'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 25\r\n", r"bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 25\r\n", r"bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "not ended by CRLF"),
        (b"PROXY UNKNOWN\n", "not ended by CRLF"),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "bare CR"),
        (LONGEST_V1[:-2] + b" \r\n", "without CRLF in 107 octets"),
    ],
    ids=[
        "tcp5",
        "double-space-first",
        "double-space",
        "trailing-space",
        "missing-port",
        "tab",
        "three-octets",
        "octet-256",
        "leading-zero-address",
        "ipv6-in-tcp4",
        "hex-octet",
        "arabic-digit-address",
        "ipv4-in-tcp6",
        "scope-id",
        "seven-groups",
        "five-digit-group",
        "mapped-leading-zero",
        "port-65536",
        "port-99999",
        "port-leading-zero",
        "port-00",
        "negative-port",
        "plus-port",
        "six-digit-port",
        "arabic-digit-port",
        "bare-lf-tcp4",
        "bare-lf-unknown",
        "bare-cr-tcp4",
        "108-octets",
    ],
)
def test_malformed_v1_lines_name_the_problem(wire: bytes, problem: str) -> None:
    for chunks in ([wire], [wire + CLIENT]):
        with pytest.raises(ProxyProtocolError, match=problem):
            read(chunks)
    for chunks in splits(wire):
        assert outcome(chunks) == "error"


def test_a_long_chunk_without_crlf_fails_at_once() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(b"PROXY UNKNOWN " + b"x" * 10_000)
    with pytest.raises(ProxyProtocolError, match="107 octets"):
        reader.next_header()


def test_the_crlf_must_come_within_107_octets_even_with_more_lines_behind() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(line) == 108
    with pytest.raises(ProxyProtocolError, match="107 octets"):
        read([line + CLIENT])
    assert read([line[:-3] + b"\r\n" + CLIENT]) == (V1_NONE, CLIENT)


def test_the_error_is_a_protocol_error_and_not_a_reply() -> None:
    assert issubclass(ProxyProtocolError, ProtocolError)
    assert not hasattr(ProxyProtocolError("x"), "reply_bytes")


def test_eof_before_the_header_is_refused() -> None:
    for data in (b"", b"PROXY TCP4 1.2", SIG + b"\x21\x11\x00\x0c" + bytes(11)):
        reader = ProxyHeaderReader()
        reader.receive_data(data)
        assert reader.next_header() is None
        with pytest.raises(ProxyProtocolError, match=f"closed after {len(data)} octets"):
            reader.receive_eof()


def test_eof_after_the_header_is_fine() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(b"PROXY UNKNOWN\r\n")
    assert reader.next_header() == V1_NONE
    reader.receive_eof()


def test_the_reader_is_done_after_the_header() -> None:
    reader = ProxyHeaderReader()
    assert reader.rest == b""
    reader.receive_data(b"PROXY UNKNOWN\r\nEHLO")
    assert reader.next_header() == V1_NONE
    assert reader.rest == b"EHLO"
    with pytest.raises(LocalProtocolError, match="already read"):
        reader.next_header()
    with pytest.raises(LocalProtocolError, match="already read"):
        reader.receive_data(b" x\r\n")
    assert reader.rest == b"EHLO"


def test_a_whole_client_chunk_after_the_header_is_kept() -> None:
    body = b"DATA\r\n" + b"x" * 100_000
    header, rest = read([encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2)) + body])
    assert header == ProxyHeader(version=2, source=("192.0.2.1", 1), destination=("192.0.2.2", 2))
    assert rest == body


ports = st.integers(min_value=0, max_value=0xFFFF)
ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
cut_points = st.lists(st.integers(min_value=0, max_value=1000), max_size=8)


@given(
    family=st.sampled_from([ipv4, ipv6]).flatmap(lambda s: st.tuples(s, s)),
    source_port=ports,
    destination_port=ports,
    after=st.binary(max_size=64),
    points=cut_points,
    version=st.sampled_from([1, 2]),
)
def test_addresses_round_trip_in_any_split(
    family: tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address],
    source_port: int,
    destination_port: int,
    after: bytes,
    points: list[int],
    version: int,
) -> None:
    source = (str(family[0]), source_port)
    destination = (str(family[1]), destination_port)
    encode = encode_v1 if version == 1 else encode_v2
    wire = encode(source, destination)
    if version == 1:
        assert len(wire) <= MAX_V1_LINE_BYTES
    expected = ProxyHeader(version=version, source=source, destination=destination)
    assert read(cut(wire + after, points)) == (expected, after)


@given(
    local=st.booleans(),
    tlvs=st.binary(max_size=300),
    after=st.binary(max_size=64),
    points=cut_points,
)
def test_v2_without_addresses_round_trips(
    local: bool, tlvs: bytes, after: bytes, points: list[int]
) -> None:
    wire = encode_v2(None, None, local=local, tlvs=tlvs)
    expected = ProxyHeader(version=2, source=None, destination=None, local=local)
    assert read(cut(wire + after, points)) == (expected, after)


def mutated(wire: bytes) -> st.SearchStrategy[bytes]:
    """``wire`` with a few octets replaced, dropped or inserted."""
    edit = st.tuples(
        st.integers(0, len(wire)),
        st.sampled_from(["set", "drop", "add"]),
        st.binary(min_size=1, max_size=1),
    )
    edits = st.lists(
        edit,
        min_size=1,
        max_size=3,
    )

    def apply(changes: list[tuple[int, str, bytes]]) -> bytes:
        data = bytearray(wire)
        for where, how, octet in changes:
            where = min(where, len(data))
            if how == "set" and where < len(data):
                data[where : where + 1] = octet
            elif how == "drop":
                del data[where : where + 1]
            else:
                data[where:where] = octet
        return bytes(data)

    return edits.map(apply)


v1_alphabet = st.sampled_from(list(b"0123456789abcdefABCDEF.: \r\nPROXYTCP46UNKW\x00\xff"))
inputs = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: SIG + b),
    st.binary(max_size=40).map(lambda b: SIG + b"\x21" + b),
    st.lists(v1_alphabet, max_size=120).map(lambda b: b"PROXY " + bytes(b)),
    st.lists(v1_alphabet, max_size=120).map(lambda b: b"PROXY TCP4 " + bytes(b)),
    st.lists(v1_alphabet, max_size=120).map(lambda b: b"PROXY TCP6 " + bytes(b)),
    mutated(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n" + CLIENT),
    mutated(b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 0 65535\r\n" + CLIENT),
    mutated(encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=TLVS) + CLIENT),
    mutated(encode_v2(("2001:db8::1", 1), ("::", 2)) + CLIENT),
)


@given(data=inputs, points=cut_points)
def test_any_input_gives_the_same_outcome_in_any_split(data: bytes, points: list[int]) -> None:
    whole = outcome([data])
    assert outcome(cut(data, points)) == whole
    if isinstance(whole, tuple):
        header, rest = whole
        assert data.endswith(rest)
        assert header.version in (1, 2)
        if header.local:
            assert header.version == 2
            assert header.source is None
        assert (header.source is None) == (header.destination is None)


@given(data=st.binary(max_size=600), points=cut_points)
def test_random_bytes_raise_only_the_module_error(data: bytes, points: list[int]) -> None:
    reader = ProxyHeaderReader()
    try:
        for chunk in cut(data, points):
            reader.receive_data(chunk)
            if reader.next_header() is not None:
                break
        else:
            reader.receive_eof()
    except ProxyProtocolError:
        pass
