"""AUTH pass-through in the core: response lines (RFC 4954) and identities."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corehelpers import splits
from smtpwarden.protocol.auth import (
    MAX_IDENTITY_OCTETS,
    AuthIdentity,
    AuthStart,
    identity,
    parse_auth_command,
)
from smtpwarden.protocol.errors import LocalProtocolError, ProtocolError
from smtpwarden.protocol.events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthResponse,
    BadCommand,
    Command,
    Signal,
    Verb,
)
from smtpwarden.protocol.server import MAX_AUTH_LINE_BYTES, ServerConnection
from smtpwarden.protocol.state import ServerState

SECRET = b"s3cret-P4ss"
DIGEST = b"b913a602c7eda7a495b4e6e7334d3890"


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def line(raw: bytes) -> bytes:
    return b64(raw) + b"\r\n"


PLAIN_MESSAGE = b"\x00alice\x00" + SECRET
XOAUTH2_MESSAGE = b"user=alice\x01auth=Bearer " + SECRET + b"\x01\x01"
# Every form in which a secret could leak: as is, and base64 of each
# message it is sent in.
SECRET_FORMS = tuple(
    form.decode()
    for form in (
        SECRET,
        DIGEST,
        b64(SECRET),
        b64(PLAIN_MESSAGE),
        b64(XOAUTH2_MESSAGE),
        b64(b"alice " + DIGEST),
    )
)


def no_secret(shown: str) -> bool:
    return not any(form in shown for form in SECRET_FORMS)


Summary = tuple[str, bytes]


def exchange(
    chunks: list[bytes], verdicts: list[int], *, max_auth_line_bytes: int = MAX_AUTH_LINE_BYTES
) -> list[Summary]:
    """Play the shell: each wait in an AUTH exchange takes the next upstream reply.

    334 means a response follows; any other code ends the exchange.
    """
    conn = ServerConnection(max_auth_line_bytes=max_auth_line_bytes)
    replies = iter(verdicts)
    out: list[Summary] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            if event is PAUSED:
                assert conn.state is ServerState.AWAIT_AUTH
                if next(replies) == 334:
                    conn.expect_auth_response()
                else:
                    conn.auth_done()
                continue
            if isinstance(event, Signal):
                break
            if isinstance(event, AuthResponse):
                out.append(("response", event.line))
            elif isinstance(event, BadCommand):
                out.append(("bad", event.error.reply_bytes()))
            elif isinstance(event, Command):
                out.append((event.verb.value, event.line))
    assert next(replies, None) is None, "every upstream reply was used"
    return out


# -- response lines ------------------------------------------------------------


def test_login_exchange_in_every_split() -> None:
    user, password = line(b"alice"), line(SECRET)
    wire = b"AUTH LOGIN\r\n" + user + password + b"MAIL FROM:<a@b>\r\n"
    expected = [
        ("AUTH", b"AUTH LOGIN\r\n"),
        ("response", user),
        ("response", password),
        ("MAIL", b"MAIL FROM:<a@b>\r\n"),
    ]
    for chunks in splits(wire):
        assert exchange(chunks, [334, 334, 235]) == expected, chunks


def test_plain_with_an_initial_response_needs_no_response_line() -> None:
    wire = b"AUTH PLAIN " + b64(PLAIN_MESSAGE) + b"\r\nNOOP\r\n"
    for chunks in splits(wire):
        assert exchange(chunks, [235]) == [
            ("AUTH", b"AUTH PLAIN " + b64(PLAIN_MESSAGE) + b"\r\n"),
            ("NOOP", b"NOOP\r\n"),
        ]


def test_an_empty_response_line_is_a_response() -> None:
    # An XOAUTH2 failure: the upstream sends an error as a 334 challenge and
    # the client answers with an empty line before the final 535.
    wire = b"AUTH XOAUTH2 " + b64(b"user=a\x01auth=Bearer t\x01\x01") + b"\r\n\r\nQUIT\r\n"
    for chunks in splits(wire):
        out = exchange(chunks, [334, 535])
        assert out[1:] == [("response", b"\r\n"), ("QUIT", b"QUIT\r\n")]


def test_the_auth_event_is_the_command_as_received() -> None:
    conn = ServerConnection()
    raw = b"auth  plain " + b64(PLAIN_MESSAGE) + b"\r\n"
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, Auth)
    assert isinstance(event, Command)
    assert event.verb is Verb.AUTH
    assert event.line == raw
    assert event.argument == b"plain " + b64(PLAIN_MESSAGE)
    assert event.mechanism == "PLAIN"
    assert event.initial == b64(PLAIN_MESSAGE)
    assert no_secret(repr(event))
    assert no_secret(str(event))


def test_an_auth_line_without_a_mechanism_still_pauses() -> None:
    conn = ServerConnection()
    conn.receive_data(b"AUTH\r\nNOOP\r\n")
    event = conn.next_event()
    assert isinstance(event, Auth)
    assert (event.mechanism, event.initial) == ("", None)
    assert conn.next_event() is PAUSED
    conn.auth_done()  # the upstream answered 501
    noop = conn.next_event()
    assert isinstance(noop, Command)
    assert noop.verb is Verb.NOOP


def test_pipelined_bytes_after_auth_wait_for_the_upstream() -> None:
    rest = line(PLAIN_MESSAGE) + b"NOOP\r\n"
    conn = ServerConnection()
    conn.receive_data(b"AUTH PLAIN\r\n" + rest)
    assert isinstance(conn.next_event(), Auth)
    for _ in range(3):
        assert conn.next_event() is PAUSED
    assert conn.buffered == len(rest)
    conn.expect_auth_response()
    response = conn.next_event()
    assert isinstance(response, AuthResponse)
    assert response.line == line(PLAIN_MESSAGE)
    assert not response.cancelled
    # The response is read; its verdict is awaited before anything else.
    assert conn.next_event() is PAUSED
    assert conn.buffered == len(b"NOOP\r\n")
    conn.auth_done()
    noop = conn.next_event()
    assert isinstance(noop, Command)
    assert noop.verb is Verb.NOOP
    assert conn.next_event() is NEED_DATA


def test_auth_refused_at_once_reads_the_next_line_as_a_command() -> None:
    # The upstream (or the shell: 503 inside a transaction, 530 before TLS)
    # refused AUTH outright: the client cannot have meant a response.
    wire = b"MAIL FROM:<a@b>\r\nAUTH LOGIN\r\nRSET\r\n"
    for chunks in splits(wire):
        assert exchange(chunks, [503]) == [
            ("MAIL", b"MAIL FROM:<a@b>\r\n"),
            ("AUTH", b"AUTH LOGIN\r\n"),
            ("RSET", b"RSET\r\n"),
        ]


def test_star_cancels_the_exchange() -> None:
    wire = b"AUTH LOGIN\r\n*\r\nNOOP\r\n"
    for chunks in splits(wire):
        assert exchange(chunks, [334, 501]) == [
            ("AUTH", b"AUTH LOGIN\r\n"),
            ("response", b"*\r\n"),
            ("NOOP", b"NOOP\r\n"),
        ]
    conn = ServerConnection()
    conn.receive_data(b"AUTH LOGIN\r\n*\r\n")
    conn.next_event()
    conn.next_event()
    conn.expect_auth_response()
    cancel = conn.next_event()
    assert isinstance(cancel, AuthResponse)
    assert cancel.cancelled


def test_a_response_of_12288_base64_octets_is_read() -> None:
    assert MAX_AUTH_LINE_BYTES == 12288 + 2
    response = b"A" * 12288 + b"\r\n"
    wire = b"AUTH GSSAPI\r\n" + response + b"NOOP\r\n"
    step = 1000
    chunks = [wire[i : i + step] for i in range(0, len(wire), step)]
    assert exchange(chunks, [334, 235]) == [
        ("AUTH", b"AUTH GSSAPI\r\n"),
        ("response", response),
        ("NOOP", b"NOOP\r\n"),
    ]


TOO_LONG = b"500 5.5.6 Authentication Exchange line is too long\r\n"
BARE = b"500 5.5.2 Bare CR or LF is not allowed; lines must end with CRLF\r\n"
NOT_BASE64 = b"501 5.5.2 Cannot Base64-decode Client responses\r\n"


def test_an_overlong_response_is_refused_and_commands_follow() -> None:
    wire = b"AUTH GSSAPI\r\n" + b"A" * 12289 + b"\r\nNOOP\r\n"
    step = 997
    chunks = [wire[i : i + step] for i in range(0, len(wire), step)]
    assert exchange(chunks, [334]) == [
        ("AUTH", b"AUTH GSSAPI\r\n"),
        ("bad", TOO_LONG),
        ("NOOP", b"NOOP\r\n"),
    ]


def test_an_overlong_response_is_dropped_as_it_comes_in_every_split() -> None:
    wire = b"AUTH LOGIN\r\n" + b64(SECRET * 10) + b"\r\nNOOP\r\n"
    for chunks in splits(wire):
        assert exchange(chunks, [334], max_auth_line_bytes=32) == [
            ("AUTH", b"AUTH LOGIN\r\n"),
            ("bad", TOO_LONG),
            ("NOOP", b"NOOP\r\n"),
        ]
    conn = ServerConnection(max_auth_line_bytes=32)
    conn.receive_data(b"AUTH LOGIN\r\n")
    conn.next_event()
    conn.next_event()
    conn.expect_auth_response()
    events = []
    for octet in wire[len(b"AUTH LOGIN\r\n") :]:
        conn.receive_data(bytes([octet]))
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
        assert conn.buffered <= 33
    assert len(events) == 2
    refused = events[0]
    assert isinstance(refused, BadCommand)
    assert (refused.verb, refused.line) == (Verb.AUTH, b"")


@pytest.mark.parametrize(
    ("response", "reply"),
    [
        (b"dXNlcg==\nNOOP\r\n", BARE),
        (b"dXNl\rcg==\r\nNOOP\r\n", BARE),
        (b"\nNOOP\r\n", BARE),
        (b"\r\r\nNOOP\r\n", BARE),
        (SECRET + b"\r\nNOOP\r\n", NOT_BASE64),
        (b"dXNl cg==\r\nNOOP\r\n", NOT_BASE64),
        (b"dXNlcg==\x00\r\nNOOP\r\n", NOT_BASE64),
        (b"* \r\nNOOP\r\n", NOT_BASE64),
    ],
    ids=["bare-lf", "bare-cr", "lone-lf", "cr-cr-lf", "clear-text", "blank", "nul", "star-blank"],
)
def test_bad_response_lines_are_refused_and_commands_follow(response: bytes, reply: bytes) -> None:
    wire = b"AUTH LOGIN\r\n" + response
    for chunks in splits(wire):
        assert exchange(chunks, [334]) == [
            ("AUTH", b"AUTH LOGIN\r\n"),
            ("bad", reply),
            ("NOOP", b"NOOP\r\n"),
        ], chunks


def test_each_further_challenge_needs_expect_auth_response_again() -> None:
    conn = ServerConnection()
    conn.receive_data(b"AUTH LOGIN\r\n" + line(b"alice") + line(SECRET))
    conn.next_event()
    assert conn.next_event() is PAUSED
    conn.expect_auth_response()
    assert isinstance(conn.next_event(), AuthResponse)
    assert conn.next_event() is PAUSED
    assert conn.state is ServerState.AWAIT_AUTH
    conn.expect_auth_response()
    assert isinstance(conn.next_event(), AuthResponse)
    conn.auth_done()
    assert conn.state is ServerState.COMMAND


@pytest.mark.parametrize(
    "misuse",
    [ServerConnection.expect_auth_response, ServerConnection.auth_done],
    ids=["expect_auth_response", "auth_done"],
)
def test_auth_calls_out_of_turn_are_local_errors(
    misuse: Callable[[ServerConnection], None],
) -> None:
    conn = ServerConnection()
    with pytest.raises(LocalProtocolError, match="not allowed"):
        misuse(conn)
    assert conn.state is ServerState.ERROR


def test_auth_response_state_cannot_be_left_by_the_shell() -> None:
    conn = ServerConnection()
    conn.receive_data(b"AUTH LOGIN\r\n")
    conn.next_event()
    conn.next_event()
    conn.expect_auth_response()
    with pytest.raises(LocalProtocolError):
        conn.auth_done()


@settings(max_examples=200)
@given(
    # No empty binary beside integers: hash(b"") == hash(0), and Hypothesis
    # would compare the two in its cache, a BytesWarning under -bb.
    st.lists(
        st.one_of(st.binary(min_size=1, max_size=120).map(b64), st.sampled_from([b"*", b""])),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_response_lines_come_out_whole_and_unchanged(
    responses: list[bytes], cuts: list[int]
) -> None:
    lines = [text + b"\r\n" for text in responses]
    wire = b"AUTH LOGIN\r\n" + b"".join(lines) + b"QUIT\r\n"
    points = sorted({0, len(wire), *(cut % (len(wire) + 1) for cut in cuts)})
    chunks = [wire[a:b] for a, b in itertools.pairwise(points)]
    out = exchange(chunks, [334] * len(lines) + [235])
    assert out == [
        ("AUTH", b"AUTH LOGIN\r\n"),
        *(("response", text) for text in lines),
        ("QUIT", b"QUIT\r\n"),
    ]


# -- no secret in any event or error -------------------------------------------------


def collect(wire: bytes, verdicts: list[int], **limits: int) -> list[object]:
    """Every event, error and identity an AUTH exchange produces."""
    conn = ServerConnection(**limits)
    conn.receive_data(wire)
    replies = iter(verdicts)
    seen: list[object] = []
    tracker: AuthIdentity | None = None
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            break
        if event is PAUSED:
            if next(replies, 235) == 334:
                conn.expect_auth_response()
            else:
                conn.auth_done()
            continue
        seen.append(event)
        if isinstance(event, Auth):
            tracker = AuthIdentity(event.mechanism, event.initial)
            seen.append(parse_auth_command(event.line))
        elif isinstance(event, AuthResponse) and tracker is not None:
            tracker.response(event.line)
        elif isinstance(event, BadCommand):
            seen.append(event.error)
    if tracker is not None:
        seen.extend([tracker, tracker.identity])
    # Misuse of the core after the exchange: its message holds no secret.
    try:
        conn.expect_auth_response()
    except ProtocolError as error:
        seen.append(error)
    return seen


SECRET_EXCHANGES = {
    "plain-initial": (b"AUTH PLAIN " + b64(PLAIN_MESSAGE) + b"\r\n", [235], {}),
    "plain-response": (b"AUTH PLAIN\r\n" + line(PLAIN_MESSAGE), [334, 235], {}),
    "login": (b"AUTH LOGIN\r\n" + line(b"alice") + line(SECRET), [334, 334, 235], {}),
    "login-initial": (b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + line(SECRET), [334, 235], {}),
    "cram-md5": (b"AUTH CRAM-MD5\r\n" + line(b"alice " + DIGEST), [334, 235], {}),
    "xoauth2": (
        b"AUTH XOAUTH2 " + b64(XOAUTH2_MESSAGE) + b"\r\n",
        [235],
        {},
    ),
    "clear-text-response": (b"AUTH LOGIN\r\n" + line(b"alice") + SECRET + b"\r\n", [334, 334], {}),
    "overlong-response": (
        b"AUTH PLAIN\r\n" + line(PLAIN_MESSAGE * 4),
        [334],
        {"max_auth_line_bytes": 40},
    ),
    "bare-lf-response": (b"AUTH PLAIN\r\n" + b64(PLAIN_MESSAGE) + b"\n", [334], {}),
    "bare-lf-command": (b"AUTH PLAIN " + b64(PLAIN_MESSAGE) + b"\n", [], {}),
    "nul-in-command": (b"AUTH PLAIN " + b64(PLAIN_MESSAGE) + b"\x00\r\n", [], {}),
    "overlong-command": (
        b"AUTH PLAIN " + b64(PLAIN_MESSAGE) + b"\r\n",
        [],
        {"max_line_bytes": 20},
    ),
}


@pytest.mark.parametrize(
    ("wire", "verdicts", "limits"), SECRET_EXCHANGES.values(), ids=SECRET_EXCHANGES.keys()
)
def test_no_event_or_error_of_an_exchange_shows_the_secret(
    wire: bytes, verdicts: list[int], limits: dict[str, int]
) -> None:
    seen = collect(wire, verdicts, **limits)
    assert len(seen) >= 2
    for item in seen:
        assert no_secret(repr(item)), item
        assert no_secret(str(item)), item
        if isinstance(item, BaseException):
            assert all(no_secret(str(arg)) for arg in item.args)


def test_the_secret_check_would_see_a_leak() -> None:
    assert not no_secret(repr(Command(verb=Verb.AUTH, argument=b"", line=b64(PLAIN_MESSAGE))))
    assert not no_secret(f"password {SECRET.decode()}")


# -- parsing the AUTH line ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"AUTH PLAIN\r\n", ("PLAIN", None)),
        (b"auth plain =\r\n", ("PLAIN", b"=")),
        (b"AUTH LOGIN dXNlcg==\r\n", ("LOGIN", b"dXNlcg==")),
        (b"AUTH  cram-md5 \r\n", ("CRAM-MD5", None)),
        (b"AUTH XOAUTH2 abc", ("XOAUTH2", b"abc")),
        (b"AUTH SCRAM-SHA-256-PLUS\r\n", ("SCRAM-SHA-256-PLUS", None)),
    ],
)
def test_parse_auth_command(raw: bytes, expected: tuple[str, bytes | None]) -> None:
    start = parse_auth_command(raw)
    assert start is not None
    assert (start.mechanism, start.initial) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"AUTH\r\n",
        b"AUTH \r\n",
        b"AUTH PLAIN a b\r\n",
        b"AUTH PL@IN\r\n",
        b"AUTH " + b"X" * 21 + b"\r\n",
        b"AUTH PLAIN\n",
        b"MAIL FROM:<a@b>\r\n",
        b"AUTHX PLAIN\r\n",
    ],
)
def test_parse_auth_command_refuses_what_is_not_auth(raw: bytes) -> None:
    assert parse_auth_command(raw) is None


def test_auth_start_repr_hides_the_initial_response() -> None:
    start = AuthStart("PLAIN", b64(PLAIN_MESSAGE))
    assert repr(start) == "AuthStart(mechanism='PLAIN')"


# -- identity ------------------------------------------------------------------


def xoauth2(user: bytes) -> bytes:
    return b"user=" + user + b"\x01auth=Bearer " + SECRET + b"\x01\x01"


IDENTITIES: dict[str, tuple[str, bytes | None, list[bytes], str | None]] = {
    "plain-initial": ("PLAIN", b64(PLAIN_MESSAGE), [], "alice"),
    "plain-response": ("PLAIN", None, [line(PLAIN_MESSAGE)], "alice"),
    "plain-response-no-crlf": ("PLAIN", None, [b64(PLAIN_MESSAGE)], "alice"),
    "plain-lower-case": ("plain", b64(PLAIN_MESSAGE), [], "alice"),
    "plain-same-authzid": ("PLAIN", b64(b"alice\x00alice\x00" + SECRET), [], "alice"),
    "plain-authzid": ("PLAIN", b64(b"bob\x00alice\x00" + SECRET), [], "alice as bob"),
    "plain-utf8": ("PLAIN", b64("\x00jürgen\x00".encode() + SECRET), [], "jürgen"),
    "plain-empty-initial": ("PLAIN", b"=", [line(PLAIN_MESSAGE)], None),
    "plain-no-authcid": ("PLAIN", b64(b"bob\x00\x00" + SECRET), [], None),
    "plain-one-nul": ("PLAIN", b64(b"alice\x00" + SECRET), [], None),
    "plain-three-nuls": ("PLAIN", b64(b"\x00alice\x00" + SECRET + b"\x00"), [], None),
    "plain-bad-utf8": ("PLAIN", b64(b"\x00al\xffice\x00" + SECRET), [], None),
    "plain-control": ("PLAIN", b64(b"\x00ali\nce\x00" + SECRET), [], None),
    "plain-bad-authzid": ("PLAIN", b64(b"b\x01b\x00alice\x00" + SECRET), [], None),
    "plain-not-base64": ("PLAIN", b"!!" + SECRET, [], None),
    "plain-bad-padding": ("PLAIN", b64(PLAIN_MESSAGE).rstrip(b"=") + b"=", [], None),
    "plain-cancelled": ("PLAIN", None, [b"*\r\n"], None),
    "plain-no-response-yet": ("PLAIN", None, [], None),
    "plain-too-long": (
        "PLAIN",
        b64(b"\x00" + b"a" * (MAX_IDENTITY_OCTETS + 1) + b"\x00" + SECRET),
        [],
        None,
    ),
    "plain-longest": (
        "PLAIN",
        b64(b"\x00" + b"a" * MAX_IDENTITY_OCTETS + b"\x00" + SECRET),
        [],
        "a" * MAX_IDENTITY_OCTETS,
    ),
    "login": ("LOGIN", None, [line(b"alice"), line(SECRET)], "alice"),
    "login-initial": ("LOGIN", b64(b"alice"), [line(SECRET)], "alice"),
    "login-empty-initial": ("LOGIN", b"=", [line(SECRET)], None),
    "login-cancelled": ("LOGIN", None, [b"*\r\n", line(SECRET)], None),
    "login-garbage": ("LOGIN", None, [b"%%%\r\n", line(SECRET)], None),
    "login-empty-user": ("LOGIN", None, [b"\r\n", line(SECRET)], None),
    "cram-md5": ("CRAM-MD5", None, [line(b"alice " + DIGEST)], "alice"),
    "cram-md5-spaces": ("CRAM-MD5", None, [line(b"alice smith " + DIGEST)], "alice smith"),
    "cram-md5-upper-hex": ("CRAM-MD5", None, [line(b"alice " + DIGEST.upper())], "alice"),
    "cram-md5-initial": ("CRAM-MD5", b64(b"alice " + DIGEST), [], None),
    "cram-md5-short-digest": ("CRAM-MD5", None, [line(b"alice " + DIGEST[:-1])], None),
    "cram-md5-no-space": ("CRAM-MD5", None, [line(b"alice" + DIGEST)], None),
    "cram-md5-no-user": ("CRAM-MD5", None, [line(b" " + DIGEST)], None),
    "xoauth2-initial": ("XOAUTH2", b64(xoauth2(b"alice@example.com")), [], "alice@example.com"),
    "xoauth2-response": ("XOAUTH2", None, [line(xoauth2(b"a@b"))], "a@b"),
    "xoauth2-failure-reply": ("XOAUTH2", b64(xoauth2(b"a@b")), [b"\r\n"], "a@b"),
    "xoauth2-unterminated": ("XOAUTH2", b64(xoauth2(b"a@b")[:-1]), [], None),
    "xoauth2-auth-first": (
        "XOAUTH2",
        b64(b"auth=Bearer " + SECRET + b"\x01user=a\x01\x01"),
        [],
        None,
    ),
    "xoauth2-empty-user": ("XOAUTH2", b64(xoauth2(b"")), [], None),
    "xoauth2-empty-initial": ("XOAUTH2", b"=", [], None),
    "unknown-mechanism": ("GSSAPI", b64(PLAIN_MESSAGE), [line(PLAIN_MESSAGE)], None),
}


@pytest.mark.parametrize(
    ("mechanism", "initial", "responses", "expected"), IDENTITIES.values(), ids=IDENTITIES.keys()
)
def test_identity(
    mechanism: str, initial: bytes | None, responses: list[bytes], expected: str | None
) -> None:
    found = identity(mechanism, initial, responses)
    assert found == expected
    assert no_secret(repr(found))
    tracker = AuthIdentity(mechanism, initial)
    for response in responses:
        tracker.response(response)
    assert tracker.identity == expected
    assert tracker.mechanism == mechanism.upper()
    assert no_secret(repr(tracker))


def test_only_the_first_message_is_read() -> None:
    tracker = AuthIdentity("LOGIN", None)
    assert tracker.identity is None
    tracker.response(line(b"alice"))
    tracker.response(line(b"mallory"))
    assert tracker.identity == "alice"
    assert repr(tracker) == "AuthIdentity(mechanism='LOGIN', identity='alice')"


@given(
    st.text(max_size=40), st.binary(min_size=1, max_size=40), st.sampled_from(["PLAIN", "LOGIN"])
)
def test_identity_never_returns_the_password(user: str, password: bytes, mechanism: str) -> None:
    raw_user = user.encode()
    if mechanism == "PLAIN":
        found = identity(mechanism, b64(b"\x00" + raw_user + b"\x00" + password), [])
    else:
        found = identity(mechanism, None, [line(raw_user), line(password)])
    if found is not None:
        assert found == user
