"""Upstream failover and health: the route's next upstream when one is down."""

from __future__ import annotations

from collections.abc import Callable

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import StartRelay, WireClient, free_port


def test_sessions_fail_over_and_a_failing_upstream_is_marked_down(
    start_relay: StartRelay, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    dead = {"kind": "smtp", "host": "127.0.0.1", "port": free_port()}
    b = make_raw_upstream()
    extra = {
        "upstreams": [{"name": "a", **dead}, {"name": "b", **b.config}],
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "a"}],
        "routes": [{"name": "main", "policy": "passthrough", "upstreams": ["a", "b"]}],
        "health": {"failures": 2, "cooldown": 60},
    }
    relay = start_relay(dead, extra=extra)
    for _ in range(4):
        with WireClient(relay.address()) as client:
            client.start_transaction()
            client.command(b"QUIT\r\n", 221)
    sessions = relay.wait_records(lambda rs: len(rs) == 4, "session")
    assert [s["upstream"]["name"] for s in sessions] == ["b"] * 4
    assert len(b.wait_all_ended(4)) == 4
    assert relay.relay is not None
    assert relay.call(lambda: relay.relay.health.is_down("a") if relay.relay else False)


def test_every_upstream_down_answers_421(start_relay: StartRelay) -> None:
    a = {"kind": "smtp", "host": "127.0.0.1", "port": free_port()}
    b = {"kind": "smtp", "host": "127.0.0.1", "port": free_port()}
    extra = {
        "upstreams": [{"name": "a", **a}, {"name": "b", **b}],
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "a"}],
        "routes": [{"name": "main", "policy": "retry", "upstreams": ["a", "b"]}],
    }
    relay = start_relay(a, extra=extra)
    with WireClient(relay.address()) as client:
        assert client.expect(421).startswith(b"421 4.4.1 ")
    (session,) = relay.wait_records(lambda rs: len(rs) == 1, "session")
    assert session["end"] == "upstream_unreachable"
