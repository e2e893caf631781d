"""TLS towards upstreams over real sockets: STARTTLS, implicit TLS, and how they fail.

``deliver`` runs on its own event loop in the test thread, once per loop
kind, against upstreams that serve certificates from a trustme CA: aiosmtpd
(a real implementation, refusing MAIL before STARTTLS) and a scripted
server that records on which leg each command came and can misbehave. The
listener side's contexts (``server_context`` and ``Switchable``) are checked
with handshakes of their own.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import trustme

from integration.recording_upstreams import RawUpstream
from integration.tls_upstreams import (
    AiosmtpdTlsUpstream,
    ScriptedTlsUpstream,
    Section,
    server_side,
    write_pair,
)
from smtpwarden.config import LimitsConfig, TimeoutsConfig
from smtpwarden.configtls import ListenerTls, UpstreamTls, UpstreamTlsMode
from smtpwarden.net.delivery import Attempt, Envelope, deliver
from smtpwarden.net.loop import LoopChoice, loop_factory
from smtpwarden.net.tls import (
    Switchable,
    TlsFailure,
    TlsInfo,
    client_context,
    describe,
    open_stream,
    server_context,
    server_name,
    start_tls,
    starttls_policy,
)
from smtpwarden.net.upstream import Target

T = TypeVar("T")
U = TypeVar("U", ScriptedTlsUpstream, AiosmtpdTlsUpstream)
HOSTNAME = "relay.test"
TIMEOUTS = TimeoutsConfig(
    connect=10, banner=10, mail=10, rcpt=10, data_init=10, data_block=10, data_end=10, reply=10
)
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
RCPT = b"RCPT TO:<one@example.net>\r\n"
SECTION = b"Subject: tls\r\n\r\nover TLS\r\n.\r\n"
ENVELOPE = Envelope(mail_from=MAIL, recipients=(RCPT,), body="data")
EHLO = b"EHLO relay.test\r\n"
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


Run = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture
def run(loop_kind: str) -> Run[Any]:
    """Run a coroutine to completion on a fresh loop of the test's kind."""
    factory, _ = loop_factory(cast(LoopChoice, loop_kind))

    def run_on_loop(coroutine: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coroutine)

    return run_on_loop


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", "upstream.test", common_name="upstream.test")


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return str(tmp_path / "ca.pem")


@pytest.fixture
def other_ca_file(tmp_path: Path) -> str:
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    return str(tmp_path / "other-ca.pem")


@pytest.fixture
def make_upstreams(leaf: trustme.LeafCert) -> Iterator[Callable[..., Any]]:
    """Start upstreams serving ``leaf`` (or the given context); closed after the test."""
    made: list[ScriptedTlsUpstream | AiosmtpdTlsUpstream] = []

    def make(kind: type[U], context: ssl.SSLContext | None = None, **kwargs: Any) -> U:
        upstream = kind(context or server_side(leaf), **kwargs)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


@pytest.fixture
def make_scripted(make_upstreams: Callable[..., Any]) -> Callable[..., ScriptedTlsUpstream]:
    return functools.partial(make_upstreams, ScriptedTlsUpstream)


def attempt_on(run: Run[Attempt], port: int, tls: UpstreamTls, *, build: bool = True) -> Attempt:
    """Deliver with ``tls``, and the context built from it unless ``build`` is False."""
    return run(
        deliver(
            Target(name="up", host="127.0.0.1", port=port),
            ENVELOPE,
            Section(SECTION),
            hostname=HOSTNAME,
            timeouts=TIMEOUTS,
            limits=LimitsConfig(),
            tls=tls,
            context=client_context(tls) if build else None,
        )
    )


def assert_delivered(attempt: Attempt) -> None:
    assert attempt.error is None
    assert attempt.succeeded
    assert attempt.tls is not None
    assert attempt.tls.split(" ")[0] in TLS_VERSIONS


# --- Success: verified against the trustme CA ---------------------------------


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_aiosmtpd_gets_the_message_over_tls(
    run: Run[Attempt],
    make_upstreams: Callable[..., AiosmtpdTlsUpstream],
    ca_file: str,
    implicit: bool,
) -> None:
    upstream = make_upstreams(AiosmtpdTlsUpstream, implicit=implicit)
    tls = UpstreamTls(mode="implicit" if implicit else "starttls", ca_file=ca_file)
    assert_delivered(attempt_on(run, upstream.port, tls))
    upstream.wait_for(lambda: len(upstream.received) == 1)
    (received,) = upstream.received
    assert received.tls
    assert received.rcpt_tos == ["one@example.net"]
    assert received.content == b"Subject: tls\r\n\r\nover TLS\r\n"


@pytest.mark.parametrize(
    ("mode", "required"),
    [("starttls", True), ("starttls", False), ("implicit", True)],
    ids=["starttls", "opportunistic", "implicit"],
)
def test_only_ehlo_and_starttls_go_in_plaintext(
    run: Run[Attempt],
    make_scripted: Callable[..., ScriptedTlsUpstream],
    ca_file: str,
    mode: UpstreamTlsMode,
    required: bool,
) -> None:
    upstream = make_scripted(implicit=mode == "implicit")
    tls = UpstreamTls(mode=mode, required=required, ca_file=ca_file)
    attempt = attempt_on(run, upstream.port, tls)

    assert_delivered(attempt)
    (conn,) = upstream.wait_all_ended()
    session = [EHLO, MAIL, RCPT, b"DATA\r\n", b"QUIT\r\n"]
    # RFC 3207 4.2: EHLO again once TLS is up.
    preamble = [EHLO, b"STARTTLS\r\n"] if mode == "starttls" else []
    assert conn.commands == preamble + session
    assert conn.plaintext() == preamble
    assert conn.data == [SECTION]
    assert conn.version in TLS_VERSIONS
    assert attempt.tls is not None
    assert attempt.tls.startswith(f"{conn.version} ")


def test_server_name_is_sent_as_sni_and_checked(
    run: Run[Attempt], make_scripted: Callable[..., ScriptedTlsUpstream], ca_file: str
) -> None:
    upstream = make_scripted(implicit=True)
    tls = UpstreamTls(mode="implicit", ca_file=ca_file, server_name="upstream.test")
    assert_delivered(attempt_on(run, upstream.port, tls))
    wrong = UpstreamTls(mode="implicit", ca_file=ca_file, server_name="elsewhere.test")
    refused = attempt_on(run, upstream.port, wrong)

    first, second = upstream.wait_all_ended(2)
    assert first.server_name == "upstream.test"
    assert second.version is None
    assert refused.error is not None
    assert refused.error.startswith("TLS handshake failed: certificate verify failed")
    assert "elsewhere.test" in refused.error


def test_client_certificate_is_presented(
    run: Run[Attempt],
    make_scripted: Callable[..., ScriptedTlsUpstream],
    ca: trustme.CA,
    leaf: trustme.LeafCert,
    ca_file: str,
    tmp_path: Path,
) -> None:
    context = server_side(leaf)
    context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(context)
    upstream = make_scripted(context, implicit=True)
    client = ca.issue_cert("relay.test", common_name="relay.test")
    certificate, key = write_pair(client, tmp_path, "client")
    tls = UpstreamTls(mode="implicit", ca_file=ca_file, certificate=certificate, key=key)

    assert_delivered(attempt_on(run, upstream.port, tls))
    (conn,) = upstream.wait_all_ended()
    assert (("commonName", "relay.test"),) in cast(tuple[Any, ...], conn.client_subject)


# --- Verification failures -----------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "required"),
    [("starttls", True), ("starttls", False), ("implicit", True)],
    ids=["starttls", "opportunistic", "implicit"],
)
def test_a_certificate_from_another_ca_stops_the_attempt(
    run: Run[Attempt],
    make_scripted: Callable[..., ScriptedTlsUpstream],
    other_ca_file: str,
    mode: UpstreamTlsMode,
    required: bool,
) -> None:
    implicit = mode == "implicit"
    upstream = make_scripted(implicit=implicit)
    tls = UpstreamTls(mode=mode, required=required, ca_file=other_ca_file)
    attempt = attempt_on(run, upstream.port, tls)

    assert attempt.error is not None
    assert attempt.error.startswith("TLS handshake failed: certificate verify failed")
    assert not attempt.sent
    assert attempt.mail is None
    assert attempt.tls is None
    (conn,) = upstream.wait_all_ended()
    assert conn.version is None
    # The handshake failed: nothing more, and never the envelope in plaintext,
    # not even when TLS was only opportunistic.
    assert conn.commands == ([] if implicit else [EHLO, b"STARTTLS\r\n"])


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_verify_false_accepts_any_certificate(
    run: Run[Attempt],
    make_scripted: Callable[..., ScriptedTlsUpstream],
    other_ca_file: str,
    implicit: bool,
) -> None:
    upstream = make_scripted(implicit=implicit)
    mode: UpstreamTlsMode = "implicit" if implicit else "starttls"
    tls = UpstreamTls(mode=mode, verify=False, ca_file=other_ca_file, server_name="wrong.test")

    assert_delivered(attempt_on(run, upstream.port, tls))
    (conn,) = upstream.wait_all_ended()
    assert conn.data == [SECTION]


def test_a_minimum_version_the_upstream_lacks_stops_the_attempt(
    run: Run[Attempt],
    make_scripted: Callable[..., ScriptedTlsUpstream],
    leaf: trustme.LeafCert,
    ca_file: str,
) -> None:
    context = server_side(leaf)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    upstream = make_scripted(context)
    tls = UpstreamTls(mode="starttls", ca_file=ca_file, min_version="1.3")
    attempt = attempt_on(run, upstream.port, tls)

    assert attempt.error is not None
    assert attempt.error.startswith("TLS handshake failed:")
    (conn,) = upstream.wait_all_ended()
    assert conn.commands == [EHLO, b"STARTTLS\r\n"]


# --- STARTTLS not offered or refused -----------------------------------------


@pytest.mark.parametrize("required", [True, False], ids=["required", "opportunistic"])
def test_starttls_not_offered(
    run: Run[Attempt], raw_upstream: RawUpstream, ca_file: str, required: bool
) -> None:
    tls = UpstreamTls(mode="starttls", required=required, ca_file=ca_file)
    attempt = attempt_on(run, raw_upstream.port, tls)

    assert attempt.connected
    assert attempt.tls is None
    (conn,) = raw_upstream.wait_all_ended()
    if required:
        assert attempt.error == "upstream does not offer STARTTLS"
        assert not attempt.sent
        assert conn.commands == [EHLO, b"QUIT\r\n"]  # polite, and nothing of the envelope
        assert conn.data == []
    else:  # plaintext, and the EHLO already made serves the session
        assert attempt.error is None
        assert attempt.succeeded
        assert conn.commands == [EHLO, MAIL, RCPT, b"DATA\r\n", b"QUIT\r\n"]
        assert conn.data == [SECTION]


@pytest.mark.parametrize("required", [True, False], ids=["required", "opportunistic"])
def test_starttls_refused(
    run: Run[Attempt],
    make_scripted: Callable[..., ScriptedTlsUpstream],
    ca_file: str,
    required: bool,
) -> None:
    upstream = make_scripted(starttls_reply=b"454 4.7.0 TLS not available\r\n")
    tls = UpstreamTls(mode="starttls", required=required, ca_file=ca_file)
    attempt = attempt_on(run, upstream.port, tls)

    (conn,) = upstream.wait_all_ended()
    assert conn.version is None
    assert attempt.tls is None
    if required:
        assert attempt.error == "STARTTLS refused: 454 4.7.0 TLS not available"
        assert conn.commands == [EHLO, b"STARTTLS\r\n", b"QUIT\r\n"]
    else:  # on in plaintext, with the EHLO already made
        assert attempt.error is None
        assert attempt.succeeded
        assert conn.commands == [EHLO, b"STARTTLS\r\n", MAIL, RCPT, b"DATA\r\n", b"QUIT\r\n"]


# --- STARTTLS injection --------------------------------------------------------


def test_octets_after_the_220_to_starttls_stop_the_attempt(
    run: Run[Attempt], make_scripted: Callable[..., ScriptedTlsUpstream], ca_file: str
) -> None:
    upstream = make_scripted(after_starttls=b"250-injected\r\n250 PIPELINING\r\n")
    attempt = attempt_on(run, upstream.port, UpstreamTls(mode="starttls", ca_file=ca_file))

    assert attempt.error == (
        "upstream sent data after its 220 to STARTTLS, before the TLS handshake"
    )
    assert attempt.tls is None
    assert attempt.mail is None
    (conn,) = upstream.wait_all_ended()
    assert conn.commands == [EHLO, b"STARTTLS\r\n"]  # aborted: not even QUIT
    assert conn.version is None


def test_start_tls_refuses_octets_left_in_the_stream_buffer(
    run: Run[None], make_scripted: Callable[..., ScriptedTlsUpstream], ca_file: str
) -> None:
    upstream = make_scripted()
    context = client_context(UpstreamTls(mode="starttls", ca_file=ca_file))
    assert context is not None

    async def scenario() -> None:
        reader, writer = await open_stream("127.0.0.1", upstream.port)
        banner = await reader.read(1024)
        assert banner.startswith(b"220 ")
        assert reader.unread == 0
        # As if the upstream's next octets had arrived after the last read.
        reader.feed_data(b"250 injected\r\n")
        with pytest.raises(TlsFailure, match="after its 220 to STARTTLS"):
            await start_tls(reader, writer, context, server_hostname="127.0.0.1")
        assert describe(writer) is None
        writer.transport.abort()

    run(scenario())
    (conn,) = upstream.wait_all_ended()
    assert conn.commands == []


# --- Settings -------------------------------------------------------------------


def test_tls_without_a_context_is_a_bug(run: Run[Attempt], raw_upstream: RawUpstream) -> None:
    with pytest.raises(ValueError, match="needs a client context"):
        attempt_on(run, raw_upstream.port, UpstreamTls(mode="starttls"), build=False)
    assert raw_upstream.connections == []


def test_client_context_follows_the_settings(ca_file: str) -> None:
    assert client_context(UpstreamTls()) is None
    made = [
        client_context(UpstreamTls(mode="starttls", ca_file=ca_file, min_version="1.3")),
        client_context(UpstreamTls(mode="implicit", verify=False)),
    ]
    seen = [(c.verify_mode, c.check_hostname, c.minimum_version) for c in made if c is not None]
    assert seen == [
        (ssl.CERT_REQUIRED, True, ssl.TLSVersion.TLSv1_3),
        (ssl.CERT_NONE, False, ssl.TLSVersion.TLSv1_2),
    ]


def test_server_name_and_starttls_policy() -> None:
    up = Target(name="up", host="mx.example.net", port=25)
    assert server_name(up, UpstreamTls(mode="starttls")) == "mx.example.net"
    assert server_name(up, UpstreamTls(mode="starttls", server_name="smtp.test")) == "smtp.test"
    settings = [None, UpstreamTls(), UpstreamTls(mode="implicit"), UpstreamTls(mode="starttls")]
    policies = [starttls_policy(tls) for tls in settings]
    assert policies == ["none", "none", "none", "required"]
    assert starttls_policy(UpstreamTls(mode="starttls", required=False)) == "opportunistic"


# --- The listener side: server_context and Switchable -----------------------------


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()
    writer.close()


async def handshake(
    port: int, client: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, TlsInfo | None]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
    )
    return reader, writer, describe(writer)


def test_a_switchable_context_changes_new_handshakes_only(
    run: Run[None], ca: trustme.CA, ca_file: str, tmp_path: Path
) -> None:
    first = write_pair(ca.issue_cert("127.0.0.1", common_name="first.test"), tmp_path, "first")
    # Another key type: loaded into the same context, it would sit beside the
    # first, and a client that takes either would still be given the first.
    rsa = ca.issue_cert("127.0.0.1", common_name="second.test", key_type=trustme.KeyType.RSA)
    second = write_pair(rsa, tmp_path, "second")
    switchable = Switchable(ListenerTls(certificate=first[0], key=first[1], mode="implicit"))
    client = client_context(UpstreamTls(mode="implicit", ca_file=ca_file))
    assert client is not None

    async def scenario() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=switchable.front)
        port = server.sockets[0].getsockname()[1]
        reader, writer, before = await handshake(port, client)
        switchable.current = server_context(ListenerTls(certificate=second[0], key=second[1]))
        _, late, after = await handshake(port, client)
        # A pair that does not match cannot be built: the current one stays.
        with pytest.raises(ssl.SSLError):
            server_context(ListenerTls(certificate=first[0], key=second[1]))
        _, last, still = await handshake(port, client)
        writer.write(b"still here\r\n")
        assert await reader.readline() == b"still here\r\n"  # the live session goes on
        for each in (writer, late, last):
            each.close()
        server.close()
        await server.wait_closed()
        peers = [info.peer if info else None for info in (before, after, still)]
        assert peers == ["CN=first.test", "CN=second.test", "CN=second.test"]

    run(scenario())


def test_describe_gives_the_subject_without_a_common_name(
    run: Run[list[TlsInfo | None]], ca: trustme.CA, ca_file: str, tmp_path: Path
) -> None:
    leaf = ca.issue_cert("127.0.0.1", organization_name="Example Org", organization_unit_name="MX")
    certificate, key = write_pair(leaf, tmp_path, "nocn")
    context = server_context(ListenerTls(certificate=certificate, key=key, min_version="1.3"))
    clients = [
        client_context(UpstreamTls(mode="implicit", ca_file=ca_file)),
        client_context(UpstreamTls(mode="implicit", verify=False)),
    ]

    async def scenario() -> list[TlsInfo | None]:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        seen = []
        for client in clients:
            assert client is not None
            _, writer, info = await handshake(port, client)
            seen.append(info)
            writer.close()
        server.close()
        await server.wait_closed()
        return seen

    verified, unverified = run(scenario())
    assert verified is not None
    assert verified.version == "TLSv1.3"
    assert verified.summary == str(verified) == f"TLSv1.3 {verified.cipher}"
    assert verified.peer == "OU=MX,O=Example Org"
    assert unverified is not None
    assert unverified.peer is None  # not verified: nothing to vouch for
