"""AUTH passed through to the upstream (RFC 4954), and no secret left behind.

The upstream is ``AuthUpstream``, which checks PLAIN, LOGIN, CRAM-MD5 and
XOAUTH2 credentials itself; the relay only relays each exchange and keeps
the identity the upstream accepted. Clients are smtplib over STARTTLS and a
raw socket for what smtplib never sends. The last test runs every mechanism
through one relay with a spool and looks for the secrets, in every encoding
the client used, in every file the relay wrote and in its log output.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import select
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from integration.auth_upstream import (
    ACCEPTED,
    CANCELLED,
    LOGIN_PASSWORD,
    LOGIN_USERNAME,
    MECHANISMS,
    REFUSED,
    XOAUTH2_ERROR,
    AuthSession,
    AuthUpstream,
)
from integration.pki import Pki
from integration.relay_harness import UPSTREAM, WAIT_S, RunningRelay, StartRelay, WireClient

# One user, and one recognisable secret, per mechanism.
CREDENTIALS = {
    "PLAIN": ("alice@example.org", "S3cret-PLAIN-pw"),
    "LOGIN": ("bob@example.org", "S3cret-LOGIN-pw"),
    "CRAM-MD5": ("carol@example.org", "S3cret-CRAM-pw"),
    "XOAUTH2": ("dave@example.org", "S3cret-XOAUTH2-token"),
}
USERS = {
    user: secret for mechanism, (user, secret) in CREDENTIALS.items() if mechanism != "XOAUTH2"
}
TOKENS = {CREDENTIALS["XOAUTH2"][0]: CREDENTIALS["XOAUTH2"][1]}
WRONG = {mechanism: f"S3cret-WRONG-{mechanism}" for mechanism in MECHANISMS}
MESSAGE = "Subject: auth\r\n\r\nsent after AUTH\r\n"
SPOOLED_MESSAGE = b"Subject: spooled\r\n\r\nkept for later\r\n"
SPOOL_SENDER = "spool@example.org"
DEFERRED = b"451 4.3.0 Try again later\r\n"
CRLF = b"\r\n"


@pytest.fixture
def make_upstream() -> Iterator[Callable[..., AuthUpstream]]:
    made: list[AuthUpstream] = []

    def make(**kwargs: Any) -> AuthUpstream:
        upstream = AuthUpstream(users=USERS, tokens=TOKENS, **kwargs)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


@pytest.fixture
def upstream(make_upstream: Callable[..., AuthUpstream]) -> AuthUpstream:
    return make_upstream()


def listener(pki: Pki | None, auth: object = True, **tls: object) -> dict[str, object]:
    section: dict[str, object] = {
        "name": "main",
        "host": "127.0.0.1",
        "port": 0,
        "upstream": UPSTREAM,
        "auth": auth,
    }
    if pki is not None:
        section["tls"] = {"certificate": str(pki.certificate), "key": str(pki.key), **tls}
    return section


def auth_relay(
    start_relay: StartRelay,
    upstream: AuthUpstream,
    pki: Pki | None,
    auth: object = True,
    **tls: object,
) -> RunningRelay:
    return start_relay(upstream.config, extra={"listeners": [listener(pki, auth, **tls)]})


def handshake_ended(tls: ssl.SSLSocket) -> None:
    """Wait until the relay has ended its side of the TLS handshake.

    A TLS 1.3 client ends its handshake before the server reads the
    client's Finished; the server sends its session tickets once it has.
    What a client sends between the two can be lost
    (test_a_command_sent_with_the_tls_finished_is_answered), so the other
    tests wait for a ticket first.
    """
    if tls.version() != "TLSv1.3":
        return  # TLS 1.2: the server's Finished comes last
    deadline = time.monotonic() + WAIT_S
    tls.setblocking(False)
    try:
        while tls.session is None or not tls.session.has_ticket:
            left = deadline - time.monotonic()
            assert left > 0, "no TLS session ticket from the relay"
            select.select([tls], [], [], left)
            with suppress(ssl.SSLWantReadError):
                got = tls.recv(1)
                raise AssertionError(f"read {got!r} from the relay before the client's EHLO")
    finally:
        tls.settimeout(WAIT_S)


@contextmanager
def tls_client(relay: RunningRelay, pki: Pki) -> Iterator[smtplib.SMTP]:
    """smtplib after EHLO, STARTTLS and EHLO again."""
    host, port = relay.address()
    with smtplib.SMTP(host, port, timeout=WAIT_S) as client:
        client.ehlo("client.test")
        assert client.starttls(context=pki.client_context())[0] == 220
        assert isinstance(client.sock, ssl.SSLSocket)
        handshake_ended(client.sock)
        client.ehlo("client.test")
        yield client


def offered(client: smtplib.SMTP) -> list[str]:
    """The mechanisms the relay's last EHLO reply offered."""
    return client.esmtp_features.get("auth", "").split()


@contextmanager
def tls_wire(relay: RunningRelay, pki: Pki) -> Iterator[WireClient]:
    """A raw client after EHLO, STARTTLS and EHLO again; its socket is TLS."""
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(b"STARTTLS\r\n", 220)
        tls = pki.client_context().wrap_socket(client.sock, server_hostname="localhost")
        client.sock = tls
        handshake_ended(tls)
        client.command(b"EHLO client.test\r\n", 250)
        yield client


class XOAuth2:
    """An smtplib authobject for XOAUTH2: the message, then "" to an error."""

    def __init__(self, user: str, token: str) -> None:
        self.message = f"user={user}\x01auth=Bearer {token}\x01\x01"
        self.challenges: list[bytes | None] = []

    def __call__(self, challenge: bytes | None = None) -> str:
        self.challenges.append(challenge)
        # The first call carries the message, as an initial response or as
        # the answer to the empty 334; after it only an error challenge comes.
        return self.message if len(self.challenges) == 1 else ""


def authenticate(
    client: smtplib.SMTP, mechanism: str, user: str, secret: str, *, initial: bool = True
) -> tuple[int, bytes]:
    """AUTH with ``mechanism`` forced, smtplib's own code for all but XOAUTH2."""
    client.user, client.password = user, secret
    if mechanism == "XOAUTH2":
        return client.auth(mechanism, XOAuth2(user, secret), initial_response_ok=initial)
    # smtplib's own methods, found as its login() finds them.
    authobject = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
    return client.auth(mechanism, authobject, initial_response_ok=initial)


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def challenge_of(line: bytes) -> bytes:
    """The decoded text of a ``334`` line."""
    assert line.startswith(b"334 ")
    return base64.b64decode(line[4:].rstrip(CRLF))


def cram_digest(secret: str, challenge: bytes) -> str:
    return hmac.new(secret.encode(), challenge, hashlib.md5).hexdigest()


def messages(mechanism: str, user: str, secret: str, challenges: list[bytes]) -> list[bytes]:
    """The SASL messages a client sends for ``mechanism``, decoded, in order."""
    if mechanism == "PLAIN":
        return [f"\0{user}\0{secret}".encode()]
    if mechanism == "LOGIN":
        return [user.encode(), secret.encode()]
    if mechanism == "CRAM-MD5":
        (challenge,) = challenges
        return [f"{user} {cram_digest(secret, challenge_of(challenge))}".encode()]
    return [f"user={user}\x01auth=Bearer {secret}\x01\x01".encode()]


def wire_lines(mechanism: str, sasl: list[bytes], *, initial: bool) -> list[bytes]:
    """The lines the client sends for an exchange of ``sasl`` messages."""
    if initial and mechanism != "CRAM-MD5":  # RFC 2195: the server speaks first
        first, *rest = sasl
        return [b"AUTH %s %s\r\n" % (mechanism.encode(), b64(first))] + [
            b64(message) + CRLF for message in rest
        ]
    return [b"AUTH %s\r\n" % mechanism.encode()] + [b64(message) + CRLF for message in sasl]


def auth_lines(session: AuthSession) -> list[bytes]:
    """What reached the upstream after the last EHLO and before MAIL or QUIT."""
    commands = session.connection.commands
    verbs = [line.split(b" ")[0].rstrip(CRLF).upper() for line in commands]
    end = next((i for i, verb in enumerate(verbs) if verb in (b"MAIL", b"QUIT")), len(verbs))
    ehlos = [i for i, verb in enumerate(verbs[:end]) if verb == b"EHLO"]
    return commands[ehlos[-1] + 1 if ehlos else 0 : end]


def cram_challenges(sessions: list[AuthSession]) -> list[bytes]:
    """Every CRAM-MD5 challenge the upstream sent, decoded."""
    texts = [challenge_of(line) for session in sessions for line in session.challenges]
    return [text for text in texts if text.startswith(b"<") and text.endswith(b"@upstream.test>")]


def records_after(
    relay: RunningRelay, sessions: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The session and transaction records, once ``sessions`` sessions ended."""
    records = relay.wait_records(
        lambda rs: sum(record["type"] == "session" for record in rs) >= sessions
    )
    by_type = {
        kind: [r for r in records if r["type"] == kind] for kind in ("session", "transaction")
    }
    return by_type["session"], by_type["transaction"]


def has_auth(lines: list[bytes]) -> bool:
    return any(line.upper().startswith(b"AUTH") for line in lines)


# -- smtplib, every mechanism ------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanisms", "picked"),
    [(None, "CRAM-MD5"), (["PLAIN", "LOGIN"], "PLAIN"), (["LOGIN"], "LOGIN")],
    ids=["every-mechanism", "plain-login", "login-only"],
)
def test_login_picks_from_what_both_sides_allow(
    start_relay: StartRelay,
    upstream: AuthUpstream,
    pki: Pki,
    mechanisms: list[str] | None,
    picked: str,
) -> None:
    auth = True if mechanisms is None else {"mechanisms": mechanisms}
    relay = auth_relay(start_relay, upstream, pki, auth)
    user, secret = CREDENTIALS["PLAIN"]
    with tls_client(relay, pki) as client:
        assert offered(client) == list(mechanisms or MECHANISMS)
        assert client.login(user, secret) == (235, b"2.7.0 Authentication successful")
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (session,) = upstream.wait_sessions()
    assert auth_lines(session)[0].split()[:2] == [b"AUTH", picked.encode()]
    assert (session.user, session.mail_auth) == (user, [user])
    assert session.connection.data == [MESSAGE.encode() + b".\r\n"]
    (record,), (transaction,) = records_after(relay, 1)
    assert record["auth"] == transaction["auth"] == user


@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "no-initial"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_each_mechanism_passes_through_unchanged(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki, mechanism: str, initial: bool
) -> None:
    relay = auth_relay(start_relay, upstream, pki)
    user, secret = CREDENTIALS[mechanism]
    with tls_client(relay, pki) as client:
        assert offered(client) == list(MECHANISMS)
        code, text = authenticate(client, mechanism, user, secret, initial=initial)
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (session,) = upstream.wait_sessions()
    sasl = messages(mechanism, user, secret, session.challenges)
    # Every line the client sent reached the upstream as it was sent.
    assert auth_lines(session) == wire_lines(mechanism, sasl, initial=initial)
    assert session.outcomes == [ACCEPTED]
    assert (session.user, session.mail_auth) == (user, [user])
    assert session.connection.data == [MESSAGE.encode() + b".\r\n"]
    (record,), (transaction,) = records_after(relay, 1)
    assert record["auth"] == transaction["auth"] == user
    assert transaction["outcome"] == "delivered"


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_wrong_secret_gets_the_upstreams_535(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki, mechanism: str
) -> None:
    relay = auth_relay(start_relay, upstream, pki)
    user, _ = CREDENTIALS[mechanism]
    with tls_client(relay, pki) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            authenticate(client, mechanism, user, WRONG[mechanism])
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            535,
            REFUSED[4:].rstrip(CRLF),
        )
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (session,) = upstream.wait_sessions()
    sasl = messages(mechanism, user, WRONG[mechanism], session.challenges[:1])
    expected = wire_lines(mechanism, sasl, initial=True)
    if mechanism == "XOAUTH2":
        # The upstream's error challenge, then the client's empty line.
        assert session.challenges == [b"334 " + b64(XOAUTH2_ERROR) + CRLF]
        expected.append(CRLF)
    assert auth_lines(session) == expected
    assert (session.user, session.mail_auth) == (None, [None])
    (record,), (transaction,) = records_after(relay, 1)
    assert record["auth"] is None
    assert transaction["auth"] is None


def test_the_xoauth2_error_reaches_the_client_unchanged(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki
) -> None:
    relay = auth_relay(start_relay, upstream, pki)
    user, _ = CREDENTIALS["XOAUTH2"]
    authobject = XOAuth2(user, WRONG["XOAUTH2"])
    with tls_client(relay, pki) as client, pytest.raises(smtplib.SMTPAuthenticationError):
        client.auth("XOAUTH2", authobject)
    assert authobject.challenges == [None, XOAUTH2_ERROR]
    (session,) = upstream.wait_sessions()
    assert session.outcomes == [REFUSED]


def test_a_second_attempt_after_a_failure_succeeds(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki
) -> None:
    relay = auth_relay(start_relay, upstream, pki)
    user, secret = CREDENTIALS["LOGIN"]
    with tls_client(relay, pki) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            authenticate(client, "LOGIN", user, WRONG["LOGIN"], initial=False)
        assert authenticate(client, "LOGIN", user, secret, initial=False)[0] == 235
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (session,) = upstream.wait_sessions()
    assert session.outcomes == [REFUSED, ACCEPTED]
    assert (
        session.challenges == [b"334 " + LOGIN_USERNAME + CRLF, b"334 " + LOGIN_PASSWORD + CRLF] * 2
    )
    (record,), _ = records_after(relay, 1)
    assert record["auth"] == user


def test_auth_without_tls_when_the_listener_allows_it(
    start_relay: StartRelay, upstream: AuthUpstream
) -> None:
    relay = auth_relay(start_relay, upstream, None, {"require_tls": False})
    user, secret = CREDENTIALS["PLAIN"]
    host, port = relay.address()
    with smtplib.SMTP(host, port, timeout=WAIT_S) as client:
        client.ehlo("client.test")
        assert offered(client) == list(MECHANISMS)
        assert authenticate(client, "PLAIN", user, secret)[0] == 235
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (session,) = upstream.wait_sessions()
    assert session.mail_auth == [user]
    (record,), _ = records_after(relay, 1)
    assert record["auth"] == user


# -- AUTH the relay refuses itself ---------------------------------------------------


def plain_line(mechanism: str = "PLAIN") -> bytes:
    user, secret = CREDENTIALS["PLAIN"]
    return b"AUTH %s %s" % (mechanism.encode(), b64(f"\0{user}\0{secret}"))


def test_auth_is_not_offered_by_a_listener_without_it(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki
) -> None:
    relay = auth_relay(start_relay, upstream, pki, False)
    with tls_client(relay, pki) as client:
        assert not client.has_extn("auth")
        assert client.docmd(plain_line().decode()) == (502, b"5.5.1 Command not implemented")
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    (session,) = upstream.wait_sessions()
    assert not has_auth(session.connection.commands)
    assert session.mail_auth == [None]
    (record,), _ = records_after(relay, 1)
    assert record["auth"] is None


def test_auth_waits_for_tls(start_relay: StartRelay, upstream: AuthUpstream, pki: Pki) -> None:
    relay = auth_relay(start_relay, upstream, pki)
    host, port = relay.address()
    user, secret = CREDENTIALS["PLAIN"]
    with smtplib.SMTP(host, port, timeout=WAIT_S) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        assert client.docmd(plain_line().decode()) == (
            538,
            b"5.7.11 Encryption required for requested authentication mechanism",
        )
        assert client.docmd("AUTH LOGIN") == (
            538,
            b"5.7.11 Encryption required for requested authentication mechanism",
        )
        client.starttls(context=pki.client_context())
        client.ehlo("client.test")
        assert offered(client) == list(MECHANISMS)
        assert authenticate(client, "PLAIN", user, secret)[0] == 235
    (session,) = upstream.wait_sessions()
    # Only the AUTH sent over TLS reached the upstream.
    assert [line for line in session.connection.commands if has_auth([line])] == [
        plain_line() + CRLF
    ]


def test_auth_before_starttls_on_a_listener_that_requires_tls(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki
) -> None:
    relay = auth_relay(start_relay, upstream, pki, True, require=True)
    host, port = relay.address()
    with smtplib.SMTP(host, port, timeout=WAIT_S) as client:
        client.ehlo("client.test")
        assert client.docmd(plain_line().decode()) == (
            530,
            b"5.7.0 Must issue a STARTTLS command first",
        )
    (session,) = upstream.wait_sessions()
    assert not has_auth(session.connection.commands)


def test_a_mechanism_the_listener_does_not_allow_is_refused(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki
) -> None:
    relay = auth_relay(start_relay, upstream, pki, {"mechanisms": ["PLAIN", "LOGIN"]})
    refused = (504, b"5.5.4 Unrecognized authentication type")
    with tls_client(relay, pki) as client:
        assert offered(client) == ["PLAIN", "LOGIN"]
        assert client.docmd("AUTH CRAM-MD5") == refused
        assert client.docmd(plain_line("XOAUTH2").decode()) == refused
        assert client.docmd("AUTH GSSAPI") == refused
        assert client.docmd(plain_line().decode()) == (235, b"2.7.0 Authentication successful")
    (session,) = upstream.wait_sessions()
    assert [line for line in session.connection.commands if has_auth([line])] == [
        plain_line() + CRLF
    ]


# The relay's own refusals of an AUTH it did not offer.
NOT_OFFERED = {
    (504, b"5.5.4 Unrecognized authentication type"),
    (503, b"5.5.1 AUTH not available"),
    (502, b"5.5.1 Command not implemented"),
}


@pytest.mark.parametrize(
    ("upstream_offers", "line"),
    [
        (("PLAIN",), b"AUTH LOGIN " + b64(CREDENTIALS["PLAIN"][0])),
        ((), plain_line()),
    ],
    ids=["mechanism", "no-auth"],
)
def test_auth_the_upstream_does_not_offer_never_reaches_it(
    start_relay: StartRelay,
    make_upstream: Callable[..., AuthUpstream],
    pki: Pki,
    upstream_offers: tuple[str, ...],
    line: bytes,
) -> None:
    upstream = make_upstream(mechanisms=upstream_offers)
    relay = auth_relay(start_relay, upstream, pki)
    with tls_client(relay, pki) as client:
        assert offered(client) == list(upstream_offers)
        reply = client.docmd(line.decode())
    # The relay offered only what both sides allow (RFC 4954 4: 504 for a
    # mechanism not supported); the credential stays with the relay.
    (session,) = upstream.wait_sessions()
    assert not has_auth(session.connection.commands)
    assert reply in NOT_OFFERED
    if upstream_offers:
        assert reply == (504, b"5.5.4 Unrecognized authentication type")


def test_auth_inside_a_transaction_is_refused(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki
) -> None:
    relay = auth_relay(start_relay, upstream, pki)
    with tls_client(relay, pki) as client:
        assert client.mail("a@example.org")[0] == 250
        assert client.docmd(plain_line().decode()) == (
            503,
            b"5.5.1 AUTH not allowed in a transaction",
        )
        assert client.rset()[0] == 250
    (session,) = upstream.wait_sessions()
    assert not has_auth(session.connection.commands)
    assert session.user is None


# -- what smtplib never sends ----------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "XOAUTH2"])
def test_responses_pipelined_with_auth_arrive_as_responses(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki, mechanism: str
) -> None:
    relay = auth_relay(start_relay, upstream, pki)
    user, secret = CREDENTIALS[mechanism]
    sasl = messages(mechanism, user, secret, [])
    lines = wire_lines(mechanism, sasl, initial=False)
    with tls_wire(relay, pki) as client:
        client.send(b"".join(lines))  # one write: AUTH and every response
        for _ in sasl:
            assert client.reply()[0] == 334
        client.expect(235)
        client.command(b"MAIL FROM:<a@example.org>\r\n", 250)
        client.command(b"RCPT TO:<b@example.net>\r\n", 250)
        client.command(b"DATA\r\n", 354)
        client.command(MESSAGE.encode() + b".\r\n", 250)
        client.command(b"QUIT\r\n", 221)
    (session,) = upstream.wait_sessions()
    assert auth_lines(session) == lines
    assert (session.user, session.mail_auth) == (user, [user])
    (record,), (transaction,) = records_after(relay, 1)
    assert record["auth"] == transaction["auth"] == user


@pytest.mark.parametrize(
    "response", [b"not base64!\r\n", b"\x00\xff\r\n", b"*\r\n"], ids=["text", "binary", "cancel"]
)
def test_a_refused_or_cancelled_response_cancels_upstream(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki, response: bytes
) -> None:
    relay = auth_relay(start_relay, upstream, pki)
    with tls_wire(relay, pki) as client:
        assert client.command(b"AUTH PLAIN\r\n", 334) == b"334 \r\n"
        client.send(response)
        # The client gets the upstream's answer to the "*" sent in its place.
        assert client.reply() == (501, CANCELLED)
        client.command(b"MAIL FROM:<a@example.org>\r\n", 250)
        client.command(b"RCPT TO:<b@example.net>\r\n", 250)
        client.command(b"DATA\r\n", 354)
        client.command(MESSAGE.encode() + b".\r\n", 250)
        client.command(b"QUIT\r\n", 221)
    (session,) = upstream.wait_sessions()
    assert auth_lines(session) == [b"AUTH PLAIN\r\n", b"*\r\n"]
    assert (session.outcomes, session.mail_auth) == ([CANCELLED], [None])
    (record,), (transaction,) = records_after(relay, 1)
    assert record["auth"] is None
    assert transaction["outcome"] == "delivered"


def test_a_command_sent_with_the_tls_finished_is_answered(
    start_relay: StartRelay, upstream: AuthUpstream, pki: Pki
) -> None:
    # RFC 3207 4.2: the client starts again with EHLO once its handshake is
    # done; with TLS 1.3 that EHLO may travel with its Finished.
    relay = auth_relay(start_relay, upstream, pki)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(b"STARTTLS\r\n", 220)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                client.send(outgoing.read())
                data = client.sock.recv(65536)
                assert data, "the relay closed the connection during the handshake"
                incoming.write(data)
        tls.write(b"EHLO client.test\r\n")
        client.send(outgoing.read())  # the Finished and the EHLO in one write
        reply = b""
        while b"\r\n250 " not in b"\r\n" + reply:
            try:
                data = client.sock.recv(65536)
            except TimeoutError:
                pytest.fail(f"no reply to the EHLO sent with the Finished; read {reply!r}")
            assert data, f"the relay closed the connection; read {reply!r}"
            incoming.write(data)
            with suppress(ssl.SSLWantReadError):
                reply += tls.read(65536)
    assert reply.startswith(b"250-")
    assert b"AUTH PLAIN LOGIN CRAM-MD5 XOAUTH2" in reply


# -- no secret left behind --------------------------------------------------------------


def base64_forms(secret: bytes) -> set[bytes]:
    """The base64 text that shows ``secret`` wherever it sits in an encoded message.

    A secret encoded inside a longer message starts at one of three offsets
    in a 3-octet group; from its first whole group on, its encoding is one of
    these three.
    """
    forms = set()
    for skip in range(3):
        aligned = secret[skip:]
        aligned = aligned[: len(aligned) // 3 * 3]
        forms.add(base64.b64encode(aligned))
    return forms


def everything_written(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_no_secret_reaches_a_log_or_the_spool(
    start_relay: StartRelay,
    make_upstream: Callable[..., AuthUpstream],
    pki: Pki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    deferring = {f"<{SPOOL_SENDER}>": DEFERRED}
    a = make_upstream(end_of_data=deferring)
    b = make_upstream(end_of_data=deferring)
    spool = tmp_path / "spool"
    relay = start_relay(
        a.config,
        extra={
            "upstreams": [{"name": "a", **a.config}, {"name": "b", **b.config}],
            "listeners": [{**listener(pki), "upstream": "a"}],
            "routes": [{"name": "main", "policy": "requeue", "upstreams": ["a", "b"]}],
            "retry": {"attempts": 1, "budget": 20},
            "spool": {"path": str(spool)},
        },
    )
    sent: list[tuple[str, str, str]] = []  # mechanism, user, secret of each exchange
    for mechanism in MECHANISMS:
        user, secret = CREDENTIALS[mechanism]
        with tls_client(relay, pki) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                authenticate(client, mechanism, user, WRONG[mechanism], initial=False)
            sent.append((mechanism, user, WRONG[mechanism]))
            assert authenticate(client, mechanism, user, secret)[0] == 235
            sent.append((mechanism, user, secret))
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    # A message that is spooled: both upstreams defer it. Its session tried
    # AUTH and failed (a session that authenticated is never spooled: a
    # spool delivery could not authenticate again).
    user, _ = CREDENTIALS["PLAIN"]
    wrong_plain = b"AUTH PLAIN " + b64(f"\0{user}\0{WRONG['PLAIN']}")
    with tls_wire(relay, pki) as client:
        client.command(wrong_plain + CRLF, 535)
        client.command(b"MAIL FROM:<%s>\r\n" % SPOOL_SENDER.encode(), 250)
        client.command(b"RCPT TO:<b@example.net>\r\n", 250)
        client.command(b"DATA\r\n", 354)
        assert b"queued as" in client.command(SPOOLED_MESSAGE + b".\r\n", 250)
        client.command(b"QUIT\r\n", 221)
    sent.append(("PLAIN", user, WRONG["PLAIN"]))
    # A response line that is not base64 holds a secret of its own. What the
    # client gets for it is test_a_refused_or_cancelled_response_cancels_upstream's
    # business; here it only must not be written anywhere.
    raw_secret = b"S3cret-RAW-line!"
    with tls_wire(relay, pki) as client:
        client.command(b"AUTH PLAIN\r\n", 334)
        client.send(raw_secret + CRLF)
        client.reply()
        client.send(b"QUIT\r\n")
        client.read_to_eof()
    count = len(MECHANISMS) + 2
    sessions, transactions = records_after(relay, count)
    relay.stop()
    upstream_sessions = a.wait_sessions(count)

    # The identities are in the records.
    plain_user = CREDENTIALS["PLAIN"][0]
    users = [user for user, _ in CREDENTIALS.values()]
    assert sorted(str(record["auth"]) for record in sessions) == sorted([*users, "None", "None"])
    assert {record["auth"] for record in transactions} == {*users, None}
    (requeued,) = [record for record in transactions if record["outcome"] == "requeued"]
    assert requeued["auth"] is None
    assert plain_user in users

    # Each secret, alone and in the SASL messages that carried it, plain and
    # in base64; for CRAM-MD5 the digests, of the right and the wrong secret
    # for each challenge.
    cram = cram_challenges(upstream_sessions)
    assert len(cram) == 2  # the wrong and the right secret, a session each
    needles: dict[bytes, str] = {raw_secret: "raw line", b64(raw_secret): "raw line, base64"}
    carried: dict[str, list[bytes]] = {}  # each secret's messages, base64
    for mechanism, user, secret in sent:
        needles[secret.encode()] = secret
        needles.update((form, f"{secret}, base64") for form in base64_forms(secret.encode()))
        if mechanism == "CRAM-MD5":
            responses = [f"{user} {cram_digest(secret, challenge)}".encode() for challenge in cram]
            for response in responses:
                digest = response.rpartition(b" ")[2]
                needles[digest] = needles[digest.upper()] = f"{secret}, HMAC-MD5"
            encoded = [b64(response) for response in responses]
        else:
            sasl = messages(mechanism, user, secret, [])
            encoded = [b64(message) for message in sasl if secret.encode() in message]
        needles.update((message, f"{secret}, {mechanism} message, base64") for message in encoded)
        needles.update(
            (base64.b64decode(message), f"{secret}, {mechanism} message") for message in encoded
        )
        carried.setdefault(secret, []).extend(encoded)
    # The needles are the right ones: each secret reached the upstream in one.
    received = b"".join(session.connection.command_text() for session in upstream_sessions)
    for secret, encoded in carried.items():
        assert any(message in received for message in encoded), secret
    assert raw_secret not in received

    files = everything_written(tmp_path)
    assert any(name.startswith("transactions-") for name in files)
    assert any(SPOOLED_MESSAGE in content for content in files.values()), sorted(files)
    logged = "\n".join([caplog.text, *(repr(vars(record)) for record in caplog.records)])
    found = [
        f"{what} in {where}"
        for needle, what in needles.items()
        for where, content in [*files.items(), ("the log output", logged.encode())]
        if needle in content
    ]
    assert not found
    # The identities are there in plain text.
    written = b"".join(content for name, content in files.items() if name.startswith("trans"))
    for user in users:
        assert user.encode() in written
