"""One delivery attempt over real sockets: what the upstream gets, what the attempt says.

``deliver`` runs on its own event loop in the test thread, once per loop
kind. The upstreams are the recording ones (exact bytes), aiosmtpd (a real
server implementation), Postfix's smtp-sink with its fault flags, and
peers that refuse, stall or break the reply grammar.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import pytest

from integration.external_tools import SmtpSink
from integration.recording_upstreams import (
    DEFAULT_EHLO,
    AiosmtpdUpstream,
    RawConnection,
    RawUpstream,
)
from integration.relay_harness import free_port
from smtpwarden.config import LimitsConfig, TimeoutsConfig
from smtpwarden.net.delivery import Attempt, Envelope, deliver
from smtpwarden.net.loop import LoopChoice, loop_factory
from smtpwarden.net.upstream import Target

T = TypeVar("T")
HOSTNAME = "relay.test"
# Long enough for a loaded CI machine; the tests that expect a timeout set
# their own short one.
TIMEOUTS = TimeoutsConfig(
    connect=10, banner=10, mail=10, rcpt=10, data_init=10, data_block=10, data_end=10, reply=10
)
SHORT_S = 0.3

MAIL = b"MAIL FROM:<sender@example.org> SIZE=1234 BODY=8BITMIME\r\n"
RCPTS = (b"RCPT TO:<one@example.net>\r\n", b"RCPT TO:<two@example.net> NOTIFY=NEVER\r\n")
MESSAGE = (
    b"From: sender@example.org\r\n"
    b"To: one@example.net\r\n"
    b"Subject: delivery\r\n"
    b"\r\n"
    b".a line starting with one dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"the end\r\n"
)


def stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2: the DATA section a client sends for ``message``."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


@dataclass(frozen=True)
class Held:
    """A held message in pieces, handed out as memoryviews like a real buffer."""

    pieces: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    def chunks(self) -> Iterator[bytes | memoryview]:
        return (memoryview(piece) for piece in self.pieces)


def pieces(data: bytes, size: int = 7) -> Held:
    """``data`` cut every ``size`` octets, so boundaries fall everywhere."""
    return Held(tuple(data[i : i + size] for i in range(0, len(data), size)))


def envelope(
    body: Literal["data", "bdat"] = "data",
    mail: bytes = MAIL,
    recipients: tuple[bytes, ...] = RCPTS,
) -> Envelope:
    return Envelope(mail_from=mail, recipients=recipients, body=body)


def target(port: int) -> Target:
    return Target(name="up", host="127.0.0.1", port=port)


@pytest.fixture
def run(loop_kind: str) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine to completion on a fresh loop of the test's kind."""
    factory, _ = loop_factory(cast(LoopChoice, loop_kind))

    def run_on_loop(coroutine: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coroutine)

    return run_on_loop


Run = Callable[[Coroutine[Any, Any, Attempt]], Attempt]


def attempt_on(
    run: Run,
    port: int,
    env: Envelope,
    message: Held,
    timeouts: TimeoutsConfig = TIMEOUTS,
    limits: LimitsConfig | None = None,
) -> Attempt:
    return run(
        deliver(
            target(port),
            env,
            message,
            hostname=HOSTNAME,
            timeouts=timeouts,
            limits=limits or LimitsConfig(),
        )
    )


def only_connection(upstream: RawUpstream) -> RawConnection:
    (conn,) = upstream.wait_all_ended()
    return conn


EHLO = b"EHLO relay.test\r\n"
QUIT = b"QUIT\r\n"


# --- Exact bytes: the recording upstream ----------------------------------------


def test_data_section_arrives_byte_for_byte(run: Run, raw_upstream: RawUpstream) -> None:
    section = stuff(MESSAGE)
    attempt = attempt_on(run, raw_upstream.port, envelope(), pieces(section))

    conn = only_connection(raw_upstream)
    assert conn.commands == [EHLO, MAIL, *RCPTS, b"DATA\r\n", QUIT]
    assert conn.data == [section]
    assert conn.quit
    assert attempt.error is None
    assert attempt.connected
    assert attempt.upstream == "up"
    assert attempt.banner is not None
    assert attempt.banner.code == 220
    assert attempt.mail is not None
    assert attempt.mail.code == 250
    assert [reply.code if reply else None for reply in attempt.recipients] == [250, 250]
    assert attempt.accepted == (0, 1)
    assert attempt.data is not None
    assert attempt.data.code == 354
    assert attempt.final is not None
    assert attempt.final.raw == b"250 2.0.0 Ok: queued\r\n"
    assert attempt.sent
    assert attempt.succeeded


def test_empty_data_message(run: Run, raw_upstream: RawUpstream) -> None:
    attempt = attempt_on(run, raw_upstream.port, envelope(), Held((b".\r\n",)))
    assert only_connection(raw_upstream).data == [b".\r\n"]
    assert attempt.succeeded


def test_bdat_message_goes_as_one_last_chunk(run: Run, raw_upstream: RawUpstream) -> None:
    attempt = attempt_on(run, raw_upstream.port, envelope("bdat"), pieces(MESSAGE))

    conn = only_connection(raw_upstream)
    assert conn.commands == [EHLO, MAIL, *RCPTS, b"BDAT %d LAST\r\n" % len(MESSAGE), QUIT]
    assert conn.bdat_chunks == [MESSAGE]
    assert conn.data == []
    assert attempt.data is None
    assert attempt.sent
    assert attempt.succeeded


def test_empty_bdat_message(run: Run, raw_upstream: RawUpstream) -> None:
    attempt = attempt_on(run, raw_upstream.port, envelope("bdat"), Held(()))
    conn = only_connection(raw_upstream)
    assert conn.commands[-2:] == [b"BDAT 0 LAST\r\n", QUIT]
    assert conn.bdat_messages == [b""]
    assert attempt.succeeded


NO_CHUNKING = tuple(word for word in DEFAULT_EHLO if word != "CHUNKING")
NO_PIPELINING = tuple(word for word in DEFAULT_EHLO if word != "PIPELINING")
# A line of a dot alone, then a command: as DATA, only stuffing keeps it text.
SMUGGLE = b"Subject: x\r\n\r\nhello\r\n.\r\nMAIL FROM:<evil@example.org>\r\n.last line, no CRLF"


@pytest.mark.parametrize(
    "message", [MESSAGE, SMUGGLE, b"", b"x"], ids=["plain", "dot", "empty", "x"]
)
def test_bdat_message_stuffed_into_data_without_chunking(
    run: Run, make_raw_upstream: Callable[..., RawUpstream], message: bytes
) -> None:
    upstream = make_raw_upstream(ehlo=NO_CHUNKING)
    attempt = attempt_on(run, upstream.port, envelope("bdat"), pieces(message, 3))

    conn = only_connection(upstream)
    assert conn.commands == [EHLO, MAIL, *RCPTS, b"DATA\r\n", QUIT]
    assert conn.data == [stuff(message)]
    assert attempt.succeeded


def test_large_message_with_backpressure(run: Run, raw_upstream: RawUpstream) -> None:
    line = b"x" * 998 + b"\r\n"
    message = line * 2048  # 2 MiB, well past the write buffer's high-water mark
    attempt = attempt_on(run, raw_upstream.port, envelope("bdat"), pieces(message, 65536))
    assert only_connection(raw_upstream).bdat_messages == [message]
    assert attempt.succeeded


def test_bare_line_ending_cannot_become_data(
    run: Run, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(ehlo=NO_CHUNKING)
    message = Held((b"Subject: x\r\n\r\nfine\r\n", b"evil\n.\nQUIT\r\n"))
    attempt = attempt_on(run, upstream.port, envelope("bdat"), message)

    conn = only_connection(upstream)
    assert conn.data == []
    assert conn.in_data_at_end
    assert conn.partial == b"Subject: x\r\n\r\nfine\r\n"
    assert attempt.error is not None
    assert attempt.error.startswith("message holds a bare CR or LF")
    assert not attempt.sent
    assert attempt.final is None


def test_mail_parameters_reach_the_upstream_unchanged(run: Run, raw_upstream: RawUpstream) -> None:
    mail = b"MAIL FROM:<us\xc3\xa9r@example.org> SMTPUTF8 BODY=8BITMIME ENVID=abc RET=HDRS\r\n"
    attempt_on(run, raw_upstream.port, envelope(mail=mail), pieces(stuff(MESSAGE)))
    assert only_connection(raw_upstream).commands[1] == mail


def test_smtputf8_needs_the_upstream_to_offer_it(
    run: Run, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(ehlo=tuple(w for w in DEFAULT_EHLO if w != "SMTPUTF8"))
    mail = b"MAIL FROM:<us\xc3\xa9r@example.org> SMTPUTF8\r\n"
    attempt = attempt_on(run, upstream.port, envelope(mail=mail), pieces(stuff(MESSAGE)))

    assert only_connection(upstream).commands == [EHLO, QUIT]
    assert attempt.error == "upstream lacks SMTPUTF8"
    assert attempt.mail is None
    assert not attempt.sent


@pytest.mark.parametrize(
    ("ehlo", "error"),
    [
        (NO_CHUNKING, "upstream lacks CHUNKING for a BINARYMIME message"),
        (("PIPELINING", "CHUNKING"), "upstream lacks BINARYMIME"),
    ],
    ids=["no-chunking", "no-binarymime"],
)
def test_binarymime_needs_chunking(
    run: Run, make_raw_upstream: Callable[..., RawUpstream], ehlo: tuple[str, ...], error: str
) -> None:
    upstream = make_raw_upstream(ehlo=ehlo)
    mail = b"MAIL FROM:<sender@example.org> BODY=BINARYMIME\r\n"
    message = Held((b"binary\x00\r\x00\n",))
    attempt = attempt_on(run, upstream.port, envelope("bdat", mail=mail), message)

    conn = only_connection(upstream)
    assert conn.commands == [EHLO, QUIT]
    assert conn.data == conn.bdat_chunks == []
    assert attempt.error == error


def test_binarymime_with_chunking(run: Run, make_raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = make_raw_upstream(ehlo=(*DEFAULT_EHLO, "BINARYMIME"))
    mail = b"MAIL FROM:<sender@example.org> BODY=BINARYMIME\r\n"
    message = b"binary\x00\r\x00\n.\r\n"
    attempt = attempt_on(run, upstream.port, envelope("bdat", mail=mail), Held((message,)))
    assert only_connection(upstream).bdat_messages == [message]
    assert attempt.succeeded


def test_ehlo_refused_falls_back_to_helo(
    run: Run, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(replies={"EHLO": b"502 5.5.1 EHLO not implemented\r\n"})
    mail = b"MAIL FROM:<sender@example.org>\r\n"
    attempt = attempt_on(run, upstream.port, envelope("bdat", mail=mail), pieces(MESSAGE))

    conn = only_connection(upstream)
    # HELO offers nothing: no pipelining, and BDAT becomes DATA.
    assert conn.commands == [EHLO, b"HELO relay.test\r\n", mail, *RCPTS, b"DATA\r\n", QUIT]
    assert conn.data == [stuff(MESSAGE)]
    assert attempt.succeeded


def test_8bitmime_needs_the_upstream_to_offer_it(
    run: Run, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(ehlo=("PIPELINING", "SMTPUTF8"))
    attempt = attempt_on(run, upstream.port, envelope(), pieces(stuff(MESSAGE)))

    assert only_connection(upstream).commands == [EHLO, QUIT]
    assert attempt.error == "upstream lacks 8BITMIME"


def test_banner_refusal(run: Run, make_raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = make_raw_upstream(replies={"BANNER": b"554 5.7.1 No SMTP service here\r\n"})
    attempt = attempt_on(run, upstream.port, envelope(), pieces(stuff(MESSAGE)))

    assert only_connection(upstream).commands == [QUIT]
    assert attempt.connected
    assert attempt.banner is not None
    assert attempt.banner.code == 554
    assert attempt.error == "banner 554 5.7.1 No SMTP service here"
    assert attempt.mail is None
    assert not attempt.sent


@pytest.mark.parametrize(
    ("ehlo", "commands"),
    [
        (DEFAULT_EHLO, [EHLO, MAIL, *RCPTS, QUIT]),
        (NO_PIPELINING, [EHLO, MAIL, QUIT]),
    ],
    ids=["pipelined", "one-by-one"],
)
def test_refused_mail_ends_the_transaction(
    run: Run,
    make_raw_upstream: Callable[..., RawUpstream],
    ehlo: tuple[str, ...],
    commands: list[bytes],
) -> None:
    upstream = make_raw_upstream(
        ehlo=ehlo,
        replies={
            "MAIL": b"550 5.7.1 Sender refused\r\n",
            "RCPT": b"503 5.5.1 Need MAIL first\r\n",
        },
    )
    # BDAT with CHUNKING: the RCPTs go in MAIL's group when pipelining is
    # offered, and no DATA is sent with them whose section the recorder awaits.
    attempt = attempt_on(run, upstream.port, envelope("bdat"), pieces(MESSAGE))

    assert only_connection(upstream).commands == commands
    assert attempt.mail is not None
    assert attempt.mail.code == 550
    assert attempt.error == "MAIL 550 5.7.1 Sender refused"
    assert attempt.accepted == ()
    assert not attempt.sent


def test_pipelined_data_accepted_without_recipients_gets_a_lone_dot(
    run: Run, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(replies={"RCPT": b"550 5.1.1 No such user\r\n"})
    attempt = attempt_on(run, upstream.port, envelope(), pieces(stuff(MESSAGE)))

    conn = only_connection(upstream)
    assert conn.commands == [EHLO, MAIL, *RCPTS, b"DATA\r\n", QUIT]
    # RFC 2920 3.1: DATA got 354 though no recipient was accepted.
    assert conn.data == [b".\r\n"]
    assert attempt.error == "no recipient accepted"
    assert [reply.code if reply else None for reply in attempt.recipients] == [550, 550]
    assert attempt.data is not None
    assert attempt.data.code == 354
    assert attempt.final is None
    assert not attempt.sent


def test_upstream_that_never_answers_times_out(
    run: Run, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(replies={"BANNER": b""})
    timeouts = TimeoutsConfig(banner=SHORT_S)
    attempt = attempt_on(run, upstream.port, envelope(), pieces(stuff(MESSAGE)), timeouts)

    conn = only_connection(upstream)
    assert conn.commands == []
    assert attempt.connected
    assert attempt.banner is None
    assert attempt.error == "timeout waiting for banner"


def test_silent_rcpt_times_out(run: Run, make_raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = make_raw_upstream(ehlo=NO_PIPELINING, replies={"RCPT": b""})
    timeouts = TimeoutsConfig(rcpt=SHORT_S)
    attempt = attempt_on(run, upstream.port, envelope(), pieces(stuff(MESSAGE)), timeouts)

    conn = only_connection(upstream)
    assert conn.commands == [EHLO, MAIL, RCPTS[0]]
    assert not conn.quit  # aborted: the upstream is out of step
    assert attempt.mail is not None
    assert attempt.mail.code == 250
    assert attempt.recipients == (None, None)
    assert attempt.error == "timeout waiting for reply to RCPT"


def test_silence_after_the_dot_is_a_lost_outcome(
    run: Run, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(replies={".": b""})
    timeouts = TimeoutsConfig(data_end=SHORT_S)
    attempt = attempt_on(run, upstream.port, envelope(), pieces(stuff(MESSAGE)), timeouts)

    assert only_connection(upstream).data == [stuff(MESSAGE)]
    assert attempt.sent
    assert attempt.final is None
    assert attempt.error == "timeout waiting for reply to end of data"
    assert not attempt.succeeded


def test_malformed_reply(run: Run, make_raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = make_raw_upstream(replies={"MAIL": b"250 bare LF\n"})
    attempt = attempt_on(run, upstream.port, envelope(), pieces(stuff(MESSAGE)))

    assert not only_connection(upstream).quit
    assert attempt.error is not None
    assert attempt.error.startswith("malformed reply: ")
    assert attempt.error.endswith("(reply to MAIL)")


def test_overlong_reply_line(run: Run, make_raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = make_raw_upstream(replies={"MAIL": b"250 " + b"x" * 600 + b"\r\n"})
    limits = LimitsConfig(max_reply_line_bytes=512)
    attempt = attempt_on(run, upstream.port, envelope(), pieces(stuff(MESSAGE)), TIMEOUTS, limits)
    assert attempt.error == "malformed reply: reply line longer than 512 octets (reply to MAIL)"


def test_unreachable_upstream(run: Run) -> None:
    attempt = attempt_on(run, free_port(), envelope(), pieces(stuff(MESSAGE)))
    assert not attempt.connected
    assert attempt.banner is None
    assert attempt.error is not None
    assert attempt.error.startswith("connect: ")
    assert attempt.recipients == (None, None)


def test_cancellation_aborts_the_connection(
    run: Run, make_raw_upstream: Callable[..., RawUpstream]
) -> None:
    upstream = make_raw_upstream(replies={"RCPT": b""})

    async def cut_short() -> Attempt:
        async with asyncio.timeout(SHORT_S):
            return await deliver(
                target(upstream.port),
                envelope(),
                pieces(stuff(MESSAGE)),
                hostname=HOSTNAME,
                timeouts=TIMEOUTS,
                limits=LimitsConfig(),
            )

    with pytest.raises(TimeoutError):
        run(cut_short())
    conn = only_connection(upstream)
    assert not conn.quit
    assert conn.data == []


def test_bdat_source_longer_than_its_size_is_a_bug(run: Run, raw_upstream: RawUpstream) -> None:
    class Lying(Held):
        @property
        def size(self) -> int:
            return 3

    with pytest.raises(ValueError, match="more than its size"):
        attempt_on(run, raw_upstream.port, envelope("bdat"), Lying((b"abc", b"MAIL")))
    conn = only_connection(raw_upstream)
    assert not conn.quit
    assert b"MAIL" not in conn.partial


def test_data_section_without_terminator_is_a_bug(run: Run, raw_upstream: RawUpstream) -> None:
    with pytest.raises(ValueError, match="does not end"):
        attempt_on(run, raw_upstream.port, envelope(), Held((b"no end\r\n",)))
    conn = only_connection(raw_upstream)
    assert conn.data == []
    assert not conn.quit


@pytest.mark.parametrize(
    ("mail", "recipients"),
    [
        (b"MAIL FROM:<a@example.org>", RCPTS),
        (b"RCPT TO:<a@example.org>\r\n", RCPTS),
        (MAIL, ()),
        (MAIL, (b"RCPT TO:<a@example.org>\r\nQUIT\r\n",)),
    ],
    ids=["no-crlf", "not-mail", "no-recipient", "two-lines"],
)
def test_bad_envelope_is_refused(mail: bytes, recipients: tuple[bytes, ...]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        Envelope(mail_from=mail, recipients=recipients, body="data")


@pytest.mark.parametrize("hostname", ["", "two words", "relay.test\r\nQUIT", "h\u00f4te.test"])
def test_bad_hostname_is_refused_before_connecting(
    run: Run, raw_upstream: RawUpstream, hostname: str
) -> None:
    coroutine = deliver(
        target(raw_upstream.port),
        envelope(),
        pieces(stuff(MESSAGE)),
        hostname=hostname,
        timeouts=TIMEOUTS,
        limits=LimitsConfig(),
    )
    with pytest.raises(ValueError, match="not a host name"):
        run(coroutine)
    assert raw_upstream.connections == []


# --- A real server: aiosmtpd ----------------------------------------------------


@pytest.mark.parametrize("body", ["data", "bdat"])
def test_aiosmtpd_receives_envelope_and_content(
    run: Run, aiosmtpd_upstream: AiosmtpdUpstream, body: Literal["data", "bdat"]
) -> None:
    mail = b"MAIL FROM:<us\xc3\xa9r@example.org> SMTPUTF8 BODY=8BITMIME\r\n"
    recipients = (b"RCPT TO:<one@example.net>\r\n", b"RCPT TO:<two@example.net>\r\n")
    held = pieces(stuff(MESSAGE) if body == "data" else MESSAGE, 5)
    attempt = attempt_on(run, aiosmtpd_upstream.port, envelope(body, mail, recipients), held)

    aiosmtpd_upstream.wait_for(lambda: len(aiosmtpd_upstream.deliveries) == 1)
    (delivery,) = aiosmtpd_upstream.deliveries
    assert delivery.mail_from == "us\u00e9r@example.org"
    assert delivery.mail_options == ["SMTPUTF8", "BODY=8BITMIME"]
    assert delivery.rcpt_tos == ["one@example.net", "two@example.net"]
    assert delivery.content == MESSAGE
    assert attempt.succeeded
    assert attempt.error is None
    aiosmtpd_upstream.wait_for(lambda: aiosmtpd_upstream.closed == 1)


# --- Postfix's smtp-sink and its fault flags ------------------------------------


SINK_VERBS = {b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b".", b"BDAT", b"RSET", b"QUIT"}


def sink_commands(sink: SmtpSink) -> list[bytes]:
    """The verbs smtp-sink read in the delivery's session (after its readiness probe)."""
    verbs = []
    for line in sink.dialogue().splitlines():
        _, found, said = line.partition(b"smtp-sink: ")
        verb = said.split(b" ", 1)[0].upper()
        if found and verb in SINK_VERBS:
            verbs.append(verb)
    return verbs[verbs.index(b"EHLO") :]


def sink_attempt(run: Run, sink: SmtpSink, body: Literal["data", "bdat"] = "data") -> Attempt:
    held = pieces(stuff(MESSAGE) if body == "data" else MESSAGE)
    return attempt_on(run, sink.port, envelope(body), held)


@pytest.mark.postfix
@pytest.mark.parametrize("body", ["data", "bdat"])
def test_smtp_sink_takes_the_message(
    run: Run, make_smtp_sink: Callable[..., SmtpSink], body: Literal["data", "bdat"]
) -> None:
    sink = make_smtp_sink(dump=True)
    attempt = sink_attempt(run, sink, body)

    assert attempt.succeeded
    assert attempt.error is None
    sink.wait_counters(sessions=2, messages=1)  # its readiness probe, then the delivery
    (dump,) = sink.dumped()
    headers = dump.split(b"\n\n", 1)[0].splitlines()
    assert b"X-Mail-Args: <sender@example.org> SIZE=1234 BODY=8BITMIME" in headers
    assert b"X-Rcpt-Args: <two@example.net> NOTIFY=NEVER" in headers
    # smtp-sink stores lines with LF and the stuffing removed.
    assert MESSAGE.replace(b"\r\n", b"\n") in dump
    assert sink_commands(sink) == [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA", b".", b"QUIT"]


@pytest.mark.postfix
def test_smtp_sink_deferring_the_dot(run: Run, make_smtp_sink: Callable[..., SmtpSink]) -> None:
    sink = make_smtp_sink(options=("-r", "."))
    attempt = sink_attempt(run, sink)

    assert attempt.sent
    assert attempt.final is not None
    assert attempt.final.code // 100 == 4
    assert attempt.error is None
    assert attempt.accepted == (0, 1)
    assert not attempt.succeeded


@pytest.mark.postfix
def test_smtp_sink_refusing_recipients(run: Run, make_smtp_sink: Callable[..., SmtpSink]) -> None:
    sink = make_smtp_sink(options=("-f", "rcpt"))
    attempt = sink_attempt(run, sink)

    assert [reply.code // 100 if reply else None for reply in attempt.recipients] == [5, 5]
    assert attempt.error == "no recipient accepted"
    assert attempt.data is None
    assert not attempt.sent
    sink.wait_counters(sessions=2)
    assert sink_commands(sink) == [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"QUIT"]


@pytest.mark.postfix
def test_smtp_sink_refusing_mail_gets_no_recipients(
    run: Run, make_smtp_sink: Callable[..., SmtpSink]
) -> None:
    sink = make_smtp_sink(options=("-f", "mail"))  # -f implies no PIPELINING
    attempt = sink_attempt(run, sink)

    assert attempt.mail is not None
    assert attempt.mail.code // 100 == 5
    assert attempt.recipients == (None, None)
    sink.wait_counters(sessions=2)
    assert sink_commands(sink) == [b"EHLO", b"MAIL", b"QUIT"]


@pytest.mark.postfix
def test_smtp_sink_dropping_after_the_dot(
    run: Run, make_smtp_sink: Callable[..., SmtpSink]
) -> None:
    sink = make_smtp_sink(options=("-q", "."))
    attempt = sink_attempt(run, sink)

    assert attempt.sent
    assert attempt.final is None
    assert attempt.error == "connection lost waiting for reply to end of data"


@pytest.mark.postfix
def test_smtp_sink_closing_at_mail(run: Run, make_smtp_sink: Callable[..., SmtpSink]) -> None:
    sink = make_smtp_sink(options=("-Q", "mail"))
    attempt = sink_attempt(run, sink)

    assert attempt.mail is not None
    assert attempt.mail.code == 421
    assert attempt.error is not None
    assert attempt.error.startswith("MAIL 421 ")
    assert attempt.recipients == (None, None)
    assert not attempt.sent


@pytest.mark.postfix
def test_smtp_sink_without_pipelining(run: Run, make_smtp_sink: Callable[..., SmtpSink]) -> None:
    sink = make_smtp_sink(options=("-p",))
    attempt = sink_attempt(run, sink)

    assert attempt.succeeded
    sink.wait_counters(sessions=2, messages=1)
    assert sink_commands(sink) == [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA", b".", b"QUIT"]
