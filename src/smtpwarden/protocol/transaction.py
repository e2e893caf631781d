"""What the session tracker keeps per command and per transaction.

Plain data and one pure function; the tracker (``tracker.py``) is the only
one that changes these objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from smtpwarden.protocol.events import Command, MailFrom, Param, RcptTo, Verb
from smtpwarden.protocol.records import Address, Step, text_of
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


@dataclass(slots=True, kw_only=True)
class Transaction:
    number: int
    started_at: float
    mail_from: Address
    recipients: list[Address]
    steps: list[Step]
    mail_command: MailFrom
    accepted: list[RcptTo]  # the RCPT commands the upstream answered 2xx
    body: str | None = None
    sent: tuple[int, str] | None = None  # size and SHA-256 once the message went out
    replaying: bool = False  # its end awaits a replay, not an upstream reply
    duplicate_risk: bool = False  # replayed after a lost outcome
    no_replay: bool = False  # its message is not held: no replay possible


@dataclass(frozen=True, slots=True, kw_only=True)
class Replay:
    """What a replay of the open transaction needs from the tracker."""

    mail: MailFrom
    recipients: tuple[RcptTo, ...]  # only those the upstream accepted
    first_failure: Reply | None  # the reply that called for it; None if none came
    transaction_id: str
    sent: tuple[int, str]  # the message's size and SHA-256


def dedupe_key(mail: bytes, recipients: Iterable[bytes], body_sha256: str) -> str:
    """A hash of envelope and body: the same message sent twice shares it."""
    digest = hashlib.sha256(mail)
    for line in recipients:
        digest.update(line)
    digest.update(body_sha256.encode("ascii"))
    return digest.hexdigest()


def params_of(params: tuple[Param, ...]) -> dict[str, str | None]:
    return {text_of(key): None if value is None else text_of(value) for key, value in params}
