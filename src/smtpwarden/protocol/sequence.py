"""Commands and replies out of sequence.

A client may not send RCPT before MAIL, nor DATA or BDAT before RCPT; an
upstream may not answer a command with a code that command cannot have.

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
from smtpwarden.protocol.transaction import Awaiting, Transaction


class OutOfSequence(enum.Enum):
    """Why a RCPT, DATA or BDAT cannot belong to a transaction now."""

    NEED_MAIL = "need MAIL"  # RFC 5321 4.1.4: no MAIL opened a transaction
    NEED_RCPT = "need RCPT"  # RFC 5321 3.3: no RCPT was given
    NO_VALID_RECIPIENTS = "no valid recipients"  # every RCPT was refused
    DATA_AFTER_BDAT = "DATA after BDAT"  # RFC 3030 2: a MUST 503


def out_of_sequence(
    verb: Verb,
    transaction: Transaction | None,
    pending: Iterable[Awaiting],
    body_kind: str | None,
    mail_open: bool,
    recipients_sent: int,
) -> OutOfSequence | None:
    """Why ``verb`` may not be relayed now; None when it may (or cannot be known yet).

    ``transaction`` is the open one (its MAIL was accepted), ``pending`` the
    commands still awaiting their reply, ``body_kind`` how the message of the
    client's latest MAIL is being sent ("data", "bdat" or None). The last two
    are what the client sent, replies aside: ``mail_open``, a MAIL since the
    last RSET, greeting or end of message; ``recipients_sent``, the RCPTs
    relayed since that MAIL.
    """
    if not mail_open:
        return OutOfSequence.NEED_MAIL
    if verb is Verb.DATA and body_kind == "bdat":
        return OutOfSequence.DATA_AFTER_BDAT
    if verb is not Verb.RCPT and not recipients_sent:
        return OutOfSequence.NEED_RCPT
    if transaction is not None and (verb is Verb.RCPT or transaction.accepted):
        return None  # the usual case, decided without looking at the queue
    waiting = {entry.verb for entry in pending if entry.local is None}
    if transaction is None:
        # The MAIL was refused, unless its reply is still on its way.
        return None if Verb.MAIL in waiting else OutOfSequence.NEED_MAIL
    if Verb.MAIL in waiting or Verb.RCPT in waiting:
        return None
    return OutOfSequence.NO_VALID_RECIPIENTS


def reply_fits(verb: Verb | None, name: str, code: int) -> bool:
    """True if ``code`` can answer the command ``verb`` (``name`` for the relay's own).

    RFC 5321 4.3.2: DATA is answered 354 or a failure, and only DATA (and
    AUTH, RFC 4954 4: 334) an intermediate 3xx; the greeting is 220 or a
    failure. A 250 to DATA would otherwise pass for a message delivered
    that was never sent.
    """
    klass = code // 100
    if verb is Verb.DATA:
        return code == 354 or klass in (4, 5)
    if klass == 3:
        return verb is Verb.AUTH
    if name == "CONNECT":
        return code == 220 or klass in (4, 5)
    return True
