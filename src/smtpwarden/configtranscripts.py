"""Transcript capture: what each listener records, and where transcripts are kept.

`smtpwarden.config` reads the whole file; this module defines and reads the
two sections that say how sessions are captured:

- a listener's ``transcripts``: the capture mode (``off``, ``failure``,
  ``always`` or ``match``), what ``match`` selects (client networks,
  senders, recipients, for how many sessions), whether message bodies are
  kept, and the size cap of one transcript;
- the top-level ``transcripts``: the folder transcripts are written to, and
  their retention by age and total size.

The same readers check the run-time control file that
``smtpwarden transcript capture`` writes (`smtpwarden.capturecontrol`), so a
mode switched at run time obeys exactly the rules of the file.

Rule 1: like `smtpwarden.config`, it never prints, never exits and never
raises `ConfigError`; it reports problems to the checker it is given. It
does no I/O.

Rule 2: it imports nothing from the project but `smtpwarden.configcheck` and
`smtpwarden.configtls`, so that `smtpwarden.configendpoints` can import it
without a cycle.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from smtpwarden.configcheck import (
    FOLDER,
    Checker,
    Flag,
    Integer,
    Seconds,
    join_key,
    show,
)
from smtpwarden.configtls import Network, read_networks

CaptureMode = Literal["off", "failure", "always", "match"]

CAPTURE_MODES: Final[tuple[CaptureMode, ...]] = ("off", "failure", "always", "match")

# One transcript's cap. A plain session (EHLO, one message, QUIT, both legs)
# takes 2-4 KiB without its body; 1 MiB keeps long sessions, or a body of
# several hundred KiB when bodies are kept. Our choice.
DEFAULT_TRANSCRIPT_BYTES: Final = 1048576
# Below this a transcript cannot hold the EHLO exchanges of one session.
MIN_TRANSCRIPT_BYTES: Final = 4096
# A week of transcripts, at most 1 GiB of them: enough to look back on an
# incident reported days later without filling a disk. Our choice.
DEFAULT_MAX_AGE_S: Final = 604800.0
DEFAULT_MAX_TOTAL_BYTES: Final = 1073741824
DEFAULT_TRANSCRIPT_FOLDER: Final = "transcripts"


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptMatch:
    """Which sessions mode ``match`` writes: every criterion given must hold.

    Within one list any entry will do; an empty list does not restrict.
    Address patterns are lower-cased: ``user@example.org`` or ``@example.org``.
    """

    networks: tuple[Network, ...] = ()  # the client's real address (after PROXY)
    senders: tuple[str, ...] = ()  # any transaction's MAIL FROM
    recipients: tuple[str, ...] = ()  # any RCPT TO
    sessions: int = 0  # the first N matching sessions to end are written; 0: no limit


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerTranscripts:
    """How one listener's sessions are captured."""

    mode: CaptureMode = "off"
    match: TranscriptMatch = dataclasses.field(default_factory=TranscriptMatch)
    bodies: bool = False  # keep message octets, not only their size and hash
    max_bytes: int = DEFAULT_TRANSCRIPT_BYTES  # one transcript's cap


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptsConfig:
    """Where transcripts are written and how long they are kept."""

    path: str = DEFAULT_TRANSCRIPT_FOLDER  # relative paths start from the working directory
    max_age: float = DEFAULT_MAX_AGE_S  # seconds; 0: no age limit
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES  # 0: no size limit


@dataclass(frozen=True, slots=True)
class _Mode:
    """A capture mode. YAML 1.1 reads a bare ``off`` as false: that is "off" too."""

    expected: str = "one of " + ", ".join(f'"{mode}"' for mode in CAPTURE_MODES)

    def convert(self, raw: object) -> CaptureMode | None:
        if raw is False:
            return "off"
        for mode in CAPTURE_MODES:
            if raw == mode:
                return mode
        return None


MODE: Final = _Mode()
_FLAG: Final = Flag()
_MAX_BYTES: Final = Integer(MIN_TRANSCRIPT_BYTES)
_SESSIONS: Final = Integer(0)

# local@domain or @domain, no blanks, brackets or controls: the path as
# MAIL and RCPT carry it, without its angle brackets.
_ADDRESS_PATTERN: Final = re.compile(r"[^\s<>@\x00-\x1f\x7f]*@[^\s<>@\x00-\x1f\x7f]+")
_ADDRESS_EXPECTED: Final = 'an address ("user@example.org") or a domain ("@example.org")'

_MATCH_KEYS: Final = tuple(field.name for field in dataclasses.fields(TranscriptMatch))
LISTENER_KEYS: Final = tuple(field.name for field in dataclasses.fields(ListenerTranscripts))
_TOP_KEYS: Final = tuple(field.name for field in dataclasses.fields(TranscriptsConfig))


def read_addresses(
    check: Checker, section: Mapping[str, object], key: str, path: str
) -> tuple[str, ...]:
    """Read a list of address patterns at `path`.`key`, lower-cased; absent: ()."""
    key_path = join_key(path, key)
    raw = section.get(key)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        check.report(key_path, f"expected a list of addresses or @domains, got {show(raw)}")
        return ()
    found: list[str] = []
    for j, item in enumerate(raw):
        if isinstance(item, str) and _ADDRESS_PATTERN.fullmatch(item):
            found.append(item.lower())
        else:
            check.report(f"{key_path}[{j}]", f"expected {_ADDRESS_EXPECTED}, got {show(item)}")
    return tuple(dict.fromkeys(found))


def read_match(check: Checker, section: Mapping[str, object], path: str) -> TranscriptMatch:
    """Read `match` inside `path`; absent or null: every session, no limit."""
    raw = section.get("match")
    if raw is None:
        return TranscriptMatch()
    key_path = join_key(path, "match")
    found = check.mapping(raw, key_path, _MATCH_KEYS)
    return TranscriptMatch(
        networks=read_networks(check, found, "networks", key_path),
        senders=read_addresses(check, found, "senders", key_path),
        recipients=read_addresses(check, found, "recipients", key_path),
        sessions=check.value(found, "sessions", key_path, _SESSIONS, 0),
    )


def read_capture(
    check: Checker, section: Mapping[str, object], path: str, default: ListenerTranscripts
) -> ListenerTranscripts:
    """Read the keys of a ``transcripts`` mapping; missing keys take ``default``'s."""
    mode = check.value(section, "mode", path, MODE, default.mode)
    match = read_match(check, section, path) if "match" in section else default.match
    return ListenerTranscripts(
        mode=mode,
        match=match,
        bodies=check.value(section, "bodies", path, _FLAG, default.bodies),
        max_bytes=check.value(section, "max_bytes", path, _MAX_BYTES, default.max_bytes),
    )


def read_listener_transcripts(
    check: Checker, listener: Mapping[str, object], path: str
) -> ListenerTranscripts:
    """Read `transcripts` of the listener at `path`.

    Absent, null or false: off. A mode alone (``transcripts: failure``) takes
    every other default; else a mapping of ``mode``, ``match``, ``bodies``
    and ``max_bytes``.
    """
    raw = listener.get("transcripts")
    key_path = join_key(path, "transcripts")
    default = ListenerTranscripts()
    if raw is None or raw is False:
        return default
    if isinstance(raw, str):
        mode = MODE.convert(raw)
        if mode is None:
            check.invalid(key_path, MODE, raw)
            return default
        return ListenerTranscripts(mode=mode)
    if not isinstance(raw, dict):
        check.report(key_path, f"expected a mode or a mapping, got {show(raw)}")
        return default
    return read_capture(check, check.mapping(raw, key_path, LISTENER_KEYS), key_path, default)


def read_transcripts(check: Checker, top: Mapping[str, object]) -> TranscriptsConfig:
    """Read the top-level `transcripts`; absent or null means defaults."""
    default = TranscriptsConfig()
    raw = top.get("transcripts")
    if raw is None:
        return default
    section = check.mapping(raw, "transcripts", _TOP_KEYS)
    return TranscriptsConfig(
        path=check.value(section, "path", "transcripts", FOLDER, default.path),
        max_age=check.value(
            section, "max_age", "transcripts", Seconds(allow_zero=True), default.max_age
        ),
        max_total_bytes=check.value(
            section, "max_total_bytes", "transcripts", Integer(0), default.max_total_bytes
        ),
    )


def describe(settings: ListenerTranscripts) -> str:
    """Settings in a few words, for the log."""
    words: list[str] = [settings.mode]
    if settings.mode == "match":
        match = settings.match
        words += [f"network {network}" for network in match.networks]
        words += [f"sender {sender}" for sender in match.senders]
        words += [f"recipient {recipient}" for recipient in match.recipients]
        if match.sessions:
            words.append(f"{match.sessions} sessions")
    if settings.bodies and settings.mode != "off":
        words.append("with bodies")
    return ", ".join(words)
