"""What a spool entry is: its states, its recipients, the rules for changing them.

Plain values and pure functions: no files, no clock. ``codec.py`` turns an
``Entry`` into its envelope file and back; ``store.py`` keeps the files.

Command lines are kept as the client sent them, CRLF excluded, so a delivery
replays MAIL and RCPT with their parameters.

Rules kept here:
- A recipient that is delivered or failed never goes back to pending: a
  message is never delivered twice to a recipient that accepted it.
- State changes follow ``TRANSITIONS``; anything else raises
  ``InvalidTransition``.
- ``duplicate_risk``, once set, stays set: whether an earlier attempt may
  have delivered is not undone by a later one.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from smtpwarden.protocol import grammar
from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.spool.errors import InvalidTransition, NoSuchEntry

# "20250102T030405.123456-1a2b3c4d": UTC time to the microsecond, then the
# random tag of the Spool that made it. Fixed width, so names sort by time;
# only [0-9A-Za-z.-], so every id is a safe file name.
QUEUE_ID = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{6}-[0-9a-f]{8}\Z")


def check_queue_id(queue_id: str) -> str:
    """Return ``queue_id`` if it has the spool's form; raises NoSuchEntry otherwise.

    Ids come from operators on the command line: this check is what keeps
    ``../x`` and friends out of file names.
    """
    if not QUEUE_ID.match(queue_id):
        raise NoSuchEntry(f"not a queue id: {queue_id!r}")
    return queue_id


class EntryState(enum.Enum):
    """Where an entry is in its life; the values are the JSON strings."""

    QUEUED = "queued"  # waiting for its first attempt, or retried by hand
    DEFERRED = "deferred"  # an attempt failed; next_attempt says when to try again
    HELD = "held"  # an operator stopped delivery until release
    DEAD = "dead"  # given up (too old, or by hand); kept until deleted


class Change(enum.Enum):
    """What can happen to an entry's state."""

    DEFER = "defer"
    HOLD = "hold"
    RELEASE = "release"
    RETRY = "retry"
    BURY = "bury"  # to dead letters
    SETTLE = "settle"  # recipients delivered or failed; the state stays


# (state, change) -> next state. RELEASE lands on QUEUED, or on DEFERRED for
# an entry that was already tried (``release_target``). A pair that is not
# here is refused.
TRANSITIONS: Mapping[tuple[EntryState, Change], EntryState] = {
    (EntryState.QUEUED, Change.DEFER): EntryState.DEFERRED,
    (EntryState.DEFERRED, Change.DEFER): EntryState.DEFERRED,
    (EntryState.QUEUED, Change.HOLD): EntryState.HELD,
    (EntryState.DEFERRED, Change.HOLD): EntryState.HELD,
    (EntryState.HELD, Change.HOLD): EntryState.HELD,
    (EntryState.HELD, Change.RELEASE): EntryState.QUEUED,
    (EntryState.QUEUED, Change.RETRY): EntryState.QUEUED,
    (EntryState.DEFERRED, Change.RETRY): EntryState.QUEUED,
    (EntryState.DEAD, Change.RETRY): EntryState.QUEUED,
    (EntryState.QUEUED, Change.BURY): EntryState.DEAD,
    (EntryState.DEFERRED, Change.BURY): EntryState.DEAD,
    (EntryState.HELD, Change.BURY): EntryState.DEAD,
    (EntryState.DEAD, Change.BURY): EntryState.DEAD,
    (EntryState.QUEUED, Change.SETTLE): EntryState.QUEUED,
    (EntryState.DEFERRED, Change.SETTLE): EntryState.DEFERRED,
}


def transition(state: EntryState, change: Change) -> EntryState:
    """The state after ``change``; raises InvalidTransition if not allowed."""
    try:
        return TRANSITIONS[state, change]
    except KeyError:
        raise InvalidTransition(f"cannot {change.value} an entry that is {state.value}") from None


class RecipientState(enum.Enum):
    """Delivery state of one recipient."""

    PENDING = "pending"
    DELIVERED = "delivered"  # the upstream accepted the message for it: never again
    FAILED = "failed"  # refused for good (5xx): not retried


class BodyKind(enum.Enum):
    """How the message octets are stored, and so how they are sent."""

    DATA = "data"  # the DATA section as sent: dot-stuffed, "<CRLF>.<CRLF>" included
    BDAT = "bdat"  # the raw message octets of the BDAT chunks


def _path_of(line: bytes, argument: re.Pattern[bytes]) -> str:
    """The address in a MAIL or RCPT line, brackets removed, for people to read."""
    _verb, _, rest = line.partition(b" ")
    found = argument.match(rest)
    path = found.group(1) if found else rest
    if path.startswith(b"<") and path.endswith(b">"):
        path = path[1:-1]
    return path.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipient:
    """One recipient: its RCPT line (CRLF excluded), state and last reply."""

    line: bytes
    state: RecipientState = RecipientState.PENDING
    reply: ReplyInfo | None = None

    @property
    def address(self) -> str:
        return _path_of(self.line, grammar.RCPT_ARGUMENT)


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """What ``put`` stores beside the message octets.

    ``mail_from`` and ``recipients`` are the MAIL and RCPT lines to replay,
    as the client sent them; a trailing CRLF is removed, any other CR or LF
    is refused (PRODUCT.md invariant 3). ``recipients`` holds only those that
    still need delivery. ``dedupe_key`` is the caller's hash of envelope and
    body, kept for records; ``route`` names the route that spooled it and is
    opaque to the spool. ``duplicate_risk`` says that an attempt before
    spooling may have delivered the message without saying so. The first
    delivery is due ``delay_s`` seconds after the put.
    """

    mail_from: bytes
    recipients: tuple[bytes, ...]
    body: BodyKind
    transaction_id: str
    dedupe_key: str
    route: str = ""
    duplicate_risk: bool = False
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One spooled message, as its envelope file says. Times are epoch seconds."""

    queue_id: str
    state: EntryState
    created: float
    attempts: int  # delivery attempts that failed so far
    next_attempt: float
    last_error: str | None
    mail_from: bytes
    recipients: tuple[Recipient, ...]
    body: BodyKind
    size: int  # octets in the message file
    sha256: str  # hex digest of the message file
    transaction_id: str
    dedupe_key: str
    route: str
    # An attempt (before spooling, or from the spool) may have delivered
    # without a clean answer: a recipient may get the message twice.
    duplicate_risk: bool

    @property
    def sender(self) -> str:
        return _path_of(self.mail_from, grammar.MAIL_ARGUMENT)

    @property
    def pending(self) -> tuple[int, ...]:
        """Indexes of the recipients still to deliver."""
        return tuple(i for i, r in enumerate(self.recipients) if r.state is RecipientState.PENDING)

    @property
    def finished(self) -> bool:
        """True when no recipient is pending: the entry leaves the spool."""
        return not self.pending

    def settle(
        self, indexes: Iterable[int], state: RecipientState, reply: ReplyInfo | None
    ) -> Entry:
        """A copy with the given recipients in ``state`` with ``reply``.

        Setting PENDING only records the reply of a recipient still pending.
        Raises IndexError for an unknown index and InvalidTransition when a
        delivered or failed recipient would change again.
        """
        transition(self.state, Change.SETTLE)
        recipients = list(self.recipients)
        for index in indexes:
            if not 0 <= index < len(recipients):
                raise IndexError(f"{self.queue_id} has no recipient {index}")
            old = recipients[index]
            if old.state is not RecipientState.PENDING:
                raise InvalidTransition(
                    f"recipient {index} of {self.queue_id} is already {old.state.value}"
                )
            recipients[index] = replace(old, state=state, reply=reply)
        return replace(self, recipients=tuple(recipients))


def check_update(old: Entry, new: Entry) -> None:
    """Raise ValueError or InvalidTransition if ``new`` may not replace ``old``.

    What identifies the message never changes, a recipient that left
    PENDING never returns to it or changes its state, and a duplicate risk
    is never cleared.
    """
    fixed = ("queue_id", "created", "mail_from", "body", "size", "sha256", "transaction_id")
    for name in fixed:
        if getattr(old, name) != getattr(new, name):
            raise ValueError(f"{old.queue_id}: {name} cannot change")
    if old.duplicate_risk and not new.duplicate_risk:
        raise ValueError(f"{old.queue_id}: duplicate_risk cannot be cleared")
    if [r.line for r in old.recipients] != [r.line for r in new.recipients]:
        raise ValueError(f"{old.queue_id}: recipients cannot change")
    for index, (before, after) in enumerate(zip(old.recipients, new.recipients, strict=True)):
        if before.state is not RecipientState.PENDING and after.state is not before.state:
            raise InvalidTransition(
                f"recipient {index} of {old.queue_id} is already {before.state.value}"
            )


def command_line(line: bytes) -> bytes:
    """``line`` without its trailing CRLF; raises ValueError on any other CR or LF."""
    if line.endswith(b"\r\n"):
        line = line[:-2]
    if b"\r" in line or b"\n" in line:
        raise ValueError(f"CR or LF inside a command line: {line[:80]!r}")
    if not line:
        raise ValueError("empty command line")
    return line
