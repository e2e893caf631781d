"""The client-facing reader: commands, DATA framing, BDAT counting."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corehelpers import splits, summarize_server
from smtpwarden.protocol.errors import LocalProtocolError, RemoteProtocolError
from smtpwarden.protocol.events import NEED_DATA, PAUSED, BadCommand, Bdat, Body, Command, MailFrom
from smtpwarden.protocol.server import ServerConnection
from smtpwarden.protocol.state import ServerState

BODY = b"Subject: t\r\n\r\n..leading dot\r\n.\xff8bit\r\n" + b"x" * 998 + b"\r\n"


def every_split(
    wire: bytes, expected: list[tuple[str, bytes]], *, accept_data: bool = True
) -> None:
    for chunks in splits(wire):
        assert summarize_server(chunks, accept_data=accept_data) == expected, chunks


def test_a_whole_transaction_in_every_split() -> None:
    wire = (
        b"EHLO client.example\r\nMAIL FROM:<a@example.com> SIZE=100\r\n"
        b"RCPT TO:<b@example.org>\r\nDATA\r\n" + BODY + b".\r\nQUIT\r\n"
    )
    every_split(
        wire,
        [
            ("EHLO", b"EHLO client.example\r\n"),
            ("MAIL", b"MAIL FROM:<a@example.com> SIZE=100\r\n"),
            ("RCPT", b"RCPT TO:<b@example.org>\r\n"),
            ("DATA", b"DATA\r\n"),
            ("body", BODY + b".\r\n"),
            ("done", b""),
            ("QUIT", b"QUIT\r\n"),
        ],
    )


def test_empty_message() -> None:
    every_split(
        b"DATA\r\n.\r\nNOOP\r\n",
        [("DATA", b"DATA\r\n"), ("body", b".\r\n"), ("done", b""), ("NOOP", b"NOOP\r\n")],
    )


def test_refused_data_goes_back_to_commands() -> None:
    every_split(
        b"DATA\r\nRSET\r\n", [("DATA", b"DATA\r\n"), ("RSET", b"RSET\r\n")], accept_data=False
    )


def test_a_dot_line_inside_the_body_is_not_the_end() -> None:
    body = b"a\r\n..\r\n.x\r\n\r\n"
    every_split(
        b"DATA\r\n" + body + b".\r\n",
        [("DATA", b"DATA\r\n"), ("body", body + b".\r\n"), ("done", b"")],
    )


SMUGGLING = {
    "lf-dot-lf": b"a\n.\n",
    "cr-dot-cr": b"a\r.\r",
    "lf-dot-crlf": b"a\n.\r\n",
    "crlf-dot-lf": b"a\r\n.\n",
    "crlf-dot-cr": b"a\r\n.\rb",
    "cr-dot-crlf": b"a\r.\r\n",
    "bare-lf-line": b"line\nmore\r\n",
    "bare-cr-line": b"line\rmore\r\n",
    "cr-cr-lf": b"x\r\r\n",
}
SMUGGLED = (
    b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nsmuggled\r\n.\r\n"
)


@pytest.mark.parametrize("marker", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_smuggling_markers_are_refused_before_any_of_their_chunk_is_released(marker: bytes) -> None:
    wire = b"DATA\r\nclean line\r\n" + marker + SMUGGLED + b"\r\n.\r\n"
    cut = len(b"DATA\r\nclean line\r\n")
    for chunks in splits(wire):
        out = summarize_server(chunks)
        assert out[-1] == (
            "error",
            b"521 5.5.2 Bare CR or LF in message data is not allowed; closing connection\r\n",
        )
        released = b"".join(data for kind, data in out if kind == "body")
        # Nothing at or after the marker's first bare octet was released.
        assert len(released) <= cut + marker.index(b"\n" if b"\n" in marker else b"\r") + 1
        assert b"MAIL FROM:<evil" not in released
        assert ("done", b"") not in out
        assert not any(kind == "MAIL" for kind, _ in out)


def test_error_state_fails_fast() -> None:
    conn = ServerConnection()
    conn.receive_data(b"DATA\r\n")
    assert isinstance(conn.next_event(), object)
    assert conn.next_event() is PAUSED
    conn.start_data()
    conn.receive_data(b"a\n.\n")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is ServerState.ERROR
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_start_data_out_of_turn_is_a_local_error() -> None:
    conn = ServerConnection()
    with pytest.raises(LocalProtocolError, match="not allowed"):
        conn.start_data()
    assert conn.state is ServerState.ERROR


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (
            b"MAIL FROM:<a@b>\nRCPT TO:<c@d>\r\n",
            b"500 5.5.2 Bare CR or LF is not allowed; lines must end with CRLF\r\n",
        ),
        (
            b"NOOP\rRSET\r\n",
            b"500 5.5.2 Bare CR or LF is not allowed; lines must end with CRLF\r\n",
        ),
        (b"NO\x00OP\r\n", b"500 5.5.2 Control characters are not allowed\r\n"),
        (b"FOO bar\r\n", b"500 5.5.1 Command unrecognized\r\n"),
        (b"MAIL FROM:<a@b> SIZE=abc\r\n", b"501 5.5.4 Syntax error in parameters or arguments\r\n"),
        (b"MAIL TO:<a@b>\r\n", b"501 5.5.4 Syntax error in address\r\n"),
        (
            b"RCPT TO:<a@b> NOTIFY=SOMETIMES\r\n",
            b"501 5.5.4 Syntax error in parameters or arguments\r\n",
        ),
        (b"BDAT x\r\n", b"501 5.5.4 Syntax error in parameters or arguments\r\n"),
        (b"EHLO\r\n", b"501 5.5.4 Domain name required\r\n"),
    ],
    ids=[
        "bare-lf",
        "bare-cr",
        "nul",
        "unknown-verb",
        "bad-size",
        "mail-to",
        "bad-notify",
        "bad-bdat",
        "no-domain",
    ],
)
def test_bad_command_lines_get_a_reply_and_are_never_events(line: bytes, reply: bytes) -> None:
    for chunks in splits(line + b"NOOP\r\n"):
        out = summarize_server(chunks)
        assert out[-1] == ("NOOP", b"NOOP\r\n")
        assert ("bad", reply) in out
        assert all(kind in ("bad", "NOOP", "RCPT", "RSET") for kind, _ in out)


def test_overlong_command_is_dropped_to_its_end_and_answered_once() -> None:
    conn = ServerConnection(max_line_bytes=32)
    wire = b"NOOP " + b"x" * 100 + b"\r\nNOOP\r\n"
    events = []
    for i in range(len(wire)):
        conn.receive_data(wire[i : i + 1])
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
        assert conn.buffered <= 33
    assert len(events) == 2
    assert isinstance(events[0], BadCommand)
    assert events[0].error.reply_bytes() == b"500 5.5.2 Line too long\r\n"


def test_mail_and_rcpt_parameters() -> None:
    conn = ServerConnection()
    conn.receive_data(
        b"MAIL FROM:<> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=a+2Bb\r\n"
        b'RCPT TO:<"odd >name"@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y\r\n'
        b"mail from: user@example.com\r\n"
    )
    mail, rcpt, lenient = conn.next_event(), conn.next_event(), conn.next_event()
    assert isinstance(mail, MailFrom)
    assert mail.path == b""
    assert mail.params == (
        (b"BODY", b"8BITMIME"),
        (b"SMTPUTF8", None),
        (b"RET", b"HDRS"),
        (b"ENVID", b"a+2Bb"),
    )
    assert rcpt.path == b'"odd >name"@example.org'  # type: ignore[union-attr]
    assert rcpt.params == ((b"NOTIFY", b"SUCCESS,FAILURE"), (b"ORCPT", b"rfc822;x@y"))  # type: ignore[union-attr]
    assert lenient.path == b"user@example.com"  # type: ignore[union-attr]


def test_smtputf8_takes_no_value_and_envid_is_bounded() -> None:
    assert summarize_server([b"MAIL FROM:<a@b> SMTPUTF8=yes\r\n"])[0][0] == "bad"
    assert summarize_server([b"MAIL FROM:<a@b> ENVID=" + b"x" * 101 + b"\r\n"])[0][0] == "bad"
    assert summarize_server([b"MAIL FROM:<a@b> X-UNKNOWN=1\r\n"])[0][0] == "MAIL"


def test_bdat_counts_octets_and_ignores_what_they_contain() -> None:
    chunk1 = b"Subject: x\r\n\r\nbare\nlf and\r\n.\r\nend marker inside"
    wire = b"BDAT %d\r\n" % len(chunk1) + chunk1 + b"BDAT 0 LAST\r\nQUIT\r\n"
    every_split(
        wire,
        [
            ("BDAT", b"BDAT %d\r\n" % len(chunk1)),
            ("body", chunk1),
            ("done", b""),
            ("BDAT", b"BDAT 0 LAST\r\n"),
            ("done", b""),
            ("QUIT", b"QUIT\r\n"),
        ],
    )


def test_bdat_event_fields() -> None:
    conn = ServerConnection()
    conn.receive_data(b"BDAT 3 last\r\nabc")
    bdat = conn.next_event()
    assert isinstance(bdat, Bdat)
    assert (bdat.size, bdat.last) == (3, True)
    body = conn.next_event()
    assert isinstance(body, Body)
    assert body.done
    assert conn.state is ServerState.COMMAND


def test_body_chunks_are_not_copied() -> None:
    conn = ServerConnection()
    conn.receive_data(b"DATA\r\n")
    conn.next_event()
    conn.next_event()
    conn.start_data()
    chunk = b"line one\r\nline two\r\n"
    conn.receive_data(chunk)
    event = conn.next_event()
    assert isinstance(event, Body)
    assert event.data is chunk
    tail = b"end\r\n.\r\nNOOP\r\n"
    conn.receive_data(tail)
    event = conn.next_event()
    assert isinstance(event, Body)
    assert isinstance(event.data, memoryview)
    assert event.data.obj is tail
    assert bytes(event.data) == b"end\r\n.\r\n"


def resume(conn: ServerConnection, choice: int) -> None:
    """Answer a pause as the shell might: ``choice`` picks the verdict."""
    match conn.state:
        case ServerState.AWAIT_DATA:
            conn.start_data() if choice % 2 else conn.refuse_data()
        case ServerState.AWAIT_AUTH:
            conn.expect_auth_response() if choice % 2 else conn.auth_done()
        case ServerState.AWAIT_TLS:
            if choice % 2:
                conn.discard()
                conn.reset_after_tls()
            else:
                conn.refuse_tls()
        case state:
            raise AssertionError(f"paused in {state}")


@settings(max_examples=300)
@given(
    # No empty binary beside integers: hash(b"") == hash(0), and Hypothesis
    # would compare the two in its cache, a BytesWarning under -bb.
    st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=30),
            st.sampled_from([b"", b"DATA\r\n", b"AUTH LOGIN\r\n", b"STARTTLS\r\n", b"*\r\n"]),
        ),
        max_size=10,
    ),
    st.lists(st.integers(0, 1), max_size=12),
)
def test_any_input_yields_events_or_a_protocol_error(
    chunks: list[bytes], choices: list[int]
) -> None:
    # The verdict on DATA, AUTH and STARTTLS decides what follows: every path.
    conn = ServerConnection(max_line_bytes=40, max_auth_line_bytes=40)
    verdicts = iter(choices)
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if event is PAUSED:
                    resume(conn, next(verdicts, 1))
                    continue
                if event is NEED_DATA:
                    break
    except RemoteProtocolError:
        assert conn.state is ServerState.ERROR


@given(st.binary(max_size=200), st.integers(1, 64))
def test_released_body_never_holds_a_bare_line_ending(body: bytes, step: int) -> None:
    wire = b"DATA\r\n" + body + b"\r\n.\r\n"
    out = summarize_server([wire[i : i + step] for i in range(0, len(wire), step)])
    released = b"".join(data for kind, data in out if kind == "body")
    assert released.count(b"\n") == released.count(b"\r\n") == released.count(b"\r")
    if out[-1][0] != "error":
        # The first end marker ends the message: at the very start of the
        # body (an empty message) or after the CRLF of a line.
        assert ("done", b"") in out
        assert released == b".\r\n" or released.endswith(b"\r\n.\r\n")
        assert released.count(b"\r\n.\r\n") <= 1


@pytest.mark.parametrize(
    "line",
    [
        b"BDAT  5",
        b"BDAT\t5",
        b"BDAT 5 ",
        b"BDAT 5  LAST",
        b"BDAT 5\tLAST",
        b"BDAT +5",
        b"BDAT 12345678901",
    ],
    ids=[
        "two-spaces",
        "tab",
        "trailing-space",
        "two-spaces-last",
        "tab-last",
        "sign",
        "eleven-digits",
    ],
)
def test_loose_bdat_lines_are_refused_so_no_upstream_reads_them_differently(line: bytes) -> None:
    out = summarize_server([line + b"\r\nNOOP\r\n"])
    assert [kind for kind, _ in out] == ["bad", "NOOP"]
    assert out[0][1].startswith((b"501 5.5.4 ", b"500 5.5.1 "))


def test_bdat_chunk_beyond_32_bits_is_refused_and_its_octets_dropped() -> None:
    size = 2**31
    head = b"BDAT %d LAST\r\n" % size
    conn = ServerConnection()
    conn.receive_data(head + b"RSET\r\n")
    refused = conn.next_event()
    assert isinstance(refused, BadCommand)
    assert refused.error.reply_bytes() == b"552 5.3.4 Chunk too large\r\n"
    # What follows is chunk data, dropped, however much of it there is.
    assert conn.next_event() is NEED_DATA
    left = size - len(b"RSET\r\n")
    block = b"x" * (1 << 20)
    while left > len(block):
        conn.receive_data(block)
        assert conn.next_event() is NEED_DATA
        left -= len(block)
    conn.receive_data(b"y" * left + b"NOOP\r\n")
    noop = conn.next_event()
    assert isinstance(noop, Command)
    assert noop.verb.value == "NOOP"
    assert summarize_server([b"BDAT 2147483647\r\n"])[0][0] == "BDAT"


def test_bdat_is_forwarded_in_canonical_form() -> None:
    conn = ServerConnection()
    conn.receive_data(b"bdat 0005 last\r\nabcde")
    bdat = conn.next_event()
    assert isinstance(bdat, Bdat)
    assert bdat.wire == b"BDAT 5 LAST\r\n"
    assert (bdat.size, bdat.last) == (5, True)


# -- STARTTLS (RFC 3207) ---------------------------------------------------------

PIPELINED = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"


def test_commands_pipelined_after_starttls_are_never_events() -> None:
    conn = ServerConnection()
    conn.receive_data(b"EHLO client.example\r\nSTARTTLS\r\n" + PIPELINED)
    ehlo, starttls = conn.next_event(), conn.next_event()
    assert isinstance(ehlo, Command)
    assert isinstance(starttls, Command)
    assert starttls.verb.value == "STARTTLS"
    for _ in range(3):
        assert conn.next_event() is PAUSED
    assert conn.state is ServerState.AWAIT_TLS
    assert conn.buffered == len(PIPELINED)
    assert conn.discard() == len(PIPELINED)
    assert conn.buffered == 0
    assert conn.next_event() is PAUSED
    assert conn.reset_after_tls() == 0
    assert conn.state is ServerState.COMMAND
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"EHLO client.example\r\n")
    again = conn.next_event()
    assert isinstance(again, Command)
    assert again.verb.value == "EHLO"


def test_discard_drops_exactly_the_pipelined_octets_in_every_split() -> None:
    head = b"EHLO client.example\r\nSTARTTLS\r\n"
    for chunks in splits(head + PIPELINED):
        conn = ServerConnection()
        verbs = []
        dropped = 0
        for chunk in chunks:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                if event is PAUSED:
                    # The shell discards at once; octets that come later, in
                    # the clear, are discarded too.
                    dropped += conn.discard()
                    break
                assert isinstance(event, Command)
                verbs.append(event.verb.value)
        assert verbs == ["EHLO", "STARTTLS"], chunks
        assert dropped + conn.reset_after_tls() == len(PIPELINED), chunks


def test_reset_after_tls_drops_what_came_in_the_clear_after_discard() -> None:
    conn = ServerConnection()
    conn.receive_data(b"STARTTLS\r\n")
    conn.next_event()
    assert conn.discard() == 0
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() is PAUSED
    assert conn.reset_after_tls() == len(b"NOOP\r\n")
    assert conn.next_event() is NEED_DATA


def test_reset_after_tls_starts_a_fresh_reader() -> None:
    conn = ServerConnection(max_line_bytes=16)
    conn.receive_data(b"STARTTLS\r\n" + b"x" * 40)
    conn.next_event()
    conn.discard()
    conn.reset_after_tls()
    # Nothing of the overlong line before TLS counts against the next one.
    conn.receive_data(b"NOOP\r\n")
    noop = conn.next_event()
    assert isinstance(noop, Command)
    assert noop.verb.value == "NOOP"


def test_refused_starttls_goes_on_in_the_clear() -> None:
    every_split(b"STARTTLS\r\nNOOP\r\n", [("STARTTLS", b"STARTTLS\r\n"), ("NOOP", b"NOOP\r\n")])
    conn = ServerConnection()
    conn.receive_data(b"STARTTLS\r\nNOOP\r\n")
    conn.next_event()
    assert conn.next_event() is PAUSED
    conn.refuse_tls()
    noop = conn.next_event()
    assert isinstance(noop, Command)
    assert noop.verb.value == "NOOP"


def test_a_refused_starttls_line_does_not_pause() -> None:
    conn = ServerConnection()
    conn.receive_data(b"STARTTLS\nNOOP\r\n")
    assert isinstance(conn.next_event(), BadCommand)
    assert conn.state is ServerState.COMMAND
    noop = conn.next_event()
    assert isinstance(noop, Command)
    assert noop.verb.value == "NOOP"


@pytest.mark.parametrize(
    "misuse",
    [
        ServerConnection.discard,
        ServerConnection.reset_after_tls,
        ServerConnection.refuse_tls,
    ],
    ids=["discard", "reset_after_tls", "refuse_tls"],
)
def test_tls_calls_out_of_turn_are_local_errors(
    misuse: Callable[[ServerConnection], object],
) -> None:
    conn = ServerConnection()
    conn.receive_data(b"NOOP\r\n")
    with pytest.raises(LocalProtocolError, match="not allowed"):
        misuse(conn)
    assert conn.state is ServerState.ERROR
    conn = ServerConnection()
    conn.receive_data(b"DATA\r\n")
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        misuse(conn)


def test_auth_and_starttls_pause_like_data_in_every_split() -> None:
    # summarize_server takes AUTH and STARTTLS as refused: commands follow.
    every_split(
        b"AUTH PLAIN\r\nSTARTTLS\r\nNOOP\r\n",
        [
            ("AUTH", b"AUTH PLAIN\r\n"),
            ("STARTTLS", b"STARTTLS\r\n"),
            ("NOOP", b"NOOP\r\n"),
        ],
    )
