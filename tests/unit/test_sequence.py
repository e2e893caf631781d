"""Commands out of sequence, as the tracker sees them (protocol.sequence)."""

from __future__ import annotations

import pytest

from smtpwarden.protocol.events import Verb
from smtpwarden.protocol.replies import make_reply
from smtpwarden.protocol.sequence import OutOfSequence
from test_tracker import Session

MAIL = b"MAIL FROM:<a@example.com>"
RCPT = b"RCPT TO:<b@example.org>"
NEED_MAIL = OutOfSequence.NEED_MAIL
NEED_RCPT = OutOfSequence.NEED_RCPT


def verdicts(
    s: Session, recipients: int, mail_open: bool = True
) -> tuple[OutOfSequence | None, ...]:
    """The verdicts on RCPT, DATA and BDAT, given what the client sent since MAIL."""
    tracker = s.tracker
    return tuple(tracker.out_of_sequence(verb, mail_open, recipients) for verb in VERBS)


VERBS = (Verb.RCPT, Verb.DATA, Verb.BDAT)


def test_nothing_may_come_before_mail() -> None:
    assert verdicts(Session(), 0, mail_open=False) == (NEED_MAIL, NEED_MAIL, NEED_MAIL)


def test_the_end_of_a_message_needs_a_new_mail_whatever_is_pending() -> None:
    s = Session()
    s.send(MAIL, RCPT, b"DATA")
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n")
    s.body(b"x\r\n.\r\n")
    s.end()  # its reply still on its way: the transaction is open upstream
    assert verdicts(s, 0, mail_open=False) == (NEED_MAIL, NEED_MAIL, NEED_MAIL)


def test_a_mail_refused_locally_is_not_pending() -> None:
    s = Session()
    s.send(b"NOOP")  # an upstream reply owed, so the local one waits behind it
    s.tracker.answered_locally(None, Verb.MAIL, make_reply(552, "5.3.4", "too big"), s.tick())
    assert s.tracker.out_of_sequence(Verb.RCPT, True, 0) is NEED_MAIL


def test_a_pending_mail_leaves_rcpt_to_the_upstream_but_data_needs_a_rcpt() -> None:
    s = Session()
    s.send(MAIL)
    assert verdicts(s, 0) == (None, NEED_RCPT, NEED_RCPT)


def test_a_pending_rcpt_leaves_data_to_the_upstream() -> None:
    s = Session()
    s.send(MAIL, RCPT)
    assert verdicts(s, 1) == (None, None, None)
    s.reply(b"250 ok\r\n")
    assert verdicts(s, 1) == (None, None, None)


def test_an_accepted_rcpt_opens_the_message() -> None:
    s = Session()
    s.send(MAIL, RCPT)
    s.reply(b"250 ok\r\n", b"250 ok\r\n")
    assert verdicts(s, 1) == (None, None, None)


def test_every_rcpt_refused_is_no_valid_recipients() -> None:
    s = Session()
    s.send(MAIL, RCPT, RCPT)
    s.reply(b"250 ok\r\n", b"550 5.1.1 no\r\n", b"451 4.3.0 later\r\n")
    no_valid = OutOfSequence.NO_VALID_RECIPIENTS
    assert verdicts(s, 2) == (None, no_valid, no_valid)


def test_a_refused_mail_ends_the_transaction() -> None:
    s = Session()
    s.send(MAIL)
    s.reply(b"553 5.1.8 no\r\n")
    assert verdicts(s, 0) == (NEED_MAIL, NEED_RCPT, NEED_RCPT)


@pytest.mark.parametrize("last", [False, True])
def test_data_after_bdat_is_a_must_503(last: bool) -> None:
    s = Session()
    s.send(MAIL, RCPT)
    s.reply(b"250 ok\r\n", b"250 ok\r\n")
    s.send(b"BDAT 5 LAST" if last else b"BDAT 5")
    assert s.tracker.out_of_sequence(Verb.DATA, True, 1) is OutOfSequence.DATA_AFTER_BDAT
    assert s.tracker.out_of_sequence(Verb.BDAT, True, 1) is None


def test_a_new_mail_starts_over() -> None:
    s = Session()
    s.send(MAIL, RCPT, b"BDAT 2 LAST")
    s.reply(b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n")
    s.send(MAIL)
    assert verdicts(s, 0) == (None, NEED_RCPT, NEED_RCPT)
