"""Dot-stuffing a message into a DATA section, whatever its chunks."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.protocol.errors import BareLineEnding
from smtpwarden.protocol.stuffing import stuff

CASES = [
    (b"", b".\r\n"),
    (b"\r\n", b"\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"..\r\n", b"...\r\n.\r\n"),
    (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
    (b"a.b\r\n x.\r\n", b"a.b\r\n x.\r\n.\r\n"),
    (b"\r\n.\r\n.\r\n", b"\r\n..\r\n..\r\n.\r\n"),
    (b"From: a\r\n\r\n.hidden\r\nQUIT\r\n", b"From: a\r\n\r\n..hidden\r\nQUIT\r\n.\r\n"),
    ("caf\u00e9\r\n.\u00e9".encode(), "caf\u00e9\r\n..\u00e9\r\n.\r\n".encode()),
]
BARE = [
    b"\n",
    b"\r",
    b"a\nb\r\n",
    b"a\rb\r\n",
    b"a\r\n\n.\n",
    b"a\r\r\n",
    b"a\n\r",
    b"a\r",
    b"\r\r\n",
]


def splits(message: bytes) -> list[list[bytes]]:
    """The message whole, cut in two at every offset, and byte by byte."""
    out = [[message]]
    out += [[message[:cut], message[cut:]] for cut in range(len(message) + 1)]
    out.append([message[i : i + 1] for i in range(len(message))])
    return out


def with_final_crlf(message: bytes) -> bytes:
    """The message as a receiver keeps it: its last line ends with CRLF."""
    return message if not message or message.endswith(b"\r\n") else message + b"\r\n"


def reference(message: bytes) -> bytes:
    """RFC 5321 4.5.2 stated plainly, for whole messages without bare CR or LF."""
    return re.sub(rb"(?m)^\.", b"..", with_final_crlf(message)) + b".\r\n"


def unstuff(section: bytes) -> bytes:
    """What a receiver keeps of a DATA section: terminator and stuffing removed."""
    assert section.endswith(b".\r\n")
    body = section[: -len(b".\r\n")]
    return re.sub(rb"(?m)^\.", b"", body)


def joined(pieces: list[bytes] | list[bytes | memoryview]) -> bytes:
    return b"".join(stuff(pieces))


@pytest.mark.parametrize(("message", "section"), CASES, ids=[repr(m) for m, _ in CASES])
def test_stuffs_whatever_the_split(message: bytes, section: bytes) -> None:
    assert reference(message) == section
    for pieces in splits(message):
        assert joined(pieces) == section, pieces


@pytest.mark.parametrize("message", BARE, ids=repr)
def test_bare_line_ending_refused_whatever_the_split(message: bytes) -> None:
    for pieces in splits(message):
        with pytest.raises(BareLineEnding):
            joined(pieces)


def test_nothing_of_a_chunk_with_a_bare_lf_is_released() -> None:
    out = stuff([b"first\r\n", b"evil\n.\nMAIL FROM:<x>\r\n"])
    assert next(out) == b"first\r\n"
    with pytest.raises(BareLineEnding):
        next(out)


def test_a_final_cr_waits_for_the_next_chunk() -> None:
    out = stuff([b"a\r", b"\n.b\r\n"])
    assert next(out) == b"a"
    assert next(out) == b"\r\n."
    assert next(out) == b".b\r\n"
    assert next(out) == b".\r\n"


def test_memoryview_and_empty_chunks() -> None:
    data = b"x\r\n.y"
    chunks: list[bytes | memoryview] = [b"", memoryview(data)[:3], b"", memoryview(data)[3:], b""]
    assert joined(chunks) == (b"x\r\n..y\r\n.\r\n")


def test_refusal_carries_a_permanent_reply() -> None:
    with pytest.raises(BareLineEnding) as caught:
        joined([b"a\nb"])
    assert caught.value.code == 554
    assert caught.value.reply_bytes().startswith(b"554 5.6.0 ")


# Messages without bare CR or LF: tokens that keep CRLF pairs whole.
_TOKENS = st.sampled_from([b".", b"..", b"a", b" ", b"\xff", b"\r\n", b"\r\n.", b"\r\n.\r\n"])
MESSAGES = st.lists(_TOKENS, max_size=40).map(b"".join)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    message = draw(MESSAGES)
    cuts = sorted(draw(st.lists(st.integers(0, len(message)), max_size=8)))
    bounds = [0, *cuts, len(message)]
    return message, [message[a:b] for a, b in itertools.pairwise(bounds)]


@given(chunked())
def test_round_trip(case: tuple[bytes, list[bytes]]) -> None:
    message, pieces = case
    section = joined(pieces)
    assert unstuff(section) == with_final_crlf(message)
    assert section == reference(message)
    # The only end of data is the one at the end.
    assert (b"\r\n" + section).find(b"\r\n.\r\n") == len(section) - 3


@given(st.binary(max_size=40), st.data())
def test_output_never_holds_a_bare_cr_or_lf(message: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(message)))
    try:
        section = joined([message[:cut], message[cut:]])
    except BareLineEnding:
        pairs = message.count(b"\r\n")
        assert message.count(b"\r") != pairs or message.count(b"\n") != pairs
        return
    pairs = message.count(b"\r\n")
    assert message.count(b"\r") == pairs == message.count(b"\n")
    assert section.count(b"\r") == section.count(b"\r\n") == section.count(b"\n")
    assert unstuff(section) == with_final_crlf(message)
