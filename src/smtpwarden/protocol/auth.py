"""AUTH (RFC 4954) as far as a relay that passes it through must read it.

smtpwarden never checks a credential: the upstream does. What the relay
wants is the authentication identity, for its records, and nothing else.
Everything here takes the wire forms (the AUTH line, base64 responses) and
returns names only: a password, token or digest is never part of a return
value, and nothing here raises for what a client sent.

Where the identity is, per mechanism (the first message the client sends,
which is the initial response when there is one, else the first response):

- PLAIN (RFC 4616 2): ``authzid NUL authcid NUL passwd``. The identity is
  ``authcid``; when an ``authzid`` is given and differs, it is
  ``"<authcid> as <authzid>"`` (who logged in, and as whom they act).
- LOGIN (no RFC; the common practice): the first message is the user name,
  the second the password.
- CRAM-MD5 (RFC 2195 2): the response is ``user SP digest``, the digest 32
  hex digits. The server speaks first, so an initial response has no place:
  with one, the identity is None.
- XOAUTH2 (Google's SASL XOAUTH2 protocol): ``user=<u> ^A auth=Bearer
  <token> ^A ^A``; the identity is ``<u>``.

An identity is None for any other mechanism, for a cancelled exchange, and
for anything that does not decode: bad base64, bad UTF-8, a malformed
message, a control character or more than ``MAX_IDENTITY_OCTETS`` octets.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

# RFC 4954 4: sasl-mech = 1*20 (upper-case letters, digits, "-" and "_"),
# matched without regard to case; initial-response = base64 / "=". The
# blanks are as lenient as the command parser's.
_AUTH_LINE = re.compile(
    rb"AUTH[ \t]+([A-Za-z0-9_-]{1,20})(?:[ \t]+([\x21-\x7e]+))?[ \t]*(?:\r\n)?\Z", re.I
)

# RFC 4954 4: a response is base64 text, or "*" to cancel the exchange.
RESPONSE_LINE = re.compile(rb"(?:[A-Za-z0-9+/]*={0,2}|\*)\r\n\Z")

# RFC 2195 2: the digest is 16 octets written as hexadecimal digits.
_CRAM_DIGEST = re.compile(rb"[0-9A-Fa-f]{32}\Z")

# No control character (C0, DEL, C1) belongs in a name put in a record.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# RFC 4616 2: servers must take an authcid or authzid of up to 255 octets;
# a longer name is not put in a record.
MAX_IDENTITY_OCTETS = 255


@dataclass(frozen=True, slots=True)
class AuthStart:
    """What an AUTH line asks for.

    ``initial`` is the initial response as sent (base64 text, ``b"="`` for an
    empty one) or None; it may be a credential and is kept out of ``repr()``.
    """

    mechanism: str
    initial: bytes | None = field(repr=False)


def parse_auth_command(line: bytes) -> AuthStart | None:
    """Read ``AUTH mechanism [initial-response]``, with or without its CRLF.

    Returns the upper-cased mechanism name and the initial response, or None
    if the line is not such a command. Nothing of the line is kept.
    """
    found = _AUTH_LINE.match(line)
    if found is None:
        return None
    return AuthStart(found.group(1).decode("ascii").upper(), found.group(2))


def _decode(text: bytes) -> bytes | None:
    # RFC 4648 4: padded base64 comes in whole groups of four characters.
    if len(text) % 4:
        return None
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _decode_initial(initial: bytes) -> bytes | None:
    # RFC 4954 4: "=" is an initial response of zero length.
    return b"" if initial == b"=" else _decode(initial)


def _decode_response(line: bytes) -> bytes | None:
    text = line[:-2] if line.endswith(b"\r\n") else line
    return None if text == b"*" else _decode(text)


def _name(raw: bytes) -> str | None:
    if not raw or len(raw) > MAX_IDENTITY_OCTETS:
        return None
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if _CONTROL.search(name) else name


def _plain(message: bytes) -> str | None:
    parts = message.split(b"\x00")
    if len(parts) != 3:
        return None
    authzid, authcid = parts[0], parts[1]
    user = _name(authcid)
    if user is None or not authzid or authzid == authcid:
        return user
    acting = _name(authzid)
    return None if acting is None else f"{user} as {acting}"


def _cram_md5(message: bytes) -> str | None:
    user, space, digest = message.rpartition(b" ")
    if not space or not _CRAM_DIGEST.match(digest):
        return None
    return _name(user)


def _xoauth2(message: bytes) -> str | None:
    if not message.endswith(b"\x01\x01"):
        return None
    first = message[:-2].split(b"\x01", 1)[0]
    if not first.startswith(b"user="):
        return None
    return _name(first[5:])


_READERS = {
    "PLAIN": _plain,
    "LOGIN": _name,
    "CRAM-MD5": _cram_md5,
    "XOAUTH2": _xoauth2,
}


class AuthIdentity:
    """Follows one AUTH exchange and keeps the identity, never a message.

    Give it the mechanism and initial response of the AUTH command, then
    each response line as it passes (``response``); ``identity`` is known
    from the first message the client sends. Later messages are not read.
    """

    __slots__ = ("_identity", "_mechanism", "_settled")

    def __init__(self, mechanism: str, initial: bytes | None) -> None:
        self._mechanism = mechanism.upper()
        self._identity: str | None = None
        self._settled = False
        if initial is not None:
            server_first = self._mechanism == "CRAM-MD5"
            self._settle(None if server_first else _decode_initial(initial))

    @property
    def mechanism(self) -> str:
        """The mechanism name, upper-cased."""
        return self._mechanism

    @property
    def identity(self) -> str | None:
        """The authentication identity, or None if there is none (yet)."""
        return self._identity

    def response(self, line: bytes) -> None:
        """Take one response line (base64 or ``*``, CRLF optional)."""
        if not self._settled:
            self._settle(_decode_response(line))

    def _settle(self, message: bytes | None) -> None:
        self._settled = True
        reader = _READERS.get(self._mechanism)
        if message is not None and reader is not None:
            self._identity = reader(message)

    def __repr__(self) -> str:
        return f"AuthIdentity(mechanism={self._mechanism!r}, identity={self._identity!r})"


def identity(mechanism: str, initial: bytes | None, responses: Sequence[bytes]) -> str | None:
    """The authentication identity of a whole AUTH exchange, or None.

    ``mechanism`` is the SASL name (any case), ``initial`` the initial
    response as sent on the AUTH line (``b"="`` for an empty one) or None,
    and ``responses`` the client's response lines, CRLF optional.
    """
    reader = AuthIdentity(mechanism, initial)
    for line in responses[:1]:
        reader.response(line)
    return reader.identity
