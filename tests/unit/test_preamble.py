"""The upstream preamble: STARTTLS and XCLIENT before the client's session."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.protocol.extensions import Extensions
from smtpwarden.protocol.preamble import (
    Action,
    Done,
    Fail,
    Send,
    StartTls,
    StartTlsPolicy,
    UpstreamPreamble,
)
from smtpwarden.protocol.replies import Reply, parse_reply

BANNER = parse_reply(b"220 mx.test ESMTP\r\n")
EHLO = Send(b"EHLO relay.test\r\n")
STARTTLS = Send(b"STARTTLS\r\n")
XCLIENT = b"XCLIENT ADDR=192.0.2.7 NAME=client.test\r\n"
READY = parse_reply(b"220 2.0.0 Ready to start TLS\r\n")
NEW_GREETING = parse_reply(b"220 mx.test ESMTP after XCLIENT\r\n")


def ehlo(*keywords: str) -> Reply:
    lines = ["mx.test", *keywords]
    raw = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
    return parse_reply(raw.encode("ascii"))


def keywords(action: Action) -> set[str]:
    assert isinstance(action, Done)
    assert action.extensions is not None
    return set(action.extensions.keywords)


def preamble(
    starttls: StartTlsPolicy = "required", xclient: bytes | None = None
) -> UpstreamPreamble:
    return UpstreamPreamble("relay.test", starttls, xclient)


# --- Nothing to do, and banners -------------------------------------------------


def test_nothing_to_do_ends_at_the_banner() -> None:
    machine = preamble("none")
    assert machine.receive(BANNER) == Done(BANNER, None, False)
    assert machine.ended


REFUSING_BANNERS = [
    b"554 5.3.2 not now\r\n",
    b"421 4.3.2 busy\r\n",
    b"450-busy\r\n450 try later\r\n",
]


@pytest.mark.parametrize("policy", ["none", "opportunistic"])
@pytest.mark.parametrize("raw", REFUSING_BANNERS)
def test_a_refusing_banner_is_relayed_as_is(policy: StartTlsPolicy, raw: bytes) -> None:
    banner = parse_reply(raw)
    assert preamble(policy, XCLIENT).receive(banner) == Done(banner, None, False)


@pytest.mark.parametrize("raw", REFUSING_BANNERS)
def test_a_refusing_banner_fails_an_upstream_that_must_use_tls(raw: bytes) -> None:
    # Relayed, it would start a session that never gets TLS; anyone on the
    # path could send it.
    action = preamble("required", XCLIENT).receive(parse_reply(raw))
    assert isinstance(action, Fail)
    assert action.reason.startswith("banner ")
    assert action.polite


@pytest.mark.parametrize("raw", [b"250 hello\r\n", b"354 go ahead\r\n", b"221 bye\r\n"])
@pytest.mark.parametrize("policy", ["none", "required"])
def test_a_banner_other_than_220_or_a_refusal_fails(raw: bytes, policy: StartTlsPolicy) -> None:
    action = preamble(policy).receive(parse_reply(raw))
    assert isinstance(action, Fail)
    assert action.reason.startswith("unexpected banner ")
    assert not action.polite


# --- STARTTLS ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["opportunistic", "required"])
def test_starttls_offered_is_used_then_ehlo_again(policy: StartTlsPolicy) -> None:
    machine = preamble(policy)
    assert machine.receive(BANNER) == EHLO
    assert machine.receive(ehlo("PIPELINING", "STARTTLS")) == STARTTLS
    assert machine.receive(READY) == StartTls()
    assert not machine.ended
    # RFC 3207 4.2: EHLO again, and only what it says counts.
    assert machine.tls_started() == EHLO
    done = machine.receive(ehlo("CHUNKING", "SIZE 1000"))
    assert done == Done(BANNER, Extensions(keywords={"CHUNKING": b"", "SIZE": b"1000"}), False)
    assert machine.ended


def test_starttls_offered_again_after_tls_is_ignored() -> None:
    machine = preamble("required")
    machine.receive(BANNER)
    machine.receive(ehlo("STARTTLS"))
    machine.receive(READY)
    machine.tls_started()
    assert keywords(machine.receive(ehlo("STARTTLS", "PIPELINING"))) == {"STARTTLS", "PIPELINING"}


def test_required_starttls_not_offered_fails_politely() -> None:
    machine = preamble("required")
    machine.receive(BANNER)
    assert machine.receive(ehlo("PIPELINING")) == Fail("upstream does not offer STARTTLS", True)


def test_opportunistic_starttls_not_offered_goes_on_in_plaintext() -> None:
    machine = preamble("opportunistic")
    machine.receive(BANNER)
    assert keywords(machine.receive(ehlo("PIPELINING", "8BITMIME"))) == {"PIPELINING", "8BITMIME"}


@pytest.mark.parametrize(
    "raw", [b"454 4.7.0 TLS not available\r\n", b"502 5.5.1 no\r\n", b"501 5.5.4 syntax\r\n"]
)
def test_required_starttls_refused_fails_politely(raw: bytes) -> None:
    machine = preamble("required")
    machine.receive(BANNER)
    machine.receive(ehlo("STARTTLS"))
    action = machine.receive(parse_reply(raw))
    assert action == Fail(f"STARTTLS refused: {raw[:-2].decode()}", True)


def test_opportunistic_starttls_refused_goes_on_in_plaintext() -> None:
    machine = preamble("opportunistic")
    machine.receive(BANNER)
    machine.receive(ehlo("STARTTLS", "PIPELINING"))
    done = machine.receive(parse_reply(b"454 4.7.0 TLS not available\r\n"))
    assert keywords(done) == {"STARTTLS", "PIPELINING"}
    assert isinstance(done, Done)
    assert done.banner == BANNER


@pytest.mark.parametrize("raw", [b"550 5.7.1 go away\r\n", b"452 4.3.1 later\r\n"])
def test_ehlo_refused_fails_when_tls_is_required(raw: bytes) -> None:
    machine = preamble("required")
    machine.receive(BANNER)
    assert machine.receive(parse_reply(raw)) == Fail(f"EHLO refused: {raw[:-2].decode()}", True)


@pytest.mark.parametrize(("policy", "xclient"), [("opportunistic", None), ("none", XCLIENT)])
def test_ehlo_refused_otherwise_hands_over_the_banner(
    policy: StartTlsPolicy, xclient: bytes | None
) -> None:
    machine = preamble(policy, xclient)
    machine.receive(BANNER)
    assert machine.receive(parse_reply(b"502 5.5.1 no EHLO\r\n")) == Done(BANNER, None, False)


@pytest.mark.parametrize("policy", ["opportunistic", "required"])
def test_ehlo_refused_after_tls(policy: StartTlsPolicy) -> None:
    machine = preamble(policy)
    machine.receive(BANNER)
    machine.receive(ehlo("STARTTLS"))
    machine.receive(READY)
    machine.tls_started()
    action = machine.receive(parse_reply(b"550 5.7.1 no\r\n"))
    if policy == "required":
        assert action == Fail("EHLO after STARTTLS refused: 550 5.7.1 no", True)
    else:
        assert action == Done(BANNER, None, False)


@pytest.mark.parametrize("step", ["EHLO", "STARTTLS", "EHLO after STARTTLS", "XCLIENT"])
def test_421_at_any_step_fails_politely(step: str) -> None:
    machine = preamble("opportunistic", XCLIENT)
    closing = parse_reply(b"421 4.3.2 shutting down\r\n")
    machine.receive(BANNER)
    if step != "EHLO":
        machine.receive(ehlo("STARTTLS", "XCLIENT ADDR NAME"))
    if step in ("EHLO after STARTTLS", "XCLIENT"):
        machine.receive(READY)
        machine.tls_started()
    if step == "XCLIENT":
        assert machine.receive(ehlo("XCLIENT ADDR NAME")) == Send(XCLIENT)
    assert machine.receive(closing) == Fail(f"{step} 421 4.3.2 shutting down", True)


# --- XCLIENT ----------------------------------------------------------------------


def test_xclient_220_is_the_new_greeting() -> None:
    machine = preamble("none", XCLIENT)
    assert machine.receive(BANNER) == EHLO
    assert machine.receive(ehlo("PIPELINING", "XCLIENT NAME ADDR PROTO HELO")) == Send(XCLIENT)
    done = machine.receive(NEW_GREETING)
    assert isinstance(done, Done)
    assert done.banner == NEW_GREETING
    assert done.xclient_sent
    assert machine.ended


@pytest.mark.parametrize("raw", [b"550 5.7.0 not authorized\r\n", b"501 5.5.4 bad syntax\r\n"])
def test_xclient_refused_keeps_the_original_banner(raw: bytes) -> None:
    machine = preamble("none", XCLIENT)
    machine.receive(BANNER)
    machine.receive(ehlo("XCLIENT ADDR"))
    done = machine.receive(parse_reply(raw))
    assert isinstance(done, Done)
    assert done.banner == BANNER
    assert not done.xclient_sent


def test_xclient_not_offered_is_not_sent() -> None:
    machine = preamble("none", XCLIENT)
    machine.receive(BANNER)
    assert keywords(machine.receive(ehlo("PIPELINING"))) == {"PIPELINING"}


def test_xclient_follows_what_the_ehlo_after_tls_says() -> None:
    offered_before = preamble("required", XCLIENT)
    offered_before.receive(BANNER)
    offered_before.receive(ehlo("STARTTLS", "XCLIENT ADDR"))
    offered_before.receive(READY)
    offered_before.tls_started()
    done = offered_before.receive(ehlo("PIPELINING"))
    assert isinstance(done, Done)
    assert not done.xclient_sent

    offered_after = preamble("required", XCLIENT)
    offered_after.receive(BANNER)
    offered_after.receive(ehlo("STARTTLS"))
    offered_after.receive(READY)
    offered_after.tls_started()
    assert offered_after.receive(ehlo("XCLIENT ADDR")) == Send(XCLIENT)
    done = offered_after.receive(NEW_GREETING)
    assert done == Done(NEW_GREETING, Extensions(keywords={"XCLIENT": b"ADDR"}), True)


def test_xclient_after_an_opportunistic_refusal_of_starttls() -> None:
    machine = preamble("opportunistic", XCLIENT)
    machine.receive(BANNER)
    machine.receive(ehlo("STARTTLS", "XCLIENT ADDR"))
    assert machine.receive(parse_reply(b"454 4.7.0 no TLS\r\n")) == Send(XCLIENT)


# --- Malformed and out of order ---------------------------------------------------


@pytest.mark.parametrize(
    ("step", "raw"),
    [
        ("EHLO", b"354 go ahead\r\n"),
        ("EHLO", b"220 mx.test ESMTP\r\n"),
        ("EHLO", b"251 hello\r\n"),
        ("STARTTLS", b"250 2.0.0 Ok\r\n"),
        ("STARTTLS", b"354 go ahead\r\n"),
        ("XCLIENT", b"250 2.0.0 Ok\r\n"),
        ("XCLIENT", b"354 go ahead\r\n"),
    ],
)
def test_a_reply_the_step_does_not_allow_fails(step: str, raw: bytes) -> None:
    machine = preamble("opportunistic", XCLIENT)
    machine.receive(BANNER)
    if step == "STARTTLS":
        machine.receive(ehlo("STARTTLS"))
    if step == "XCLIENT":
        machine.receive(ehlo("XCLIENT ADDR"))
    action = machine.receive(parse_reply(raw))
    assert isinstance(action, Fail)
    assert action.reason == f"unexpected reply to {step}: {raw[:-2].decode()}"
    assert not action.polite
    assert machine.ended


def test_a_reply_before_the_handshake_fails() -> None:
    machine = preamble("required")
    machine.receive(BANNER)
    machine.receive(ehlo("STARTTLS"))
    assert machine.receive(READY) == StartTls()
    action = machine.receive(ehlo("PIPELINING"))
    assert action == Fail("reply before the TLS handshake: 250 mx.test")
    with pytest.raises(RuntimeError):
        machine.tls_started()


def test_misuse_by_the_caller_raises() -> None:
    machine = preamble("required")
    with pytest.raises(RuntimeError, match="no TLS handshake"):
        machine.tls_started()
    machine.receive(BANNER)
    with pytest.raises(RuntimeError, match="no TLS handshake"):
        machine.tls_started()
    machine.receive(ehlo("PIPELINING"))
    assert machine.ended
    with pytest.raises(RuntimeError, match="has ended"):
        machine.receive(BANNER)


def test_long_reply_text_is_cut_in_the_reason() -> None:
    machine = preamble("required")
    machine.receive(BANNER)
    machine.receive(ehlo("STARTTLS"))
    action = machine.receive(parse_reply(b"454 " + b"x" * 1000 + b"\r\n"))
    assert isinstance(action, Fail)
    assert len(action.reason) < 300


@pytest.mark.parametrize("hostname", ["", "relay test", "relay.test\r\nRSET", "-relay", "é.test"])
def test_a_bad_hostname_is_refused(hostname: str) -> None:
    with pytest.raises(ValueError, match="host name"):
        UpstreamPreamble(hostname, "required", None)


@pytest.mark.parametrize("hostname", ["relay.test", "[192.0.2.1]", "[IPv6:2001:db8::1]"])
def test_good_hostnames(hostname: str) -> None:
    machine = UpstreamPreamble(hostname, "required", None)
    assert machine.receive(BANNER) == Send(f"EHLO {hostname}\r\n".encode())


@pytest.mark.parametrize(
    "line",
    [
        b"XCLIENT ADDR=192.0.2.7",
        b"XCLIENT ADDR=192.0.2.7\n",
        b"XCLIENT ADDR=1\r\nRSET\r\n",
        b"XCLIENT ADDR=1\x00\r\n",
        b"MAIL FROM:<a@b>\r\n",
        b"XCLIENTADDR=1\r\n",
    ],
)
def test_a_bad_xclient_line_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError, match="XCLIENT"):
        UpstreamPreamble("relay.test", "none", line)


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="starttls"):
        UpstreamPreamble("relay.test", "sometimes", None)  # type: ignore[arg-type]


# --- Whatever the upstream says ---------------------------------------------------

CODES = st.sampled_from([211, 220, 221, 250, 251, 334, 354, 421, 450, 454, 500, 502, 550, 554])
KEYWORDS = st.lists(st.sampled_from(["STARTTLS", "XCLIENT ADDR", "PIPELINING", "SIZE"]))


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    code = draw(CODES)
    if code == 250 and draw(st.booleans()):
        return ehlo(*draw(KEYWORDS))
    return parse_reply(b"%d text\r\n" % code)


@given(
    policy=st.sampled_from(["none", "opportunistic", "required"]),
    xclient=st.sampled_from([None, XCLIENT]),
    script=st.lists(replies(), min_size=1, max_size=8),
)
def test_required_tls_is_never_skipped(
    policy: StartTlsPolicy, xclient: bytes | None, script: list[Reply]
) -> None:
    machine = UpstreamPreamble("relay.test", policy, xclient)
    secured = False
    sent: list[bytes] = []
    action: Action | None = None
    for reply in script:
        action = machine.receive(reply)
        if isinstance(action, StartTls):
            secured = True
            action = machine.tls_started()
        if isinstance(action, Send):
            sent.append(action.data)
        else:
            break
    assert set(sent) <= {EHLO.data, STARTTLS.data, XCLIENT}
    if isinstance(action, Done):
        assert machine.ended
        refused_banner = script[0].code // 100 in (4, 5)
        if policy == "required" and not refused_banner:
            assert secured
        if action.xclient_sent:
            assert XCLIENT in sent
            assert action.banner.code == 220
        if policy == "none":
            assert STARTTLS.data not in sent
    if isinstance(action, Fail):
        assert machine.ended
        with pytest.raises(RuntimeError):
            machine.receive(BANNER)
