"""Name the failure pattern of a transaction and diagnose its cause.

PRODUCT.md's patterns ("a 250 that failed") are read from a finished
``TransactionRecord``: its timeline, its recipients and its final reply.
``diagnose_text`` does the same for a reply or a transcript a person pastes.

Rule 1: this module is pure. It reads records and strings and returns
values; it performs no I/O, reads no clock and logs nothing.

Rule 2: a 2xx is taken at its word unless ``contradiction`` finds, in the
reply itself, a failure class, a quoted failure reply or a configured
phrase. Those rules are written to miss queue ids, ports, sizes and dates.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from smtpwarden.protocol.causes import ADVICE, ADVICE_LOST, FAILURE_CODES, LEADS, PHRASES, cause_of
from smtpwarden.protocol.causes import Cause as Cause  # part of this module's API
from smtpwarden.protocol.records import Address, Outcome, ReplyInfo, Step
from smtpwarden.protocol.records import Diagnosis as Diagnosis  # part of this module's API
from smtpwarden.protocol.records import Pattern as Pattern  # part of this module's API
from smtpwarden.protocol.replies import Reply

DEFAULT_PHRASES: tuple[str, ...] = PHRASES  # see causes.PHRASES
EVIDENCE_CHARS = 160  # a reply's gist on one terminal line

# RFC 3463 2: status-code = class "." subject "." detail (1-3 digits each).
_STATUS = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})\Z")
# Standing alone: not glued to a word character, ".", "=", "/", "+", "#" or
# "-" (ids, decimals, IP addresses, paths, dates). Inside text the subject
# must be a registered one (0-7), so a version such as "4.94.2" never counts.
_ALONE = r"(?<![\w.=/+#-])"
_STATUS_IN_TEXT = r"([45])\.([0-7])\.([0-9]{1,3})(?!\.?\w)"
_QUOTED_REPLY = re.compile(_ALONE + r"([45][0-5][0-9])(?:[ \t]+|-)" + _STATUS_IN_TEXT)
_MARKER = r"(?:\bsmtp;|\b(?:said|replied|reply|response|error|code|status):)[ \t]*"
_MARKED_REPLY = re.compile(_MARKER + r"([45][0-5][0-9])(?![\w.:/=-])", re.IGNORECASE)
_QUOTED_STATUS = re.compile(_ALONE + _STATUS_IN_TEXT)

_MESSAGE_SENT, _BODY_STEPS = (".", "BDAT LAST"), (".", "BDAT", "BDAT LAST")
_Status = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class _Finding:
    cause: Cause
    retryable: bool
    advice: str


_DONE = _Finding(Cause.NONE, False, ADVICE[Cause.NONE])


def _status(enhanced: str | None) -> _Status | None:
    found = _STATUS.match(enhanced.strip()) if enhanced else None
    return (int(found[1]), int(found[2]), int(found[3])) if found else None


def _quoted(text: str) -> tuple[str, int | None, _Status | None] | None:
    """A failure reply or status quoted in a reply's text: label, code, status."""
    for found in _QUOTED_REPLY.finditer(text):
        if found[1][0] == found[2]:  # the reply and status classes agree
            status = int(found[2]), int(found[3]), int(found[4])
            return f"quoted reply {found[0]!r}", int(found[1]), status
    for found in _MARKED_REPLY.finditer(text):
        if int(found[1]) in FAILURE_CODES:
            return f"quoted reply {found[0]!r}", int(found[1]), None
    alone = _QUOTED_STATUS.search(text)
    return (f"enhanced status {alone[0]} in the text", None, _status(alone[0])) if alone else None


def contradiction(
    code: int, enhanced: str | None, text: str, *, phrases: Sequence[str] = DEFAULT_PHRASES
) -> str | None:
    """Return why a 2xx reply contradicts itself, or None if it does not.

    Other codes return None. A 2xx contradicts itself when, checked in this
    order: (1) its enhanced code has class 4 or 5; (2) its text quotes a
    failure reply: a standalone 4xx/5xx code followed by a space or "-" and
    an enhanced code of the same class ("552 5.2.0"), or a failure code of
    RFC 5321/4954/7504 right after "smtp;", "said:", "replied:", "reply:",
    "response:", "error:", "code:" or "status:"; (3) its text holds a
    standalone class 4 or 5 enhanced code ("5.2.0"); (4) its text holds one
    of ``phrases``. "Standalone" is defined at ``_ALONE``. Never raises.
    """
    if code // 100 != 2:
        return None
    if len(text) <= CACHED_TEXT_CHARS:
        return _cached_contradiction(code, enhanced, text, tuple(phrases))
    return _contradiction(code, enhanced, text, tuple(phrases))


# Every 2xx an upstream sends to MAIL, RCPT and the end of a message is
# checked, and most are the same few short texts ("250 2.1.0 Ok"): a small
# cache of short ones saves the pattern searches for them.
CACHED_TEXT_CHARS = 512


def _contradiction(
    code: int, enhanced: str | None, text: str, phrases: tuple[str, ...]
) -> str | None:
    status = _status(enhanced)
    if status is not None and status[0] in (4, 5):
        return f"enhanced status {enhanced} in a {code} reply"
    quoted = _quoted(text)
    if quoted is not None:
        return quoted[0]
    found = _phrase_pattern(phrases).search(text)
    return f"phrase {' '.join(found.group(0).split()).casefold()!r}" if found else None


_cached_contradiction = functools.lru_cache(maxsize=1024)(_contradiction)


@functools.lru_cache(maxsize=16)
def _phrase_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    """One case-insensitive pattern for all phrases, any run of blanks as one.

    Built once per phrase list: this runs for every transaction.
    """
    words = [r"\s+".join(map(re.escape, phrase.split())) for phrase in phrases]
    alternatives = "|".join(word for word in words if word)
    return re.compile(alternatives or r"(?!)", re.IGNORECASE)


def _finding(code: int | None, enhanced: str | None, text: str) -> _Finding:
    """Cause, retryability and advice of a reply taken as a failure."""
    status = _status(enhanced)
    failure_code = code
    if code is not None and code // 100 < 4:
        # A 2xx that failed: its code says nothing, the failure it quotes does.
        failure_code = None
        status = status if status is not None and status[0] >= 4 else None
        quoted = _quoted(text)
        if quoted is not None:
            failure_code, status = quoted[1], status or quoted[2]
    subject, detail = (status[1], status[2]) if status is not None else (None, None)
    cause, advice = cause_of(failure_code, subject, detail, text)
    if code is None:
        retryable = True  # no reply: the outcome is unknown
    else:
        # Clients act on the reply code (RFC 5321 4.2.1: its first digit says
        # whether the command succeeded), so its class wins over a conflicting
        # enhanced class; the enhanced class decides for a 2xx that failed,
        # and a 2xx failure with no class at all is taken as transient.
        digits = (None if failure_code is None else failure_code // 100, status and status[0])
        retryable = next((digit == 4 for digit in digits if digit in (4, 5)), True)
    return _Finding(cause, retryable, advice or ADVICE[cause])


def classify(code: int | None, enhanced: str | None, text: str) -> tuple[Cause, bool]:
    """Return the cause of a failing reply and whether retrying can help.

    Evidence order: the RFC 3463 enhanced code, unambiguous reply codes,
    text keywords, then overloaded reply codes (see ``causes``). Retryable:
    4xx yes, 5xx no, no reply (None) yes. The reply code's class wins over a
    conflicting enhanced class ("550 4.2.2" is not retryable); the enhanced
    or quoted class decides for a 2xx that failed ("250 ... 552 5.2.0" is
    not retryable), and a 2xx failure with no class is. A clean 2xx or 3xx
    gives (Cause.NONE, False). Never raises.
    """
    if code is not None and code // 100 < 4 and contradiction(code, enhanced, text) is None:
        return Cause.NONE, False
    finding = _finding(code, enhanced, text)
    return finding.cause, finding.retryable


def _result(pattern: Pattern, finding: _Finding, evidence: str | None) -> Diagnosis:
    return Diagnosis(
        pattern=pattern,
        cause=finding.cause,
        retryable=finding.retryable,
        advice=LEADS.get(pattern.value, "") + finding.advice,
        evidence=evidence,
    )


def _shown(info: ReplyInfo) -> str:
    line = " ".join(
        part for part in (str(info.code), info.enhanced or "", *info.text.split()) if part
    )
    return line if len(line) <= EVIDENCE_CHARS else line[: EVIDENCE_CHARS - 3] + "..."


def _judged(pattern: Pattern, info: ReplyInfo, reason: str | None = None) -> Diagnosis:
    evidence, finding = _shown(info), _finding(info.code, info.enhanced, info.text)
    return _result(pattern, finding, f"{evidence} ({reason})" if reason else evidence)


def _cat(code: int | None) -> int:
    return 0 if code is None else code // 100


class Diagnosable(Protocol):
    """What ``diagnose`` reads of a transaction: a ``TransactionRecord`` has it all."""

    @property
    def final_reply(self) -> ReplyInfo | None: ...
    @property
    def timeline(self) -> Sequence[Step]: ...
    @property
    def outcome(self) -> Outcome: ...
    @property
    def mail_from(self) -> Address: ...
    @property
    def recipients(self) -> Sequence[Address]: ...


def diagnose(record: Diagnosable, *, phrases: Sequence[str] = DEFAULT_PHRASES) -> Diagnosis:
    """Return the pattern and diagnosis of a finished transaction.

    Patterns are tried in this order: lost outcome, contradictory 250 (the
    final reply, then the MAIL and RCPT replies), chunk failure, deferred
    failure, mid-session loss, partial recipients. Otherwise the pattern is
    NONE, with the cause of a plain rejection (MAIL, or every RCPT, refused)
    or Cause.NONE. Never raises.
    """
    final, steps = record.final_reply, record.timeline
    sent = [step for step in steps if step.command in _MESSAGE_SENT]
    if record.outcome is Outcome.UNKNOWN or any(step.code is None for step in sent):
        if final is not None and _cat(final.code) != 2:
            lost = _judged(Pattern.LOST_OUTCOME, final)
            return replace(lost, retryable=True, advice=ADVICE_LOST)
        finding = _Finding(Cause.CONNECTION_LOST, True, ADVICE_LOST)
        what = sent[-1].command if sent else "the message"
        return _result(Pattern.LOST_OUTCOME, finding, f"no reply to {what!r}")

    for info in (final, record.mail_from.reply, *(rcpt.reply for rcpt in record.recipients)):
        if info is not None:
            reason = contradiction(info.code, info.enhanced, info.text, phrases=phrases)
            if reason is not None:
                return _judged(Pattern.CONTRADICTORY_250, info, reason)

    mail_ok = record.mail_from.reply is not None and _cat(record.mail_from.reply.code) == 2
    replies = [rcpt.reply for rcpt in record.recipients if rcpt.reply is not None]
    accepted = [info for info in replies if _cat(info.code) == 2]
    refused = [info for info in replies if _cat(info.code) in (4, 5)]
    answered = [step for step in steps if step.code is not None]
    failed = final if final is not None and _cat(final.code) in (4, 5) else None
    if failed is not None and answered and answered[-1].code == failed.code:
        last = answered[-1]
        if last.command in _BODY_STEPS or (last.command == "DATA" and failed.code != 421):
            chunks = [s.code for s in answered[:-1] if s.command.startswith("BDAT")]
            if last.command.startswith("BDAT") and any(_cat(code) == 2 for code in chunks):
                return _judged(Pattern.CHUNK_FAILURE, failed)
            if mail_ok and accepted:
                return _judged(Pattern.DEFERRED_FAILURE, failed)
    if mail_ok and not sent:
        if final is not None and final.code == 421:
            return _judged(Pattern.MID_SESSION_LOSS, final)
        if final is None and record.outcome is Outcome.DEFERRED:
            finding = _Finding(Cause.CONNECTION_LOST, True, ADVICE[Cause.CONNECTION_LOST])
            return _result(Pattern.MID_SESSION_LOSS, finding, "connection lost")
    if record.outcome is Outcome.DELIVERED and accepted and refused:
        partial = _judged(Pattern.PARTIAL_RECIPIENTS, refused[0])
        count = f"Delivered to {len(accepted)} of {len(record.recipients)} recipients; the rest: "
        return replace(partial, advice=count + partial.advice)
    # Otherwise a plain rejection (blame the refusal that explains it) or none.
    blame = refused[0] if refused and (not accepted or failed is None) else failed
    if record.outcome is Outcome.DELIVERED or blame is None:
        return _result(Pattern.NONE, _DONE, None if final is None else _shown(final))
    return _judged(Pattern.NONE, blame)


# -- pasted replies and transcripts ------------------------------------------

# Side markers, server (group 1) or client (group 2): "S:"/"C:", "<<<"/">>>",
# and swaks' "<-"/"->", "<~"/"~>" (inside TLS) and "<**" (a failure reply).
_MARK = re.compile(r"(?:(<<<|<\*\*|<~\*?|<-|[Ss]:)|(>>>|\*\*>|~>|->|[Cc]:))[ \t]*")
# RFC 5321 4.2: Reply-code = %x32-35 %x30-35 %x30-39, then " ", "-" or end.
_REPLY_LINE = re.compile(r"([2-5][0-5][0-9])(?:([ \t-])(.*))?\Z", re.DOTALL)
_COMMAND_LINE = re.compile(
    r"(HELO|EHLO|MAIL|RCPT|DATA|BDAT|RSET|NOOP|QUIT|VRFY|EXPN|HELP|ETRN|STARTTLS|AUTH"
    r"|XCLIENT|XFORWARD)(?:[ \t]+(.*))?\Z",
    re.IGNORECASE | re.DOTALL,
)


def _side(line: str) -> tuple[str | None, str]:
    found = _MARK.match(line := line.strip())
    return (None, line) if found is None else ("S" if found[1] else "C", line[found.end() :])


def _command(line: str) -> str | None:
    found = _COMMAND_LINE.match(line)
    if found is None:
        return "." if line == "." else None
    last = found[1].upper() == "BDAT" and (found[2] or "").upper().split()[1:2] == ["LAST"]
    return "BDAT LAST" if last else found[1].upper()


@dataclass(slots=True)
class _Reader:
    """Pairs pasted replies with pasted commands in order (RFC 2920 3.1)."""

    phrases: Sequence[str]
    transcript: bool  # commands were pasted too
    results: list[tuple[str, Diagnosis]] = field(default_factory=list)
    pending: deque[str] = field(default_factory=deque)
    shown: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    code: int = 0
    complete: bool = False
    mail_ok: bool = False
    rcpt_ok: bool = False
    chunk_ok: bool = False
    refused: list[int] = field(default_factory=list)  # results[i] answered a RCPT

    def add(self, code: int, sep: str | None, text: str, shown: str) -> None:
        if self.shown and (code != self.code or self.complete):
            self.flush()
        self.code, self.complete = code, sep != "-"
        self.shown.append(shown)
        self.texts.append(text)

    def flush(self) -> None:
        if not self.shown:
            return
        lines = tuple(text.encode("utf-8", "surrogatepass") for text in self.texts)
        reply = Reply(code=self.code, lines=lines, raw=b"")
        command = self.pending.popleft() if self.pending else None
        self.results.append(("\n".join(self.shown), self._judge(reply, command)))
        self.shown, self.texts = [], []

    def _judge(self, reply: Reply, command: str | None) -> Diagnosis:
        info = ReplyInfo(code=reply.code, enhanced=reply.enhanced, text=reply.text, local=False)
        reason = contradiction(info.code, info.enhanced, info.text, phrases=self.phrases)
        ok = _cat(info.code) in (2, 3) and reason is None
        pattern = Pattern.CONTRADICTORY_250 if reason is not None else Pattern.NONE
        if not ok and reason is None:
            pattern = self._failure(command, info.code)
        self._track(command, ok=ok, code=info.code)
        if ok:
            return _result(Pattern.NONE, _DONE, _shown(info))
        return _judged(pattern, info, reason)

    def _failure(self, command: str | None, code: int) -> Pattern:
        body = command in _BODY_STEPS or (command == "DATA" and code != 421)
        if body and command is not None and command.startswith("BDAT") and self.chunk_ok:
            return Pattern.CHUNK_FAILURE
        if body and self.mail_ok and self.rcpt_ok:
            return Pattern.DEFERRED_FAILURE
        if code == 421 and (self.mail_ok or not self.transcript):
            return Pattern.MID_SESSION_LOSS
        if command == "RCPT":
            self.refused.append(len(self.results))  # partial if the message goes
        return Pattern.NONE

    def _track(self, command: str | None, *, ok: bool, code: int) -> None:
        """Follow the transaction: what the server has accepted so far."""
        if command in _MESSAGE_SENT and ok and self.rcpt_ok:
            for index in self.refused:  # the message went to the others
                text, found = self.results[index]
                self.results[index] = (text, replace(found, pattern=Pattern.PARTIAL_RECIPIENTS))
        ended = command in _MESSAGE_SENT or (command in ("DATA", "BDAT") and not ok)
        if ended or code == 421 or command in ("MAIL", "RSET", "EHLO", "HELO"):
            self.mail_ok, self.rcpt_ok, self.chunk_ok, self.refused = False, False, False, []
        if command == "MAIL":
            self.mail_ok = ok
        elif command == "RCPT":
            self.rcpt_ok = self.rcpt_ok or ok
        elif command == "BDAT" and ok:
            self.chunk_ok = True


def diagnose_text(
    pasted: str, *, phrases: Sequence[str] = DEFAULT_PHRASES
) -> list[tuple[str, Diagnosis]]:
    """Diagnose every server reply in a pasted reply or transcript.

    Accepts one reply (one or more lines; CRLF, LF, or CRLF written out as
    the four characters "\\r\\n") or a transcript whose lines are marked
    "S:"/"C:", "<<<"/">>>" or swaks' "<-"/"->", or unmarked reply lines
    among command lines; a reply wrapped onto an unmarked line of its own
    is joined back. Returns (the reply as pasted, its diagnosis) for each
    reply in order, plus a LOST_OUTCOME entry when the paste ends after the
    message was sent with no reply to it. Never raises.
    """
    marked = [_side(line) for line in pasted.replace("\\r\\n", "\n").splitlines()]
    transcript = any(side == "C" or _command(text) for side, text in marked)
    reader = _Reader(phrases, transcript)
    in_body = False  # between a 354 and the "." line: message text
    for side, text in marked:
        if in_body and side != "S":
            if text == ".":
                in_body = False
                reader.pending.append(".")
            continue
        found = _REPLY_LINE.match(text) if side != "C" else None
        if found is not None:
            reader.add(int(found[1]), found[2], (found[3] or "").strip(), text)
            if reader.code == 354 and reader.complete:
                reader.flush()
                in_body = True
            continue
        command = _command(text) if side != "S" else None
        wrapped = command is None and side != "C" and text[:3] not in ("", "===", "***")
        if wrapped and reader.shown:
            reader.texts.append(text)  # a reply wrapped onto a line of its own
            reader.shown.append(text)
            continue
        reader.flush()
        if command is not None:
            reader.pending.append(command)
    reader.flush()
    for command in reader.pending:
        if command in _MESSAGE_SENT:
            finding = _Finding(Cause.CONNECTION_LOST, True, ADVICE_LOST)
            lost = _result(Pattern.LOST_OUTCOME, finding, f"no reply to {command!r}")
            reader.results.append((f"(no reply to {command!r})", lost))
    return reader.results
