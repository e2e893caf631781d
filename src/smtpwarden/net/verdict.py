"""Judging one delivery attempt from the spool, and the record a delivery leaves.

``judge`` reads the replies of one ``Attempt`` (``delivery.deliver``) and
sorts its recipients into delivered, failed and pending (``Verdict``);
``settle`` applies that to the spool entry, which ``spooler.QueueRunner``
then writes back. ``DeliveryRecord`` and ``RecipientResult`` are the
"delivery" record of the transaction log, whose JSON Schema is
``observe/schema/delivery.schema.json``.

Rule 1: no I/O. Nothing here touches a socket, a file, the spool's folder,
the clock or the log; an attempt's replies go in and plain values come out,
so every verdict can be checked without a network.

Rule 2: a recipient is delivered only when MAIL, its RCPT and the end of
the message got a 2xx, and that last 2xx does not contradict itself
(``diagnosis.contradiction``); it fails only on a 5xx (to MAIL, its RCPT,
DATA or the end of the message). Anything else, a lost outcome included,
leaves it pending.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from smtpwarden.protocol.diagnosis import DEFAULT_PHRASES, contradiction
from smtpwarden.protocol.records import ReplyInfo, Upstream
from smtpwarden.protocol.replies import Reply
from smtpwarden.spool.model import Entry, RecipientState

if TYPE_CHECKING:
    # Only for annotations: the module that makes attempts does the I/O.
    from smtpwarden.net.delivery import Attempt

DeliveryOutcome = Literal["delivered", "rejected", "dead"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientResult:
    """One recipient in a delivery record: its state and the reply behind it."""

    address: str
    state: str  # "delivered", "failed" or, in a dead entry, "pending"
    reply: ReplyInfo | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRecord:
    """The record of a spooled message that left the queue, or died there.

    ``attempts`` counts delivery runs, this one included; ``upstream`` is the
    last upstream tried (None if none was); ``reason`` says why a dead entry
    died; ``queued_s`` is its time in the spool.
    """

    type: str
    time: str
    queue_id: str
    transaction_id: str
    dedupe_key: str
    route: str
    upstream: Upstream | None
    mail_from: str
    recipients: tuple[RecipientResult, ...]
    outcome: DeliveryOutcome
    attempts: int
    duplicate_risk: bool
    reason: str | None
    size: int
    body_sha256: str
    queued_s: float


@dataclass(slots=True)
class Verdict:
    """What one attempt says of its recipients, by position in its envelope.

    ``pending`` keeps the last reply of each recipient still to deliver (None
    if it got none). ``risky`` when the upstream may have the message
    although it did not accept it plainly.
    """

    delivered: dict[int, ReplyInfo] = field(default_factory=dict)
    failed: dict[int, ReplyInfo] = field(default_factory=dict)
    pending: dict[int, ReplyInfo | None] = field(default_factory=dict)
    error: str | None = None
    risky: bool = False


def _contradicts(reply: Reply, phrases: Sequence[str]) -> bool:
    return contradiction(reply.code, reply.enhanced, reply.text, phrases=phrases) is not None


def judge(attempt: Attempt, phrases: Sequence[str] = DEFAULT_PHRASES) -> Verdict:
    """Sort an attempt's recipients into delivered, failed (5xx) and pending."""
    verdict = Verdict(error=attempt.error)
    everyone = range(len(attempt.recipients))
    mail = attempt.mail
    if mail is None or not _ok(mail):
        # Without MAIL accepted the RCPT replies mean nothing (a pipelined 503).
        if mail is not None and mail.code // 100 == 5:
            verdict.failed = dict.fromkeys(everyone, _info(mail))
        else:
            verdict.pending = dict.fromkeys(everyone, _info(mail) if mail else None)
        verdict.error = verdict.error or (f"MAIL {_brief(mail)}" if mail else None)
        return verdict
    accepted = []
    for i, reply in enumerate(attempt.recipients):
        if reply is not None and reply.code // 100 == 5:
            verdict.failed[i] = _info(reply)
        elif _ok(reply) and reply is not None and not _contradicts(reply, phrases):
            accepted.append(i)
        else:
            # A "250 recipient rejected" stays pending: it may or may not get
            # the message, so it is tried again (a duplicate risk).
            verdict.pending[i] = _info(reply) if reply else None
            verdict.risky = verdict.risky or _ok(reply)
    final, data = attempt.final, attempt.data
    if final is None:
        # Not sent, or sent without an answer (lost): no verdict for the accepted.
        refusal = data if data is not None and data.code != 354 else None
        if refusal is not None and refusal.code // 100 == 5:
            verdict.failed.update(dict.fromkeys(accepted, _info(refusal)))
        else:
            verdict.pending.update(dict.fromkeys(accepted, _info(refusal) if refusal else None))
        verdict.risky = verdict.risky or attempt.sent
    else:
        why = contradiction(final.code, final.enhanced, final.text, phrases=phrases)
        if _ok(final) and why is None:
            verdict.delivered = dict.fromkeys(accepted, _info(final))
        elif final.code // 100 == 5:
            verdict.failed.update(dict.fromkeys(accepted, _info(final)))
        else:
            verdict.pending.update(dict.fromkeys(accepted, _info(final)))
            verdict.error = _brief(final) + (f" ({why})" if why else "")
            verdict.risky = verdict.risky or why is not None
    # Name a recipient's own refusal rather than "no recipient accepted".
    refusals = [info for info in verdict.pending.values() if info is not None]
    if refusals and (verdict.error is None or not accepted):
        verdict.error = f"RCPT {_describe(refusals[0])}"
    return verdict


def settle(entry: Entry, pending: Sequence[int], verdict: Verdict) -> Entry:
    """``entry`` with the verdict's recipients (positions in ``pending``) settled.

    Returns the new entry; the spool is not touched. Raises IndexError or
    InvalidTransition (``Entry.settle``) if ``pending`` is not the entry's
    pending recipients as they were offered.
    """
    for position, reply in verdict.delivered.items():
        entry = entry.settle((pending[position],), RecipientState.DELIVERED, reply)
    for position, reply in verdict.failed.items():
        entry = entry.settle((pending[position],), RecipientState.FAILED, reply)
    for position, last in verdict.pending.items():
        if last is not None:
            entry = entry.settle((pending[position],), RecipientState.PENDING, last)
    return entry


def _ok(reply: Reply | None) -> bool:
    return reply is not None and reply.code // 100 == 2


def _info(reply: Reply) -> ReplyInfo:
    return ReplyInfo.of(reply, local=False)


def _describe(info: ReplyInfo) -> str:
    return " ".join(str(part) for part in (info.code, info.enhanced, info.text) if part)


def _brief(reply: Reply) -> str:
    first = reply.lines[0].decode("utf-8", "replace") if reply.lines else ""
    return f"{reply.code} {first}"
