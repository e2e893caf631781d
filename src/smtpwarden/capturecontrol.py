"""The run-time capture control file: a listener's mode, switched without a restart.

``smtpwarden transcript capture`` writes ``capture.json`` in the transcripts
folder; the running relay looks at the file once a second and applies it.
An entry overrides the listener's configured ``transcripts`` until
``--mode config`` removes it. The file is small JSON:

    {"listeners": {"main": {"mode": "match",
                            "match": {"networks": ["192.0.2.0/24"], "senders": [],
                                      "recipients": [], "sessions": 5},
                            "bodies": false, "set_at": "2025-03-01T09:15:02.123Z"}}}

``set_at`` tells one command from the next: the relay starts the count of
``match.sessions`` again each time it changes. ``max_bytes`` may be given
too; without it the listener's own applies.

It is read with the configuration's own rules
(`smtpwarden.configtranscripts`), so a bad file is reported as a bad
configuration would be, each problem with its key path.

Rule 1: never prints, never exits; problems raise ``ConfigError``.

Rule 2: the file is replaced atomically (a temporary file in the same
folder, then a rename), so the relay never reads half of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from smtpwarden.config import ConfigError
from smtpwarden.configcheck import NAME, Checker, Integer, Text, join_key, show
from smtpwarden.configtranscripts import (
    MIN_TRANSCRIPT_BYTES,
    CaptureMode,
    ListenerTranscripts,
    TranscriptMatch,
    read_capture,
)

CONTROL_FILE: Final = "capture.json"
# The file holds a handful of entries; anything larger is not ours.
MAX_CONTROL_BYTES: Final = 1 << 20

_ENTRY_KEYS: Final = ("mode", "match", "bodies", "max_bytes", "set_at")
_SET_AT: Final = Text("a time stamp", lambda text: 0 < len(text) <= 64)


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptureOverride:
    """A listener's capture as ``smtpwarden transcript capture`` set it."""

    mode: CaptureMode
    match: TranscriptMatch
    bodies: bool
    max_bytes: int | None  # None: the listener's configured max_bytes
    set_at: str

    def applied_to(self, configured: ListenerTranscripts) -> ListenerTranscripts:
        """The settings in force over a listener configured with ``configured``."""
        return ListenerTranscripts(
            mode=self.mode,
            match=self.match,
            bodies=self.bodies,
            max_bytes=configured.max_bytes if self.max_bytes is None else self.max_bytes,
        )


def control_path(folder: str | os.PathLike[str]) -> Path:
    """Where the control file of a transcripts folder is."""
    return Path(folder) / CONTROL_FILE


def parse_control(data: object, *, source: str) -> dict[str, CaptureOverride]:
    """The overrides a loaded control file holds, by listener name.

    Raises ConfigError(source, problems) listing every problem.
    """
    check = Checker()
    top = check.mapping(data, "", ("listeners",))
    raw = top.get("listeners")
    overrides: dict[str, CaptureOverride] = {}
    if raw is not None and not isinstance(raw, dict):
        check.report("listeners", f"expected a mapping of listener names, got {show(raw)}")
    elif raw is not None:
        for name, entry in raw.items():
            path = join_key("listeners", name)
            if NAME.convert(name) is None:
                check.invalid(path, NAME, name)
                continue
            section = check.mapping(entry, path, _ENTRY_KEYS)
            if "mode" not in section:
                check.report(join_key(path, "mode"), "missing required key")
            rest = {key: value for key, value in section.items() if key != "max_bytes"}
            settings = read_capture(check, rest, path, ListenerTranscripts())
            max_bytes = None
            if "max_bytes" in section:
                limit = Integer(MIN_TRANSCRIPT_BYTES)
                max_bytes = check.value(section, "max_bytes", path, limit, MIN_TRANSCRIPT_BYTES)
            overrides[name] = CaptureOverride(
                mode=settings.mode,
                match=settings.match,
                bodies=settings.bodies,
                max_bytes=max_bytes,
                set_at=check.value(section, "set_at", path, _SET_AT, ""),
            )
    if check.problems:
        raise ConfigError(source, check.problems)
    return overrides


def read_control(path: Path) -> dict[str, CaptureOverride]:
    """The overrides in a control file; {} if there is none.

    Raises ConfigError naming the file if it cannot be read or is not valid.
    """
    source = str(path)
    try:
        with open(path, "rb") as stream:
            content = stream.read(MAX_CONTROL_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise ConfigError(source, [f"cannot read the file: {error.strerror or error}"]) from error
    if len(content) > MAX_CONTROL_BYTES:
        raise ConfigError(source, [f"larger than {MAX_CONTROL_BYTES} bytes"])
    try:
        data = json.loads(content)
    except ValueError as error:
        raise ConfigError(source, [f"invalid JSON: {error}"]) from error
    return parse_control(data, source=source)


def override_json(override: CaptureOverride) -> dict[str, object]:
    """An override as the control file holds it."""
    match = override.match
    entry: dict[str, object] = {
        "mode": override.mode,
        "match": {
            "networks": [str(network) for network in match.networks],
            "senders": list(match.senders),
            "recipients": list(match.recipients),
            "sessions": match.sessions,
        },
        "bodies": override.bodies,
        "set_at": override.set_at,
    }
    if override.max_bytes is not None:
        entry["max_bytes"] = override.max_bytes
    return entry


def write_control(path: Path, overrides: Mapping[str, CaptureOverride]) -> None:
    """Replace the control file atomically with ``overrides``; none left: remove it.

    The folder is created if it is missing. Raises OSError.
    """
    if not overrides:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    content = {"listeners": {name: override_json(item) for name, item in overrides.items()}}
    data = json.dumps(content, indent=2).encode() + b"\n"
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with open(descriptor, "wb") as stream:
            stream.write(data)
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
