"""Routes by recipient domain, taken-over recipients, and contradictory 250s.

Scripted upstreams: "a" is the one every session connects to; the routes'
other upstreams say where replays went.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import RunningRelay, StartRelay, WireClient
from smtpwarden.spool.model import EntryState
from smtpwarden.spool.store import Spool

MESSAGE = b"Subject: routes\r\n\r\nbody\r\n"
FAILS = b"451 4.3.0 Temporary local problem\r\n"


def _upstreams(**servers: RawUpstream) -> list[dict[str, object]]:
    return [{"name": name, **server.config} for name, server in servers.items()]


def _relay(
    start_relay: StartRelay,
    a: RawUpstream,
    tmp_path: Path,
    upstreams: list[dict[str, object]],
    routes: list[dict[str, object]],
    **retry: object,
) -> RunningRelay:
    extra = {
        "upstreams": upstreams,
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "a"}],
        "routes": routes,
        "retry": {"attempts": 2, "budget": 20, **retry},
        "spool": {"path": str(tmp_path / "spool")},
    }
    return start_relay(a.config, extra=extra)


def _send(client: WireClient, *recipients: bytes) -> tuple[list[int], int]:
    """One transaction; the RCPT reply codes and the code that ends it."""
    client.command(b"MAIL FROM:<sender@example.org>\r\n", 250)
    codes = []
    for rcpt in recipients:
        client.send(b"RCPT TO:<" + rcpt + b">\r\n")
        codes.append(client.reply()[0])
    if 250 not in codes:
        client.command(b"RSET\r\n", 250)
        return codes, 0
    client.command(b"DATA\r\n", 354)
    client.send(MESSAGE + b".\r\n")
    return codes, client.reply()[0]


def _transactions(relay: RunningRelay, count: int) -> list[dict[str, Any]]:
    return relay.wait_records(lambda rs: len(rs) == count, "transaction")


def test_a_domain_route_chooses_policy_and_replay_upstreams(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], tmp_path: Path
) -> None:
    a = make_raw_upstream(replies={".": FAILS})
    b = make_raw_upstream()
    c = make_raw_upstream()
    routes: list[dict[str, object]] = [
        {"name": "main", "policy": "passthrough", "upstreams": ["a", "b"]},
        {
            "name": "partners",
            "recipient_domains": ["example.net", ".partner.test"],
            "policy": "retry",
            "upstreams": ["a", "c"],
        },
    ]
    relay = _relay(start_relay, a, tmp_path, _upstreams(a=a, b=b, c=c), routes)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        # The listener's route: passthrough, the upstream's 4xx relayed.
        assert _send(client, b"x@example.org") == ([250], 451)
        # A domain route: retry, replayed on its own next upstream.
        assert _send(client, b"x@example.net") == ([250], 250)
        assert _send(client, b"y@mx.Partner.TEST") == ([250], 250)
        client.command(b"QUIT\r\n", 221)
    records = _transactions(relay, 3)
    assert [record["outcome"] for record in records] == ["deferred", "retried", "retried"]
    replays = c.wait_all_ended(2)
    assert [conn.data for conn in replays] == [[MESSAGE + b".\r\n"]] * 2
    assert b.connections == []


def test_a_recipient_of_another_route_waits_for_another_transaction(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], tmp_path: Path
) -> None:
    a = make_raw_upstream()
    routes: list[dict[str, object]] = [
        {"name": "main", "policy": "passthrough", "upstreams": ["a"]},
        {
            "name": "guarded",
            "recipient_domains": ["example.net"],
            "policy": "retry",
            "upstreams": ["a"],
        },
    ]
    relay = _relay(start_relay, a, tmp_path, _upstreams(a=a), routes)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        client.command(b"MAIL FROM:<sender@example.org>\r\n", 250)
        client.command(b"RCPT TO:<one@example.net>\r\n", 250)
        refused = client.command(b"RCPT TO:<two@example.org>\r\n", 452)
        assert refused.startswith(b"452 4.5.3 ")
        client.command(b"RCPT TO:<three@EXAMPLE.net>\r\n", 250)
        client.command(b"DATA\r\n", 354)
        client.send(MESSAGE + b".\r\n")
        client.expect(250)
        # The client sends the refused recipient in its own transaction.
        assert _send(client, b"two@example.org") == ([250], 250)
        client.command(b"QUIT\r\n", 221)
    first, second = _transactions(relay, 2)
    assert [rcpt["address"] for rcpt in first["recipients"]] == [
        "one@example.net",
        "three@EXAMPLE.net",
    ]
    assert [step["code"] for step in first["timeline"] if step["local"]] == [452]
    assert [rcpt["address"] for rcpt in second["recipients"]] == ["two@example.org"]
    (conn,) = a.wait_all_ended()
    rcpts = [line for line in conn.commands if line.startswith(b"RCPT")]
    assert rcpts == [
        b"RCPT TO:<one@example.net>\r\n",
        b"RCPT TO:<three@EXAMPLE.net>\r\n",
        b"RCPT TO:<two@example.org>\r\n",
    ]


def _take_over_relay(
    start_relay: StartRelay, a: RawUpstream, tmp_path: Path, *, enabled: bool
) -> RunningRelay:
    routes: list[dict[str, object]] = [{"name": "main", "policy": "requeue", "upstreams": ["a"]}]
    return _relay(start_relay, a, tmp_path, _upstreams(a=a), routes, take_over_partial=enabled)


def test_requeue_takes_over_recipients_that_got_a_4xx(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], tmp_path: Path
) -> None:
    busy = b"451 4.2.1 Mailbox busy, try later\r\n"
    a = make_raw_upstream(replies={"RCPT <busy@example.net>": busy})
    relay = _take_over_relay(start_relay, a, tmp_path, enabled=True)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        # No recipient accepted yet: the 4xx is relayed, the client keeps it.
        assert _send(client, b"busy@example.net") == ([451], 0)
        codes, end = _send(client, b"ok@example.net", b"busy@example.net", b"two@example.net")
        assert (codes, end) == ([250, 250, 250], 250)
        client.command(b"QUIT\r\n", 221)
    records = _transactions(relay, 2)
    record = records[1]
    assert record["taken_over"] == ["busy@example.net"]
    assert record["outcome"] == "requeued"
    assert [rcpt["reply"]["code"] for rcpt in record["recipients"]] == [250, 451, 250]
    assert records[0]["taken_over"] == []
    # The upstream got the message for the others; the spool holds it for
    # the taken-over recipient alone.
    (conn,) = a.wait_all_ended()
    assert conn.data == [MESSAGE + b".\r\n"]
    relay.stop()
    with Spool(tmp_path / "spool") as spool:
        (entry,) = spool.entries()
        assert entry.state is EntryState.QUEUED
        assert [rcpt.address for rcpt in entry.recipients] == ["busy@example.net"]
        with spool.open_message(entry.queue_id) as message:
            assert message.read() == MESSAGE + b".\r\n"


def test_without_take_over_the_client_sees_the_4xx(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], tmp_path: Path
) -> None:
    busy = b"451 4.2.1 Mailbox busy, try later\r\n"
    a = make_raw_upstream(replies={"RCPT <busy@example.net>": busy})
    relay = _take_over_relay(start_relay, a, tmp_path, enabled=False)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        assert _send(client, b"ok@example.net", b"busy@example.net") == ([250, 451], 250)
        client.command(b"QUIT\r\n", 221)
    (record,) = _transactions(relay, 1)
    assert record["taken_over"] == []
    assert record["outcome"] == "delivered"
    assert record["diagnosis"]["pattern"] == "partial_recipients"
    relay.stop()
    with Spool(tmp_path / "spool") as spool:
        assert list(spool.entries()) == []


def test_taken_over_recipients_and_a_failed_message_are_spooled_together(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream], tmp_path: Path
) -> None:
    busy = b"451 4.2.1 Mailbox busy, try later\r\n"
    a = make_raw_upstream(replies={"RCPT <busy@example.net>": busy, ".": FAILS})
    relay = _take_over_relay(start_relay, a, tmp_path, enabled=True)
    with WireClient(relay.address()) as client:
        client.expect(220)
        client.command(b"EHLO client.test\r\n", 250)
        assert _send(client, b"ok@example.net", b"busy@example.net") == ([250, 250], 250)
        client.command(b"QUIT\r\n", 221)
    (record,) = _transactions(relay, 1)
    assert record["outcome"] == "requeued"
    relay.stop()
    with Spool(tmp_path / "spool") as spool:
        (entry,) = spool.entries()
        assert [rcpt.address for rcpt in entry.recipients] == [
            "ok@example.net",
            "busy@example.net",
        ]
