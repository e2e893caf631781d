"""Fuzz targets over what a session carries besides SMTP: ``proxy``, ``auth``, ``codec``.

``proxy`` reads the PROXY protocol header a load balancer sends first;
``auth`` reads AUTH lines and responses for the client's identity;
``codec`` decodes the spool's envelope files.
"""

from __future__ import annotations

import base64
import hashlib
import re

import orjson
from targets_common import BYTE_BY_BYTE_MAX, MECHANISMS, InvariantBroken, check, u16

from smtpwarden.protocol.auth import RESPONSE_LINE, AuthIdentity, identity, parse_auth_command
from smtpwarden.protocol.commands import parse_command
from smtpwarden.protocol.errors import ProxyProtocolError
from smtpwarden.protocol.events import Command, Verb
from smtpwarden.protocol.proxy import (
    MAX_V1_LINE_BYTES,
    V2_FIXED_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderReader,
    encode_v1,
    encode_v2,
)
from smtpwarden.spool.codec import decode, encode
from smtpwarden.spool.errors import CorruptEntry

# ---------------------------------------------------------------------------
# proxy: ProxyHeaderReader
# ---------------------------------------------------------------------------

ProxyOutcome = tuple[str, ProxyHeader | None, bytes]


def read_proxy(chunks: list[bytes]) -> ProxyOutcome:
    """Feed ``chunks``; return ("header", header, client octets), "error" or "short"."""
    reader = ProxyHeaderReader()
    header: ProxyHeader | None = None
    after = b""
    for chunk in chunks:
        if not chunk:
            continue
        if header is not None:
            after += chunk
            continue
        reader.receive_data(chunk)
        try:
            header = reader.next_header()
        except ProxyProtocolError:
            return ("error", None, b"")
        if header is not None:
            after = reader.rest
    if header is None:
        try:
            reader.receive_eof()
        except ProxyProtocolError:
            return ("short", None, b"")
        raise InvariantBroken("receive_eof accepted a connection without a header")
    return ("header", header, after)


def _check_proxy_header(stream: bytes, header: ProxyHeader, rest: bytes) -> None:
    check(stream.endswith(rest), "rest is not the octets after the header")
    size = len(stream) - len(rest)
    head = stream[:size]
    if header.version == 1:
        check(head.startswith(b"PROXY ") and head.endswith(b"\r\n"), "v1 header framing")
        check(len(head) <= MAX_V1_LINE_BYTES, "v1 header past 107 octets")
        check(head.count(b"\r") == 1 and head.count(b"\n") == 1, "bare CR or LF in v1 header")
    else:
        check(header.version == 2 and head.startswith(V2_SIGNATURE), "v2 header framing")
        check(size == V2_FIXED_BYTES + u16(head[14:16]), "v2 length does not match")
    check((header.source is None) == (header.destination is None), "one address without other")
    if header.local:
        local = read_proxy([encode_v2(None, None, local=True)])[1]
        check(local is not None and local.local, "LOCAL header does not round-trip")
    if header.source is None or header.destination is None:
        return
    for host, port in (header.source, header.destination):
        check(0 <= port <= 0xFFFF, "port out of range")
        check(host != "", "empty host")
    encoders = {
        "v1": encode_v1(header.source, header.destination),
        "v2": encode_v2(header.source, header.destination),
    }
    for version, encoded in encoders.items():
        again = read_proxy([encoded])[1]
        check(again is not None, f"encode_{version} output does not parse")
        assert again is not None
        check(again.source == header.source, f"{version} source does not round-trip")
        check(again.destination == header.destination, f"{version} destination differs")


def fuzz_proxy(data: bytes) -> None:
    """ProxyHeaderReader, fed whole, cut in two and octet by octet: same result.

    Layout: octets 0-1 are the cut offset; the rest is the connection's
    first octets. Addresses read are encoded again and must read back.
    """
    if len(data) < 2:
        return
    stream = data[2:]
    cut = u16(data) % (len(stream) + 1)
    whole = read_proxy([stream])
    split = read_proxy([stream[:cut], stream[cut:]])
    check(whole == split, f"PROXY header read differently when cut at {cut}")
    if len(stream) <= BYTE_BY_BYTE_MAX:
        octets = [stream[i : i + 1] for i in range(len(stream))]
        check(read_proxy(octets) == whole, "PROXY header read differently octet by octet")
    kind, header, rest = whole
    if kind == "header":
        assert header is not None
        _check_proxy_header(stream, header, rest)


# ---------------------------------------------------------------------------
# auth: parse_auth_command, AuthIdentity, identity
# ---------------------------------------------------------------------------

_C0_C1 = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_NAME_OCTETS = 255


def _auth_lines(data: bytes) -> None:
    lines = data.split(b"\n")
    first = lines[0] + b"\n" if len(lines) > 1 else lines[0]
    start = parse_auth_command(first)
    responses = [line + b"\n" for line in lines[1:]]
    for response in responses:
        if RESPONSE_LINE.match(response):
            check(response.endswith(b"\r\n"), "AUTH response accepted without CRLF")
    mechanism = "PLAIN" if start is None else start.mechanism
    initial = None if start is None else start.initial
    if start is not None:
        check(re.fullmatch(r"[A-Z0-9_-]{1,20}", mechanism) is not None, "bad mechanism name")
        check(initial is None or b" " not in initial, "initial response with a blank")
    found = identity(mechanism, initial, responses)
    stepwise = AuthIdentity(mechanism, initial)
    for response in responses:
        stepwise.response(response)
    check(stepwise.identity == found, "AuthIdentity and identity() disagree")
    _check_name(found)
    _ = repr(stepwise)


def _check_name(found: str | None) -> None:
    if found is None:
        return
    for part in found.split(" as ", 1) if " as " in found else [found]:
        check(part != "", "empty identity")
        check(_C0_C1.search(part) is None, "control character in an identity")
    check(len(found.encode()) <= 2 * _MAX_NAME_OCTETS + 4, "identity too long")


def _clean_name(raw: bytes) -> str:
    text = raw.decode("utf-8", "ignore")
    return _C0_C1.sub("", text)


def _auth_roundtrip(flags: int, rest: bytes) -> None:
    """Encode a known identity the way a client would; it must be read back."""
    mechanism = MECHANISMS[(flags >> 1) % 4]
    on_line = bool(flags >> 3 & 1)
    acting = bool(flags >> 4 & 1)
    lower = bool(flags >> 5 & 1)
    raw_name, _, secret = rest.partition(b"\x00")
    name = _clean_name(raw_name)
    if not name or len(name.encode()) + len(" as x") > _MAX_NAME_OCTETS:
        return
    user = name.encode()
    expected: str | None = name
    if mechanism == "PLAIN":
        authzid = user + b"x" if acting else b""
        message = authzid + b"\x00" + user + b"\x00" + secret.replace(b"\x00", b"")
        if acting:
            expected = f"{name} as {name}x"
    elif mechanism == "LOGIN":
        message = user
    elif mechanism == "CRAM-MD5":
        message = user + b" " + hashlib.md5(secret, usedforsecurity=False).hexdigest().encode()
    else:
        token = bytes(b for b in secret if 0x21 <= b <= 0x7E)
        message = b"user=" + user + b"\x01auth=Bearer " + token + b"\x01\x01"
    encoded = base64.b64encode(message)
    verb = b"auth " if lower else b"AUTH "
    name_on_line = mechanism.lower().encode() if lower else mechanism.encode()
    if on_line:
        line = verb + name_on_line + b" " + encoded + b"\r\n"
        responses: list[bytes] = []
        if mechanism == "CRAM-MD5":
            expected = None  # the server speaks first: an initial response is wrong
    else:
        line = verb + name_on_line + b"\r\n"
        responses = [encoded + b"\r\n"]
        check(RESPONSE_LINE.match(responses[0]) is not None, "base64 response refused")
    event = parse_command(line)
    check(isinstance(event, Command) and event.verb is Verb.AUTH, "AUTH line not a command")
    start = parse_auth_command(line)
    check(start is not None, "AUTH line not parsed")
    assert start is not None
    check(start.mechanism == mechanism, "mechanism read wrongly")
    check(start.initial == (encoded if on_line else None), "initial response read wrongly")
    found = identity(start.mechanism, start.initial, responses)
    check(found == expected, f"{mechanism} identity {found!r}, expected {expected!r}")


def fuzz_auth(data: bytes) -> None:
    """AUTH lines and responses: nothing raises, identities are clean.

    Layout: octet 0, bit 0 clear: the rest is an AUTH line, then response
    lines (LF-separated). Bit 0 set: a round trip; bits 1-2 pick the
    mechanism, bit 3 initial response on the line, bit 4 an authorization
    identity, bit 5 lower case; the rest is ``name NUL secret``.
    """
    if not data:
        return
    if data[0] & 1:
        _auth_roundtrip(data[0], data[1:])
    else:
        _auth_lines(data[1:])


# ---------------------------------------------------------------------------
# codec: the spool's envelope files
# ---------------------------------------------------------------------------

QUEUE_ID = "20250102T030405.123456-1a2b3c4d"


def fuzz_codec(data: bytes) -> None:
    """spool.codec.decode: CorruptEntry or an entry that survives a round trip.

    The input is an envelope file for queue id ``QUEUE_ID``.
    """
    try:
        entry = decode(data, QUEUE_ID)
    except CorruptEntry:
        return
    raw = encode(entry)
    check(decode(raw, QUEUE_ID) == entry, "encode then decode changes the entry")
    check(encode(decode(raw, QUEUE_ID)) == raw, "encoding is not stable")
    check(isinstance(orjson.loads(raw), dict), "encode wrote something else than an object")
    _ = (entry.sender, entry.pending, [r.address for r in entry.recipients])
