"""The PROXY protocol: HAProxy in front of the relay, and raw headers on the wire.

A listener with ``proxy_protocol`` takes connections only from its trusted
networks, and only with a PROXY v1 or v2 header first; the address in the
header is the client's from then on: in the records, in ``allow``, in the
per-address limits, and in XCLIENT or XFORWARD towards the upstream.
Anything else is closed without a byte in reply, and the relay goes on
serving the next connection.

Clients bind their own source address inside 127.0.0.0/8 (every such
address reaches the loopback interface on Linux), so that the address HAProxy
reports differs from the one the relay's socket sees (127.0.0.1).
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.haproxy import SEND_PROXY, HAProxy
from integration.postfix_instance import PostfixInstance
from integration.recording_upstreams import AiosmtpdUpstream, RawUpstream
from integration.relay_harness import (
    LISTENER,
    UPSTREAM,
    WAIT_S,
    RunningRelay,
    StartRelay,
    WireClient,
)
from smtpwarden.protocol.proxy import V2_SIGNATURE, encode_v1, encode_v2

TRUSTED = "127.0.0.1"  # where HAProxy and the raw-header clients connect from
CLIENT = "127.0.0.5"  # the client as HAProxy or the header reports it
OTHER_CLIENT = "127.0.0.6"
UNTRUSTED = "127.0.0.9"
STILL_SERVING_PORT = 45454  # the header port of the session that shows the relay goes on
SENDER = "sender@example.org"
RECIPIENT = "rcpt@example.net"
MESSAGE = (
    f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: behind a proxy\r\n\r\nHello through PROXY.\r\n"
)
QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")
XCLIENT_EHLO = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "XCLIENT NAME ADDR PORT")
XCLIENT_GREETING = b"220 upstream.test ESMTP after XCLIENT\r\n"
XCLIENT_REPLIES = {"XCLIENT": XCLIENT_GREETING}
XCLIENT_SESSIONS = 100
XFORWARD_EHLO = ("PIPELINING", "8BITMIME", "XFORWARD NAME ADDR PORT PROTO HELO")
XFORWARD_REPLIES = {"XFORWARD": b"250 2.0.0 Ok\r\n"}


def proxy_listener(**keys: Any) -> dict[str, Any]:
    """The relay's listener, taking PROXY headers from 127.0.0.1 only."""
    return {
        "name": LISTENER,
        "host": "127.0.0.1",
        "port": 0,
        "upstream": UPSTREAM,
        "proxy_protocol": {"trusted": [f"{TRUSTED}/32"]},
        **keys,
    }


def proxy_relay(
    start_relay: StartRelay,
    upstream: dict[str, object],
    *,
    limits: dict[str, object] | None = None,
    **listener: Any,
) -> RunningRelay:
    return start_relay(upstream, limits=limits, extra={"listeners": [proxy_listener(**listener)]})


def header(version: int, source: str, port: int = 40000) -> bytes:
    """A PROXY header saying that ``source``:``port`` connected to the relay."""
    destination = ("127.0.0.1", 25)
    if version == 1:
        return encode_v1((source, port), destination)
    return encode_v2((source, port), destination)


class SourcedClient(WireClient):
    """A ``WireClient`` whose socket is bound to a chosen loopback address."""

    def __init__(self, address: tuple[str, int], source: str, timeout: float = WAIT_S) -> None:
        self.sock = socket.create_connection(address, timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = b""


def send_message(client: WireClient) -> bytes:
    """After the banner: one message and QUIT; return the reply to the end of data."""
    client.start_transaction()
    client.command(b"DATA\r\n", 354)
    queued = client.command(MESSAGE.encode("ascii") + b".\r\n", 250)
    client.command(b"QUIT\r\n", 221)
    return queued


def sessions_from(relay: RunningRelay, address: str, count: int = 1) -> list[dict[str, Any]]:
    """Wait for ``count`` session records of the client ``address``; return them."""

    def mine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [record for record in records if record["client"]["address"] == address]

    return mine(relay.wait_records(lambda rs: len(mine(rs)) >= count, "session"))


def assert_refused_silently(client: WireClient) -> None:
    """The relay closed the connection without sending a single octet."""
    assert client.read_to_eof() == b""


def assert_still_serving(relay: RunningRelay, upstream: RawUpstream, source: str) -> None:
    """The relay is up and relays a whole message for a good PROXY connection."""
    assert relay.is_alive
    delivered = sum(len(conn.data) for conn in upstream.connections)
    with WireClient(relay.address()) as client:
        client.send(header(2, source, STILL_SERVING_PORT))
        send_message(client)
    upstream.wait_for(lambda conns: sum(len(conn.data) for conn in conns) == delivered + 1)
    peer = {"address": source, "port": STILL_SERVING_PORT}
    records = relay.wait_records(
        lambda rs: any(record["client"] == peer for record in rs), "session"
    )
    (session,) = [record for record in records if record["client"] == peer]
    assert session["end"] == "quit"
    assert session["transactions"] == 1


@pytest.fixture
def make_haproxy(start_relay: StartRelay, tmp_path: Path) -> Iterator[Callable[..., HAProxy]]:
    """Start HAProxy in front of a relay; each is stopped before the relays are.

    Depending on ``start_relay`` makes this fixture's teardown run first.
    """
    made: list[HAProxy] = []

    def make(relay: RunningRelay, send_proxy: str) -> HAProxy:
        proxy = HAProxy(tmp_path / f"haproxy-{len(made)}", relay.address(), send_proxy=send_proxy)
        made.append(proxy)
        proxy.start()
        return proxy

    yield make
    for proxy in made:
        proxy.stop()


def smtplib_from(proxy: HAProxy, source: str) -> smtplib.SMTP:
    host, port = proxy.address
    return smtplib.SMTP(host, port, timeout=WAIT_S, source_address=(source, 0))


def local_port(client: smtplib.SMTP) -> int:
    """The port smtplib's connection came from."""
    assert client.sock is not None
    port: int = client.sock.getsockname()[1]
    return port


# --- HAProxy in front of the relay -------------------------------------------


@pytest.mark.parametrize("send_proxy", SEND_PROXY)
def test_haproxy_client_address_reaches_records_and_xclient(
    make_raw_upstream: Callable[..., RawUpstream],
    start_relay: StartRelay,
    make_haproxy: Callable[..., HAProxy],
    send_proxy: str,
) -> None:
    upstream = make_raw_upstream(ehlo=XCLIENT_EHLO, replies=XCLIENT_REPLIES)
    relay = proxy_relay(start_relay, {**upstream.config, "xclient": True})
    proxy = make_haproxy(relay, send_proxy)
    with smtplib_from(proxy, CLIENT) as client:
        client_port = local_port(client)
        assert client.ehlo("client.test")[0] == 250
        assert client.sendmail(SENDER, [RECIPIENT], MESSAGE) == {}

    (session,) = sessions_from(relay, CLIENT)
    assert session["client"] == {"address": CLIENT, "port": client_port}
    assert session["end"] == "quit"
    assert session["transactions"] == 1
    (transaction,) = relay.records("transaction")
    assert transaction["client"] == {"address": CLIENT, "port": client_port}
    assert transaction["outcome"] == "delivered"

    xclient = f"XCLIENT ADDR={CLIENT} PORT={client_port} NAME=[UNAVAILABLE]\r\n".encode()
    upstream.wait_for(lambda conns: any(xclient in conn.commands and conn.ended for conn in conns))
    (conn,) = [conn for conn in upstream.connections if xclient in conn.commands]
    assert conn.commands[1] == xclient  # right after the relay's own EHLO
    assert len(conn.data) == 1
    assert conn.data[0].endswith(b"\r\n\r\nHello through PROXY.\r\n.\r\n")
    assert relay.is_alive


@pytest.mark.parametrize("send_proxy", SEND_PROXY)
def test_haproxy_message_delivered_to_aiosmtpd(
    aiosmtpd_upstream: AiosmtpdUpstream,
    start_relay: StartRelay,
    make_haproxy: Callable[..., HAProxy],
    send_proxy: str,
) -> None:
    relay = proxy_relay(start_relay, aiosmtpd_upstream.config)
    proxy = make_haproxy(relay, send_proxy)
    with smtplib_from(proxy, CLIENT) as client:
        client_port = local_port(client)
        assert client.sendmail(SENDER, [RECIPIENT], MESSAGE) == {}

    aiosmtpd_upstream.wait_for(lambda: len(aiosmtpd_upstream.deliveries) == 1)
    (delivery,) = aiosmtpd_upstream.deliveries
    assert delivery.mail_from == SENDER
    assert delivery.rcpt_tos == [RECIPIENT]
    assert delivery.content.endswith(b"\r\n\r\nHello through PROXY.\r\n")
    (session,) = sessions_from(relay, CLIENT)
    assert session["client"] == {"address": CLIENT, "port": client_port}
    # HAProxy's own readiness probe came from 127.0.0.1 and is logged as such.
    probes = sessions_from(relay, TRUSTED)
    assert probes
    assert all(record["transactions"] == 0 for record in probes)


# --- HAProxy, the relay and a real Postfix --------------------------------------


def postfix_chain(
    postfix: PostfixInstance,
    start_relay: StartRelay,
    make_haproxy: Callable[..., HAProxy],
    send_proxy: str,
    **upstream: object,
) -> str:
    """Send one message through HAProxy and the relay to Postfix; return its queue id."""
    relay = proxy_relay(start_relay, {**postfix.config, **upstream})
    proxy = make_haproxy(relay, send_proxy)
    with smtplib_from(proxy, CLIENT) as client:
        client_port = local_port(client)
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        code, reply = client.data(MESSAGE)
        assert code == 250, reply
    found = QUEUED.search(reply.decode("ascii", "replace"))
    assert found is not None, reply
    (session,) = sessions_from(relay, CLIENT)
    assert session["client"] == {"address": CLIENT, "port": client_port}
    return found.group(1)


@pytest.mark.postfix
@pytest.mark.parametrize("send_proxy", SEND_PROXY)
def test_postfix_logs_the_original_client_by_xclient(
    postfix_upstream: PostfixInstance,
    aiosmtpd_upstream: AiosmtpdUpstream,
    start_relay: StartRelay,
    make_haproxy: Callable[..., HAProxy],
    send_proxy: str,
) -> None:
    queue_id = postfix_chain(postfix_upstream, start_relay, make_haproxy, send_proxy, xclient=True)
    # "client=" names the XCLIENT address alone; Postfix's session ends under it.
    logged = postfix_upstream.wait_log(rf"{queue_id}: client=(.*)\n")
    assert logged.group(1) == f"unknown[{CLIENT}]"
    postfix_upstream.wait_log(rf"disconnect from unknown\[{re.escape(CLIENT)}\] ehlo=")
    postfix_upstream.wait_log(rf"{queue_id}: to=<{re.escape(RECIPIENT)}>, .*status=sent")
    aiosmtpd_upstream.wait_for(lambda: len(aiosmtpd_upstream.deliveries) == 1)
    (delivery,) = aiosmtpd_upstream.deliveries
    assert f"(unknown [{CLIENT}])".encode() in delivery.content


@pytest.mark.postfix
@pytest.mark.parametrize("send_proxy", SEND_PROXY)
def test_postfix_logs_the_original_client_by_xforward(
    postfix_upstream: PostfixInstance,
    aiosmtpd_upstream: AiosmtpdUpstream,
    start_relay: StartRelay,
    make_haproxy: Callable[..., HAProxy],
    send_proxy: str,
) -> None:
    queue_id = postfix_chain(
        postfix_upstream, start_relay, make_haproxy, send_proxy, xclient=False, xforward=True
    )
    # XFORWARD leaves the connection's own client in place and adds the original.
    logged = postfix_upstream.wait_log(rf"{queue_id}: client=(.*)\n")
    assert logged.group(1) == f"unknown[{TRUSTED}], orig_client=unknown[{CLIENT}]"
    disconnect = postfix_upstream.wait_log(
        rf"disconnect from unknown\[{re.escape(TRUSTED)}\] ehlo=1 xforward=1 mail=1 .*\n"
    )
    assert "xclient" not in disconnect.group(0)
    postfix_upstream.wait_log(rf"{queue_id}: to=<{re.escape(RECIPIENT)}>, .*status=sent")
    aiosmtpd_upstream.wait_for(lambda: len(aiosmtpd_upstream.deliveries) == 1)
    (delivery,) = aiosmtpd_upstream.deliveries
    assert delivery.rcpt_tos == [RECIPIENT]
    assert delivery.content.endswith(b"\r\n\r\nHello through PROXY.\r\n")


# --- Raw headers from the test: what is refused, and what is accepted -----------


def test_an_untrusted_source_is_closed_without_a_reply(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = proxy_relay(start_relay, raw_upstream.config)
    with SourcedClient(relay.address(), UNTRUSTED) as client:
        # The relay may already have closed: what it sends back is what counts.
        with contextlib.suppress(ConnectionError):
            client.send(header(1, CLIENT))
        assert_refused_silently(client)
    (session,) = sessions_from(relay, UNTRUSTED)
    assert session["end"] == "proxy_untrusted"
    assert session["banner"] is None
    assert raw_upstream.connections == []
    assert_still_serving(relay, raw_upstream, CLIENT)


MALFORMED = {
    "v1-bad-port": b"PROXY TCP4 127.0.0.5 127.0.0.1 99999 25\r\n",
    "v1-family-mismatch": b"PROXY TCP6 127.0.0.5 127.0.0.1 40000 25\r\n",
    "v1-no-line-end": b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 25" + b" " * 80,
    "v1-lf-only": b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 25\n",
    "v2-version-3": V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),
    "v2-udp": V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),
    "v2-short-address-block": V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),
    "http": b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_header_is_closed_without_a_reply(
    start_relay: StartRelay, raw_upstream: RawUpstream, data: bytes
) -> None:
    relay = proxy_relay(start_relay, raw_upstream.config)
    with WireClient(relay.address()) as client:
        client.send(data)
        assert_refused_silently(client)
    (session,) = sessions_from(relay, TRUSTED)
    assert session["end"] == "proxy_error"
    assert session["banner"] is None
    assert raw_upstream.connections == []
    assert_still_serving(relay, raw_upstream, CLIENT)


def test_smtp_without_a_header_is_closed_without_a_reply(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = proxy_relay(start_relay, raw_upstream.config)
    with WireClient(relay.address()) as client:
        client.send(b"EHLO client.test\r\n")
        assert_refused_silently(client)
    (session,) = sessions_from(relay, TRUSTED)
    assert session["end"] == "proxy_error"
    assert session["helo"] is None
    assert raw_upstream.connections == []
    assert_still_serving(relay, raw_upstream, CLIENT)


def test_a_v2_local_header_keeps_the_socket_address(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = proxy_relay(start_relay, raw_upstream.config)
    # A LOCAL header's addresses are ignored, whatever they say.
    local = encode_v2((CLIENT, 40000), ("127.0.0.1", 25), local=True)
    with WireClient(relay.address()) as client:
        own_port = client.sock.getsockname()[1]
        client.send(local)
        send_message(client)
    (session,) = sessions_from(relay, TRUSTED)
    assert session["client"] == {"address": TRUSTED, "port": own_port}
    assert session["end"] == "quit"
    (transaction,) = relay.records("transaction")
    assert transaction["client"] == {"address": TRUSTED, "port": own_port}
    assert transaction["outcome"] == "delivered"
    assert sessions_from(relay, CLIENT, count=0) == []


@pytest.mark.parametrize("version", [1, 2])
def test_a_header_split_across_sends(
    start_relay: StartRelay, raw_upstream: RawUpstream, version: int
) -> None:
    relay = proxy_relay(start_relay, raw_upstream.config)
    data = header(version, CLIENT, 41414)
    with WireClient(relay.address()) as client:
        for octet in data:
            client.send(bytes([octet]))
        send_message(client)
    (session,) = sessions_from(relay, CLIENT)
    assert session["client"] == {"address": CLIENT, "port": 41414}
    assert session["end"] == "quit"
    assert session["transactions"] == 1
    (conn,) = raw_upstream.wait_all_ended()
    assert len(conn.data) == 1
    # Nothing of the header reaches the upstream.
    assert not any(b"PROXY" in line or V2_SIGNATURE in line for line in conn.commands)


def test_allow_applies_to_the_header_source(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    # The socket address (127.0.0.1) is not allowed; only the header counts.
    relay = proxy_relay(start_relay, raw_upstream.config, allow=[f"{CLIENT}/32"])
    with WireClient(relay.address()) as client:
        client.send(header(1, OTHER_CLIENT))
        assert client.expect(554).startswith(b"554 5.7.1 ")
        assert client.read_to_eof() == b""
    (denied,) = sessions_from(relay, OTHER_CLIENT)
    assert denied["end"] == "access_denied"
    assert raw_upstream.connections == []
    assert_still_serving(relay, raw_upstream, CLIENT)


def test_per_client_limit_counts_the_header_source(
    start_relay: StartRelay, raw_upstream: RawUpstream
) -> None:
    relay = proxy_relay(start_relay, raw_upstream.config, limits={"max_connections_per_client": 1})
    with WireClient(relay.address()) as first, WireClient(relay.address()) as other:
        first.send(header(1, CLIENT, 40001))
        first.expect(220)
        # Same socket address, another header source: a client of its own.
        other.send(header(2, OTHER_CLIENT, 40002))
        other.expect(220)
        with WireClient(relay.address()) as second:
            second.send(header(2, CLIENT, 40003))
            assert second.expect(421).startswith(b"421 4.7.0 ")
            assert second.read_to_eof() == b""
        (limited,) = sessions_from(relay, CLIENT)
        assert limited["end"] == "client_connection_limit"
        assert limited["client"] == {"address": CLIENT, "port": 40003}
        other.command(b"EHLO other.test\r\n", 250)
        other.command(b"QUIT\r\n", 221)
        first.command(b"QUIT\r\n", 221)
    ends = sorted(record["end"] for record in sessions_from(relay, CLIENT, count=2))
    assert ends == ["client_connection_limit", "quit"]
    (other_session,) = sessions_from(relay, OTHER_CLIENT)
    assert other_session["end"] == "quit"
    # Once the first is gone its address may come again.
    assert_still_serving(relay, raw_upstream, CLIENT)


def test_xforward_carries_the_header_source(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(ehlo=XFORWARD_EHLO, replies=XFORWARD_REPLIES)
    relay = proxy_relay(start_relay, {**upstream.config, "xforward": True})
    with WireClient(relay.address()) as client:
        client.send(header(1, CLIENT, 41515))
        send_message(client)
    (conn,) = upstream.wait_all_ended()
    xforward = [line for line in conn.commands if line.startswith(b"XFORWARD ")]
    expected = f"XFORWARD ADDR={CLIENT} PORT=41515 NAME=[UNAVAILABLE] HELO=client.test"
    assert xforward == [expected.encode() + b" PROTO=ESMTP\r\n"]
    verbs = [line.split()[0] for line in conn.commands]
    assert verbs.index(b"XFORWARD") == verbs.index(b"MAIL") - 1


def test_every_session_gets_xclient_with_its_header_source(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    """Each session's greeting is the 220 to XCLIENT, never the upstream's own banner."""
    upstream = make_raw_upstream(ehlo=XCLIENT_EHLO, replies=XCLIENT_REPLIES)
    relay = proxy_relay(start_relay, {**upstream.config, "xclient": True})
    greetings = []
    for index in range(XCLIENT_SESSIONS):
        with WireClient(relay.address()) as client:
            client.send(header(1 + index % 2, CLIENT, 42000 + index))
            greetings.append(client.reply()[1])
            client.send(b"QUIT\r\n")
            client.read_to_eof()
    wrong = [(index, got) for index, got in enumerate(greetings) if got != XCLIENT_GREETING]
    assert wrong == [], f"{len(wrong)} of {XCLIENT_SESSIONS} sessions greeted without XCLIENT"
    conns = upstream.wait_all_ended(XCLIENT_SESSIONS)
    assert sorted(conn.commands[1] for conn in conns) == sorted(
        f"XCLIENT ADDR={CLIENT} PORT={42000 + index} NAME=[UNAVAILABLE]\r\n".encode()
        for index in range(XCLIENT_SESSIONS)
    )
    ends = [record["end"] for record in sessions_from(relay, CLIENT, XCLIENT_SESSIONS)]
    assert ends == ["quit"] * XCLIENT_SESSIONS
