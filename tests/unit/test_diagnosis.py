"""Failure patterns and diagnoses: contradictions, causes, records, pasted text."""

from __future__ import annotations

import io
import json
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.cli import main
from smtpwarden.protocol.commands import parse_command
from smtpwarden.protocol.diagnosis import (
    DEFAULT_PHRASES,
    Cause,
    Pattern,
    classify,
    contradiction,
    diagnose,
    diagnose_text,
)
from smtpwarden.protocol.events import Command
from smtpwarden.protocol.records import (
    Address,
    Outcome,
    Peer,
    ReplyInfo,
    SessionInfo,
    Step,
    Tls,
    TransactionRecord,
    Upstream,
    outcome_of,
)
from smtpwarden.protocol.replies import make_reply, parse_reply
from smtpwarden.protocol.tracker import SessionTracker

CHUNKING_ABORTED = (
    "250 CHUNKING aborted.(anonymous:250 552 5.2.0 DATA END command failed "
    "Detail: Transaction failed)"
)
MAIL_TRANSACTION_FAILED = "250 Mail transaction failed: http://mailserver/failed.aspx"
GMAIL_OVER_QUOTA = (
    "452-4.2.2 The email account that you tried to reach is over quota. Please direct\r\n"
    "452-4.2.2 the recipient to\r\n"
    "452 4.2.2  https://support.google.com/mail/?p=OverQuotaTemp a1si123456.452 - gsmtp\r\n"
)
GMAIL_BLOCKED = (
    "550-5.7.1 [203.0.113.5] Our system has detected that this message is likely\r\n"
    "550-5.7.1 unsolicited mail. To reduce the amount of spam sent to Gmail, this\r\n"
    "550 5.7.1 message has been blocked. a1si123456.550 - gsmtp\r\n"
)


def info(wire: str, *, local: bool = False) -> ReplyInfo:
    """Parse one reply written as on the wire (the final CRLF may be left out)."""
    data = wire.encode() if wire.endswith("\r\n") else wire.encode() + b"\r\n"
    return ReplyInfo.of(parse_reply(data), local=local)


def fields(wire: str) -> tuple[int, str | None, str]:
    reply = info(wire)
    return reply.code, reply.enhanced, reply.text


# --- contradiction ---------------------------------------------------------------

CONTRADICTIONS = [
    pytest.param(MAIL_TRANSACTION_FAILED, "phrase 'transaction failed'", id="transaction-failed"),
    pytest.param(CHUNKING_ABORTED, "552 5.2.0", id="chunking-aborted"),
    pytest.param("250 recipient rejected", "recipient rejected", id="recipient-rejected"),
    pytest.param("250 Transport suspended", "transport suspended", id="transport-suspended"),
    pytest.param("250 Connection  timed\tout", "connection timed out", id="phrase-white-space"),
    pytest.param("250 AUTHENTICATION FAILED", "authentication failed", id="phrase-case"),
    pytest.param("250 5.2.0 Message too large", "enhanced status 5.2.0", id="enhanced-class-5"),
    pytest.param("250 4.4.2 Relay lost", "enhanced status 4.4.2", id="enhanced-class-4"),
    pytest.param("250 Queued, relay said 4.4.1.", "4.4.1 in the text", id="status-in-text"),
    pytest.param("250 Forward failed (5.1.1)", "5.1.1 in the text", id="status-in-parens"),
    pytest.param("250 2.0.0 Ok, next hop smtp;550 User unknown", "smtp;550", id="dsn-smtp"),
    pytest.param("250 accepted; remote said: 554 rejected", "said: 554", id="said"),
    pytest.param("250 Relay error: 451 try later", "error: 451", id="error-marker"),
    pytest.param("250 Forward 550-5.1.1 user unknown", "550-5.1.1", id="dash-quoted"),
    pytest.param("250-Ok\r\n250 but 452 4.2.2 mailbox full", "452 4.2.2", id="multi-line"),
]


@pytest.mark.parametrize(("wire", "reason"), CONTRADICTIONS)
def test_contradiction_found(wire: str, reason: str) -> None:
    found = contradiction(*fields(wire))
    assert found is not None
    assert reason in found


CLEAN_2XX = [
    pytest.param("250 2.0.0 Ok 0010a4o5df45e7e7", id="hex-queue-id"),
    pytest.param("250 Requested mail action okay, completed: id=00000000", id="id-zeros"),
    pytest.param("250 2.1.0 Recipient <a@example.com> OK", id="recipient-ok"),
    pytest.param("250 2.0.0 Ok: queued as 4Xyz", id="postfix-queued"),
    pytest.param(
        "250 2.0.0 OK  1712345678 d9443c01a7336-1e0bb5b8f32si123456.452 - gsmtp", id="gmail"
    ),
    pytest.param("250 OK id=1rABCd-0005Xy-4B", id="exim-id"),
    pytest.param(
        "250 2.6.0 <a@b> [InternalId=4521, Hostname=X] 4520 bytes in 0.451, 35.8 KB/sec Queued",
        id="microsoft",
    ),
    pytest.param("250 Message accepted, 552 bytes", id="size"),
    pytest.param("250 Ok; message 550 of 600 sent", id="counter"),
    pytest.param("250 2.0.0 Ok: queued on 127.0.0.1:451", id="port"),
    pytest.param("250 Hello [10.4.5.1], pleased to meet you", id="ip-v4"),
    pytest.param("250 Hello [4.5.1.2]", id="ip-v4-start"),
    pytest.param("220 mx ESMTP Exim 4.94.2 Mon, 04 Mar 2024 10:45:52 +0000", id="exim-version"),
    pytest.param("250 2.0.0 Ok, 2024-05-04 12:55:52 550ms", id="date-duration"),
    pytest.param("250 mail.example.com Postfix 3.4.5", id="postfix-version"),
    pytest.param("250 Ok /var/spool/451/552", id="path"),
    pytest.param("250-mx\r\n250-SIZE 52428800\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME", id="ehlo"),
    pytest.param("550 5.1.1 User unknown", id="not-2xx"),
    pytest.param("354 End data with <CR><LF>.<CR><LF>", id="intermediate"),
]


@pytest.mark.parametrize("wire", CLEAN_2XX)
def test_no_contradiction(wire: str) -> None:
    assert contradiction(*fields(wire)) is None


def test_phrases_are_configurable() -> None:
    assert contradiction(250, None, "Ok, queue frozen", phrases=("Queue Frozen",)) is not None
    assert contradiction(*fields(MAIL_TRANSACTION_FAILED), phrases=()) is None
    assert contradiction(250, None, "anything", phrases=("", "  ")) is None


def test_default_phrases_cover_the_issue() -> None:
    wanted = {
        "transaction failed",
        "chunking aborted",
        "recipient rejected",
        "connection timed out",
        "transport suspended",
        "authentication failed",
    }
    assert wanted <= {phrase.casefold() for phrase in DEFAULT_PHRASES}


# --- classify --------------------------------------------------------------------

CLASSIFIED = [
    pytest.param(GMAIL_OVER_QUOTA, Cause.MAILBOX_FULL, True, id="gmail-over-quota"),
    pytest.param(GMAIL_BLOCKED, Cause.POLICY, False, id="gmail-blocked"),
    pytest.param(
        "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP",
        Cause.POLICY,
        False,
        id="microsoft-708",
    ),
    pytest.param(
        "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
        Cause.POLICY,
        False,
        id="spamhaus",
    ),
    pytest.param(
        "552 5.3.4 Message size exceeds fixed maximum message size",
        Cause.MESSAGE_TOO_BIG,
        False,
        id="size-5.3.4",
    ),
    pytest.param(
        "421 4.7.0 Try again later, closing connection", Cause.POLICY, True, id="gmail-421"
    ),
    pytest.param("451 4.3.0 Temporary local problem", Cause.RESOURCES, True, id="local-problem"),
    pytest.param(
        "535 5.7.8 Authentication credentials invalid", Cause.AUTHENTICATION, False, id="auth"
    ),
    pytest.param("550 5.1.1 User unknown", Cause.ROUTING, False, id="user-unknown"),
    pytest.param(
        "450 4.1.2 Recipient address rejected: Domain not found",
        Cause.ROUTING,
        True,
        id="domain-not-found",
    ),
    pytest.param("250 2.0.0 Ok: queued as 4Xyz", Cause.NONE, False, id="clean-250"),
    pytest.param("354 Go ahead", Cause.NONE, False, id="clean-354"),
    pytest.param("552 5.2.2 Mailbox full", Cause.MAILBOX_FULL, False, id="5.2.2-permanent"),
    pytest.param("550 4.2.2 Over quota", Cause.MAILBOX_FULL, False, id="reply-class-wins"),
    pytest.param("452 4.5.3 Too many recipients", Cause.RESOURCES, True, id="too-many-rcpts"),
    pytest.param("552 5.2.3 Message length exceeds", Cause.MESSAGE_TOO_BIG, False, id="5.2.3"),
    pytest.param("530 5.7.0 Authentication required", Cause.AUTHENTICATION, False, id="530"),
    pytest.param(
        "454 4.7.0 Temporary authentication failure", Cause.AUTHENTICATION, True, id="454"
    ),
    pytest.param("421 4.4.2 mx Upstream server timed out", Cause.TIMEOUT, True, id="4.4.2-time"),
    pytest.param(
        "421 4.4.2 mx Upstream connection failed, try again later",
        Cause.CONNECTION_LOST,
        True,
        id="4.4.2-lost",
    ),
    pytest.param("451 4.4.7 Delivery time expired", Cause.TIMEOUT, True, id="4.4.7"),
    pytest.param("451 4.4.3 Directory server failure", Cause.ROUTING, True, id="4.4.3-dns"),
    pytest.param(
        "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)",
        Cause.POLICY,
        False,
        id="microsoft-5.4.1",
    ),
    pytest.param(
        "550 5.7.26 Unauthenticated email from example.com is not accepted due to domain's "
        "DMARC policy",
        Cause.POLICY,
        False,
        id="gmail-dmarc",
    ),
    pytest.param("554 Transaction failed", Cause.UNKNOWN, False, id="bare-554"),
    pytest.param(
        "552 Requested mail action aborted: exceeded storage allocation",
        Cause.MAILBOX_FULL,
        False,
        id="552-storage",
    ),
    pytest.param("552 Message too large", Cause.MESSAGE_TOO_BIG, False, id="552-too-large"),
    pytest.param("552 Closing", Cause.MESSAGE_TOO_BIG, False, id="552-fallback"),
    pytest.param("554 5.7.1 Relay access denied", Cause.POLICY, False, id="relay-denied"),
    pytest.param("550 Relay access denied", Cause.POLICY, False, id="relay-denied-bare"),
    pytest.param(
        "450 Recipient address rejected: Greylisted, see http://postgrey.example/",
        Cause.POLICY,
        True,
        id="greylisted",
    ),
    pytest.param("451 Temporary lookup failure", Cause.RESOURCES, True, id="lookup"),
    pytest.param("451 Could not resolve MX host", Cause.ROUTING, True, id="resolve"),
    pytest.param("421 Service not available", Cause.RESOURCES, True, id="bare-421"),
    pytest.param("550 Mailbox is full", Cause.MAILBOX_FULL, False, id="550-full"),
    pytest.param("553 Mailbox name not allowed", Cause.ROUTING, False, id="553"),
    pytest.param("501 5.5.4 Invalid arguments", Cause.UNKNOWN, False, id="protocol"),
    pytest.param("554 5.6.0 Content rejected", Cause.UNKNOWN, False, id="content"),
    pytest.param("450 4.2.1 Mailbox disabled", Cause.UNKNOWN, True, id="disabled"),
    pytest.param("550 Sorry", Cause.UNKNOWN, False, id="nothing-known"),
    pytest.param(MAIL_TRANSACTION_FAILED, Cause.UNKNOWN, True, id="250-phrase-transient"),
    pytest.param(CHUNKING_ABORTED, Cause.MESSAGE_TOO_BIG, False, id="250-quoted-552"),
    pytest.param("250 4.2.2 Over quota", Cause.MAILBOX_FULL, True, id="250-enhanced-4"),
    pytest.param("250 Ok, relay said: 550 no", Cause.UNKNOWN, False, id="250-marked-550"),
]


@pytest.mark.parametrize(("wire", "cause", "retryable"), CLASSIFIED)
def test_classify(wire: str, cause: Cause, retryable: bool) -> None:
    assert classify(*fields(wire)) == (cause, retryable)


def test_classify_without_reply() -> None:
    assert classify(None, None, "") == (Cause.UNKNOWN, True)
    assert classify(None, "4.4.2", "timed out") == (Cause.TIMEOUT, True)


def test_classify_tolerates_odd_enhanced_codes() -> None:
    assert classify(550, "garbage", "blocked") == (Cause.POLICY, False)
    assert classify(550, "5.99.99", "over quota") == (Cause.MAILBOX_FULL, False)


# --- diagnose: records -------------------------------------------------------------

PEER = Peer(address="192.0.2.7", port=40000)
UPSTREAM = Upstream(name="mta", address="127.0.0.1", port=25)


def record(
    *exchanges: tuple[str, str | None],
    final: ReplyInfo | Literal["last"] | None = "last",
    outcome: Outcome | None = None,
) -> TransactionRecord:
    """A record from (command, reply) pairs; a None reply never came.

    The final reply defaults to the last exchange's reply, and the outcome to
    what that reply implies.
    """
    steps, recipients = [], []
    mail_reply: ReplyInfo | None = None
    last: ReplyInfo | None = None
    for number, (command, wire) in enumerate(exchanges):
        reply = None if wire is None else info(wire)
        steps.append(
            Step(
                command=command,
                at_ms=float(number),
                latency_ms=None if reply is None else 1.0,
                code=None if reply is None else reply.code,
                local=False,
            )
        )
        if command == "MAIL":
            mail_reply = reply
        elif command == "RCPT":
            recipients.append(Address(address=f"r{number}@example.com", params={}, reply=reply))
        last = reply
    final_reply = last if final == "last" else final
    assert not isinstance(final_reply, str)
    if outcome is None:
        assert final_reply is not None
        outcome = outcome_of(parse_reply(f"{final_reply.code} x\r\n".encode()))
    return TransactionRecord(
        type="transaction",
        time="2024-01-01T00:00:00.000Z",
        session_id="s1",
        transaction_id="s1.1",
        listener="smtp",
        client=PEER,
        upstream=UPSTREAM,
        tls=Tls(),
        helo="client.example",
        mail_from=Address(address="a@example.com", params={}, reply=mail_reply),
        recipients=tuple(recipients),
        body=None,
        size=None,
        body_sha256=None,
        timeline=tuple(steps),
        final_reply=final_reply,
        outcome=outcome,
        attempts=1,
        duration_ms=5.0,
    )


MAIL = ("MAIL", "250 2.1.0 Ok")
RCPT = ("RCPT", "250 2.1.5 Ok")
DATA = ("DATA", "354 End data with <CR><LF>.<CR><LF>")
CHUNK = ("BDAT", "250 2.0.0 1000 octets received")

RECORDS = [
    pytest.param(
        record(MAIL, RCPT, DATA, (".", "250 2.0.0 Ok: queued as 4Xyz")),
        Pattern.NONE,
        Cause.NONE,
        False,
        id="delivered",
    ),
    pytest.param(
        record(MAIL, RCPT, DATA, (".", "451 4.3.0 Temporary local problem")),
        Pattern.DEFERRED_FAILURE,
        Cause.RESOURCES,
        True,
        id="deferred-dot-451",
    ),
    pytest.param(
        record(MAIL, RCPT, DATA, (".", "552 5.3.4 Message size exceeds fixed maximum")),
        Pattern.DEFERRED_FAILURE,
        Cause.MESSAGE_TOO_BIG,
        False,
        id="deferred-dot-552",
    ),
    pytest.param(
        record(MAIL, RCPT, ("DATA", "554 5.7.1 Rejected by policy")),
        Pattern.DEFERRED_FAILURE,
        Cause.POLICY,
        False,
        id="deferred-data",
    ),
    pytest.param(
        record(MAIL, RCPT, DATA, (".", "421 4.3.2 Service shutting down")),
        Pattern.DEFERRED_FAILURE,
        Cause.RESOURCES,
        True,
        id="deferred-dot-421",
    ),
    pytest.param(
        record(MAIL, RCPT, ("BDAT LAST", "451 4.3.0 Temporary local problem")),
        Pattern.DEFERRED_FAILURE,
        Cause.RESOURCES,
        True,
        id="deferred-first-bdat",
    ),
    pytest.param(
        record(MAIL, RCPT, CHUNK, CHUNK, ("BDAT LAST", "552 5.3.4 Message too big for system")),
        Pattern.CHUNK_FAILURE,
        Cause.MESSAGE_TOO_BIG,
        False,
        id="chunk-last",
    ),
    pytest.param(
        record(MAIL, RCPT, CHUNK, ("BDAT", "452 4.3.1 Insufficient system storage")),
        Pattern.CHUNK_FAILURE,
        Cause.RESOURCES,
        True,
        id="chunk-middle",
    ),
    pytest.param(
        record(MAIL, RCPT, DATA, (".", None), final=None, outcome=Outcome.UNKNOWN),
        Pattern.LOST_OUTCOME,
        Cause.CONNECTION_LOST,
        True,
        id="lost-dot",
    ),
    pytest.param(
        record(MAIL, RCPT, CHUNK, ("BDAT LAST", None), final=None, outcome=Outcome.UNKNOWN),
        Pattern.LOST_OUTCOME,
        Cause.CONNECTION_LOST,
        True,
        id="lost-bdat-last",
    ),
    pytest.param(
        record(
            MAIL,
            RCPT,
            DATA,
            (".", None),
            final=info("421 4.4.2 mx Upstream server timed out", local=True),
            outcome=Outcome.UNKNOWN,
        ),
        Pattern.LOST_OUTCOME,
        Cause.TIMEOUT,
        True,
        id="lost-local-421",
    ),
    pytest.param(
        record(MAIL, RCPT, DATA, (".", MAIL_TRANSACTION_FAILED)),
        Pattern.CONTRADICTORY_250,
        Cause.UNKNOWN,
        True,
        id="contradictory-phrase",
    ),
    pytest.param(
        record(MAIL, RCPT, CHUNK, ("BDAT LAST", CHUNKING_ABORTED)),
        Pattern.CONTRADICTORY_250,
        Cause.MESSAGE_TOO_BIG,
        False,
        id="contradictory-chunking",
    ),
    pytest.param(
        record(MAIL, ("RCPT", "250 recipient rejected"), DATA, (".", "250 Ok")),
        Pattern.CONTRADICTORY_250,
        Cause.UNKNOWN,
        True,
        id="contradictory-rcpt",
    ),
    pytest.param(
        record(MAIL, RCPT, ("RCPT", GMAIL_OVER_QUOTA), DATA, (".", "250 Ok")),
        Pattern.PARTIAL_RECIPIENTS,
        Cause.MAILBOX_FULL,
        True,
        id="partial-quota",
    ),
    pytest.param(
        record(MAIL, ("RCPT", "550 5.1.1 User unknown"), RCPT, DATA, (".", "250 Ok")),
        Pattern.PARTIAL_RECIPIENTS,
        Cause.ROUTING,
        False,
        id="partial-unknown",
    ),
    pytest.param(
        record(MAIL, RCPT, ("RCPT", "421 4.3.2 Service shutting down"), outcome=Outcome.DEFERRED),
        Pattern.MID_SESSION_LOSS,
        Cause.RESOURCES,
        True,
        id="mid-session-upstream-421",
    ),
    pytest.param(
        record(
            MAIL,
            RCPT,
            ("DATA", None),
            final=info("421 4.4.2 mx Upstream connection failed, try again later", local=True),
            outcome=Outcome.DEFERRED,
        ),
        Pattern.MID_SESSION_LOSS,
        Cause.CONNECTION_LOST,
        True,
        id="mid-session-local-421",
    ),
    pytest.param(
        record(MAIL, RCPT, ("DATA", "421 4.7.0 Try again later, closing connection")),
        Pattern.MID_SESSION_LOSS,
        Cause.POLICY,
        True,
        id="mid-session-421-to-data",
    ),
    pytest.param(
        record(MAIL, RCPT, final=None, outcome=Outcome.DEFERRED),
        Pattern.MID_SESSION_LOSS,
        Cause.CONNECTION_LOST,
        True,
        id="mid-session-no-reply",
    ),
    pytest.param(
        record(("MAIL", "550 5.7.1 Client host blocked using zen.spamhaus.org")),
        Pattern.NONE,
        Cause.POLICY,
        False,
        id="mail-rejected",
    ),
    pytest.param(
        record(("MAIL", "421 4.7.0 Too many connections, try again later")),
        Pattern.NONE,
        Cause.POLICY,
        True,
        id="mail-421",
    ),
    pytest.param(
        record(
            MAIL,
            ("RCPT", "550 5.1.1 User unknown"),
            ("DATA", "554 5.5.1 Error: no valid recipients"),
        ),
        Pattern.NONE,
        Cause.ROUTING,
        False,
        id="every-rcpt-refused",
    ),
    pytest.param(
        record(MAIL, RCPT, ("RSET", "250 Ok"), final=None, outcome=Outcome.ABORTED),
        Pattern.NONE,
        Cause.NONE,
        False,
        id="aborted",
    ),
    pytest.param(
        record(
            MAIL,
            ("RCPT", "450 4.2.2 Over quota"),
            ("QUIT", None),
            final=None,
            outcome=Outcome.ABORTED,
        ),
        Pattern.NONE,
        Cause.MAILBOX_FULL,
        True,
        id="aborted-after-refusal",
    ),
]


@pytest.mark.parametrize(("tx", "pattern", "cause", "retryable"), RECORDS)
def test_diagnose(tx: TransactionRecord, pattern: Pattern, cause: Cause, retryable: bool) -> None:
    found = diagnose(tx)
    assert (found.pattern, found.cause, found.retryable) == (pattern, cause, retryable)
    assert found.advice
    assert "\n" not in found.advice
    assert found.evidence is None or len(found.evidence) <= 220


def test_diagnose_evidence_and_advice() -> None:
    lost = diagnose(record(MAIL, RCPT, DATA, (".", None), final=None, outcome=Outcome.UNKNOWN))
    assert lost.evidence == "no reply to '.'"
    assert "duplicate" in lost.advice
    full = diagnose(record(MAIL, RCPT, ("RCPT", GMAIL_OVER_QUOTA), DATA, (".", "250 Ok")))
    assert full.advice.startswith("Delivered to 1 of 2 recipients")
    assert "mailbox is full" in full.advice
    assert full.evidence is not None
    assert full.evidence.startswith("452 4.2.2 The email account")
    chunked = diagnose(record(MAIL, RCPT, CHUNK, ("BDAT LAST", CHUNKING_ABORTED)))
    assert chunked.evidence is not None
    assert "'552 5.2.0'" in chunked.evidence
    assert "not delivered" in chunked.advice


def test_diagnose_uses_configured_phrases() -> None:
    tx = record(MAIL, RCPT, DATA, (".", "250 Ok, queue frozen"))
    assert diagnose(tx).pattern is Pattern.NONE
    assert diagnose(tx, phrases=("queue frozen",)).pattern is Pattern.CONTRADICTORY_250


def test_diagnose_shortens_long_evidence() -> None:
    tx = record(MAIL, RCPT, DATA, (".", "554 5.7.1 " + "blocked " * 100))
    found = diagnose(tx)
    assert found.evidence is not None
    assert len(found.evidence) <= 160
    assert found.evidence.endswith("...")


# The tracker's own records, so the step names diagnose relies on stay true.

SESSION = SessionInfo(session_id="s1", listener="smtp", client=PEER, upstream=UPSTREAM, tls=Tls())


def command(line: str) -> Command:
    event = parse_command(line.encode() + b"\r\n")
    assert isinstance(event, Command)
    return event


def tracked(replies: list[str], *, sent: bool, failure: str | None) -> TransactionRecord:
    tracker = SessionTracker(info=SESSION, now=1.0)
    tracker.upstream_reply(parse_reply(b"220 mx\r\n"), 1.0)
    commands = ["MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA"]
    for line in commands:
        tracker.forwarded(command(line), 1.1)
    for wire in replies:
        assert tracker.upstream_reply(parse_reply(wire.encode() + b"\r\n"), 1.2) is not None
    if sent:
        tracker.body(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        tracker.end_of_body(1.3)
    reply = None if failure is None else ReplyInfo.of(make_reply(421, "4.4.2", failure), local=True)
    tracker.close(reason="upstream_lost", now=2.0, client_bytes=0, upstream_bytes=0, failure=reply)
    [tx] = tracker.records
    return tx


def test_diagnose_tracker_records() -> None:
    lost = tracked(["250 Ok", "250 Ok", "354 Go"], sent=True, failure="Upstream connection failed")
    assert diagnose(lost).pattern is Pattern.LOST_OUTCOME
    cut = tracked(["250 Ok", "250 Ok"], sent=False, failure="Upstream connection failed")
    assert diagnose(cut).pattern is Pattern.MID_SESSION_LOSS
    assert diagnose(cut).cause is Cause.CONNECTION_LOST


# --- diagnose_text -----------------------------------------------------------------


def summary(pasted: str) -> list[tuple[str, str, str, bool]]:
    return [
        (reply.split("\n")[0][:3], found.pattern.value, found.cause.value, found.retryable)
        for reply, found in diagnose_text(pasted)
    ]


TEXTS = [
    pytest.param(
        MAIL_TRANSACTION_FAILED,
        [("250", "contradictory_250", "unknown", True)],
        id="single-phrase",
    ),
    pytest.param(
        CHUNKING_ABORTED,
        [("250", "contradictory_250", "message_too_big", False)],
        id="single-chunking",
    ),
    pytest.param(
        "250 2.0.0 Ok 0010a4o5df45e7e7", [("250", "none", "none", False)], id="single-clean"
    ),
    pytest.param(GMAIL_OVER_QUOTA, [("452", "none", "mailbox_full", True)], id="gmail-crlf"),
    pytest.param(
        GMAIL_OVER_QUOTA.replace("\r\n", "\n"),
        [("452", "none", "mailbox_full", True)],
        id="gmail-lf",
    ),
    pytest.param(
        GMAIL_OVER_QUOTA.replace("\r\n", "\\r\\n"),
        [("452", "none", "mailbox_full", True)],
        id="gmail-escaped-crlf",
    ),
    pytest.param(
        "250 CHUNKING aborted.(anonymous:250 552 5.2.0 DATA END command\n"
        "failed Detail: Transaction failed)",
        [("250", "contradictory_250", "message_too_big", False)],
        id="wrapped",
    ),
    pytest.param(
        "421 4.7.0 Try again later, closing connection",
        [("421", "mid_session_loss", "policy", True)],
        id="single-421",
    ),
    pytest.param(
        "S: 220 mx ESMTP\nC: EHLO client\nS: 250-mx\nS: 250 PIPELINING\n"
        "C: MAIL FROM:<a@example.com>\nS: 250 2.1.0 Ok\n"
        "C: RCPT TO:<b@example.com>\nS: 250 2.1.5 Ok\n"
        "C: RCPT TO:<c@example.com>\nS: 452 4.2.2 Over quota\n"
        "C: DATA\nS: 354 Go ahead\nC: Subject: hi\nC:\nC: 250 looks like a reply\nC: .\n"
        "S: 250 2.0.0 Ok: queued as 4Xyz\nC: QUIT\nS: 221 Bye",
        [
            ("220", "none", "none", False),
            ("250", "none", "none", False),
            ("250", "none", "none", False),
            ("250", "none", "none", False),
            ("452", "partial_recipients", "mailbox_full", True),
            ("354", "none", "none", False),
            ("250", "none", "none", False),
            ("221", "none", "none", False),
        ],
        id="s-c-partial",
    ),
    pytest.param(
        "=== Trying mx.example.com:25...\n=== Connected to mx.example.com.\n"
        "<-  220 mx ESMTP\n -> EHLO client\n<-  250 mx\n"
        " -> MAIL FROM:<a@example.com>\n<-  250 2.1.0 Ok\n"
        " -> RCPT TO:<b@example.com>\n<-  250 2.1.5 Ok\n"
        " -> DATA\n<-  354 End data\n -> Subject: test\n -> \n -> body\n -> .\n"
        "<** 554 5.7.1 Message rejected as spam\n -> QUIT\n<-  221 Bye\n"
        "=== Connection closed with remote host.",
        [
            ("220", "none", "none", False),
            ("250", "none", "none", False),
            ("250", "none", "none", False),
            ("250", "none", "none", False),
            ("354", "none", "none", False),
            ("554", "deferred_failure", "policy", False),
            ("221", "none", "none", False),
        ],
        id="swaks-deferred",
    ),
    pytest.param(
        ">>> MAIL FROM:<a@example.com>\n<<< 250 Ok\n>>> RCPT TO:<b@example.com>\n<<< 250 Ok\n"
        ">>> BDAT 1000\n<<< 250 1000 octets\n>>> BDAT 20 LAST\n"
        "<<< 552 5.3.4 Message too big for system",
        [
            ("250", "none", "none", False),
            ("250", "none", "none", False),
            ("250", "none", "none", False),
            ("552", "chunk_failure", "message_too_big", False),
        ],
        id="arrows-chunk",
    ),
    pytest.param(
        ">>> MAIL FROM:<a@example.com>\n<<< 250 Ok\n>>> RCPT TO:<b@example.com>\n"
        "<<< 550 5.1.1 User unknown\n>>> RCPT TO:<c@example.com>\n<<< 250 Ok\n"
        ">>> BDAT 1000\n>>> Subject: hi\n<<< 250 1000 octets\n>>> BDAT 0 LAST\n<<< 250 Queued",
        [
            ("250", "none", "none", False),
            ("550", "partial_recipients", "routing", False),
            ("250", "none", "none", False),
            ("250", "none", "none", False),
            ("250", "none", "none", False),
        ],
        id="arrows-bdat-partial",
    ),
    pytest.param(
        "<-  220 mx\n -> MAIL FROM:<a@example.com>\n<-  250 Ok\n -> RCPT TO:<b@example.com>\n"
        "<-  250 Ok\n -> DATA\n<-  354 Go\n -> hi\n -> .\n"
        "*** Remote host closed connection unexpectedly.",
        [
            ("220", "none", "none", False),
            ("250", "none", "none", False),
            ("250", "none", "none", False),
            ("354", "none", "none", False),
            ("(no", "lost_outcome", "connection_lost", True),
        ],
        id="swaks-lost",
    ),
    pytest.param(
        "MAIL FROM:<a@example.com>\nRCPT TO:<b@example.com>\nDATA\n"
        "250 2.1.0 Ok\n250 2.1.5 Ok\n354 Go\nhello\n.\n451 4.3.0 Temporary local problem",
        [
            ("250", "none", "none", False),
            ("250", "none", "none", False),
            ("354", "none", "none", False),
            ("451", "deferred_failure", "resources", True),
        ],
        id="unmarked-pipelined",
    ),
    pytest.param(
        "421 4.3.2 Service shutting down\nEHLO client",
        [("421", "none", "resources", True)],
        id="421-before-mail",
    ),
    pytest.param(
        "MAIL FROM:<a@example.com>\n250 Ok\nRCPT TO:<b@example.com>\n421 4.4.2 Connection dropped",
        [("250", "none", "none", False), ("421", "mid_session_loss", "connection_lost", True)],
        id="421-mid-session",
    ),
    pytest.param(
        "C: MAIL FROM:<a@example.com>\nS: 250 Ok\nC: RCPT TO:<b@example.com>\nS: 250 Ok\n"
        "C: DATA\nS: 354 Go\nC: hi\nC: .\n",
        [
            ("250", "none", "none", False),
            ("250", "none", "none", False),
            ("354", "none", "none", False),
            ("(no", "lost_outcome", "connection_lost", True),
        ],
        id="lost-at-end",
    ),
    pytest.param(
        "C: MAIL FROM:<a@example.com>\nS: 250 Ok\nC: RCPT TO:<b@example.com>\n"
        "S: 250 recipient rejected",
        [("250", "none", "none", False), ("250", "contradictory_250", "unknown", True)],
        id="contradictory-rcpt",
    ),
    pytest.param("no reply here\nat all", [], id="nothing"),
    pytest.param("", [], id="empty"),
]


@pytest.mark.parametrize(("pasted", "expected"), TEXTS)
def test_diagnose_text(pasted: str, expected: list[tuple[str, str, str, bool]]) -> None:
    assert summary(pasted) == expected


def test_diagnose_text_keeps_the_reply_as_pasted() -> None:
    [(reply, found)] = diagnose_text(GMAIL_OVER_QUOTA)
    assert reply == GMAIL_OVER_QUOTA.replace("\r\n", "\n").rstrip("\n")
    assert found.evidence is not None
    assert found.evidence.startswith("452 4.2.2 The email account")


def test_diagnose_text_uses_configured_phrases() -> None:
    [(_, found)] = diagnose_text("250 Ok, queue frozen", phrases=("queue frozen",))
    assert found.pattern is Pattern.CONTRADICTORY_250


# --- never raise -----------------------------------------------------------------

enhanced_codes = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.from_regex(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True),
)


@given(st.integers(200, 599), enhanced_codes, st.text())
def test_contradiction_and_classify_never_raise(code: int, enhanced: str | None, text: str) -> None:
    reason = contradiction(code, enhanced, text)
    assert reason is None or code // 100 == 2
    cause, retryable = classify(code, enhanced, text)
    assert isinstance(cause, Cause)
    if code // 100 == 4:
        assert retryable
    if code // 100 == 5:
        assert not retryable
    assert isinstance(classify(None, enhanced, text)[0], Cause)


@given(st.text())
def test_diagnose_text_never_raises(pasted: str) -> None:
    for _, found in diagnose_text(pasted):
        assert isinstance(found.pattern, Pattern)


transcript_lines = st.lists(
    st.tuples(
        st.sampled_from(["", "S: ", "C: ", "<<< ", ">>> ", "<-  ", " -> ", "<** "]),
        st.one_of(
            st.sampled_from(
                ["MAIL FROM:<a>", "RCPT TO:<b>", "DATA", ".", "BDAT 10", "BDAT 5 LAST", "RSET"]
            ),
            st.from_regex(r"[2-5][0-5][0-9][ -][ -~]{0,30}", fullmatch=True),
            st.text(max_size=20),
        ),
    ),
    max_size=30,
)


@given(transcript_lines)
def test_diagnose_text_never_raises_on_transcripts(lines: list[tuple[str, str]]) -> None:
    pasted = "\n".join(mark + text for mark, text in lines)
    for reply, found in diagnose_text(pasted):
        assert reply
        assert found.advice


# --- smtpwarden diagnose -----------------------------------------------------------


def test_cli_diagnose_one_reply(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", CHUNKING_ABORTED]) == 0
    out = capsys.readouterr().out
    assert out.startswith(CHUNKING_ABORTED + "\n")
    assert "pattern:   contradictory_250" in out
    assert "cause:     message_too_big" in out
    assert "retryable: no" in out
    assert "advice:    The server answered 2xx" in out
    assert "'552 5.2.0'" in out


def test_cli_diagnose_retryable_yes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "452 4.2.2 Over quota"]) == 0
    out = capsys.readouterr().out
    assert "retryable: yes" in out
    assert "evidence" not in out  # it would only repeat the reply


def test_cli_diagnose_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "--json", MAIL_TRANSACTION_FAILED]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry == {
        "reply": MAIL_TRANSACTION_FAILED,
        "pattern": "contradictory_250",
        "cause": "unknown",
        "retryable": True,
        "advice": entry["advice"],
        "evidence": entry["evidence"],
    }
    assert "transaction failed" in entry["evidence"]


def test_cli_diagnose_stdin_transcript(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    transcript = (
        "C: MAIL FROM:<a@example.com>\r\nS: 250 Ok\r\nC: RCPT TO:<b@example.com>\r\n"
        "S: 250 Ok\r\nC: DATA\r\nS: 354 Go\r\nC: hi\r\nC: .\r\n"
        "S: 451 4.3.0 Temporary local problem\r\n"
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(transcript))
    assert main(["diagnose", "--json", "-"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [entry["pattern"] for entry in entries] == ["none", "none", "none", "deferred_failure"]
    assert entries[-1]["cause"] == "resources"


def test_cli_diagnose_without_a_reply(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "hello"]) == 2
    assert "no SMTP reply found" in capsys.readouterr().err
