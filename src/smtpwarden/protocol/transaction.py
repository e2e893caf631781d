"""What the session tracker keeps per command and per transaction.

Plain data and pure functions; the tracker (``tracker.py``) is the only one
that changes these objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from smtpwarden.protocol.diagnosis import diagnose
from smtpwarden.protocol.errors import LocalProtocolError
from smtpwarden.protocol.events import Command, MailFrom, Param, RcptTo, Verb
from smtpwarden.protocol.records import (
    Address,
    Outcome,
    ReplyInfo,
    SessionInfo,
    SessionRecord,
    Step,
    TransactionRecord,
    iso_time,
    text_of,
)
from smtpwarden.protocol.replies import Reply


@dataclass(slots=True, kw_only=True)
class Awaiting:
    """A command waiting for its reply.

    ``name`` is what the timeline shows: the verb, "CONNECT" for the banner,
    "." for the end of data, "BDAT LAST" for the last chunk. ``body`` holds
    the message size and SHA-256 once the message has been sent.
    """

    name: str
    verb: Verb | None
    sent_at: float
    command: Command | None
    local: Reply | None = None
    body: tuple[int, str] | None = None
    replayable: bool = True  # the end of a message whose copy is held
    takes_over: bool = False  # a RCPT whose 4xx the spool may take over
    contradicted: bool = False  # an end of message answered by a 2xx that reports failure
    hidden: bool = False  # the relay's own command (XFORWARD): its reply is not relayed


@dataclass(slots=True, kw_only=True)
class Transaction:
    number: int
    started_at: float
    mail_from: Address
    recipients: list[Address]
    steps: list[Step]
    mail_command: MailFrom
    accepted: list[RcptTo]  # the RCPT commands the upstream answered 2xx
    taken_over: list[RcptTo]  # RCPTs answered 4xx upstream, 250 by the relay, for the spool
    body: str | None = None
    sent: tuple[int, str] | None = None  # size and SHA-256 once the message went out
    replaying: bool = False  # its end awaits a replay, not an upstream reply
    duplicate_risk: bool = False  # replayed after a lost outcome
    no_replay: bool = False  # its message is not held: no replay possible


# The DATA terminator's last octets, ".<CRLF>", are not part of the message.
_DOT_CRLF = 3


class MessageDigest:
    """Size and SHA-256 of a message as it streams upstream.

    For DATA (``data``) the hash lags three octets behind, so that the
    terminator's ".<CRLF>" is left out at the end; BDAT chunks count whole.
    """

    __slots__ = ("_data", "_lag", "_sha", "_size")

    def __init__(self, *, data: bool) -> None:
        self._data = data
        self._sha = hashlib.sha256()
        self._size = 0
        self._lag = b""

    def update(self, chunk: bytes | memoryview) -> None:
        """Add octets sent upstream (the hot path)."""
        size = len(chunk)
        self._size += size
        if not self._data:
            self._sha.update(chunk)
        elif size >= _DOT_CRLF:
            view = memoryview(chunk)
            self._sha.update(self._lag)
            self._sha.update(view[:-_DOT_CRLF])
            self._lag = bytes(view[-_DOT_CRLF:])
        else:
            lag = self._lag + bytes(chunk)
            self._sha.update(lag[:-_DOT_CRLF])
            self._lag = lag[-_DOT_CRLF:]

    def result(self) -> tuple[int, str]:
        """The message's size and hex SHA-256 so far."""
        size = self._size - _DOT_CRLF if self._data else self._size
        return size, self._sha.hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Replay:
    """What a replay of the open transaction needs from the tracker."""

    mail: MailFrom
    recipients: tuple[RcptTo, ...]  # only those the upstream accepted
    first_failure: Reply | None  # the reply that called for it; None if none came
    # The upstream took the message cleanly: nothing to replay, only the
    # taken-over recipients to spool. ``first_failure`` is then its 2xx.
    delivered: bool = False
    taken_over: tuple[RcptTo, ...] = ()  # recipients for the spool alone
    transaction_id: str
    sent: tuple[int, str]  # the message's size and SHA-256


def replay_of(tx: Transaction, session_id: str, failure: Reply | None) -> Replay:
    """What a replay of ``tx``, sent and then failed by ``failure``, needs."""
    if tx.sent is None:
        raise LocalProtocolError("a replay of a message that was not sent")
    return Replay(
        mail=tx.mail_command,
        recipients=tuple(tx.accepted),
        first_failure=failure,
        taken_over=tuple(tx.taken_over),
        transaction_id=f"{session_id}.{tx.number}",
        sent=tx.sent,
    )


def dedupe_key(mail: bytes, recipients: Iterable[bytes], body_sha256: str) -> str:
    """A hash of envelope and body: the same message sent twice shares it."""
    digest = hashlib.sha256(mail)
    for line in recipients:
        digest.update(line)
    digest.update(body_sha256.encode("ascii"))
    return digest.hexdigest()


def params_of(params: tuple[Param, ...]) -> dict[str, str | None]:
    return {text_of(key): None if value is None else text_of(value) for key, value in params}


def session_record(
    info: SessionInfo,
    *,
    started: float,
    helo: str | None,
    banner: ReplyInfo | None,
    transactions: int,
    timeline: tuple[Step, ...],
    end: str,
    client_bytes: int,
    upstream_bytes: int,
    duration_ms: float,
) -> SessionRecord:
    """The record of a session that ended; ``started`` in seconds since the epoch."""
    return SessionRecord(
        type="session",
        time=iso_time(started),
        session_id=info.session_id,
        listener=info.listener,
        client=info.client,
        upstream=info.upstream,
        tls=info.tls,
        auth=info.auth,
        helo=helo,
        banner=banner,
        transactions=transactions,
        timeline=timeline,
        end=end,
        client_bytes=client_bytes,
        upstream_bytes=upstream_bytes,
        duration_ms=duration_ms,
    )


def transaction_record(
    tx: Transaction,
    info: SessionInfo,
    *,
    helo: str | None,
    started: float,
    final: ReplyInfo | None,
    outcome: Outcome,
    body: tuple[int, str] | None,
    attempts: int,
    duration_ms: float,
) -> TransactionRecord:
    """The record of a finished transaction, with its diagnosis.

    ``started`` is in seconds since the epoch; ``body`` is the size and
    SHA-256 of the message as sent, or None if none was.
    """
    recipients = tuple(tx.recipients)
    timeline = tuple(tx.steps)
    facts = _Facts(final, timeline, outcome, tx.mail_from, recipients)
    return TransactionRecord(
        type="transaction",
        time=iso_time(started),
        session_id=info.session_id,
        transaction_id=f"{info.session_id}.{tx.number}",
        listener=info.listener,
        client=info.client,
        upstream=info.upstream,
        tls=info.tls,
        auth=info.auth,
        helo=helo,
        mail_from=tx.mail_from,
        recipients=recipients,
        taken_over=tuple(text_of(rcpt.path) for rcpt in tx.taken_over),
        body=tx.body,
        size=None if body is None else body[0],
        body_sha256=None if body is None else body[1],
        timeline=timeline,
        final_reply=final,
        outcome=outcome,
        attempts=attempts,
        duplicate_risk=tx.duplicate_risk,
        dedupe_key=None
        if body is None
        else dedupe_key(tx.mail_command.line, [rcpt.line for rcpt in tx.accepted], body[1]),
        duration_ms=duration_ms,
        diagnosis=diagnose(facts),
    )


class _Facts(NamedTuple):
    """What the diagnosis reads, before the record exists (it is built once)."""

    final_reply: ReplyInfo | None
    timeline: tuple[Step, ...]
    outcome: Outcome
    mail_from: Address
    recipients: tuple[Address, ...]
