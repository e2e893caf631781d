"""Commands out of sequence: what a client may not send before MAIL or RCPT.

The upstream enforces the order of a transaction itself, but smtpwarden
must not lean on that: a lax upstream that answers 354 to a DATA with no
recipient, or to a DATA after BDAT chunks, would take a message that no
envelope, or half of one, describes. Only what is certain is refused here:
while the reply to a MAIL or a RCPT is still on its way, the upstream's
own answer decides (RFC 2920 3.1: a pipelining client cannot know yet),
except that a message with no RCPT sent since its MAIL has no envelope
whatever the replies say.
Pure: the tracker passes in what it knows.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from smtpwarden.protocol.events import Verb
from smtpwarden.protocol.transaction import Transaction


class OutOfSequence(enum.Enum):
    """Why a RCPT, DATA or BDAT cannot belong to a transaction now."""

    NEED_MAIL = "need MAIL"  # RFC 5321 4.1.4: no MAIL opened a transaction
    NEED_RCPT = "need RCPT"  # RFC 5321 3.3: no RCPT was given
    NO_VALID_RECIPIENTS = "no valid recipients"  # every RCPT was refused
    DATA_AFTER_BDAT = "DATA after BDAT"  # RFC 3030 2: a MUST 503


def out_of_sequence(
    verb: Verb,
    transaction: Transaction | None,
    pending: Iterable[Verb | None],
    body_kind: str | None,
    recipients_sent: int,
) -> OutOfSequence | None:
    """Why ``verb`` may not be relayed now; None when it may (or cannot be known yet).

    ``transaction`` is the open one (its MAIL was accepted), ``pending`` the
    verbs still awaiting their reply, ``body_kind`` how the message of the
    client's latest MAIL is being sent ("data", "bdat" or None), and
    ``recipients_sent`` how many RCPTs the client sent since that MAIL.
    """
    waiting = set(pending)
    if Verb.MAIL not in waiting and transaction is None:
        return OutOfSequence.NEED_MAIL
    if verb is Verb.RCPT:
        return None
    if verb is Verb.DATA and body_kind == "bdat":
        return OutOfSequence.DATA_AFTER_BDAT
    if not recipients_sent:
        return OutOfSequence.NEED_RCPT
    if Verb.MAIL in waiting or Verb.RCPT in waiting:
        return None
    assert transaction is not None  # noqa: S101 - no MAIL pending means one is open
    return None if transaction.accepted else OutOfSequence.NO_VALID_RECIPIENTS
