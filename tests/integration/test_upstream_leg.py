"""The live session's upstream leg: TLS towards the upstream, failover, XCLIENT and XFORWARD.

Each relay reads its upstreams' ``tls`` section: with STARTTLS it sends its
own EHLO, STARTTLS and EHLO again before the client sees a banner; with
implicit TLS the connection is encrypted from its first octet. Upstreams
serve certificates from a throw-away trustme CA and record on which leg
each command came. Required TLS that cannot be had is a failure of that
upstream (the next one of the route is tried, else 421 4.4.1), never a
session in plaintext. XCLIENT and XFORWARD are checked against a raw
recording upstream.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import trustme

from integration.recording_upstreams import DEFAULT_EHLO, RawConnection, RawUpstream
from integration.relay_harness import HOSTNAME, WAIT_S, RunningRelay, StartRelay, WireClient
from integration.tls_upstreams import (
    AiosmtpdTlsUpstream,
    ScriptedTlsUpstream,
    TlsConnection,
    server_side,
)

RELAY_EHLO = f"EHLO {HOSTNAME}\r\n".encode("ascii")
STARTTLS = b"STARTTLS\r\n"
PREAMBLE = [RELAY_EHLO, STARTTLS]  # all that may ever go in plaintext under STARTTLS
CLIENT_EHLO = b"EHLO client.test\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
RCPT = b"RCPT TO:<rcpt@example.net>\r\n"
DATA = b"DATA\r\n"
QUIT = b"QUIT\r\n"
MESSAGE = "Subject: upstream leg\r\n\r\nover the upstream leg\r\n"
SECTION = b"Subject: upstream leg\r\n\r\n..a stuffed line\r\nend\r\n.\r\n"
ENVELOPE_VERBS = {b"MAIL", b"RCPT", b"DATA", b"BDAT"}
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
SCRIPTED_BANNER = b"220 tls-upstream.test ESMTP scripted\r\n"
NEW_GREETING = b"220 new.greeting ESMTP\r\n"
XCLIENT_EHLO = ("PIPELINING", "XCLIENT ADDR PORT NAME")
XFORWARD_EHLO = ("PIPELINING", "XFORWARD NAME ADDR PORT PROTO HELO")
XCLIENT_SESSION = [b"EHLO", b"XCLIENT", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
RACE_SESSIONS = 200
TEMPORARY = b"451 4.3.0 Temporary local problem\r\n"


# --- Certificates and upstreams ---------------------------------------------------


@dataclass(frozen=True)
class Pki:
    leaf: trustme.LeafCert
    ca_file: str  # the CA that issued ``leaf``
    other_ca_file: str  # a CA that issued nothing the upstreams serve


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("upstream-pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "upstream.test", common_name="upstream.test")
    ca_file, other_ca_file = folder / "ca.pem", folder / "other-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    trustme.CA().cert_pem.write_to_path(str(other_ca_file))
    return Pki(leaf=leaf, ca_file=str(ca_file), other_ca_file=str(other_ca_file))


@pytest.fixture
def make_scripted(pki: Pki) -> Iterator[Callable[..., ScriptedTlsUpstream]]:
    """Scripted TLS upstreams serving the trustme leaf; closed after the test."""
    made: list[ScriptedTlsUpstream] = []

    def make(**kwargs: Any) -> ScriptedTlsUpstream:
        upstream = ScriptedTlsUpstream(server_side(pki.leaf), **kwargs)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


@pytest.fixture
def make_aiosmtpd(pki: Pki) -> Iterator[Callable[..., AiosmtpdTlsUpstream]]:
    made: list[AiosmtpdTlsUpstream] = []

    def make(**kwargs: Any) -> AiosmtpdTlsUpstream:
        upstream = AiosmtpdTlsUpstream(server_side(pki.leaf), **kwargs)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


def smtp(port: int, tls: object = None, **more: object) -> dict[str, object]:
    """An upstream section of the relay's configuration."""
    section: dict[str, object] = {"kind": "smtp", "host": "127.0.0.1", "port": port, **more}
    if tls is not None:
        section["tls"] = tls
    return section


def start_route(
    start_relay: StartRelay,
    upstreams: Mapping[str, Mapping[str, object]],
    *,
    policy: str = "passthrough",
    retry: Mapping[str, object] | None = None,
) -> RunningRelay:
    """A relay whose one route tries ``upstreams`` in order."""
    names = list(upstreams)
    extra: dict[str, object] = {
        "upstreams": [{"name": name, **section} for name, section in upstreams.items()],
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": names[0]}],
        "routes": [{"name": "main", "policy": policy, "upstreams": names}],
    }
    if retry is not None:
        extra["retry"] = dict(retry)
    return start_relay(upstreams[names[0]], extra=extra)


# --- Clients and what the records say --------------------------------------------------


def send_with_smtplib(relay: RunningRelay) -> tuple[int, bytes]:
    """One message with plain smtplib; return the banner it got."""
    host, port = relay.address()
    client = smtplib.SMTP(timeout=WAIT_S)
    try:
        banner = client.connect(host, port)
        client.ehlo("client.test")
        assert not client.has_extn("starttls")  # the upstream's STARTTLS is the relay's own
        client.sendmail("sender@example.org", ["rcpt@example.net"], MESSAGE)
        client.quit()
    finally:
        client.close()
    return banner


def send_raw(relay: RunningRelay) -> tuple[bytes, bytes]:
    """One message over a raw socket; return the banner and the reply to the final dot."""
    with WireClient(relay.address()) as client:
        banner = client.expect(220)
        client.command(CLIENT_EHLO, 250)
        client.command(MAIL, 250)
        client.command(RCPT, 250)
        client.command(DATA, 354)
        client.send(SECTION)
        _, final = client.reply()
        client.command(QUIT, 221)
    return banner, final


def refused_at_connect(relay: RunningRelay) -> bytes:
    """The reply a client gets when no upstream of the route could be used."""
    with WireClient(relay.address()) as client:
        got = client.expect(421)
        assert client.read_to_eof() == b""
    return got


def verbs(commands: list[bytes]) -> list[bytes]:
    return [line.split()[0].upper() for line in commands if line.split()]


def envelope_commands(commands: list[bytes]) -> list[bytes]:
    return [line for line in commands if line.split()[:1] and line.split()[0] in ENVELOPE_VERBS]


def one_session(relay: RunningRelay) -> dict[str, Any]:
    (session,) = relay.wait_records(lambda rs: len(rs) >= 1, "session")
    return session


def one_transaction(relay: RunningRelay) -> dict[str, Any]:
    (record,) = relay.wait_records(lambda rs: len(rs) >= 1, "transaction")
    return record


def assert_over_tls(conn: TlsConnection, *, starttls: bool) -> None:
    """Only the relay's EHLO and STARTTLS, if any, came in plaintext; the rest over TLS."""
    assert conn.version in TLS_VERSIONS
    assert conn.plaintext() == (PREAMBLE if starttls else [])
    assert all(conn.secure[len(conn.plaintext()) :])


def assert_tls_recorded(record: dict[str, Any], conn: TlsConnection) -> None:
    summary = record["tls"]["upstream"]
    assert summary.startswith("TLSv1.")
    assert summary.startswith(f"{conn.version} ")
    assert len(summary.split(" ")) == 2  # the version, then the cipher


# --- 1 and 2: STARTTLS and implicit TLS, verified against the trustme CA ---------------


def test_starttls_verified_carries_every_client_command_over_tls(
    start_relay: StartRelay, make_scripted: Callable[..., ScriptedTlsUpstream], pki: Pki
) -> None:
    upstream = make_scripted()
    tls = {"mode": "starttls", "verify": True, "ca_file": pki.ca_file}
    relay = start_relay(smtp(upstream.port, tls))

    banner = send_with_smtplib(relay)

    assert banner == (220, SCRIPTED_BANNER[4:-2])
    (conn,) = upstream.wait_all_ended()
    assert_over_tls(conn, starttls=True)
    # RFC 3207 4.2: the relay's EHLO again once TLS is up, then the client's session.
    assert conn.commands[:3] == [RELAY_EHLO, STARTTLS, RELAY_EHLO]
    assert conn.commands[3].lower() == CLIENT_EHLO.lower()  # smtplib writes "ehlo"
    assert verbs(conn.commands[3:]) == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    assert conn.data == [MESSAGE.encode("ascii") + b".\r\n"]
    session = one_session(relay)
    assert_tls_recorded(session, conn)
    assert session["tls"]["client"] == "none"
    assert session["tls"]["upstream_subject"] == "CN=upstream.test"
    record = one_transaction(relay)
    assert record["tls"]["upstream"] == session["tls"]["upstream"]


def test_implicit_tls_encrypts_from_the_first_octet(
    start_relay: StartRelay, make_scripted: Callable[..., ScriptedTlsUpstream], pki: Pki
) -> None:
    upstream = make_scripted(implicit=True)
    relay = start_relay(smtp(upstream.port, {"mode": "implicit", "ca_file": pki.ca_file}))

    banner = send_with_smtplib(relay)

    assert banner == (220, SCRIPTED_BANNER[4:-2])
    (conn,) = upstream.wait_all_ended()
    assert_over_tls(conn, starttls=False)
    # Nothing to negotiate: the client's own EHLO is the first command.
    assert verbs(conn.commands) == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    assert conn.commands[0].lower() == CLIENT_EHLO.lower()
    assert conn.data == [MESSAGE.encode("ascii") + b".\r\n"]
    session = one_session(relay)
    assert_tls_recorded(session, conn)
    assert one_transaction(relay)["tls"]["upstream"] == session["tls"]["upstream"]


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_aiosmtpd_requiring_tls_gets_the_message_over_tls(
    start_relay: StartRelay,
    make_aiosmtpd: Callable[..., AiosmtpdTlsUpstream],
    pki: Pki,
    implicit: bool,
) -> None:
    upstream = make_aiosmtpd(implicit=implicit)
    tls = {"mode": "implicit" if implicit else "starttls", "ca_file": pki.ca_file}
    relay = start_relay(smtp(upstream.port, tls))

    code, _ = send_with_smtplib(relay)

    assert code == 220
    upstream.wait_for(lambda: len(upstream.received) == 1)
    (received,) = upstream.received
    assert received.tls
    assert received.rcpt_tos == ["rcpt@example.net"]
    assert received.content == MESSAGE.encode("ascii")
    assert one_session(relay)["tls"]["upstream"].split(" ")[0] in TLS_VERSIONS


# --- 3: required STARTTLS that cannot be had ------------------------------------------


NO_STARTTLS: dict[str, dict[str, Any]] = {
    "not-offered": {"offer_starttls": False},
    "refused": {"starttls_reply": b"454 4.7.0 TLS not available due to temporary reason\r\n"},
}


def assert_nothing_of_the_envelope(conn: TlsConnection | RawConnection) -> None:
    assert envelope_commands(conn.commands) == []
    assert conn.data == []
    assert conn.commands[0] == RELAY_EHLO
    assert set(verbs(conn.commands)) <= {b"EHLO", b"STARTTLS", b"QUIT"}


@pytest.mark.parametrize("failure", list(NO_STARTTLS), ids=list(NO_STARTTLS))
def test_required_starttls_missing_fails_over_to_the_next_upstream(
    start_relay: StartRelay,
    make_scripted: Callable[..., ScriptedTlsUpstream],
    pki: Pki,
    failure: str,
) -> None:
    a = make_scripted(**NO_STARTTLS[failure])
    b = make_scripted()
    tls = {"mode": "starttls", "required": True, "ca_file": pki.ca_file}
    relay = start_route(start_relay, {"a": smtp(a.port, tls), "b": smtp(b.port, tls)})

    banner, final = send_raw(relay)

    assert banner == SCRIPTED_BANNER
    assert final == b"250 2.0.0 Ok: queued\r\n"
    (refused,) = a.wait_all_ended()
    assert_nothing_of_the_envelope(refused)
    assert refused.version is None
    assert refused.secure == [False] * len(refused.commands)
    (relayed,) = b.wait_all_ended()
    assert_over_tls(relayed, starttls=True)
    assert relayed.data == [SECTION]
    session = one_session(relay)
    assert session["upstream"]["name"] == "b"
    assert_tls_recorded(session, relayed)


@pytest.mark.parametrize("failure", list(NO_STARTTLS), ids=list(NO_STARTTLS))
def test_required_starttls_missing_everywhere_answers_421(
    start_relay: StartRelay,
    make_scripted: Callable[..., ScriptedTlsUpstream],
    pki: Pki,
    failure: str,
) -> None:
    a = make_scripted(**NO_STARTTLS[failure])
    relay = start_relay(smtp(a.port, {"mode": "starttls", "ca_file": pki.ca_file}))

    assert refused_at_connect(relay).startswith(b"421 4.4.1 ")

    (conn,) = a.wait_all_ended()
    assert_nothing_of_the_envelope(conn)
    session = one_session(relay)
    assert session["end"] == "upstream_unreachable"
    assert session["tls"]["upstream"] == "none"
    assert relay.records("transaction") == []


def test_shorthand_starttls_is_required(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    raw_upstream = make_raw_upstream()
    relay = start_relay({**raw_upstream.config, "tls": "starttls"})

    assert refused_at_connect(relay).startswith(b"421 4.4.1 ")

    (conn,) = raw_upstream.wait_all_ended()
    assert_nothing_of_the_envelope(conn)


# --- 4: certificate verification ----------------------------------------------------


def wrong_certificate(pki: Pki, case: str) -> dict[str, object]:
    """TLS settings under which the upstream's certificate does not verify."""
    if case == "other-ca":
        return {"ca_file": pki.other_ca_file}
    if case == "other-name":
        return {"ca_file": pki.ca_file, "server_name": "elsewhere.test"}
    return {}  # the system's CAs, which never issued the trustme leaf


BAD_CERTIFICATES = ["other-ca", "other-name", "system-cas"]
MODES = ["starttls", "implicit"]
# The STARTTLS handshake fails in the session's own task; implicit TLS fails
# inside create_connection, which the failover loop catches.
MODES_FAILING = ["starttls", "implicit"]


@pytest.mark.parametrize("mode", MODES_FAILING)
@pytest.mark.parametrize("case", BAD_CERTIFICATES)
def test_a_certificate_that_does_not_verify_fails_over(
    start_relay: StartRelay,
    make_scripted: Callable[..., ScriptedTlsUpstream],
    pki: Pki,
    case: str,
    mode: str,
) -> None:
    implicit = mode == "implicit"
    a = make_scripted(implicit=implicit)
    b = make_scripted(implicit=implicit)
    a_tls = {"mode": mode, **wrong_certificate(pki, case)}
    b_tls = {"mode": mode, "ca_file": pki.ca_file}
    relay = start_route(start_relay, {"a": smtp(a.port, a_tls), "b": smtp(b.port, b_tls)})

    _, final = send_raw(relay)

    assert final == b"250 2.0.0 Ok: queued\r\n"
    (refused,) = a.wait_all_ended()
    assert refused.version is None
    assert refused.commands == ([] if implicit else PREAMBLE)
    (relayed,) = b.wait_all_ended()
    assert_over_tls(relayed, starttls=not implicit)
    assert relayed.data == [SECTION]
    session = one_session(relay)
    assert session["upstream"]["name"] == "b"
    assert_tls_recorded(session, relayed)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("required", [True, False], ids=["required", "opportunistic"])
def test_a_certificate_that_does_not_verify_alone_never_goes_on_in_plaintext(
    start_relay: StartRelay,
    make_scripted: Callable[..., ScriptedTlsUpstream],
    pki: Pki,
    mode: str,
    required: bool,
) -> None:
    implicit = mode == "implicit"
    a = make_scripted(implicit=implicit)
    tls = {"mode": mode, "required": required, "ca_file": pki.other_ca_file}
    relay = start_relay(smtp(a.port, tls))

    assert refused_at_connect(relay).startswith(b"421 ")

    (conn,) = a.wait_all_ended()
    assert conn.version is None
    # Not even opportunistic TLS falls back to plaintext once the handshake failed.
    assert conn.commands == ([] if implicit else PREAMBLE)
    assert relay.records("transaction") == []


@pytest.mark.parametrize("mode", MODES_FAILING)
def test_a_certificate_that_does_not_verify_alone_answers_421_4_4_1(
    start_relay: StartRelay,
    make_scripted: Callable[..., ScriptedTlsUpstream],
    pki: Pki,
    mode: str,
) -> None:
    a = make_scripted(implicit=mode == "implicit")
    relay = start_relay(smtp(a.port, {"mode": mode, "ca_file": pki.other_ca_file}))

    assert refused_at_connect(relay).startswith(b"421 4.4.1 ")

    a.wait_all_ended()
    assert one_session(relay)["end"] == "upstream_unreachable"


@pytest.mark.parametrize("mode", MODES)
def test_verify_false_accepts_any_certificate(
    start_relay: StartRelay,
    make_scripted: Callable[..., ScriptedTlsUpstream],
    pki: Pki,
    mode: str,
) -> None:
    implicit = mode == "implicit"
    a = make_scripted(implicit=implicit)
    tls = {
        "mode": mode,
        "verify": False,
        "ca_file": pki.other_ca_file,
        "server_name": "elsewhere.test",
    }
    relay = start_relay(smtp(a.port, tls))

    _, final = send_raw(relay)

    assert final == b"250 2.0.0 Ok: queued\r\n"
    (conn,) = a.wait_all_ended()
    assert_over_tls(conn, starttls=not implicit)
    assert conn.data == [SECTION]
    session = one_session(relay)
    assert_tls_recorded(session, conn)
    assert session["tls"]["upstream_subject"] is None  # nothing verified, nothing vouched for


# --- 5: opportunistic STARTTLS -----------------------------------------------------------


def test_opportunistic_starttls_goes_on_in_plaintext_when_not_offered(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], pki: Pki
) -> None:
    raw_upstream = make_raw_upstream()
    tls = {"mode": "starttls", "required": False, "ca_file": pki.ca_file}
    relay = start_relay({**raw_upstream.config, "tls": tls})

    banner, final = send_raw(relay)

    assert banner == b"220 upstream.test ESMTP raw recorder\r\n"
    assert final == b"250 2.0.0 Ok: queued\r\n"
    (conn,) = raw_upstream.wait_all_ended()
    assert conn.commands == [RELAY_EHLO, CLIENT_EHLO, MAIL, RCPT, DATA, QUIT]
    assert conn.data == [SECTION]
    session = one_session(relay)
    assert session["tls"]["upstream"] == "none"
    assert session["tls"]["upstream_subject"] is None
    assert one_transaction(relay)["tls"]["upstream"] == "none"


def test_opportunistic_starttls_is_used_when_offered(
    start_relay: StartRelay, make_scripted: Callable[..., ScriptedTlsUpstream], pki: Pki
) -> None:
    upstream = make_scripted()
    tls = {"mode": "starttls", "required": False, "ca_file": pki.ca_file}
    relay = start_relay(smtp(upstream.port, tls))

    send_raw(relay)

    (conn,) = upstream.wait_all_ended()
    assert_over_tls(conn, starttls=True)
    assert_tls_recorded(one_session(relay), conn)


# --- 6: octets after the 220 to STARTTLS ----------------------------------------------------


INJECTED = b"250-injected\r\n250 PIPELINING\r\n"


def test_octets_after_the_220_to_starttls_fail_over(
    start_relay: StartRelay, make_scripted: Callable[..., ScriptedTlsUpstream], pki: Pki
) -> None:
    a = make_scripted(after_starttls=INJECTED)
    b = make_scripted()
    tls = {"mode": "starttls", "ca_file": pki.ca_file}
    relay = start_route(start_relay, {"a": smtp(a.port, tls), "b": smtp(b.port, tls)})

    _, final = send_raw(relay)

    assert final == b"250 2.0.0 Ok: queued\r\n"
    (injected,) = a.wait_all_ended()
    assert injected.commands == PREAMBLE
    assert injected.version is None
    (relayed,) = b.wait_all_ended()
    assert_over_tls(relayed, starttls=True)
    assert one_session(relay)["upstream"]["name"] == "b"


@pytest.mark.parametrize("required", [True, False], ids=["required", "opportunistic"])
def test_octets_after_the_220_to_starttls_never_go_on_in_plaintext(
    start_relay: StartRelay,
    make_scripted: Callable[..., ScriptedTlsUpstream],
    pki: Pki,
    required: bool,
) -> None:
    a = make_scripted(after_starttls=INJECTED)
    tls = {"mode": "starttls", "required": required, "ca_file": pki.ca_file}
    relay = start_relay(smtp(a.port, tls))

    assert refused_at_connect(relay).startswith(b"421 4.4.1 ")

    (conn,) = a.wait_all_ended()
    assert conn.commands == PREAMBLE
    assert conn.version is None
    assert one_session(relay)["end"] == "upstream_unreachable"


# --- 7: XCLIENT --------------------------------------------------------------------------


def xclient_line(port: int) -> bytes:
    return f"XCLIENT ADDR=127.0.0.1 PORT={port} NAME=[UNAVAILABLE]\r\n".encode("ascii")


def test_xclient_passes_the_client_address_and_its_220_is_the_greeting(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(ehlo=XCLIENT_EHLO, replies={"XCLIENT": NEW_GREETING})
    relay = start_relay({**upstream.config, "xclient": True})

    with WireClient(relay.address()) as client:
        client_port = client.sock.getsockname()[1]
        assert client.expect(220) == NEW_GREETING
        ehlo = client.command(CLIENT_EHLO, 250)
        assert b"XCLIENT" not in ehlo
        # The client's own XCLIENT and XFORWARD are refused, and go nowhere.
        assert client.command(b"XCLIENT ADDR=192.0.2.1 PORT=25\r\n", 502).startswith(b"502 5.5.1")
        assert client.command(b"XFORWARD ADDR=192.0.2.1\r\n", 502).startswith(b"502 5.5.1")
        client.command(MAIL, 250)
        client.command(RCPT, 250)
        client.command(DATA, 354)
        client.send(SECTION)
        client.expect(250)
        client.command(QUIT, 221)

    (conn,) = upstream.wait_all_ended()
    assert conn.commands == [
        RELAY_EHLO,
        xclient_line(client_port),
        CLIENT_EHLO,
        MAIL,
        RCPT,
        DATA,
        QUIT,
    ]
    assert conn.data == [SECTION]
    session = one_session(relay)
    assert session["client"]["port"] == client_port
    assert session["banner"]["code"] == 220
    assert "new.greeting" in session["banner"]["text"]


def test_xclient_is_sent_after_starttls(
    start_relay: StartRelay, make_scripted: Callable[..., ScriptedTlsUpstream], pki: Pki
) -> None:
    upstream = make_scripted(
        ehlo=(*DEFAULT_EHLO, "XCLIENT ADDR PORT NAME"), replies={"XCLIENT": NEW_GREETING}
    )
    tls = {"mode": "starttls", "ca_file": pki.ca_file}
    relay = start_relay(smtp(upstream.port, tls, xclient=True))

    with WireClient(relay.address()) as client:
        client_port = client.sock.getsockname()[1]
        assert client.expect(220) == NEW_GREETING
        client.command(CLIENT_EHLO, 250)
        client.command(QUIT, 221)

    (conn,) = upstream.wait_all_ended()
    assert_over_tls(conn, starttls=True)
    assert conn.commands == [*PREAMBLE, RELAY_EHLO, xclient_line(client_port), CLIENT_EHLO, QUIT]


def test_a_refused_xclient_leaves_the_original_greeting(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(
        ehlo=XCLIENT_EHLO, replies={"XCLIENT": b"550 5.7.0 Insufficient authorization\r\n"}
    )
    relay = start_relay({**upstream.config, "xclient": True})

    banner, final = send_raw(relay)

    assert banner == b"220 upstream.test ESMTP raw recorder\r\n"
    assert final == b"250 2.0.0 Ok: queued\r\n"
    (conn,) = upstream.wait_all_ended()
    assert verbs(conn.commands) == XCLIENT_SESSION


@pytest.mark.parametrize(
    ("ehlo", "xclient"),
    [(XCLIENT_EHLO, False), (DEFAULT_EHLO, True)],
    ids=["not-configured", "not-offered"],
)
def test_no_xclient_unless_configured_and_offered(
    start_relay: StartRelay,
    make_raw_upstream: Callable[..., RawUpstream],
    ehlo: tuple[str, ...],
    xclient: bool,
) -> None:
    upstream = make_raw_upstream(ehlo=ehlo, replies={"XCLIENT": NEW_GREETING})
    relay = start_relay({**upstream.config, "xclient": xclient})

    banner, final = send_raw(relay)

    assert banner == b"220 upstream.test ESMTP raw recorder\r\n"
    assert final == b"250 2.0.0 Ok: queued\r\n"
    (conn,) = upstream.wait_all_ended()
    assert b"XCLIENT" not in verbs(conn.commands)
    assert envelope_commands(conn.commands) == [MAIL, RCPT, DATA]


# --- 8: XFORWARD --------------------------------------------------------------------------


def xforward_line(port: int, helo: str = "client.test") -> bytes:
    return (
        f"XFORWARD ADDR=127.0.0.1 PORT={port} NAME=[UNAVAILABLE] HELO={helo} PROTO=ESMTP\r\n"
    ).encode("ascii")


MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
DATA_GO = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 Ok: queued\r\n"


def pipelined_transactions(client: WireClient, count: int) -> None:
    """``count`` transactions, MAIL, RCPT and DATA in one write each; every reply checked."""
    for _ in range(count):
        client.send(MAIL + RCPT + DATA)
        # Exactly one reply per command of the client's, in order: any other
        # reply (the relay's XFORWARD's) would shift them.
        assert [client.reply()[1] for _ in range(3)] == [MAIL_OK, RCPT_OK, DATA_GO]
        client.send(SECTION)
        assert client.reply()[1] == QUEUED


@pytest.mark.parametrize(
    "xforward_reply",
    [b"250 2.0.0 XFORWARD accepted\r\n", b"550 5.7.0 XFORWARD refused\r\n"],
    ids=["accepted", "refused"],
)
def test_xforward_goes_before_each_mail_and_its_reply_is_never_relayed(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], xforward_reply: bytes
) -> None:
    upstream = make_raw_upstream(ehlo=XFORWARD_EHLO, replies={"XFORWARD": xforward_reply})
    relay = start_relay({**upstream.config, "xforward": True})

    with WireClient(relay.address()) as client:
        client_port = client.sock.getsockname()[1]
        assert client.expect(220) == b"220 upstream.test ESMTP raw recorder\r\n"
        assert b"XFORWARD" not in client.command(CLIENT_EHLO, 250)
        pipelined_transactions(client, 2)
        assert client.command(QUIT, 221) == b"221 2.0.0 Bye\r\n"
        assert client.read_to_eof() == b""

    (conn,) = upstream.wait_all_ended()
    transaction = [xforward_line(client_port), MAIL, RCPT, DATA]
    assert conn.commands == [CLIENT_EHLO, *transaction, *transaction, QUIT]
    assert conn.data == [SECTION, SECTION]
    records = relay.wait_records(lambda rs: len(rs) == 2, "transaction")
    assert [record["final_reply"]["code"] for record in records] == [250, 250]


def test_xforward_uses_each_ehlo_name(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(ehlo=XFORWARD_EHLO)
    relay = start_relay({**upstream.config, "xforward": True})

    with WireClient(relay.address()) as client:
        client_port = client.sock.getsockname()[1]
        client.expect(220)
        client.command(CLIENT_EHLO, 250)
        pipelined_transactions(client, 1)
        client.command(b"EHLO second.test\r\n", 250)
        pipelined_transactions(client, 1)
        client.command(QUIT, 221)

    (conn,) = upstream.wait_all_ended()
    sent = [line for line in conn.commands if line.startswith(b"XFORWARD ")]
    assert sent == [xforward_line(client_port), xforward_line(client_port, "second.test")]


@pytest.mark.parametrize(
    ("ehlo", "xforward"),
    [(XFORWARD_EHLO, False), (DEFAULT_EHLO, True)],
    ids=["not-configured", "not-offered"],
)
def test_no_xforward_unless_configured_and_offered(
    start_relay: StartRelay,
    make_raw_upstream: Callable[..., RawUpstream],
    ehlo: tuple[str, ...],
    xforward: bool,
) -> None:
    upstream = make_raw_upstream(ehlo=ehlo)
    relay = start_relay({**upstream.config, "xforward": xforward})

    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(CLIENT_EHLO, 250)
        pipelined_transactions(client, 2)
        client.command(QUIT, 221)

    (conn,) = upstream.wait_all_ended()
    assert conn.commands == [CLIENT_EHLO, MAIL, RCPT, DATA, MAIL, RCPT, DATA, QUIT]


def test_no_xforward_once_xclient_was_accepted(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(
        ehlo=(*XCLIENT_EHLO, "XFORWARD NAME ADDR PORT PROTO HELO"),
        replies={"XCLIENT": NEW_GREETING},
    )
    relay = start_relay({**upstream.config, "xclient": True, "xforward": True})

    with WireClient(relay.address()) as client:
        assert client.expect(220) == NEW_GREETING
        client.command(CLIENT_EHLO, 250)
        pipelined_transactions(client, 1)
        client.command(QUIT, 221)

    (conn,) = upstream.wait_all_ended()
    assert verbs(conn.commands) == XCLIENT_SESSION


# --- 9: replays under policy retry --------------------------------------------------------


def test_a_replay_goes_over_tls_to_the_next_upstream(
    start_relay: StartRelay, make_scripted: Callable[..., ScriptedTlsUpstream], pki: Pki
) -> None:
    a = make_scripted(replies={".": TEMPORARY})
    b = make_scripted()
    tls = {"mode": "starttls", "ca_file": pki.ca_file}
    relay = start_route(
        start_relay,
        {"a": smtp(a.port, tls), "b": smtp(b.port, tls)},
        policy="retry",
        retry={"attempts": 3, "budget": 20},
    )

    _, final = send_raw(relay)

    assert final == QUEUED
    (first,) = a.wait_all_ended()
    assert_over_tls(first, starttls=True)
    assert first.data == [SECTION]
    (replayed,) = b.wait_all_ended()
    assert_over_tls(replayed, starttls=True)
    assert replayed.commands[:3] == [*PREAMBLE, RELAY_EHLO]
    assert envelope_commands(replayed.commands) == [MAIL, RCPT, DATA]
    assert replayed.data == [SECTION]
    record = one_transaction(relay)
    assert (record["outcome"], record["attempts"]) == ("retried", 2)
    assert record["tls"]["upstream"].startswith("TLSv1.")


def test_a_replay_never_goes_in_plaintext_to_an_upstream_without_starttls(
    start_relay: StartRelay, make_scripted: Callable[..., ScriptedTlsUpstream], pki: Pki
) -> None:
    a = make_scripted(replies={".": TEMPORARY})
    b = make_scripted(offer_starttls=False)
    tls = {"mode": "starttls", "ca_file": pki.ca_file}
    relay = start_route(
        start_relay,
        {"a": smtp(a.port, tls), "b": smtp(b.port, tls)},
        policy="retry",
        retry={"attempts": 3, "budget": 20},
    )

    _, final = send_raw(relay)

    assert final.startswith(b"451 ")
    record = one_transaction(relay)
    assert record["outcome"] == "deferred"
    assert record["attempts"] > 1
    b_connections = b.wait_all_ended()
    for conn in b_connections:
        assert_nothing_of_the_envelope(conn)
    for conn in a.wait_all_ended():
        assert_over_tls(conn, starttls=True)


# --- The banner and the preamble ---------------------------------------------------


def test_the_banner_never_outruns_the_preamble(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    """An upstream that greets at once, without STARTTLS: every session is refused.

    Its banner must be read by the STARTTLS exchange, never relayed as the
    session's greeting, and nothing of the client's may reach it, however
    soon the banner comes (under uvloop it may be read before the
    connecting coroutine resumes).
    """
    upstream = make_raw_upstream()  # greets as soon as it accepts
    relay = start_relay({**upstream.config, "tls": {"mode": "starttls"}})

    for index in range(RACE_SESSIONS):
        with WireClient(relay.address()) as client:
            code, raw = client.reply()
            if code == 220:
                client.send(CLIENT_EHLO + MAIL + RCPT)
                raw += client.read_to_eof()
        conn = upstream.wait_all_ended(index + 1)[index]
        # The relay's EHLO, then at most its QUIT: never a client command.
        assert conn.commands in ([RELAY_EHLO], [RELAY_EHLO, b"QUIT\r\n"]), (
            f"session {index}: upstream got {conn.commands}"
        )
        assert raw.startswith(b"421 4.4.1 "), f"session {index}: client got {raw!r}"
