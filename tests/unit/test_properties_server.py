"""Properties of the client-facing reader (``protocol/server.py``)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from corehelpers import describe, summarize_server
from smtpwarden.protocol.errors import RemoteProtocolError
from smtpwarden.protocol.events import (
    NEED_DATA,
    PAUSED,
)
from smtpwarden.protocol.server import ServerConnection
from smtpwarden.protocol.state import ServerState
from strategies import cut, cut_points, octets, scaled

Summary = list[tuple[str, bytes]]

# Small limits, so that overlong lines come up in short streams.
MAX_LINE = 40
MAX_AUTH_LINE = 60


def run(chunks: list[bytes], verdicts: list[bool]) -> Summary:
    """Feed a reader and describe what came out (Body events merged).

    Each pause takes the next verdict (True when the list runs out): DATA
    accepted or refused, a 334 or the end of an AUTH exchange, STARTTLS
    refused (its handshake drops what is buffered, which depends on the
    split by design). A RemoteProtocolError ends the list.
    """
    conn = ServerConnection(max_line_bytes=MAX_LINE, max_auth_line_bytes=MAX_AUTH_LINE)
    answers = iter(verdicts)
    out: Summary = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as error:
                assert conn.state is ServerState.ERROR
                out.append(("error", error.reply_bytes()))
                return out
            if event is NEED_DATA:
                break
            if event is PAUSED:
                yes = next(answers, True)
                if conn.state is ServerState.AWAIT_DATA:
                    (conn.start_data if yes else conn.refuse_data)()
                elif conn.state is ServerState.AWAIT_AUTH:
                    (conn.expect_auth_response if yes else conn.auth_done)()
                else:
                    conn.refuse_tls()
                out.append(("verdict", b"yes" if yes else b"no"))
            else:
                describe(out, event)
    return out


def without_partial_body(out: Summary) -> Summary:
    """``out`` less the body released before an error (the split decides how much)."""
    if len(out) >= 2 and out[-1][0] == "error" and out[-2][0] == "body":
        return out[:-2] + out[-1:]
    return out


# Pieces of a client stream: commands that change what follows (DATA, BDAT,
# AUTH, STARTTLS), body text with dots and line endings, bare CR and LF,
# overlong lines, and any octets at all.
_pieces = st.one_of(
    st.sampled_from(
        [
            b"EHLO c.example\r\n",
            b"MAIL FROM:<a@b.example> SIZE=10\r\n",
            b"RCPT TO:<c@d.example>\r\n",
            b"DATA\r\n",
            b"data\r\n",
            b"BDAT 3\r\n",
            b"BDAT 0 LAST\r\n",
            b"BDAT 7 last\r\n",
            b"BDAT 4294967296\r\n",  # refused: its octets are dropped, never read
            b"AUTH PLAIN\r\n",
            b"AUTH LOGIN dXNlcg==\r\n",
            b"auth " + b"A" * 50 + b"\r\n",
            b"dXNlcg==\r\n",
            b"*\r\n",
            b"STARTTLS\r\n",
            b"NOOP\r\n",
            b"QUIT\r\n",
            b"X" * 45 + b"\r\n",
            b".\r\n",
            b"..\r\n",
            b"\r\n.\r\n",
            b"\r\n",
            b"\r",
            b"\n",
            b".",
            b"text",
        ]
    ),
    st.binary(min_size=1, max_size=12),
)
streams = st.lists(_pieces, max_size=16).map(b"".join)
verdict_lists = st.lists(st.booleans(), max_size=8)


@scaled()
@given(streams, cut_points, verdict_lists)
def test_any_stream_in_any_split_gives_the_events_it_gives_whole(
    wire: bytes, points: list[int], verdicts: list[bool]
) -> None:
    whole = run([wire], verdicts)
    split = run(cut(wire, points), verdicts)
    if whole and whole[-1][0] == "error":
        # Octets before the chunk holding a bare CR or LF may have gone out
        # already; nothing else depends on the split.
        assert without_partial_body(split) == without_partial_body(whole)
    else:
        assert split == whole


@scaled()
@given(streams, cut_points)
def test_the_shared_helper_agrees_in_any_split(wire: bytes, points: list[int]) -> None:
    # corehelpers.summarize_server, used by the example tests, is split-proof too.
    whole = summarize_server([wire])
    split = summarize_server(cut(wire, points))
    if whole and whole[-1][0] == "error":
        assert without_partial_body(split) == without_partial_body(whole)
    else:
        assert split == whole


# Body text where smuggling markers are likely: every way to write a line
# ending and a dot next to one another.
_body_tokens = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"a", b"\r\n.\r\n", b"\n.\n"])
bodies = st.lists(_body_tokens, max_size=24).map(b"".join)


def bare(data: bytes) -> bool:
    """True if ``data`` holds a CR not followed by LF or an LF not after a CR."""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def first_section(body: bytes) -> bytes | None:
    """The DATA section up to the first real end marker, or None without one.

    RFC 5321 4.1.1.4: the data ends with <CRLF>.<CRLF>, where the first CRLF
    may be the one that ended the DATA command line.
    """
    found = (b"\r\n" + body).find(b"\r\n.\r\n")
    return None if found < 0 else body[: found + 3]


@scaled()
@given(bodies, cut_points)
def test_only_crlf_dot_crlf_ends_data(body: bytes, points: list[int]) -> None:
    # Behind the body, a message an upstream must never see as commands.
    wire = b"DATA\r\n" + body + b"\r\n.\r\nRSET\r\n"
    out = run(cut(wire, points), [True])
    section = first_section(body + b"\r\n.\r\n")
    assert section is not None
    released = b"".join(data for kind, data in out if kind == "body")
    assert not bare(released)
    if bare(section):
        # A bare CR or LF before the end: the session ends, nothing ends DATA.
        assert out[-1][0] == "error"
        assert out[-1][1].startswith(b"521 ")
        assert ("done", b"") not in out
        assert section.startswith(released)
    else:
        assert released == section
        assert out.count(("done", b"")) == 1
        assert out[out.index(("done", b"")) - 1] == ("body", section)


def stuffed(message: bytes) -> bytes:
    """RFC 5321 4.5.2 dot-stuffing of a message whose lines end with CRLF."""
    return re.sub(rb"(?m)^\.", b"..", message)


def unstuffed(section: bytes) -> bytes:
    """What a receiver keeps of a DATA section: terminator and stuffing removed."""
    assert section.endswith(b".\r\n")
    return re.sub(rb"(?m)^\.", b"", section[:-3])


_line_text = st.lists(st.sampled_from([b".", b"a", b" ", b"\xff", b"\x00", b"\t"]), max_size=6)
messages = st.lists(_line_text.map(lambda t: b"".join(t) + b"\r\n"), max_size=10).map(b"".join)


@scaled()
@given(messages, cut_points)
def test_body_events_are_the_stuffed_message_and_unstuff_to_it(
    message: bytes, points: list[int]
) -> None:
    wire = b"DATA\r\n" + stuffed(message) + b".\r\nQUIT\r\n"
    out = run(cut(wire, points), [True])
    body = b"".join(data for kind, data in out if kind == "body")
    assert body == stuffed(message) + b".\r\n"
    assert unstuffed(body) == message
    assert [kind for kind, _ in out if kind != "body"] == ["DATA", "verdict", "done", "QUIT"]


# Chunk content: any octets, or octets that would mean something as commands.
chunk_data = st.one_of(
    octets(max_size=20),
    st.sampled_from([b"NOOP\r\n", b"\r\n.\r\n", b"QUIT\r\nBDAT 5\r\n", b"\n.\n", b"\r"]),
)


@scaled()
@given(
    st.lists(st.tuples(chunk_data, st.booleans()), min_size=1, max_size=4),
    cut_points,
)
def test_bdat_chunks_are_passed_on_whole_and_never_read_as_commands(
    chunks: list[tuple[bytes, bool]], points: list[int]
) -> None:
    wire = b""
    for data, last in chunks:
        wire += b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data
    out = run(cut(wire + b"NOOP\r\n", points), [])
    expected: Summary = []
    for data, last in chunks:
        expected.append(("BDAT", b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"")))
        if data:
            expected.append(("body", data))
        expected.append(("done", b""))
    assert out == [*expected, ("NOOP", b"NOOP\r\n")]


@scaled()
@given(streams, verdict_lists)
def test_after_a_refused_data_the_octets_are_read_as_commands(
    wire: bytes, verdicts: list[bool]
) -> None:
    # Without a 354 nothing is a body: what follows DATA reads exactly as
    # it would at the start of a session.
    refused = run([b"DATA\r\n" + wire], [False, *verdicts])
    assert refused[:2] == [("DATA", b"DATA\r\n"), ("verdict", b"no")]
    assert refused[2:] == run([wire], verdicts)
