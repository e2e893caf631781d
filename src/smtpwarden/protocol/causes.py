"""What a failing reply blames: the cause tables behind ``diagnosis``.

Pure data and one lookup. The order of the evidence is fixed here:

1. the RFC 3463 enhanced status code (subject and detail), read from the
   IANA registry that RFC 5248 set up;
2. reply codes whose meaning is unambiguous (RFC 4954 authentication
   replies, RFC 5321 address replies);
3. keywords in the reply text;
4. reply codes that servers overload (RFC 5321 421, 451, 452, 552), as a
   last resort: "552" means a full mailbox on one server and an oversized
   message on the next, so a plain keyword beats it.

Nothing here reads the class digit; whether a failure is worth retrying is
decided in ``diagnosis``.
"""

from __future__ import annotations

import enum
import re


class Cause(enum.Enum):
    """Why a transaction failed, as PRODUCT.md names the causes."""

    NONE = "none"
    MAILBOX_FULL = "mailbox_full"
    POLICY = "policy"  # policy or spam block
    ROUTING = "routing"  # routing, DNS, or an address that leads nowhere
    AUTHENTICATION = "authentication"
    RESOURCES = "resources"  # the server's own resources
    MESSAGE_TOO_BIG = "message_too_big"
    TIMEOUT = "timeout"
    CONNECTION_LOST = "connection_lost"
    UNKNOWN = "unknown"


# Advice for the operator, one line per cause.
ADVICE: dict[Cause, str] = {
    Cause.NONE: "Nothing to do.",
    Cause.MAILBOX_FULL: (
        "Recipient mailbox is full; the sender should retry later or contact the recipient."
    ),
    Cause.POLICY: (
        "The server refused the message by policy (spam filter, blocklist or reputation); "
        "check the sending IP and domain reputation, SPF/DKIM/DMARC and the content."
    ),
    Cause.ROUTING: (
        "The destination could not be resolved or reached; check the address, the domain's "
        "DNS and MX records, and the upstream's routing."
    ),
    Cause.AUTHENTICATION: (
        "Authentication failed or is required; check the credentials, the AUTH mechanism "
        "and whether TLS is needed first."
    ),
    Cause.RESOURCES: (
        "The server is short of resources or overloaded; retry later and check its queue, "
        "disk and load."
    ),
    Cause.MESSAGE_TOO_BIG: (
        "The message exceeds the server's size limit; shrink it (attachments) or ask for a "
        "higher limit."
    ),
    Cause.TIMEOUT: "The exchange timed out; check the upstream's health and the timeouts.",
    Cause.CONNECTION_LOST: (
        "The connection to the upstream was lost; check the network and the upstream, then retry."
    ),
    Cause.UNKNOWN: "The reply names no known cause; read its text and the server's logs.",
}

# Sharper advice where the cause alone says too little.
ADVICE_ADDRESS = "An envelope address is wrong or does not exist; correct it before sending again."
ADVICE_PROTOCOL = (
    "The server refused a command or its arguments; look for the offending command in a transcript."
)
ADVICE_CONTENT = (
    "The server cannot take the message's content or encoding; convert or fix the message."
)
ADVICE_DISABLED = "The recipient mailbox is disabled; reach the recipient another way."
ADVICE_FEATURES = (
    "The server lacks a feature this message needs (e.g. 8BITMIME, SMTPUTF8); "
    "send it in a form the server supports."
)

# Phrases that make a 2xx a failure (``diagnosis.contradiction``), seen in
# the wild; matched case-insensitively, a run of white space as one space.
PHRASES: tuple[str, ...] = (
    "transaction failed",
    "chunking aborted",
    "recipient rejected",
    "connection timed out",
    "transport suspended",
    "authentication failed",
    "delivery failed",
    "message rejected",
    "relay access denied",
)

# Advice that leads the cause's advice, by pattern (Pattern values).
LEADS: dict[str, str] = {
    "deferred_failure": "The message was refused after its envelope was accepted. ",
    "chunk_failure": "A BDAT chunk was refused after earlier chunks were accepted. ",
    "contradictory_250": (
        "The server answered 2xx but its reply reports a failure; treat the message as "
        "not delivered. "
    ),
    "mid_session_loss": (
        "The session ended after the envelope was accepted and before the message was "
        "sent; nothing was delivered, so replaying the transaction is safe. "
    ),
}
ADVICE_LOST = (
    "No reply came after the message was sent, so it may or may not have been delivered; "
    "a retry risks a duplicate, so look for the message in the upstream's logs first."
)

# Reply codes RFC 5321 4.2.2-4.2.3, RFC 4954 6 and RFC 7504 define for
# failures.
FAILURE_CODES = frozenset(
    {421, 450, 451, 452, 454, 455, 500, 501, 502, 503, 504, 521, 530, 534, 535, 538}
    | {550, 551, 552, 553, 554, 555, 556}
)

# RFC 3463 3.1-3.8 (and the registry entries added by RFC 4954, RFC 5248,
# RFC 6710, RFC 7372, RFC 7505): (subject, detail) -> cause, and advice when
# the cause's own advice would mislead. Details not listed take the
# subject's default below.
ENHANCED: dict[tuple[int, int], tuple[Cause, str | None]] = {
    # 3.2 Addressing status: "These errors can generally be corrected by
    # the sender and retried" once corrected.
    (1, 1): (Cause.ROUTING, ADVICE_ADDRESS),  # X.1.1 bad destination mailbox address
    (1, 2): (Cause.ROUTING, None),  # X.1.2 bad destination system address (domain)
    (1, 10): (Cause.ROUTING, None),  # X.1.10 recipient address has null MX (RFC 7505)
    # 3.3 Mailbox status.
    (2, 1): (Cause.UNKNOWN, ADVICE_DISABLED),  # X.2.1 mailbox disabled
    (2, 2): (Cause.MAILBOX_FULL, None),  # X.2.2 mailbox full
    (2, 3): (Cause.MESSAGE_TOO_BIG, None),  # X.2.3 message length exceeds admin limit
    (2, 4): (Cause.UNKNOWN, None),  # X.2.4 mailing list expansion problem
    # 3.4 Mail system status.
    (3, 1): (Cause.RESOURCES, None),  # X.3.1 mail system full
    (3, 2): (Cause.RESOURCES, None),  # X.3.2 system not accepting network messages
    (3, 3): (Cause.UNKNOWN, ADVICE_FEATURES),  # X.3.3 not capable of selected features
    (3, 4): (Cause.MESSAGE_TOO_BIG, None),  # X.3.4 message too big for system
    (3, 5): (Cause.RESOURCES, None),  # X.3.5 system incorrectly configured
    # 3.5 Network and routing status.
    (4, 1): (Cause.CONNECTION_LOST, None),  # X.4.1 no answer from host (no connection)
    (4, 2): (Cause.CONNECTION_LOST, None),  # X.4.2 bad connection ("time-out, or ...")
    (4, 3): (Cause.ROUTING, None),  # X.4.3 directory server failure (DNS)
    (4, 4): (Cause.ROUTING, None),  # X.4.4 unable to route
    (4, 5): (Cause.RESOURCES, None),  # X.4.5 mail system congestion
    (4, 6): (Cause.ROUTING, None),  # X.4.6 routing loop detected
    (4, 7): (Cause.TIMEOUT, None),  # X.4.7 delivery time expired
    # 3.6 Mail delivery protocol status.
    (5, 3): (Cause.RESOURCES, None),  # X.5.3 too many recipients (RFC 5321 4.5.3.1.10: 452)
    (5, 6): (Cause.AUTHENTICATION, None),  # X.5.6 AUTH line too long (RFC 4954 6)
    # 3.8 Security or policy status; X.7.8-X.7.13 come from RFC 4954 6 and
    # RFC 5248 (registry).
    (7, 8): (Cause.AUTHENTICATION, None),  # X.7.8 authentication credentials invalid
    (7, 9): (Cause.AUTHENTICATION, None),  # X.7.9 mechanism too weak
    (7, 10): (Cause.AUTHENTICATION, None),  # X.7.10 encryption needed (for AUTH)
    (7, 11): (Cause.AUTHENTICATION, None),  # X.7.11 encryption required for the mechanism
    (7, 12): (Cause.AUTHENTICATION, None),  # X.7.12 password transition needed
    (7, 13): (Cause.AUTHENTICATION, None),  # X.7.13 user account disabled
    (7, 16): (Cause.MESSAGE_TOO_BIG, None),  # X.7.16 too big for the priority (RFC 6710)
}

# Subject defaults (RFC 3463 3.1-3.8). None: the subject says too little
# (X.0.x "other or undefined", X.2.0, X.4.0), so the later evidence decides.
SUBJECT: dict[int, tuple[Cause, str | None] | None] = {
    0: None,
    1: (Cause.ROUTING, ADVICE_ADDRESS),  # 3.2 addressing status
    2: None,  # 3.3 mailbox status; X.2.0 is "other or undefined"
    3: (Cause.RESOURCES, None),  # 3.4 mail system status
    4: None,  # 3.5 network and routing; X.4.0 is "other or undefined"
    5: (Cause.UNKNOWN, ADVICE_PROTOCOL),  # 3.6 mail delivery protocol status
    6: (Cause.UNKNOWN, ADVICE_CONTENT),  # 3.7 message content or media status
    7: (Cause.POLICY, None),  # 3.8 security or policy status (X.7.1 refused, X.7.2x DMARC...)
}

# RFC 4954 6: 530 authentication required, 534 mechanism too weak, 535
# credentials invalid, 538 encryption required for the mechanism.
AUTH_CODES = frozenset({530, 534, 535, 538})

# Reply codes that name their cause whatever the text says. RFC 5321 4.2.2:
# 551 "User not local", 553 "mailbox name not allowed" (address syntax).
DEFINITE_CODES: dict[int, tuple[Cause, str | None]] = {
    **{code: (Cause.AUTHENTICATION, None) for code in AUTH_CODES},
    551: (Cause.ROUTING, ADVICE_ADDRESS),
    553: (Cause.ROUTING, ADVICE_ADDRESS),
}

# Reply codes used only when neither the enhanced code nor the text helps.
# RFC 5321 4.2.2: 421 "Service not available, closing transmission
# channel", 451 "local error in processing", 452 "insufficient system
# storage"; RFC 1870 6.1: 552 "message size exceeds fixed maximum".
FALLBACK_CODES: dict[int, Cause] = {
    421: Cause.RESOURCES,
    451: Cause.RESOURCES,
    452: Cause.RESOURCES,
    552: Cause.MESSAGE_TOO_BIG,
}


def _words(*alternatives: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")", re.IGNORECASE)


# Text keywords, tried in this order; the first that matches wins. Earlier
# entries are the more specific: "authentication" before "denied", "mailbox
# size" before "size", "blocked" before "service unavailable".
KEYWORDS: tuple[tuple[Cause, re.Pattern[str]], ...] = (
    (
        Cause.AUTHENTICATION,
        _words(r"auth\b", r"authenticat", r"credentials?\b", r"password\b", r"log ?in failed"),
    ),
    (Cause.TIMEOUT, _words(r"timed? ?out\b", r"timeout")),
    (
        Cause.CONNECTION_LOST,
        _words(
            r"connection (?:lost|reset|dropped|closed unexpectedly)",
            r"lost connection",
            r"broken pipe",
        ),
    ),
    (
        Cause.MAILBOX_FULL,
        _words(
            r"over ?quota",
            r"quota",
            r"(?:mail ?box|inbox|mail ?folder|account) (?:is )?full",
            r"mailbox size",
            r"exceeded storage allocation",
            r"storage (?:space|quota)",
        ),
    ),
    (
        Cause.MESSAGE_TOO_BIG,
        _words(
            r"too (?:large|big)\b",
            r"message size",
            r"size (?:limit|exceed)",
            r"exceeds? (?:the )?(?:fixed )?(?:maximum )?(?:message )?size",
        ),
    ),
    (
        Cause.POLICY,
        _words(
            r"spam",
            r"block(?:ed|list)",
            r"blacklist",
            r"denylist",
            r"(?:dns)?rbl\b",
            r"policy",
            r"reputation",
            r"gr[ae]ylist",
            r"rate.?limit",
            r"virus",
            r"malware",
            r"phish",
            r"dmarc\b",
            r"spf\b",
            r"dkim\b",
            r"not (?:permitted|allowed|authori[sz]ed)",
            r"denied\b",
            r"banned\b",
            r"abuse\b",
        ),
    ),
    (
        Cause.ROUTING,
        _words(
            r"dns\b",
            r"nxdomain",
            r"(?:domain|host) not found",
            r"no mx\b",
            r"mx record",
            r"unroute?able",
            r"unable to route",
            r"no route",
            r"name (?:service|server|resolution)",
            r"could not resolve",
            r"unknown (?:user|recipient|mailbox|address|domain|host)",
            r"user unknown",
            r"no such (?:user|mailbox|recipient|address|domain)",
            r"does not exist",
            r"not found\b",
        ),
    ),
    (
        Cause.RESOURCES,
        _words(
            r"insufficient (?:system )?(?:storage|resources)",
            r"system storage",
            r"resources?\b",
            r"disk (?:full|space)",
            r"out of memory",
            r"overloaded",
            r"busy\b",
            r"too many\b",
            r"congest",
            r"local (?:error|problem)",
            r"try (?:again )?later",
            r"temporar",
            r"shutting down",
            r"maintenance",
        ),
    ),
)


# Enhanced codes whose text may name a sharper cause, and which causes it may
# name. X.4.2 covers "time-out, or inadequate connection quality" (RFC 3463
# 3.5): the text says which. Microsoft answers "550 5.4.1 Recipient address
# rejected: Access denied" for directory refusals, so a refusal in the text
# beats X.4.1's "no answer from host". X.7.0 "other or undefined security
# status" serves blocks and RFC 4954's "530 5.7.0 Authentication required".
REFINED: dict[tuple[int, int], tuple[Cause, ...]] = {
    (4, 1): (Cause.POLICY, Cause.ROUTING, Cause.AUTHENTICATION),
    (4, 2): (Cause.TIMEOUT,),
    (7, 0): (Cause.AUTHENTICATION,),
}


def cause_of(
    code: int | None, subject: int | None, detail: int | None, text: str
) -> tuple[Cause, str | None]:
    """The cause of a failing reply and, if it needs one, sharper advice.

    ``subject`` and ``detail`` come from the reply's RFC 3463 code (None
    when it has none). Never raises; unknown values give ``Cause.UNKNOWN``.
    """
    if subject is not None and detail is not None:
        if subject == 7 and code in AUTH_CODES:
            return Cause.AUTHENTICATION, None
        found = ENHANCED.get((subject, detail)) or SUBJECT.get(subject)
        if found is not None:
            sharper = REFINED.get((subject, detail), ())
            keyword = _keyword(text) if sharper else None
            return (keyword, None) if keyword in sharper and keyword is not None else found
    if code is not None and code in DEFINITE_CODES:
        return DEFINITE_CODES[code]
    keyword = _keyword(text)
    if keyword is not None:
        return keyword, None
    if code is not None and code in FALLBACK_CODES:
        return FALLBACK_CODES[code], None
    return Cause.UNKNOWN, None


def _keyword(text: str) -> Cause | None:
    for cause, pattern in KEYWORDS:
        if pattern.search(text):
            return cause
    return None
