"""Which recipients a replay attempt delivered to."""

from __future__ import annotations

from smtpwarden.net.delivery import Attempt
from smtpwarden.net.replay import _delivered
from smtpwarden.protocol.diagnosis import DEFAULT_PHRASES
from smtpwarden.protocol.replies import Reply, parse_reply


def reply(wire: bytes) -> Reply:
    return parse_reply(wire)


def attempt(recipients: list[bytes | None], final: bytes | None) -> Attempt:
    return Attempt(
        upstream="b",
        connected=True,
        banner=reply(b"220 b\r\n"),
        mail=reply(b"250 ok\r\n"),
        recipients=tuple(None if r is None else reply(r) for r in recipients),
        data=reply(b"354 go\r\n"),
        final=None if final is None else reply(final),
        sent=True,
        error=None,
    )


def test_only_clean_acceptances_count() -> None:
    got = attempt(
        [b"250 ok\r\n", b"450 busy\r\n", b"250 recipient rejected\r\n"], b"250 queued\r\n"
    )
    assert _delivered(got, DEFAULT_PHRASES) == {0}


def test_nothing_counts_without_a_clean_end() -> None:
    for final in (b"451 later\r\n", b"250 Mail transaction failed\r\n", None):
        got = attempt([b"250 ok\r\n"], final)
        assert _delivered(got, DEFAULT_PHRASES) == set()
