"""Command-line parsing (RFC 5321 4.1, RFC 3030, RFC 3461, RFC 6531).

``parse_command`` turns one complete CRLF-terminated line into an event. It
validates what smtpwarden must understand to relay safely (the verb, MAIL and
RCPT paths, the ESMTP parameters it knows, BDAT sizes) and leaves policy on
everything else to the upstream. It never raises for bad client input: a bad
line becomes a ``BadCommand`` carrying the reply the client should get.
"""

from __future__ import annotations

import re

from smtpwarden.protocol import grammar
from smtpwarden.protocol.errors import BadCommand as BadCommandError
from smtpwarden.protocol.events import (
    BadCommand,
    Bdat,
    Command,
    MailFrom,
    Param,
    RcptTo,
    Verb,
)

_VERBS: dict[bytes, Verb] = {verb.value.encode("ascii"): verb for verb in Verb}

# Longest verb we know plus slack: a first word longer than this is not a verb.
_MAX_VERB_BYTES = 16

# Known ESMTP parameters and the grammar of their values. ``None`` means the
# parameter takes no value. Unknown parameters are passed on: the upstream
# answers 555 for what it does not support (RFC 5321 4.1.1.11).
_PARAM_VALUES: dict[bytes, re.Pattern[bytes] | None] = {
    b"SIZE": grammar.SIZE_VALUE,  # RFC 1870
    b"SMTPUTF8": None,  # RFC 6531 3.4
    b"RET": re.compile(rb"(?:FULL|HDRS)\Z", re.I),  # RFC 3461 4.3
    b"ENVID": grammar.XTEXT,  # RFC 3461 4.4
    b"NOTIFY": grammar.NOTIFY_VALUE,  # RFC 3461 4.1
    b"ORCPT": grammar.ORCPT_VALUE,  # RFC 3461 4.2
    b"BODY": re.compile(rb"(?:7BIT|8BITMIME|BINARYMIME)\Z", re.I),  # RFC 6152, 3030
}

# RFC 3461 4.4: "The ENVID parameter ... MUST NOT exceed 100 characters".
MAX_ENVID_CHARS = 100


def _syntax(detail: str, text: str = "Syntax error in parameters or arguments") -> BadCommandError:
    # RFC 5321 4.2.2: 501 syntax error in parameters or arguments; RFC 3463 X.5.4.
    return BadCommandError(detail, code=501, enhanced="5.5.4", text=text)


def _parse_params(raw: bytes | None) -> tuple[Param, ...] | BadCommandError:
    if not raw:
        return ()
    params: list[Param] = []
    for word in raw.split():
        keyword, eq, value = word.partition(b"=")
        if not grammar.ESMTP_KEYWORD.match(keyword):
            return _syntax(f"bad ESMTP keyword {keyword!r}")
        keyword = keyword.upper()
        if eq and not grammar.ESMTP_VALUE.match(value):
            return _syntax(f"bad value for {keyword!r}")
        if keyword in _PARAM_VALUES:
            pattern = _PARAM_VALUES[keyword]
            if pattern is None and eq:
                return _syntax(f"{keyword!r} takes no value")
            if pattern is not None and not (eq and pattern.match(value)):
                return _syntax(f"bad value for {keyword!r}")
            if keyword == b"ENVID" and len(value) > MAX_ENVID_CHARS:
                return _syntax("ENVID longer than 100 characters")
        params.append((keyword, value if eq else None))
    return tuple(params)


def _strip_brackets(path: bytes) -> bytes:
    if path.startswith(b"<") and path.endswith(b">"):
        return path[1:-1]
    return path


def parse_command(line: bytes) -> Command | BadCommand:
    """Parse one command line, CRLF included.

    The caller has already checked the line length and that the only CR and
    LF are the final pair. Returns the command event, or a ``BadCommand``
    whose error carries the reply to give. Never raises for client input.
    """
    text = line[:-2]
    if grammar.COMMAND_CONTROL.search(text):
        return BadCommand(
            line=line,
            verb=None,
            error=BadCommandError(
                "control character in command", text="Control characters are not allowed"
            ),
        )
    word, _, raw_argument = text.partition(b" ")
    verb = _VERBS.get(word.upper()) if len(word) <= _MAX_VERB_BYTES else None
    if verb is None:
        # RFC 5321 4.2.4: 500 for a command that is not recognised. Unknown
        # verbs are never relayed: smtpwarden must know what state a command
        # puts the upstream in.
        error = BadCommandError(
            "unknown command", code=500, enhanced="5.5.1", text="Command unrecognized"
        )
        return BadCommand(line=line, verb=None, error=error)
    argument = raw_argument.strip(b" \t")
    match verb:
        case Verb.MAIL | Verb.RCPT:
            pattern = grammar.MAIL_ARGUMENT if verb is Verb.MAIL else grammar.RCPT_ARGUMENT
            found = pattern.match(argument)
            if found is None:
                return BadCommand(
                    line=line, verb=verb, error=_syntax("bad path", "Syntax error in address")
                )
            params = _parse_params(found.group(2))
            if isinstance(params, BadCommandError):
                return BadCommand(line=line, verb=verb, error=params)
            path = _strip_brackets(found.group(1))
            kind = MailFrom if verb is Verb.MAIL else RcptTo
            return kind(verb=verb, argument=argument, line=line, path=path, params=params)
        case Verb.BDAT:
            found = grammar.BDAT_ARGUMENT.match(raw_argument)
            if found is None:
                return BadCommand(line=line, verb=verb, error=_syntax("bad BDAT size"))
            return Bdat(
                verb=verb,
                argument=argument,
                line=line,
                size=int(found.group(1)),
                last=found.group(2) is not None,
            )
        case Verb.HELO | Verb.EHLO:
            if not argument:
                return BadCommand(
                    line=line, verb=verb, error=_syntax("no domain", "Domain name required")
                )
        case _:
            pass
    return Command(verb=verb, argument=argument, line=line)
