"""Regressions around client TLS, AUTH, BDAT limits and the upstream preamble.

- A client that resets or falls silent during a STARTTLS handshake, or never
  starts the handshake on an implicit-TLS listener, leaves no session behind
  and no admission counted for its address.
- A BDAT chunk refused for the size limit fails the rest of the message too.
- An upstream whose banner refuses, under required STARTTLS, is a failed
  upstream, never a banner relayed in plaintext.
- A host name with an underscore works with XCLIENT.
- A client gone mid-AUTH leaves the upstream a cancelled exchange.
- Long XOAUTH2 initial responses pass; one AUTH per session; no STARTTLS
  after AUTH; EHLO again after STARTTLS.
- An authenticated message is never replayed: the relay cannot authenticate
  on another upstream.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from integration.auth_upstream import (
    ACCEPTED,
    CANCELLED,
    LOGIN_PASSWORD,
    LOGIN_USERNAME,
    AuthUpstream,
)
from integration.pki import Pki
from integration.recording_upstreams import RawUpstream
from integration.relay_harness import (
    POLL_S,
    UPSTREAM,
    WAIT_S,
    RunningRelay,
    StartRelay,
    WireClient,
)
from integration.test_auth import CREDENTIALS, TOKENS, USERS, b64, handshake_ended
from integration.test_upstream_leg import (
    CLIENT_EHLO,
    NEW_GREETING,
    XCLIENT_EHLO,
    refused_at_connect,
    send_raw,
    smtp,
    start_route,
)
from integration.test_upstream_leg import SECTION as SENT_RAW
from smtpwarden.net import secure, server

LOCALHOST = ipaddress.ip_address("127.0.0.1")
CRLF = b"\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
RCPT = b"RCPT TO:<rcpt@example.net>\r\n"
QUIT = b"QUIT\r\n"
SECTION = b"Subject: hardening\r\n\r\n..a stuffed line\r\nend\r\n.\r\n"
TEMPORARY = b"451 4.3.0 Temporary local problem\r\n"
RAW_BANNER = b"220 upstream.test ESMTP raw recorder\r\n"
GO_AWAY = b"554 5.7.1 go away\r\n"
OPENING_TIMEOUT_S = 0.5  # the patched limit on a client's TLS handshake
UNDERSCORE_HOSTNAME = "relay_1.example.test"


# --- Fixtures and helpers -------------------------------------------------------------


@pytest.fixture
def make_auth_upstream() -> Iterator[Callable[..., AuthUpstream]]:
    made: list[AuthUpstream] = []

    def make(**kwargs: Any) -> AuthUpstream:
        kwargs.setdefault("users", USERS)
        kwargs.setdefault("tokens", TOKENS)
        upstream = AuthUpstream(**kwargs)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


@pytest.fixture
def short_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorten the time a client gets for its TLS handshake.

    ``secure`` reads it at each check; ``server`` imported it for the
    implicit-TLS listeners it creates, so it is patched there too.
    """
    monkeypatch.setattr(secure, "OPENING_TIMEOUT_S", OPENING_TIMEOUT_S)
    monkeypatch.setattr(server, "OPENING_TIMEOUT_S", OPENING_TIMEOUT_S)


def listener(
    pki: Pki | None, *, auth: object = None, upstream: str = UPSTREAM, **tls: object
) -> dict[str, object]:
    section: dict[str, object] = {
        "name": "main",
        "host": "127.0.0.1",
        "port": 0,
        "upstream": upstream,
    }
    if auth is not None:
        section["auth"] = auth
    if pki is not None:
        section["tls"] = {"certificate": str(pki.certificate), "key": str(pki.key), **tls}
    return section


def start_with_listener(
    start_relay: StartRelay, upstream: RawUpstream, section: dict[str, object]
) -> RunningRelay:
    return start_relay(upstream.config, extra={"listeners": [section]})


def counts(relay: RunningRelay) -> tuple[int, int]:
    """Live sessions, and sessions admission counts for 127.0.0.1."""
    running = relay.relay
    assert running is not None
    return relay.call(lambda: (len(running.sessions), running.admission.open_sessions(LOCALHOST)))


def wait_forgotten(relay: RunningRelay, timeout: float = WAIT_S) -> None:
    """Wait until the relay counts no session at all; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (now := counts(relay)) != (0, 0):
        if time.monotonic() > deadline:
            raise AssertionError(f"(sessions, admitted) still {now} after {timeout} s")
        time.sleep(POLL_S)


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def client_hello(pki: Pki) -> bytes:
    """A real TLS ClientHello for the relay's certificate."""
    tls = pki.client_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost"
    )
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello
    return hello


def starttls_answered(relay: RunningRelay) -> WireClient:
    """A raw client after EHLO and the relay's 220 to STARTTLS, in the clear."""
    client = WireClient(relay.address())
    client.expect(220)
    client.command(CLIENT_EHLO, 250)
    client.command(b"STARTTLS\r\n", 220)
    return client


def new_session_works(relay: RunningRelay, pki: Pki | None = None) -> None:
    """A whole transaction on a new connection (over implicit TLS if ``pki``)."""
    with WireClient(relay.address()) as client:
        if pki is not None:
            client.sock = pki.client_context().wrap_socket(client.sock, server_hostname="localhost")
        client.start_transaction()
        client.command(b"DATA\r\n", 354)
        client.command(SECTION, 250)
        client.command(QUIT, 221)


def session_records(relay: RunningRelay, count: int = 1) -> list[dict[str, Any]]:
    return relay.wait_records(lambda rs: len(rs) >= count, "session")


# --- 1: a client gone during the TLS opening is forgotten -------------------------------


def test_a_reset_during_the_starttls_handshake_leaves_nothing_counted(
    start_relay: StartRelay, raw_upstream: RawUpstream, pki: Pki
) -> None:
    relay = start_with_listener(start_relay, raw_upstream, listener(pki))
    client = starttls_answered(relay)
    client.send(client_hello(pki))
    # The relay's first flight: the handshake is under way.
    assert client.sock.recv(65536)
    reset(client.sock)

    wait_forgotten(relay)
    (session,) = session_records(relay)
    assert session["end"] == "tls_failed"
    new_session_works(relay)
    wait_forgotten(relay)


def test_a_client_silent_after_starttls_is_timed_out_and_forgotten(
    start_relay: StartRelay, raw_upstream: RawUpstream, pki: Pki, short_opening: None
) -> None:
    relay = start_with_listener(start_relay, raw_upstream, listener(pki))
    with starttls_answered(relay) as client:
        # Nothing more: the relay gives up on the handshake and closes.
        assert client.read_to_eof() == b""

    wait_forgotten(relay)
    (session,) = session_records(relay)
    assert session["end"] == "client_timeout"
    new_session_works(relay)
    wait_forgotten(relay)


@pytest.mark.parametrize("silent", [False, True], ids=["closes", "stays-silent"])
def test_a_plain_client_on_an_implicit_tls_listener_leaves_nothing_counted(
    start_relay: StartRelay,
    raw_upstream: RawUpstream,
    pki: Pki,
    short_opening: None,
    silent: bool,
) -> None:
    relay = start_with_listener(start_relay, raw_upstream, listener(pki, mode="implicit"))
    with socket.create_connection(relay.address(), timeout=WAIT_S) as plain:
        if silent:
            # No handshake within the opening time: the relay closes.
            plain.settimeout(WAIT_S)
            with contextlib.suppress(ConnectionResetError):
                assert plain.recv(65536) == b""
    wait_forgotten(relay)
    # No session had begun, so none is recorded.
    assert relay.records("session") == []
    new_session_works(relay, pki)
    wait_forgotten(relay)
    (session,) = session_records(relay)
    assert session["tls"]["client"].startswith("TLSv1.")
    assert raw_upstream.wait_all_ended()[0].data == [SECTION]


# --- 2: a refused BDAT chunk fails the rest of the message -------------------------------


def test_bdat_chunks_after_a_refused_one_are_refused_too(start_relay: StartRelay) -> None:
    upstream = RawUpstream(ehlo=("PIPELINING", "CHUNKING", "8BITMIME"))
    try:
        relay = start_relay(upstream.config, limits={"max_message_bytes": 1000})
        with WireClient(relay.address()) as client:
            client.start_transaction()
            client.send(
                b"BDAT 600\r\n"
                + b"A" * 600
                + b"BDAT 600\r\n"
                + b"B" * 600
                + b"BDAT 10 LAST\r\n"
                + b"C" * 10
            )
            client.expect(250)
            assert client.expect(552).startswith(b"552 5.3.4 ")
            # The last chunk alone is small, but the message it ends has failed.
            assert client.expect(552).startswith(b"552 5.3.4 ")
            client.command(b"RSET\r\n", 250)
            client.command(MAIL, 250)
            client.command(RCPT, 250)
            client.send(b"BDAT 5 LAST\r\nhello")
            client.expect(250)
            client.command(QUIT, 221)
        (conn,) = upstream.wait_all_ended()
        assert conn.bdat_chunks == [b"A" * 600, b"hello"]
        bdat = [line for line in conn.commands if line.upper().startswith(b"BDAT")]
        # The only end of a message the upstream got is the new transaction's.
        assert bdat == [b"BDAT 600\r\n", b"BDAT 5 LAST\r\n"]
        assert conn.commands.index(b"RSET\r\n") < conn.commands.index(b"BDAT 5 LAST\r\n")
        records = relay.wait_records(lambda rs: len(rs) >= 2, "transaction")
        assert records[-1]["outcome"] == "delivered"
    finally:
        upstream.close()


# --- 3: a refusing banner under required STARTTLS --------------------------------------


REQUIRED_STARTTLS = {"mode": "starttls", "required": True}


def assert_no_client_command(conn_commands: list[bytes]) -> None:
    assert conn_commands in ([], [QUIT]), conn_commands


def test_a_refusing_banner_under_required_starttls_fails_over(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    a = make_raw_upstream(replies={"BANNER": GO_AWAY})
    b = make_raw_upstream()
    relay = start_route(start_relay, {"a": smtp(a.port, REQUIRED_STARTTLS), "b": smtp(b.port)})

    banner, final = send_raw(relay)

    assert banner == RAW_BANNER
    assert final == b"250 2.0.0 Ok: queued\r\n"
    (refused,) = a.wait_all_ended()
    assert_no_client_command(refused.commands)
    (relayed,) = b.wait_all_ended()
    assert relayed.commands[0] == CLIENT_EHLO
    assert relayed.data == [SENT_RAW]
    (session,) = session_records(relay)
    assert session["upstream"]["name"] == "b"


def test_a_refusing_banner_under_required_starttls_alone_answers_421(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    a = make_raw_upstream(replies={"BANNER": GO_AWAY})
    relay = start_relay(smtp(a.port, REQUIRED_STARTTLS))

    assert refused_at_connect(relay).startswith(b"421 4.4.1 ")

    (refused,) = a.wait_all_ended()
    assert_no_client_command(refused.commands)
    (session,) = session_records(relay)
    assert session["end"] == "upstream_unreachable"


def test_a_refusing_banner_under_opportunistic_starttls_is_relayed(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    a = make_raw_upstream(replies={"BANNER": GO_AWAY})
    relay = start_relay(smtp(a.port, {"mode": "starttls", "required": False}))

    with WireClient(relay.address()) as client:
        assert client.expect(554) == GO_AWAY
        client.command(QUIT, 221)

    (conn,) = a.wait_all_ended()
    assert conn.commands == [QUIT]


# --- 4: a host name with an underscore --------------------------------------------------


def test_a_hostname_with_an_underscore_works_with_xclient(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(ehlo=XCLIENT_EHLO, replies={"XCLIENT": NEW_GREETING})
    relay = start_relay(
        {**upstream.config, "xclient": True}, extra={"hostname": UNDERSCORE_HOSTNAME}
    )

    with WireClient(relay.address()) as client:
        assert client.expect(220) == NEW_GREETING
        client.command(CLIENT_EHLO, 250)
        client.command(QUIT, 221)

    (conn,) = upstream.wait_all_ended()
    assert conn.commands[0] == f"EHLO {UNDERSCORE_HOSTNAME}\r\n".encode("ascii")
    assert conn.commands[1].startswith(b"XCLIENT ADDR=127.0.0.1 ")
    assert conn.commands[2:] == [CLIENT_EHLO, QUIT]


# --- 5 to 7: AUTH ---------------------------------------------------------------------


PLAINTEXT_AUTH = {"require_tls": False}


def plain_auth_line() -> bytes:
    user, secret = CREDENTIALS["PLAIN"]
    return b"AUTH PLAIN " + b64(f"\0{user}\0{secret}") + CRLF


def auth_lines(commands: list[bytes]) -> list[bytes]:
    return [line for line in commands if line.upper().startswith(b"AUTH")]


def test_a_client_gone_mid_auth_leaves_the_exchange_cancelled(
    start_relay: StartRelay, make_auth_upstream: Callable[..., AuthUpstream]
) -> None:
    upstream = make_auth_upstream()
    relay = start_with_listener(start_relay, upstream, listener(None, auth=PLAINTEXT_AUTH))
    user, _ = CREDENTIALS["LOGIN"]

    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(CLIENT_EHLO, 250)
        assert client.command(b"AUTH LOGIN\r\n", 334) == b"334 " + LOGIN_USERNAME + CRLF
        assert client.command(b64(user) + CRLF, 334) == b"334 " + LOGIN_PASSWORD + CRLF
        # Gone before the password.

    (session,) = upstream.wait_sessions()
    commands = session.connection.commands
    after = commands[commands.index(b"AUTH LOGIN\r\n") + 1 :]
    assert after[0] == b64(user) + CRLF
    # The exchange is cancelled before any QUIT: no QUIT read as the password.
    assert after[1:] in ([b"*\r\n"], [b"*\r\n", QUIT]), after
    assert session.outcomes == [CANCELLED]
    assert session.user is None
    wait_forgotten(relay)


def test_a_long_xoauth2_initial_response_passes_and_an_overlong_line_does_not(
    start_relay: StartRelay, make_auth_upstream: Callable[..., AuthUpstream]
) -> None:
    user = "dave@example.org"
    token = "t" * 6000
    upstream = make_auth_upstream(tokens={user: token})
    relay = start_with_listener(start_relay, upstream, listener(None, auth=PLAINTEXT_AUTH))
    line = b"AUTH XOAUTH2 " + b64(f"user={user}\x01auth=Bearer {token}\x01\x01") + CRLF
    assert 2048 < len(line) < 12288
    overlong = b"AUTH XOAUTH2 " + b"A" * (13000 - len(b"AUTH XOAUTH2 ") - 2) + CRLF
    assert len(overlong) == 13000

    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(CLIENT_EHLO, 250)
        client.command(overlong, 500)
        assert client.command(line, 235) == ACCEPTED
        client.command(QUIT, 221)

    (session,) = upstream.wait_sessions()
    assert auth_lines(session.connection.commands) == [line]
    assert session.outcomes == [ACCEPTED]
    assert session.user == user
    (record,) = session_records(relay)
    assert record["auth"] == user


def test_a_second_auth_is_refused_locally(
    start_relay: StartRelay, make_auth_upstream: Callable[..., AuthUpstream]
) -> None:
    upstream = make_auth_upstream()
    relay = start_with_listener(start_relay, upstream, listener(None, auth=PLAINTEXT_AUTH))

    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(CLIENT_EHLO, 250)
        assert client.command(plain_auth_line(), 235) == ACCEPTED
        refused = client.command(plain_auth_line(), 503)
        assert refused.startswith(b"503 5.5.1 ")
        client.command(b"AUTH LOGIN\r\n", 503)
        client.command(QUIT, 221)

    (session,) = upstream.wait_sessions()
    assert auth_lines(session.connection.commands) == [plain_auth_line()]
    assert session.outcomes == [ACCEPTED]


def test_starttls_after_auth_is_refused(
    start_relay: StartRelay, make_auth_upstream: Callable[..., AuthUpstream], pki: Pki
) -> None:
    upstream = make_auth_upstream()
    relay = start_with_listener(start_relay, upstream, listener(pki, auth=PLAINTEXT_AUTH))
    user, _ = CREDENTIALS["PLAIN"]

    with WireClient(relay.address()) as client:
        client.expect(220)
        ehlo = client.command(CLIENT_EHLO, 250)
        assert b"STARTTLS" in ehlo
        assert client.command(plain_auth_line(), 235) == ACCEPTED
        refused = client.command(b"STARTTLS\r\n", 503)
        assert refused.startswith(b"503 5.5.1 ")
        # Still in the clear, and still going.
        client.command(MAIL, 250)
        client.command(RCPT, 250)
        client.command(b"DATA\r\n", 354)
        client.command(SECTION, 250)
        client.command(QUIT, 221)

    (session,) = upstream.wait_sessions()
    assert session.mail_auth == [user]
    assert session.connection.data == [SECTION]
    (record,) = session_records(relay)
    assert record["tls"]["client"] == "none"
    assert record["auth"] == user


# --- 8: EHLO again after STARTTLS -----------------------------------------------------


def tls_session(relay: RunningRelay, pki: Pki) -> WireClient:
    """A raw client after EHLO and STARTTLS; its socket is TLS, no EHLO said over it."""
    client = starttls_answered(relay)
    tls = pki.client_context().wrap_socket(client.sock, server_hostname="localhost")
    client.sock = tls
    handshake_ended(tls)
    return client


def test_mail_after_starttls_wants_ehlo_again(
    start_relay: StartRelay, raw_upstream: RawUpstream, pki: Pki
) -> None:
    relay = start_with_listener(start_relay, raw_upstream, listener(pki))

    with tls_session(relay, pki) as client:
        refused = client.command(MAIL, 503)
        assert refused.startswith(b"503 5.5.1 ")
        client.command(b"EHLO after.tls.test\r\n", 250)
        client.command(MAIL, 250)
        client.command(QUIT, 221)

    (conn,) = raw_upstream.wait_all_ended()
    assert [line for line in conn.commands if line.startswith(b"MAIL")] == [MAIL]
    (record,) = session_records(relay)
    assert record["helo"] == "after.tls.test"


def test_the_post_tls_ehlo_is_the_recorded_helo(
    start_relay: StartRelay, raw_upstream: RawUpstream, pki: Pki
) -> None:
    relay = start_with_listener(start_relay, raw_upstream, listener(pki))

    with tls_session(relay, pki) as client:
        client.command(b"EHLO after.tls.test\r\n", 250)
        client.command(MAIL, 250)
        client.command(RCPT, 250)
        client.command(b"DATA\r\n", 354)
        client.command(SECTION, 250)
        client.command(QUIT, 221)

    (record,) = session_records(relay)
    assert record["helo"] == "after.tls.test"
    (transaction,) = relay.wait_records(lambda rs: len(rs) >= 1, "transaction")
    assert transaction["helo"] == "after.tls.test"


def test_no_helo_is_recorded_from_before_tls(
    start_relay: StartRelay, raw_upstream: RawUpstream, pki: Pki
) -> None:
    relay = start_with_listener(start_relay, raw_upstream, listener(pki))

    with tls_session(relay, pki) as client:
        client.command(QUIT, 221)

    (conn,) = raw_upstream.wait_all_ended()
    assert conn.commands == [CLIENT_EHLO, QUIT]
    (record,) = session_records(relay)
    # RFC 3207 4.2: what the client said before TLS is forgotten.
    assert record["helo"] is None


# --- 9: an authenticated message is never replayed ---------------------------------------


def start_retry_with_auth(
    start_relay: StartRelay, a: AuthUpstream, b: AuthUpstream
) -> RunningRelay:
    extra: dict[str, object] = {
        "upstreams": [{"name": "a", **a.config}, {"name": "b", **b.config}],
        "listeners": [listener(None, auth=PLAINTEXT_AUTH, upstream="a")],
        "routes": [{"name": "main", "policy": "retry", "upstreams": ["a", "b"]}],
        "retry": {"attempts": 3, "budget": 20},
    }
    return start_relay(a.config, extra=extra)


@pytest.mark.parametrize("authenticated", [True, False], ids=["auth", "no-auth"])
def test_an_authenticated_message_is_not_replayed(
    start_relay: StartRelay,
    make_auth_upstream: Callable[..., AuthUpstream],
    authenticated: bool,
) -> None:
    a = make_auth_upstream(replies={".": TEMPORARY})
    b = make_auth_upstream()
    relay = start_retry_with_auth(start_relay, a, b)
    user, _ = CREDENTIALS["PLAIN"]

    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(CLIENT_EHLO, 250)
        if authenticated:
            client.command(plain_auth_line(), 235)
        client.command(MAIL, 250)
        client.command(RCPT, 250)
        client.command(b"DATA\r\n", 354)
        client.send(SECTION)
        final = client.reply()
        client.command(QUIT, 221)

    (first,) = a.wait_sessions()
    assert first.connection.data == [SECTION]
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    if authenticated:
        # The relay keeps no credentials: the client, told 4xx, tries again.
        assert final == (451, TEMPORARY)
        assert (record["outcome"], record["attempts"]) == ("deferred", 1)
        assert record["auth"] == user
        b.close()
        assert b.connections == []
    else:
        assert final == (250, b"250 2.0.0 Ok: queued\r\n")
        assert (record["outcome"], record["attempts"]) == ("retried", 2)
        (replayed,) = b.wait_sessions()
        assert replayed.connection.data == [SECTION]
