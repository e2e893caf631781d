"""The durable queue behind the requeue policy, and its retry schedule.

``store.Spool`` keeps messages on local disk (layout and crash rules in
``store.py``, the locking rule in ``lease.py``); ``schedule`` says when to
try again. The spool knows nothing of sockets: the workers that deliver
from it live in ``smtpwarden.net``.
"""

from smtpwarden.spool.errors import (
    CorruptEntry,
    EntryBusy,
    InvalidTransition,
    NoSuchEntry,
    SpoolError,
    SpoolFull,
)
from smtpwarden.spool.lease import Lease
from smtpwarden.spool.model import BodyKind, Entry, EntryState, Envelope, Recipient, RecipientState
from smtpwarden.spool.recovery import RecoveryReport
from smtpwarden.spool.store import Spool

__all__ = [
    "BodyKind",
    "CorruptEntry",
    "Entry",
    "EntryBusy",
    "EntryState",
    "Envelope",
    "InvalidTransition",
    "Lease",
    "NoSuchEntry",
    "Recipient",
    "RecipientState",
    "RecoveryReport",
    "Spool",
    "SpoolError",
    "SpoolFull",
]
