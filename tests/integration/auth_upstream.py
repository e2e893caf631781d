"""An upstream that checks AUTH credentials, for the AUTH pass-through tests.

``AuthUpstream`` is a ``RawUpstream`` that also serves the server side of
four SASL mechanisms (RFC 4954), each as its specification has it:

- PLAIN (RFC 4616): ``authzid NUL authcid NUL passwd``, as the initial
  response or after a ``334`` with empty text;
- LOGIN (draft-murchison-sasl-login): ``334 VXNlcm5hbWU6`` ("Username:")
  and ``334 UGFzc3dvcmQ6`` ("Password:"); an initial response is the user
  name;
- CRAM-MD5 (RFC 2195): a base64 challenge, answered with the user name and
  the hex HMAC-MD5 of the challenge keyed with the password;
- XOAUTH2 (Google's SASL XOAUTH2): ``user=U ^A auth=Bearer TOKEN ^A ^A``; a
  bad token gets a ``334`` carrying a base64 JSON error, the client's empty
  line, then ``535``.

A ``*`` line cancels any exchange (``501``). Every line received, AUTH
responses included, lands in the connection's ``commands`` as RawUpstream
keeps them; each ``AuthSession`` also says who had authenticated when each
MAIL came, and keeps the challenges it sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from integration.recording_upstreams import PeerClosed, RawConnection, RawUpstream, _LineReader

MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")
LOGIN_USERNAME = base64.b64encode(b"Username:")
LOGIN_PASSWORD = base64.b64encode(b"Password:")
XOAUTH2_ERROR = json.dumps(
    {"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"}
).encode("ascii")

ACCEPTED = b"235 2.7.0 Authentication successful\r\n"
REFUSED = b"535 5.7.8 Authentication credentials invalid\r\n"
CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"
UNDECODABLE = b"501 5.5.2 Cannot decode response\r\n"
UNKNOWN_MECHANISM = b"504 5.5.4 Mechanism not offered here\r\n"
ALREADY = b"503 5.5.1 Already authenticated\r\n"
BANNER = b"220 upstream.test ESMTP auth recorder\r\n"


class _Cancelled(Exception):
    """The client answered a challenge with ``*``."""


class _Undecodable(Exception):
    """The client sent something the mechanism cannot read."""


@dataclass
class AuthSession:
    """What one upstream connection saw of AUTH."""

    connection: RawConnection
    user: str | None = None  # who authenticated (235), None before or without
    outcomes: list[bytes] = field(default_factory=list)  # the last reply of each AUTH
    challenges: list[bytes] = field(default_factory=list)  # each 334 line sent, CRLF included
    mail_auth: list[str | None] = field(default_factory=list)  # ``user`` when each MAIL came


def _decode(text: bytes) -> bytes:
    if text == b"=":  # RFC 4954 4: an empty initial response
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as error:
        raise _Undecodable from error


class _Exchange:
    """One AUTH exchange on a connection: challenges out, responses in."""

    def __init__(
        self, owner: AuthUpstream, sock: socket.socket, reader: _LineReader, session: AuthSession
    ) -> None:
        self.owner = owner
        self.sock = sock
        self.reader = reader
        self.session = session

    def challenge(self, text: bytes) -> bytes:
        """Send ``334 text``; return the decoded response (``*`` cancels)."""
        line = b"334 " + text + b"\r\n"
        with self.owner.changed:
            self.session.challenges.append(line)
        self.sock.sendall(line)
        response = self.owner.receive(self.reader, self.session.connection).rstrip(b"\r\n")
        if response == b"*":
            raise _Cancelled
        return _decode(response)

    def first(self, initial: bytes | None, text: bytes = b"") -> bytes:
        """The client's first message: its initial response, else asked for."""
        return self.challenge(text) if initial is None else _decode(initial)


class AuthUpstream(RawUpstream):
    """A RawUpstream that answers AUTH and checks the credentials.

    ``users`` maps user names to passwords (PLAIN, LOGIN, CRAM-MD5),
    ``tokens`` user names to bearer tokens (XOAUTH2). ``mechanisms`` is what
    EHLO offers and AUTH accepts (none: AUTH is an unknown command, 502).
    ``end_of_data`` maps a sender (the MAIL
    path as written) to the reply to its final dot; ``replies`` works as in
    RawUpstream.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str],
        tokens: Mapping[str, str] | None = None,
        mechanisms: tuple[str, ...] = MECHANISMS,
        end_of_data: Mapping[str, bytes] | None = None,
        replies: dict[str, bytes] | None = None,
    ) -> None:
        self.users = dict(users)
        self.tokens = dict(tokens or {})
        self.mechanisms = mechanisms
        self.end_of_data = dict(end_of_data or {})
        self.sessions: list[AuthSession] = []
        offer = ("AUTH " + " ".join(mechanisms),) if mechanisms else ()
        super().__init__(ehlo=("PIPELINING", "8BITMIME", *offer), replies=replies)

    @property
    def changed(self) -> threading.Condition:
        return self._changed

    def receive(self, reader: _LineReader, record: RawConnection) -> bytes:
        line = reader.line()
        with self._changed:
            record.commands.append(line)
            self._changed.notify_all()
        return line

    def wait_sessions(self, count: int = 1) -> list[AuthSession]:
        """Wait until ``count`` connections came and all of them ended."""
        self.wait_all_ended(count)
        return list(self.sessions)

    def _serve(self, sock: socket.socket, record: RawConnection) -> None:
        reader = _LineReader(sock)
        session = AuthSession(record)
        with self._changed:
            self.sessions.append(session)
        sender = ""
        try:
            sock.sendall(self._reply("BANNER", BANNER))
            while True:
                line = self.receive(reader, record)
                words = line.split()
                verb = words[0].upper().decode("ascii", "replace") if words else ""
                if verb == "AUTH" and self.mechanisms:
                    reply = self._authenticate(_Exchange(self, sock, reader, session), words[1:])
                    with self._changed:
                        session.outcomes.append(reply)
                        self._changed.notify_all()
                    sock.sendall(reply)
                elif verb in ("EHLO", "HELO"):
                    sock.sendall(self._reply(verb, self._ehlo_reply()))
                elif verb == "MAIL":
                    sender = line.partition(b":")[2].split(b" ")[0].strip().decode("ascii")
                    with self._changed:
                        session.mail_auth.append(session.user)
                    sock.sendall(self._reply("MAIL", b"250 2.1.0 Ok\r\n"))
                elif verb == "RCPT":
                    sock.sendall(self._reply("RCPT", b"250 2.1.5 Ok\r\n"))
                elif verb == "DATA":
                    sock.sendall(self._reply("DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n"))
                    section = reader.data_section()
                    with self._changed:
                        record.data.append(section)
                        self._changed.notify_all()
                    default = self._reply(".", b"250 2.0.0 Ok: queued\r\n")
                    sock.sendall(self.end_of_data.get(sender, default))
                elif verb in ("RSET", "NOOP"):
                    sock.sendall(self._reply(verb, b"250 2.0.0 Ok\r\n"))
                elif verb == "QUIT":
                    record.quit = True
                    sock.sendall(self._reply("QUIT", b"221 2.0.0 Bye\r\n"))
                    return
                else:
                    sock.sendall(self._reply(verb, b"502 5.5.2 Error: command not recognized\r\n"))
        except (PeerClosed, OSError):
            pass
        finally:
            with self._changed:
                record.partial = reader.buf
                record.ended = True
                self._changed.notify_all()
            sock.close()

    def _authenticate(self, exchange: _Exchange, words: list[bytes]) -> bytes:
        """Run one AUTH exchange; return its last reply."""
        if exchange.session.user is not None:
            return ALREADY  # RFC 4954 4: one successful AUTH per session
        if not words or len(words) > 2:
            return b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
        mechanism = words[0].decode("ascii", "replace").upper()
        initial = words[1] if len(words) == 2 else None
        check = {
            "PLAIN": self._plain,
            "LOGIN": self._login,
            "CRAM-MD5": self._cram_md5,
            "XOAUTH2": self._xoauth2,
        }.get(mechanism)
        if check is None or mechanism not in self.mechanisms:
            return UNKNOWN_MECHANISM
        try:
            user = check(exchange, initial)
        except _Cancelled:
            return CANCELLED
        except _Undecodable:
            return UNDECODABLE
        if user is None:
            return REFUSED
        with self._changed:
            exchange.session.user = user
        return ACCEPTED

    def _password_is(self, user: bytes, password: bytes) -> str | None:
        name = user.decode("utf-8", "replace")
        known = self.users.get(name)
        if known is None or not hmac.compare_digest(known.encode("utf-8"), password):
            return None
        return name

    def _plain(self, exchange: _Exchange, initial: bytes | None) -> str | None:
        # RFC 4616 2: message = [authzid] UTF8NUL authcid UTF8NUL passwd
        parts = exchange.first(initial).split(b"\x00")
        if len(parts) != 3:
            raise _Undecodable
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            return None  # nobody here may act as someone else
        return self._password_is(authcid, password)

    def _login(self, exchange: _Exchange, initial: bytes | None) -> str | None:
        user = exchange.first(initial, LOGIN_USERNAME)
        password = exchange.challenge(LOGIN_PASSWORD)
        return self._password_is(user, password)

    def _cram_md5(self, exchange: _Exchange, initial: bytes | None) -> str | None:
        if initial is not None:
            raise _Undecodable  # RFC 2195 2: the server speaks first
        # RFC 2195 2: a unique msg-id, "<random.timestamp@hostname>".
        challenge = b"<%d.%d@upstream.test>" % (secrets.randbits(48), time.time_ns())
        response = exchange.challenge(base64.b64encode(challenge))
        user, space, digest = response.rpartition(b" ")
        password = self.users.get(user.decode("utf-8", "replace"))
        if not space or password is None:
            return None
        expected = hmac.new(password.encode("utf-8"), challenge, hashlib.md5).hexdigest()
        if not hmac.compare_digest(expected.encode("ascii"), digest):
            return None
        return user.decode("utf-8")

    def _xoauth2(self, exchange: _Exchange, initial: bytes | None) -> str | None:
        message = exchange.first(initial)
        if not message.endswith(b"\x01\x01"):
            raise _Undecodable
        fields: dict[bytes, bytes] = {}
        for part in message[:-2].split(b"\x01"):
            key, _, value = part.partition(b"=")
            fields[key] = value
        user = fields.get(b"user", b"").decode("utf-8", "replace")
        token = self.tokens.get(user)
        if token is not None and hmac.compare_digest(
            b"Bearer " + token.encode("utf-8"), fields.get(b"auth", b"")
        ):
            return user
        # The error goes out as a challenge; the client answers with an
        # empty line and the exchange fails.
        exchange.challenge(base64.b64encode(XOAUTH2_ERROR))
        return None
