"""Hypothesis strategies shared by the property tests: SMTP text from its grammar.

The mailbox and parameter strategies follow RFC 5321 4.1.2 and the grammar
of the extensions the command parser knows (RFC 1870, 3461, 6152, 6531), so
that every line they build is one the parser must accept.
"""

from __future__ import annotations

import itertools
import string

from hypothesis import settings
from hypothesis import strategies as st


def scaled(share: float = 1.0, cap: int = 5_000) -> settings:
    """Settings for a property that costs milliseconds an example.

    It runs ``share`` of the profile's examples, and never more than ``cap``,
    so that the ``long`` profile stays within the suite's per-test timeout.
    """
    return settings(max_examples=max(10, min(cap, round(settings().max_examples * share))))


# -- octets --------------------------------------------------------------------


def octets(*, min_size: int = 0, max_size: int) -> st.SearchStrategy[bytes]:
    """Any octets; use in place of ``st.binary`` when ``b""`` is allowed.

    Hypothesis keys its cache on the choices it made, and an empty bytes
    choice hashes like 0 and False: under ``python -bb`` comparing them is a
    BytesWarning, which the suite turns into an error. So ``b""`` is a
    constant here, never a drawn bytes value.
    """
    some = st.binary(min_size=max(min_size, 1), max_size=max_size)
    return st.just(b"") | some if min_size == 0 else some


# -- cutting a byte stream ----------------------------------------------------


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (taken modulo its length plus one)."""
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


cut_points = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)
"""Offsets for ``cut``: up to a dozen cuts anywhere in the stream."""


def flip_case(text: bytes, flips: list[bool]) -> bytes:
    """``text`` with the case of the ASCII letters at the flipped positions swapped."""
    return (
        bytes(
            c ^ 0x20 if flip and (65 <= c <= 90 or 97 <= c <= 122) else c
            for c, flip in zip(text, flips, strict=False)
        )
        + text[len(flips) :]
    )


def any_case(word: bytes) -> st.SearchStrategy[bytes]:
    """``word`` with each ASCII letter in either case."""
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda flips: flip_case(word, flips)
    )


# -- RFC 5321 4.1.2 paths ------------------------------------------------------

_LET_DIG = string.ascii_letters + string.digits
_ATEXT = _LET_DIG + "!#$%&'*+-/=?^_`{|}~"
# RFC 6531 3.3: UTF-8 where atext is allowed.
_UTF8 = st.characters(min_codepoint=0x80, max_codepoint=0x2FFF, exclude_categories=["Cs"])
_atom = st.text(st.one_of(st.sampled_from(_ATEXT), _UTF8), min_size=1, max_size=6)
_dot_string = st.lists(_atom, min_size=1, max_size=3).map(".".join)
# qtextSMTP = %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP = %d92 %d32-126
_QTEXT = "".join(chr(c) for c in range(32, 127) if c not in (34, 92))
_qcontent = st.one_of(
    st.sampled_from(_QTEXT),
    st.sampled_from([chr(c) for c in range(32, 127)]).map(lambda c: "\\" + c),
)
_quoted_string = st.lists(_qcontent, max_size=8).map(lambda parts: '"' + "".join(parts) + '"')
# sub-domain = Let-dig [Ldh-str]: no hyphen at either end.
_label = st.text(st.sampled_from(_LET_DIG + "-"), min_size=1, max_size=8).map(
    lambda text: text.strip("-") or "x"
)
hostnames = st.lists(_label, min_size=1, max_size=3).map(".".join)
domains = st.one_of(
    hostnames,
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]"),
)
"""``Domain / address-literal`` (RFC 5321 4.1.2, 4.1.3), as text."""


@st.composite
def mailboxes(draw: st.DrawFn) -> bytes:
    """``Local-part "@" ( Domain / address-literal )``, UTF-8 encoded."""
    local = draw(st.one_of(_dot_string, _quoted_string))
    return f"{local}@{draw(domains)}".encode()


@st.composite
def bracketed_paths(draw: st.DrawFn) -> bytes:
    """What goes between the angle brackets of a Path: ``[ A-d-l ":" ] Mailbox``."""
    route = draw(st.lists(hostnames, max_size=2))
    mailbox = draw(mailboxes())
    if not route:
        return mailbox
    return ",".join("@" + hop for hop in route).encode() + b":" + mailbox


# -- ESMTP parameters ----------------------------------------------------------

_XCHAR = bytes(c for c in range(0x21, 0x7F) if c not in (0x2B, 0x3D))
_xtext = st.lists(
    st.one_of(
        st.sampled_from([bytes([c]) for c in _XCHAR]),
        st.integers(0, 255).map(lambda o: b"+%02X" % o),
    ),
    min_size=1,
    max_size=20,
).map(b"".join)
# esmtp-value = 1*(%d33-60 / %d62-126), with UTF-8 octets (RFC 6531 3.3).
_VALUE_OCTETS = bytes(c for c in range(0x21, 0x7F) if c != 0x3D) + bytes(range(0x80, 0x100))
esmtp_values = st.binary(min_size=1, max_size=12).map(
    lambda raw: bytes(_VALUE_OCTETS[b % len(_VALUE_OCTETS)] for b in raw)
)

KNOWN_KEYWORDS = frozenset({b"SIZE", b"SMTPUTF8", b"RET", b"ENVID", b"NOTIFY", b"ORCPT", b"BODY"})

Param = tuple[bytes, bytes | None]


def _cased(words: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.sampled_from(words).flatmap(any_case)


_notify = st.one_of(
    _cased([b"NEVER"]),
    st.lists(_cased([b"SUCCESS", b"FAILURE", b"DELAY"]), min_size=1, max_size=3).map(b",".join),
)
# esmtp-keyword and addr-type: (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
_words = st.tuples(
    st.sampled_from(_LET_DIG), st.text(st.sampled_from(_LET_DIG + "-"), max_size=8)
).map(lambda t: (t[0] + t[1]).encode())
_orcpt = st.tuples(_words, _xtext).map(lambda t: t[0] + b";" + t[1])
_unknown_keyword = _words.map(bytes.upper).filter(lambda k: k not in KNOWN_KEYWORDS)
_unknown_params = st.tuples(_unknown_keyword, st.none() | esmtp_values)

mail_params: st.SearchStrategy[Param] = st.one_of(
    st.tuples(
        st.just(b"SIZE"),
        st.tuples(st.integers(0, 10**20 - 1), st.integers(1, 20)).map(lambda t: b"%0*d" % t[::-1]),
    ),
    st.tuples(st.just(b"SMTPUTF8"), st.none()),
    st.tuples(st.just(b"RET"), _cased([b"FULL", b"HDRS"])),
    st.tuples(st.just(b"ENVID"), _xtext),
    st.tuples(st.just(b"BODY"), _cased([b"7BIT", b"8BITMIME", b"BINARYMIME"])),
    _unknown_params,
)
"""A MAIL parameter as (keyword, value), keyword in canonical upper case."""

rcpt_params: st.SearchStrategy[Param] = st.one_of(
    st.tuples(st.just(b"NOTIFY"), _notify),
    st.tuples(st.just(b"ORCPT"), _orcpt),
    _unknown_params,
)
"""A RCPT parameter as (keyword, value), keyword in canonical upper case."""

blanks = st.sampled_from([b" ", b"  ", b"\t", b" \t "])
"""What may separate a path from its parameters, and parameters from each other."""


def param_words(params: list[Param]) -> list[bytes]:
    return [key if value is None else key + b"=" + value for key, value in params]


# -- replies -------------------------------------------------------------------

reply_codes = st.integers(200, 559).filter(lambda c: (c // 10) % 10 <= 5)
"""Codes the reply grammar allows (RFC 5321 4.2: %x32-35 %x30-35 %x30-39)."""

reply_texts = octets(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
"""Text of a reply line: any octets but CR and LF."""


def reply_wire(code: int, texts: list[bytes]) -> bytes:
    """A reply's bytes: ``code-text`` lines ending with one ``code text`` line."""
    last = len(texts) - 1
    return b"".join(
        b"%d%s%s\r\n" % (code, b" " if i == last else b"-", text) for i, text in enumerate(texts)
    )
