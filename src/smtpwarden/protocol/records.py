"""The records the session tracker produces: plain frozen dataclasses.

They serialise to JSON as they are (orjson handles dataclasses and enums),
in field order, so this module is also the reference for the log format
that ``observe/schema/*.json`` describes. Times are passed in by the caller.

The classes that go into records have no ``__slots__``: orjson writes a
dataclass with an instance dictionary from that dictionary, in C, about
twice as fast as one with slots, whose fields it must look up one by one;
a record is written for every transaction. ``SessionInfo``, which lives as
long as its session and is never written itself, keeps its slots.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from smtpwarden.protocol.causes import Cause
from smtpwarden.protocol.replies import Reply


class Outcome(enum.Enum):
    """How a transaction ended, as PRODUCT.md names it."""

    # Members are singletons: hashed by identity in C (Enum's own hash
    # is a Python call), as dict keys on the hot path.
    __hash__ = object.__hash__

    DELIVERED = "delivered"  # the upstream answered 2xx to the end of the message
    REJECTED = "rejected"  # a 5xx ended it
    DEFERRED = "deferred"  # a 4xx ended it (or the upstream went away before the end)
    UNKNOWN = "unknown"  # the message was sent but no final reply came
    ABORTED = "aborted"  # the client stopped it (RSET, QUIT, EHLO, disconnect)
    RETRIED = "retried"  # a replay on a fresh upstream connection got the 2xx
    REQUEUED = "requeued"  # spooled after the replays failed; delivered later


class Pattern(enum.Enum):
    """PRODUCT.md's failure patterns; the values are the JSON strings."""

    # Members are singletons: hashed by identity in C (Enum's own hash
    # is a Python call), as dict keys on the hot path.
    __hash__ = object.__hash__

    NONE = "none"
    DEFERRED_FAILURE = "deferred_failure"  # envelope 2xx, then DATA/"."/BDAT 4xx/5xx
    CHUNK_FAILURE = "chunk_failure"  # BDAT chunks 2xx, then a BDAT 4xx/5xx
    LOST_OUTCOME = "lost_outcome"  # message sent, no reply (RFC 1047 window)
    CONTRADICTORY_250 = "contradictory_250"  # a 2xx whose text says failure
    PARTIAL_RECIPIENTS = "partial_recipients"  # delivered to part of the envelope
    MID_SESSION_LOSS = "mid_session_loss"  # 421 or loss after MAIL, before the message


@dataclass(frozen=True, kw_only=True)
class Diagnosis:
    """What went wrong, whether a retry can help, and what to do."""

    pattern: Pattern
    cause: Cause
    retryable: bool
    advice: str  # one line for the operator
    evidence: str | None  # the reply or step that shows it, shortened


def outcome_of(reply: Reply) -> Outcome:
    """The outcome a final reply implies."""
    match reply.code // 100:
        case 2:
            return Outcome.DELIVERED
        case 4:
            return Outcome.DEFERRED
        case 5:
            return Outcome.REJECTED
        case _:
            return Outcome.UNKNOWN


def iso_time(epoch_s: float) -> str:
    """Format seconds since the epoch as RFC 3339 UTC with milliseconds."""
    # As datetime does: microseconds rounded half to even, then truncated.
    seconds = math.floor(epoch_s)
    micros = round((epoch_s - seconds) * 1_000_000)
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    return f"{_second(seconds)}.{micros // 1000:03d}Z"


# Every record has a time, and most records of a busy second share its
# date and time of day: formatting them is kept for the latest few seconds.
@functools.lru_cache(maxsize=8)
def _second(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def text_of(raw: bytes) -> str:
    """Decode wire text for a record; invalid UTF-8 becomes U+FFFD."""
    return raw.decode("utf-8", "replace")


@dataclass(frozen=True, kw_only=True)
class ReplyInfo:
    """A reply as recorded. ``local`` is set when smtpwarden answered itself."""

    code: int
    enhanced: str | None
    text: str
    local: bool

    @classmethod
    def of(cls, reply: Reply, *, local: bool) -> ReplyInfo:
        raw = reply.raw
        if len(raw) > CACHED_REPLY_BYTES:
            return cls(code=reply.code, enhanced=reply.enhanced, text=reply.text, local=local)
        key = (raw, local)
        info = _INFO_OF.get(key)
        if info is None:
            if len(_INFO_OF) >= CACHED_REPLIES:
                _INFO_OF.clear()
            info = _INFO_OF[key] = cls(
                code=reply.code, enhanced=reply.enhanced, text=reply.text, local=local
            )
        return info


# Records keep a ReplyInfo for the replies to MAIL, RCPT and the end of each
# message; most are the same few short replies, and a ReplyInfo is immutable,
# so one is shared instead of parsing the reply's text again. The cache is
# keyed by the reply's octets (compared in C) and holds only short replies,
# at most CACHED_REPLIES of them, so it stays small whatever upstreams send.
CACHED_REPLY_BYTES = 512
CACHED_REPLIES = 1024
_INFO_OF: dict[tuple[bytes, bool], ReplyInfo] = {}


@dataclass(frozen=True, kw_only=True)
class Step:
    """One command of the timeline and its reply.

    ``at_ms`` counts from the start of the transaction (or session);
    ``latency_ms`` from sending the command to its reply. ``code`` is None
    when no reply came.
    """

    command: str
    at_ms: float
    latency_ms: float | None
    code: int | None
    local: bool


@dataclass(frozen=True, kw_only=True)
class Peer:
    """A network endpoint."""

    address: str
    port: int


@dataclass(frozen=True, kw_only=True)
class Upstream:
    """The upstream a session was relayed to."""

    name: str
    address: str
    port: int


@dataclass(frozen=True, kw_only=True)
class Tls:
    """TLS on each leg: version and cipher, or "none"; the peer certificate's subject."""

    client: str = "none"
    upstream: str = "none"
    client_subject: str | None = None  # a client certificate's, when one was verified
    upstream_subject: str | None = None  # the upstream's verified certificate
    # False when the upstream's certificate was not checked (tls.verify:
    # false); None without TLS to the upstream.
    upstream_verified: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """What the shell knows of a session when it starts."""

    session_id: str
    listener: str
    client: Peer
    upstream: Upstream
    tls: Tls
    auth: str | None = None  # the identity AUTH proved, once the upstream said 235


@dataclass(frozen=True, kw_only=True)
class Address:
    """A MAIL FROM or RCPT TO path with its parameters and reply."""

    address: str
    params: dict[str, str | None]
    reply: ReplyInfo | None


@dataclass(frozen=True, kw_only=True)
class TransactionRecord:
    """One mail transaction, from MAIL to its final reply."""

    type: str
    time: str
    session_id: str
    transaction_id: str
    listener: str
    client: Peer
    upstream: Upstream
    tls: Tls
    auth: str | None = None  # the authenticated identity (never a credential)
    helo: str | None
    mail_from: Address
    recipients: tuple[Address, ...]
    # Recipients the upstream answered 4xx that the relay answered 250 and
    # spooled (requeue with retry.take_over_partial).
    taken_over: tuple[str, ...] = ()
    body: str | None
    size: int | None
    body_sha256: str | None
    timeline: tuple[Step, ...]
    final_reply: ReplyInfo | None
    outcome: Outcome
    attempts: int
    # True when a replay followed a lost outcome: the first upstream may have
    # taken the message too, so it may arrive twice (at-least-once).
    duplicate_risk: bool = False
    # SHA-256 of the MAIL line, the accepted RCPT lines and the body's hash:
    # the same message sent twice shares it. Null if no message was sent.
    dedupe_key: str | None = None
    duration_ms: float
    # What went wrong and what to do; filled in by the tracker once the rest
    # of the record exists (``diagnosis.diagnose`` reads the record).
    diagnosis: Diagnosis | None = None


@dataclass(frozen=True, kw_only=True)
class SessionRecord:
    """One client session, written when it ends."""

    type: str
    time: str
    session_id: str
    listener: str
    client: Peer
    upstream: Upstream
    tls: Tls
    auth: str | None = None  # the authenticated identity (never a credential)
    helo: str | None
    banner: ReplyInfo | None
    transactions: int
    timeline: tuple[Step, ...]
    end: str
    client_bytes: int
    upstream_bytes: int
    duration_ms: float
