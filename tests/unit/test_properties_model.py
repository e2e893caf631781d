"""Properties of spool entries and their rules (``spool/model.py``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.spool.errors import InvalidTransition
from smtpwarden.spool.model import (
    TRANSITIONS,
    BodyKind,
    Change,
    Entry,
    EntryState,
    Recipient,
    RecipientState,
    check_update,
    command_line,
    transition,
)
from strategies import any_case, bracketed_paths, octets, scaled

replies = st.none() | st.builds(
    ReplyInfo,
    code=st.sampled_from([250, 451, 550]),
    enhanced=st.none(),
    text=st.just("x"),
    local=st.booleans(),
)


def entry(states: list[RecipientState], state: EntryState, risk: bool) -> Entry:
    return Entry(
        queue_id="20250102T030405.123456-1a2b3c4d",
        state=state,
        created=1.0,
        attempts=0,
        next_attempt=1.0,
        last_error=None,
        mail_from=b"MAIL FROM:<a@example.org>",
        recipients=tuple(
            Recipient(line=b"RCPT TO:<r%d@example.net>" % i, state=s) for i, s in enumerate(states)
        ),
        body=BodyKind.DATA,
        size=1,
        sha256="0" * 64,
        transaction_id="s1.1",
        dedupe_key="k",
        route="",
        duplicate_risk=risk,
    )


entries = st.builds(
    entry,
    st.lists(st.sampled_from(RecipientState), min_size=1, max_size=5),
    st.sampled_from(EntryState),
    st.booleans(),
)
settlements = st.lists(
    st.tuples(
        st.lists(st.integers(-1, 5), max_size=3),
        st.sampled_from(RecipientState),
        replies,
    ),
    max_size=6,
)


@scaled(cap=10_000)
@given(entries, settlements)
def test_a_recipient_that_left_pending_never_changes_again(
    start: Entry, steps: list[tuple[list[int], RecipientState, ReplyInfo | None]]
) -> None:
    current = start
    for indexes, state, reply in steps:
        before = current
        try:
            current = current.settle(indexes, state, reply)
        except (InvalidTransition, IndexError):
            assert current is before  # a refused change changes nothing
            continue
        # The result may always replace what was there (store.py checks it).
        check_update(before, current)
        for index, (old, new) in enumerate(zip(before.recipients, current.recipients, strict=True)):
            if old.state is not RecipientState.PENDING:
                assert new == old
            elif index in indexes:
                assert (new.state, new.reply) == (state, reply)
            else:
                assert new == old
        assert current.state is before.state
        assert current.finished == (not current.pending)
        assert current.pending == tuple(
            i for i, r in enumerate(current.recipients) if r.state is RecipientState.PENDING
        )


@scaled(cap=10_000)
@given(entries, st.integers(0, 4), st.sampled_from(RecipientState))
def test_check_update_refuses_any_change_to_a_settled_recipient(
    old: Entry, index: int, state: RecipientState
) -> None:
    recipients = list(old.recipients)
    if index >= len(recipients):
        return
    was = recipients[index].state
    recipients[index] = replace(recipients[index], state=state)
    new = replace(old, recipients=tuple(recipients))
    if was is not RecipientState.PENDING and state is not was:
        with pytest.raises(InvalidTransition):
            check_update(old, new)
    else:
        check_update(old, new)


@given(entries)
def test_check_update_refuses_clearing_a_duplicate_risk(old: Entry) -> None:
    new = replace(old, duplicate_risk=False)
    if old.duplicate_risk:
        with pytest.raises(ValueError, match="duplicate_risk"):
            check_update(old, new)
    else:
        check_update(old, new)
    check_update(new, replace(new, duplicate_risk=True))


@scaled(cap=10_000)
@given(st.sampled_from(EntryState), st.lists(st.sampled_from(Change), max_size=8))
def test_states_change_only_along_the_table(state: EntryState, changes: list[Change]) -> None:
    for change in changes:
        before = state
        if (state, change) not in TRANSITIONS:
            with pytest.raises(InvalidTransition):
                transition(state, change)
            continue
        state = transition(state, change)
        assert state is TRANSITIONS[before, change]
        # Settling recipients never moves the entry; a dead letter comes
        # back only by hand (retry), a held entry only by release or bury.
        if change is Change.SETTLE:
            assert state is before
        if before is EntryState.DEAD and state is not EntryState.DEAD:
            assert change is Change.RETRY
        if before is EntryState.HELD and state is not EntryState.HELD:
            assert change in (Change.RELEASE, Change.BURY)


@given(octets(max_size=30), st.sampled_from([b"", b"\r\n", b"\r", b"\n"]))
def test_command_lines_lose_their_crlf_and_hold_no_other_cr_or_lf(text: bytes, end: bytes) -> None:
    raw = text + end
    kept = raw[:-2] if raw.endswith(b"\r\n") else raw
    if not kept or b"\r" in kept or b"\n" in kept:
        with pytest.raises(ValueError, match=r"CR or LF|empty"):
            command_line(raw)
    else:
        assert command_line(raw) == kept


@scaled(0.5, cap=3_000)
@given(bracketed_paths(), bracketed_paths(), st.data())
def test_sender_and_recipient_addresses_are_the_paths_of_their_lines(
    sender: bytes, rcpt: bytes, data: st.DataObject
) -> None:
    mail = data.draw(any_case(b"MAIL FROM:"), label="mail") + b"<" + sender + b">"
    line = data.draw(any_case(b"RCPT TO:"), label="rcpt") + b"<" + rcpt + b"> NOTIFY=NEVER"
    spooled = replace(
        entry([RecipientState.PENDING], EntryState.QUEUED, False),
        mail_from=mail,
        recipients=(Recipient(line=line),),
    )
    assert spooled.sender == sender.decode("utf-8")
    assert spooled.recipients[0].address == rcpt.decode("utf-8")
