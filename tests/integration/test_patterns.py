"""Every failure pattern under every policy, against scripted upstreams.

The session's upstream "a" fails in one way; the route's next upstream "b"
is healthy. For each pattern and policy: what the client is told, and what
the record's outcome and diagnosis say.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from integration.recording_upstreams import RawUpstream
from integration.relay_harness import StartRelay, WireClient

MESSAGE = b"Subject: pattern\r\n\r\nbody\r\n"

# pattern: (upstream a's scripted replies, how the client sends the message)
PATTERNS: dict[str, tuple[dict[str, bytes], str]] = {
    "deferred_failure": ({".": b"451 4.3.0 Temporary local problem\r\n"}, "data"),
    "contradictory_250": ({".": b"250 Mail transaction failed: http://x/f.aspx\r\n"}, "data"),
    "chunk_failure": ({"BDAT LAST": b"452 4.3.1 Insufficient system storage\r\n"}, "bdat"),
    "mid_session_loss": ({"RCPT": b"421 4.3.2 Service shutting down\r\n"}, "data"),
    "permanent": ({".": b"554 5.7.1 Message refused\r\n"}, "data"),
}

# (pattern, policy) -> (client reply code, record outcome, diagnosis pattern)
EXPECTED: dict[tuple[str, str], tuple[int, str, str]] = {
    ("deferred_failure", "passthrough"): (451, "deferred", "deferred_failure"),
    ("contradictory_250", "passthrough"): (451, "deferred", "contradictory_250"),
    ("chunk_failure", "passthrough"): (452, "deferred", "chunk_failure"),
    ("mid_session_loss", "passthrough"): (421, "deferred", "mid_session_loss"),
    ("permanent", "passthrough"): (554, "rejected", "deferred_failure"),
}
for _pattern in ("deferred_failure", "contradictory_250", "chunk_failure"):
    for _policy in ("retry", "requeue"):
        EXPECTED[(_pattern, _policy)] = (250, "retried", "none")
for _policy in ("retry", "requeue"):
    EXPECTED[("mid_session_loss", _policy)] = (421, "deferred", "mid_session_loss")
    EXPECTED[("permanent", _policy)] = (554, "rejected", "deferred_failure")


def send(client: WireClient, how: str) -> tuple[int, bytes]:
    """One transaction; the reply that ends it (RCPT's, DATA's or the end's)."""
    client.expect(220)
    client.command(b"EHLO client.test\r\n", 250)
    client.command(b"MAIL FROM:<sender@example.org>\r\n", 250)
    client.send(b"RCPT TO:<rcpt@example.net>\r\n")
    code, raw = client.reply()
    if code != 250:
        return code, raw
    if how == "bdat":
        # Two chunks: the first gets its 250, the LAST one fails.
        head, tail = MESSAGE[:10], MESSAGE[10:]
        client.send(b"BDAT %d\r\n" % len(head) + head)
        client.expect(250)
        client.send(b"BDAT %d LAST\r\n" % len(tail) + tail)
    else:
        client.command(b"DATA\r\n", 354)
        client.send(MESSAGE + b".\r\n")
    return client.reply()


@pytest.mark.parametrize("policy", ["passthrough", "retry", "requeue"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_under_policy(
    start_relay: StartRelay,
    make_raw_upstream: Callable[..., RawUpstream],
    tmp_path: Path,
    pattern: str,
    policy: str,
) -> None:
    replies, how = PATTERNS[pattern]
    a = make_raw_upstream(replies=replies)
    b = make_raw_upstream()
    extra = {
        "upstreams": [{"name": "a", **a.config}, {"name": "b", **b.config}],
        "listeners": [{"name": "main", "host": "127.0.0.1", "port": 0, "upstream": "a"}],
        "routes": [{"name": "main", "policy": policy, "upstreams": ["a", "b"]}],
        "retry": {"attempts": 2, "budget": 20},
        "spool": {"path": str(tmp_path / "spool")},
    }
    relay = start_relay(a.config, extra=extra)
    with WireClient(relay.address()) as client:
        code, _ = send(client, how)
    want_code, want_outcome, want_pattern = EXPECTED[(pattern, policy)]
    assert code == want_code
    (record,) = relay.wait_records(lambda rs: len(rs) == 1, "transaction")
    assert record["outcome"] == want_outcome
    assert record["diagnosis"]["pattern"] == want_pattern
    if want_outcome == "retried":
        (replayed,) = b.wait_all_ended()
        received = replayed.data or replayed.bdat_messages
        assert received == [MESSAGE + b".\r\n"] if how == "data" else [MESSAGE]
