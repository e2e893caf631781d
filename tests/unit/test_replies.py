"""The reply reader: multi-line replies, enhanced codes, malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corehelpers import read_replies, splits
from smtpwarden.protocol.errors import MalformedReply, RemoteProtocolError
from smtpwarden.protocol.replies import ReplyReader, make_reply, parse_reply

EHLO = (
    b"250-mx.example.net Hello\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-8BITMIME\r\n"
    b"250 CHUNKING\r\n"
)


@pytest.mark.parametrize(
    ("wire", "code", "lines", "enhanced", "text"),
    [
        (b"250 2.1.0 Ok\r\n", 250, (b"2.1.0 Ok",), "2.1.0", "Ok"),
        (b"220 mx ESMTP\r\n", 220, (b"mx ESMTP",), None, "mx ESMTP"),
        (b"250\r\n", 250, (b"",), None, ""),
        (b"250-\r\n250 end\r\n", 250, (b"", b"end"), None, "\nend"),
        (
            b"550-5.1.1 No such\r\n550 5.1.1 user here\r\n",
            550,
            (b"5.1.1 No such", b"5.1.1 user here"),
            "5.1.1",
            "No such\nuser here",
        ),
        (b"451 4.3.0 \xff\xfe\r\n", 451, (b"4.3.0 \xff\xfe",), "4.3.0", "\ufffd\ufffd"),
        (b"250 2.0.0\r\n", 250, (b"2.0.0",), "2.0.0", ""),
    ],
    ids=["single", "banner", "bare-code", "empty-continuation", "multi", "8bit-text", "code-only"],
)
def test_reply_fields(
    wire: bytes, code: int, lines: tuple[bytes, ...], enhanced: str | None, text: str
) -> None:
    for chunks in splits(wire):
        (reply,) = read_replies(chunks)
        assert reply.code == code
        assert reply.lines == lines
        assert reply.enhanced == enhanced
        assert reply.text == text
        assert reply.raw == wire


def test_pipelined_replies_keep_their_raw_bytes_in_every_split() -> None:
    wire = EHLO + b"250 2.1.0 Ok\r\n" + b"354 go ahead\r\n"
    for chunks in splits(wire):
        replies = read_replies(chunks)
        assert [r.code for r in replies] == [250, 250, 354]
        assert b"".join(r.raw for r in replies) == wire
        assert replies[0].lines[1:] == (b"PIPELINING", b"SIZE 10240000", b"8BITMIME", b"CHUNKING")


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (b"25O ok\r\n", "bad reply line start"),
        (b"abc ok\r\n", "bad reply line start"),
        (b"650 ok\r\n", "bad reply line start"),
        (b"260 ok\r\n", "bad reply line start"),
        (b"250+ok\r\n", "bad reply line start"),
        (b"250-a\r\n251 b\r\n", "code changed"),
        (b"250 ok\n", "CRLF"),
        (b"250 o\rk\r\n", "bare CR"),
        (b"\r\n", "bad reply line start"),
        (b"25\r\n", "bad reply line start"),
    ],
    ids=[
        "letter-o",
        "letters",
        "first-digit-6",
        "second-digit-6",
        "bad-separator",
        "code-changes",
        "bare-lf",
        "bare-cr",
        "empty-line",
        "short-code",
    ],
)
def test_malformed_replies_name_the_problem(wire: bytes, problem: str) -> None:
    with pytest.raises(MalformedReply, match=problem):
        read_replies([wire])


def test_line_limit_applies_before_the_line_ends() -> None:
    reader = ReplyReader(max_line_bytes=64)
    reader.receive_data(b"250-" + b"x" * 100)
    with pytest.raises(MalformedReply, match="longer than 64"):
        reader.next_reply()


def test_complete_line_over_the_limit() -> None:
    with pytest.raises(MalformedReply, match="longer than 64"):
        read_replies([b"250 " + b"x" * 70 + b"\r\n"], max_line_bytes=64)


def test_endless_multiline_reply_is_bounded() -> None:
    with pytest.raises(MalformedReply, match="longer than 5 lines"):
        read_replies([b"250-x\r\n" * 10], max_lines=5)


def test_missing_final_line_is_just_incomplete() -> None:
    reader = ReplyReader()
    reader.receive_data(b"250-first\r\n250-second\r\n")
    assert reader.next_reply() is None
    assert reader.buffered == len(b"250-first\r\n250-second\r\n")
    reader.receive_data(b"250 last\r\n")
    reply = reader.next_reply()
    assert reply is not None
    assert reply.lines == (b"first", b"second", b"last")


def test_parse_reply_wants_exactly_one() -> None:
    assert parse_reply(b"250 ok\r\n").code == 250
    with pytest.raises(MalformedReply):
        parse_reply(b"250 ok\r\n250 again\r\n")
    with pytest.raises(MalformedReply):
        parse_reply(b"250-ok\r\n")


def test_make_reply_round_trips() -> None:
    reply = make_reply(421, "4.4.2", "mx Upstream timed out")
    assert reply.raw == b"421 4.4.2 mx Upstream timed out\r\n"
    assert parse_reply(reply.raw) == reply
    assert make_reply(250, None, "ok").raw == b"250 ok\r\n"


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_any_input_parses_or_raises_a_protocol_error(chunks: list[bytes]) -> None:
    reader = ReplyReader(max_line_bytes=64, max_lines=4)
    try:
        for chunk in chunks:
            reader.receive_data(chunk)
            while (reply := reader.next_reply()) is not None:
                assert 200 <= reply.code <= 559
                assert reply.raw.endswith(b"\r\n")
    except RemoteProtocolError:
        pass


reply_line = st.tuples(
    st.integers(200, 559).filter(lambda c: (c // 10) % 10 <= 5),
    st.lists(
        st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        min_size=1,
        max_size=4,
    ),
)


@given(st.lists(reply_line, min_size=1, max_size=5), st.integers(1, 50))
def test_valid_replies_survive_any_chunking(
    replies: list[tuple[int, list[bytes]]], step: int
) -> None:
    wire = b""
    for code, texts in replies:
        for i, text in enumerate(texts):
            sep = b" " if i == len(texts) - 1 else b"-"
            wire += str(code).encode() + sep + text + b"\r\n"
    chunks = [wire[i : i + step] for i in range(0, len(wire), step)]
    got = read_replies(chunks, max_line_bytes=4096)
    assert [r.code for r in got] == [code for code, _ in replies]
    assert [list(r.lines) for r in got] == [texts for _, texts in replies]
    assert b"".join(r.raw for r in got) == wire


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (b"250 ok", "inside a reply line"),
        (b"250-first\r\n", "inside a multi-line reply"),
        (b"250-a\r\n250", "multi-line"),
    ],
    ids=["partial-line", "missing-final-line", "partial-final-line"],
)
def test_end_of_stream_inside_a_reply_is_named(wire: bytes, problem: str) -> None:
    reader = ReplyReader()
    reader.receive_data(wire)
    assert reader.next_reply() is None
    with pytest.raises(MalformedReply, match=problem):
        reader.receive_eof()


def test_end_of_stream_between_replies_is_fine() -> None:
    reader = ReplyReader()
    reader.receive_data(b"221 bye\r\n")
    assert reader.next_reply() is not None
    reader.receive_eof()
