"""Properties of EHLO reconciliation (``protocol/extensions.py``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fuzz.targets_common import RELAYED_KEYWORDS
from smtpwarden.protocol.extensions import ExtensionPolicy, parse_ehlo, reconcile
from smtpwarden.protocol.replies import Reply, parse_reply
from strategies import any_case, octets, reply_codes, reply_texts, reply_wire, scaled

RELAYED = set(RELAYED_KEYWORDS)
CHUNKING = {"CHUNKING", "BINARYMIME"}
# Offered only as the policy says, or never (the relay's own).
DECIDED = [b"STARTTLS", b"AUTH", b"XCLIENT", b"XFORWARD"]
OTHERS = [*DECIDED, b"TURN", b"XEXCH50", b"X-EXPS", b"ATRN"]
MECHANISMS = [b"PLAIN", b"LOGIN", b"CRAM-MD5", b"XOAUTH2", b"GSSAPI", b"NTLM"]

# Half of the keywords are ones the relay must hold back or rewrite.
_keywords = st.one_of(
    st.sampled_from(OTHERS), st.sampled_from(sorted(k.encode() for k in RELAYED | CHUNKING))
).flatmap(any_case)
_mechanism_lists = st.lists(st.sampled_from(MECHANISMS).flatmap(any_case), max_size=4)
_params = _mechanism_lists.map(b" ".join) | reply_texts
extension_lines = st.one_of(
    # AUTH and SIZE lines, whose parameters the relay rewrites.
    st.tuples(any_case(b"AUTH"), _mechanism_lists).map(lambda t: b" ".join([t[0], *t[1]])),
    st.tuples(
        any_case(b"SIZE"),
        st.one_of(st.integers(0, 10**20).map(b" %d".__mod__), st.just(b""), reply_texts),
    ).map(b"".join),
    # Any keyword, bare or with any parameters.
    st.tuples(_keywords, st.just(b"") | reply_texts.map(b" ".__add__)).map(b"".join),
    # Anything at all.
    reply_texts,
)
policies = st.builds(
    ExtensionPolicy,
    chunking=st.booleans(),
    starttls=st.booleans(),
    auth=st.lists(st.sampled_from(["PLAIN", "LOGIN", "XOAUTH2", "SCRAM-SHA-256"]), max_size=3).map(
        tuple
    ),
    max_size=st.one_of(st.just(0), st.integers(1, 10**12)),
)
ehlo_replies = st.tuples(reply_texts, st.lists(extension_lines, max_size=12)).map(
    lambda t: parse_reply(reply_wire(250, [t[0], *t[1]]))
)


def keyword(line: bytes) -> str:
    return line.partition(b" ")[0].decode("ascii", "replace").upper()


def mechanisms(line: bytes) -> list[bytes]:
    return line.partition(b" ")[2].upper().split()


def check_client_reply(reply: Reply, policy: ExtensionPolicy) -> None:
    """What the client gets for ``reply`` under ``policy`` (README, EHLO reconciliation)."""
    out, offered = reconcile(reply, policy)
    assert offered == parse_ehlo(reply)
    # Exactly one well-formed multi-line 250 reply (RFC 5321 4.2).
    client = parse_reply(out)
    assert client.code == 250
    assert client.raw == out
    *first, last = out.splitlines()
    assert all(line.startswith(b"250-") for line in first)
    assert last == b"250" or last.startswith(b"250 ")
    assert client.lines[0] == reply.lines[0]  # the greeting is the upstream's
    kept = [keyword(line) for line in client.lines[1:]]
    upstream = {keyword(line) for line in reply.lines[1:]}

    assert "XCLIENT" not in kept
    assert "XFORWARD" not in kept
    assert kept.count("STARTTLS") == (1 if policy.starttls else 0)
    if not policy.chunking:
        assert not CHUNKING & set(kept)
    for name in kept:
        # An allow-list: nothing the relay does not know, nothing the
        # upstream did not offer (STARTTLS is the relay's own).
        assert name in RELAYED | CHUNKING | {"AUTH", "STARTTLS"}
        assert name == "STARTTLS" or name in upstream
    upstream_mechs = {
        m for line in reply.lines[1:] if keyword(line) == "AUTH" for m in mechanisms(line)
    }
    allowed = {m.encode() for m in policy.auth}
    for line in client.lines[1:]:
        if keyword(line) == "AUTH":
            offered_mechs = mechanisms(line)
            assert offered_mechs
            assert set(offered_mechs) <= allowed & upstream_mechs
            assert len(set(offered_mechs)) == len(offered_mechs)
    sizes = [line for line in reply.lines[1:] if keyword(line) == "SIZE"]
    shown = [line for line in client.lines[1:] if keyword(line) == "SIZE"]
    if not policy.max_size:
        assert shown == sizes  # no limit of its own: the upstream's, as sent
    else:
        # RFC 1870 4: SIZE offers the smaller of the two limits; the
        # upstream's "SIZE" or "SIZE 0" (or no number) sets none.
        for theirs, ours in zip(sizes, shown, strict=True):
            value = theirs.partition(b" ")[2].strip()
            limit = int(value) if value.isdigit() and int(value) else policy.max_size
            assert ours == b"SIZE %d" % min(limit, policy.max_size)


@scaled()
@given(ehlo_replies, policies)
def test_the_client_gets_a_well_formed_250_with_only_what_the_relay_honours(
    reply: Reply, policy: ExtensionPolicy
) -> None:
    check_client_reply(reply, policy)


@scaled()
@given(
    ehlo_replies,
    policies,
    st.tuples(st.sampled_from(DECIDED).flatmap(any_case), st.just(b"") | _params),
    st.integers(0, 12),
)
def test_the_relays_own_keywords_and_those_the_policy_decides_are_never_passed_unchecked(
    reply: Reply, policy: ExtensionPolicy, extension: tuple[bytes, bytes], at: int
) -> None:
    # Each reply holds one of STARTTLS, AUTH, XCLIENT or XFORWARD somewhere.
    keyword, params = extension
    lines = list(reply.lines)
    lines.insert(1 + at % len(lines), keyword + b" " + params if params else keyword)
    check_client_reply(parse_reply(reply_wire(250, lines)), policy)


@scaled(0.5)
@given(ehlo_replies)
def test_nothing_to_filter_forwards_the_upstreams_own_bytes(reply: Reply) -> None:
    out, _ = reconcile(reply, ExtensionPolicy(chunking=True))
    if all(keyword(line) in RELAYED | CHUNKING for line in reply.lines[1:]):
        assert out is reply.raw
    else:
        assert len(parse_reply(out).lines) < len(reply.lines)


@scaled(0.5)
@given(
    reply_codes.filter(lambda code: code != 250),
    st.lists(extension_lines, min_size=1, max_size=6),
    policies,
)
def test_a_reply_other_than_250_is_relayed_unchanged(
    code: int, lines: list[bytes], policy: ExtensionPolicy
) -> None:
    reply = parse_reply(reply_wire(code, lines))
    out, _ = reconcile(reply, policy)
    assert out == reply.raw


@scaled(cap=10_000)
@given(st.lists(octets(max_size=40), min_size=1, max_size=8), policies)
def test_any_reply_lines_parse_and_reconcile_without_raising(
    lines: list[bytes], policy: ExtensionPolicy
) -> None:
    # Lines as a Reply may hold them, even those no reader would return.
    reply = Reply(code=250, lines=tuple(lines), raw=b"250 x\r\n")
    extensions = parse_ehlo(reply)
    assert all(name == name.upper() for name in extensions.keywords)
    out, _ = reconcile(reply, policy)
    assert out.endswith(b"\r\n")
