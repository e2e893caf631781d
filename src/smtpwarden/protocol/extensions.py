"""EHLO capabilities: parse the upstream's, offer the client what we honour.

PRODUCT.md, "Capabilities": the client-facing EHLO reply is the upstream's,
filtered to what smtpwarden can carry on this session. Keywords are kept by
an allow-list, not a deny-list: an extension smtpwarden does not know may
change the protocol in ways the relay cannot follow (TURN reverses roles,
XEXCH50 sends binary data after a command), so it is never offered.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpwarden.protocol.replies import Reply

# Extensions whose commands and parameters the relay carries unchanged.
_ALWAYS = frozenset(
    {
        "SIZE",  # RFC 1870
        "PIPELINING",  # RFC 2920
        "8BITMIME",  # RFC 6152
        "SMTPUTF8",  # RFC 6531
        "DSN",  # RFC 3461
        "ENHANCEDSTATUSCODES",  # RFC 2034
        "VRFY",
        "EXPN",
        "HELP",
        "ETRN",  # RFC 1985
        "DELIVERBY",  # RFC 2852
        "MT-PRIORITY",  # RFC 6710
        "FUTURERELEASE",  # RFC 4865
        "NO-SOLICITING",  # RFC 3865
        "LIMITS",  # RFC 9422
        "RRVS",  # RFC 7293
    }
)
# Carried only when the relay can carry BDAT on this session (RFC 3030).
_CHUNKING = frozenset({"CHUNKING", "BINARYMIME"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Extensions:
    """A parsed EHLO reply: upper-cased keyword -> its parameters."""

    keywords: dict[str, bytes]

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.keywords


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtensionPolicy:
    """What this session lets the client use besides the allow-list."""

    chunking: bool = True
    # smtpwarden terminates the client's TLS itself: STARTTLS is offered
    # whenever the listener has a certificate and the session is not yet
    # encrypted, whatever the upstream says.
    starttls: bool = False
    # AUTH passes through: offered with the mechanisms both the upstream and
    # the listener allow, in the upstream's order; empty: not offered.
    auth: tuple[str, ...] = ()
    # The listener's limit (limits.max_message_bytes); 0: none. SIZE keeps
    # the smaller of it and the upstream's (RFC 1870 4).
    max_size: int = 0


def parse_ehlo(reply: Reply) -> Extensions:
    """Parse a 250 EHLO reply (RFC 5321 4.1.1.1: ehlo-ok-rsp)."""
    keywords: dict[str, bytes] = {}
    for line in reply.lines[1:]:
        word, _, params = line.partition(b" ")
        if word:
            keywords[word.decode("ascii", "replace").upper()] = params
    return Extensions(keywords=keywords)


def reconcile(reply: Reply, policy: ExtensionPolicy) -> tuple[bytes, Extensions]:
    """Filter an upstream EHLO reply for the client.

    Returns the reply bytes to send and the upstream's parsed extensions.
    A reply other than 250 is returned unchanged.
    """
    offered = parse_ehlo(reply)
    if reply.code != 250:
        return reply.raw, offered
    kept = [reply.lines[0]]
    changed = False
    for line in reply.lines[1:]:
        word, _, params = line.partition(b" ")
        keyword = word.decode("ascii", "replace").upper()
        if keyword in _ALWAYS or (keyword in _CHUNKING and policy.chunking):
            if keyword == "SIZE" and policy.max_size:
                line = _size_line(params, policy.max_size)
                changed = changed or line != word + b" " + params
            kept.append(line)
        elif keyword == "AUTH" and policy.auth:
            mechanisms = _mechanisms(params, policy.auth)
            if mechanisms:
                kept.append(b"AUTH " + mechanisms)
            changed = True
        else:
            changed = True
    if policy.starttls:
        # smtpwarden's own, in place of any the upstream offered.
        kept.append(b"STARTTLS")
        changed = True
    if not changed and len(kept) == len(reply.lines):
        return reply.raw, offered
    out = b"".join(b"250-" + line + b"\r\n" for line in kept[:-1])
    return out + b"250 " + kept[-1] + b"\r\n", offered


def _size_line(params: bytes, limit: int) -> bytes:
    """SIZE with the smaller limit; the upstream's "SIZE" or "SIZE 0" means none."""
    value = params.strip()
    upstream = int(value) if value.isdigit() and len(value) <= 18 else 0
    size = limit if upstream == 0 else min(upstream, limit)
    return b"SIZE %d" % size


def _mechanisms(params: bytes, allowed: tuple[str, ...]) -> bytes:
    """The upstream's AUTH mechanisms the listener allows, in the upstream's order."""
    wanted = {name.encode("ascii") for name in allowed}
    names = [name for name in params.upper().split() if name in wanted]
    return b" ".join(dict.fromkeys(names))
