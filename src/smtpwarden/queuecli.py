"""What ``smtpwarden queue`` does: look at the spool and act on its entries.

``cli`` declares the command line; ``run`` does what the parsed arguments
ask and returns an ``Outcome``: text for standard output, the octets of a
message, and one ``Failure`` per queue id that could not be handled.
``cli`` prints the outcome and picks the exit code.

Rules kept here:
- Never print, never exit: only ``cli`` does.
- Safe beside a running relay. Reads take no lock (envelopes are replaced
  by rename, ``lease.py``); every change goes through the entry's lease,
  as a delivery does, and waits for it at most ``--wait`` seconds: an entry
  a delivery holds is reported busy instead of hanging the command.
- Never call ``Spool.recover``. Crash cleanup is the relay's job at start;
  run from here it would wait ``RECOVER_WAIT_S`` for the exclusive lock
  whenever the relay runs, and an operator who only looks must not move
  files. Opening the spool takes its shared lock, like the relay does, so
  a relay that starts meanwhile waits for the command to end before it
  cleans, or skips cleaning: it never cleans under our feet.
- Never create a spool: a mistyped folder is a usage error, not an empty
  queue.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from smtpwarden.config import CLI_SOURCE, DEFAULT_SOURCE, ConfigError, default_config, load_config
from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.spool import (
    BodyKind,
    Entry,
    EntryBusy,
    EntryState,
    NoSuchEntry,
    Spool,
    SpoolError,
)
from smtpwarden.spool.codec import reply_json
from smtpwarden.spool.files import Layout
from smtpwarden.spool.model import QUEUE_ID

# How long a change waits for an entry that a delivery holds. A delivery may
# hold its entry for minutes (upstream timeouts); one second lets a lease
# that is just ending go, and otherwise the operator hears "busy" at once.
# Our choice, far below the spool's LOCK_WAIT_S (30 s) for its own callers.
BUSY_WAIT_S = 1.0
# Characters of the sender and of the last error in a ``list`` line, so that
# a line fits a wide terminal; ``show`` prints both whole. Our choice.
SENDER_COLUMN_CHARS = 32
ERROR_COLUMN_CHARS = 40
# Block size when copying a BDAT message to standard output; our choice.
MESSAGE_BLOCK_BYTES = 64 * 1024
# The reason ``dead`` records, so records tell an operator's hand from max_age.
DEAD_REASON = "operator"


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """A queue id that could not be handled, and why, for a person."""

    queue_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.queue_id}: {self.reason}"


def _octets(stream: BinaryIO, body: BodyKind) -> Iterator[bytes]:
    """The message as the recipient gets it; closes ``stream`` once iterated.

    A BDAT body is stored as the message. A DATA body is stored as sent, and
    RFC 5321 4.5.2 says: "If the line is composed of a single period, it is
    treated as the end of mail indicator. If the first character is a period
    and there are other characters on the line, the first character is
    deleted."
    """
    with stream:
        if body is BodyKind.BDAT:
            while block := stream.read(MESSAGE_BLOCK_BYTES):
                yield block
            return
        for line in stream:  # lines end in CRLF: the relay refuses bare LF
            if line.startswith(b"."):
                if line == b".\r\n":
                    return
                line = line[1:]
            yield line


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What ``run`` found, for ``cli`` to print.

    ``text`` goes to standard output (None: nothing), then ``message``,
    which holds its file open until iterated to the end; ``failures`` go to
    standard error, and any makes the exit code 1.
    """

    text: str | None = None
    message: Iterator[bytes] | None = None
    failures: tuple[Failure, ...] = ()


def spool_folder(args: argparse.Namespace) -> str:
    """The spool folder that --spool or --config names, or the default's.

    Raises ConfigError if the configuration file is bad, or if the folder
    holds no spool (checked here because opening a Spool creates one).
    """
    config_file: str | None = getattr(args, "config", None)
    folder: str | None = getattr(args, "spool", None)
    if folder is not None:
        source, key, hint = CLI_SOURCE, "--spool", ""
    elif config_file is not None:
        source, key, hint = config_file, "spool.path", ""
        folder = load_config(config_file).spool.path
    else:
        source, key = DEFAULT_SOURCE, "spool.path"
        hint = "; give --spool FOLDER or --config FILE"
        folder = default_config().spool.path
    if not Layout(Path(folder)).queue.is_dir():
        problem = f"{key}: expected a spool folder (one with queue/ inside), got {folder!r}"
        raise ConfigError(source, [problem + hint])
    return folder


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, *, now: float) -> Outcome:
    """Do what ``args`` asks of the spool; ``now`` is the epoch time for ages.

    Per-id problems become ``Failure``s. Raises the parser's usage error
    (``parser.error``) for arguments that do not go together, ConfigError
    for a bad configuration or spool folder, and SpoolError when the spool
    cannot be opened or listed. Never runs ``Spool.recover``.
    """
    _check_usage(parser, args)
    with Spool(spool_folder(args)) as spool:
        match args.queue_action:
            case "list":
                return _list(spool, args, now)
            case "show":
                return _show(spool, args, now)
            case _:
                return _change_all(spool, args)


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before the spool is opened, arguments that do not go together."""
    if hasattr(args, "config") and hasattr(args, "spool"):
        parser.error("--config and --spool cannot be combined")
    match args.queue_action:
        case "show" if args.message and args.json:
            parser.error("--message cannot be combined with --json")
        case "retry" if args.all and args.ids:
            parser.error("give queue ids or --all, not both")
        case "retry" if not (args.all or args.ids):
            parser.error("give at least one queue id, or --all")


def _list(spool: Spool, args: argparse.Namespace, now: float) -> Outcome:
    state = EntryState(args.state) if args.state is not None else None
    entries = list(spool.entries(state))
    if args.json:
        return Outcome(text=json.dumps([_entry_json(e, now) for e in entries], indent=2))
    if not entries:
        return Outcome(text=f"no {state.value} entries" if state else "the spool is empty")
    rows: list[tuple[str, ...]] = [
        ("ID", "STATE", "AGE", "TRIES", "SIZE", "SENDER", "RCPTS", "NEXT", "DUP", "LAST ERROR")
    ]
    rows.extend(_row(entry, now) for entry in entries)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]
    return Outcome(text="\n".join(line.rstrip() for line in lines))


def _row(entry: Entry, now: float) -> tuple[str, ...]:
    return (
        entry.queue_id,
        entry.state.value,
        _duration(now - entry.created),
        str(entry.attempts),
        _size(entry.size),
        _shorten(_sender(entry), SENDER_COLUMN_CHARS),
        f"{len(entry.pending)}/{len(entry.recipients)}",
        _next(entry, now),
        _yes_no(entry.duplicate_risk),
        _shorten(entry.last_error or "", ERROR_COLUMN_CHARS),
    )


def _show(spool: Spool, args: argparse.Namespace, now: float) -> Outcome:
    queue_id: str = args.queue_id
    try:
        entry = spool.get(queue_id)
        if args.message:
            return Outcome(message=_octets(spool.open_message(queue_id), entry.body))
    except SpoolError as error:
        return Outcome(failures=(_failure(queue_id, error),))
    if args.json:
        return Outcome(text=json.dumps(_entry_json(entry, now), indent=2))
    return Outcome(text=_describe(entry, now))


def _describe(entry: Entry, now: float) -> str:
    created = f"{_clock_time(entry.created)} ({_duration(now - entry.created)} ago)"
    lines = [
        f"id:             {entry.queue_id}",
        f"state:          {entry.state.value}",
        f"created:        {created}",
        f"attempts:       {entry.attempts}",
        f"next attempt:   {_clock_time(entry.next_attempt)} ({_next(entry, now)})",
        f"last error:     {_printable(entry.last_error or '-')}",
        f"duplicate risk: {_yes_no(entry.duplicate_risk)}",
        f"sender:         {_printable(_sender(entry))}",
        f"mail from:      {_line_text(entry.mail_from)}",
        f"recipients:     {len(entry.pending)} of {len(entry.recipients)} pending",
    ]
    for recipient in entry.recipients:
        reply = _reply_text(recipient.reply) if recipient.reply else "no reply yet"
        lines.append(f"  {recipient.state.value:<9}  {_printable(recipient.address)}")
        lines.append(f"             {_line_text(recipient.line)}")
        lines.append(f"             last reply: {reply}")
    lines += [
        f"body:           {entry.body.value}, {entry.size} octets stored",
        f"sha256:         {entry.sha256}",
        f"transaction:    {_printable(entry.transaction_id)}",
        f"dedupe key:     {_printable(entry.dedupe_key)}",
        f"route:          {_printable(entry.route or '-')}",
    ]
    return "\n".join(lines)


def _change_all(spool: Spool, args: argparse.Namespace) -> Outcome:
    action: str = args.queue_action
    ids: list[str] = list(dict.fromkeys(args.ids))  # a repeated id is handled once
    if action == "retry" and args.all:
        ids = [entry.queue_id for entry in spool.entries(EntryState.DEFERRED)]
        if not ids and not args.json:
            return Outcome(text="no deferred entries")
    lines: list[str] = []
    results: list[dict[str, object]] = []
    failures: list[Failure] = []
    for queue_id in ids:
        try:
            entry = _change(spool, action, queue_id, args.wait)
        except SpoolError as error:
            failure = _failure(queue_id, error)
            failures.append(failure)
            results.append({"id": queue_id, "ok": False, "state": None, "error": failure.reason})
            continue
        state = "deleted" if action == "delete" else entry.state.value
        results.append({"id": queue_id, "ok": True, "state": state, "error": None})
        done = _DONE[action].format(state=entry.state.value, reason=entry.last_error)
        lines.append(f"{queue_id}: {done}")
    text = json.dumps(results, indent=2) if args.json else "\n".join(lines) or None
    return Outcome(text=text, failures=tuple(failures))


def _change(spool: Spool, action: str, queue_id: str, wait: float) -> Entry:
    """Apply ``action`` under the entry's lease; raises SpoolError and its kinds."""
    match action:
        case "retry":
            return spool.retry_now(queue_id, timeout=wait)
        case "hold":
            return spool.hold(queue_id, timeout=wait)
        case "release":
            return spool.release(queue_id, timeout=wait)
        case "delete":
            return spool.delete(queue_id, timeout=wait)
        case "dead":
            return spool.to_dead(queue_id, DEAD_REASON, timeout=wait)
    raise ValueError(f"not a queue action: {action!r}")


# What each change prints after the id, given the entry it left.
_DONE = {
    "retry": "{state}, due now",
    "hold": "{state}",
    "release": "released, {state}",
    "delete": "deleted",
    "dead": "{state} ({reason})",
}


def _failure(queue_id: str, error: SpoolError) -> Failure:
    if isinstance(error, EntryBusy):
        reason = "busy (a delivery holds it), try again"
    elif isinstance(error, NoSuchEntry):
        reason = "no such entry" if QUEUE_ID.match(queue_id) else "not a queue id"
    else:
        # InvalidTransition says which state refused what; CorruptEntry and
        # a failed write name the file and the OS error.
        reason = str(error)
    return Failure(queue_id=_printable(queue_id), reason=reason)


def _entry_json(entry: Entry, now: float) -> dict[str, object]:
    """An entry for ``--json``; times are ISO 8601 UTC, as in transaction records."""
    return {
        "id": entry.queue_id,
        "state": entry.state.value,
        "created": _iso(entry.created),
        "age_s": round(max(0.0, now - entry.created), 3),
        "attempts": entry.attempts,
        "next_attempt": _iso(entry.next_attempt),
        "last_error": entry.last_error,
        "duplicate_risk": entry.duplicate_risk,
        "sender": entry.sender,
        "mail_from": _line_json(entry.mail_from),
        "pending": len(entry.pending),
        "total": len(entry.recipients),
        "recipients": [
            {
                "address": r.address,
                "line": _line_json(r.line),
                "state": r.state.value,
                "reply": reply_json(r.reply),
            }
            for r in entry.recipients
        ],
        "body": entry.body.value,
        "size": entry.size,
        "sha256": entry.sha256,
        "transaction_id": entry.transaction_id,
        "dedupe_key": entry.dedupe_key,
        "route": entry.route,
    }


def _line_json(line: bytes) -> object:
    """A command line as the envelope file keeps it: text, or base64 if not UTF-8."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(line).decode("ascii")}


# C0 controls, DEL and C1 controls: shown escaped, so that text from clients
# and upstreams cannot drive the operator's terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def _line_text(line: bytes) -> str:
    return _printable(line.decode("utf-8", "backslashreplace"))


def _reply_text(reply: ReplyInfo) -> str:
    parts = [str(reply.code), reply.enhanced or "", reply.text]
    text = _printable(" ".join(part for part in parts if part))
    return f"{text} (from smtpwarden)" if reply.local else text


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _sender(entry: Entry) -> str:
    return entry.sender or "<>"  # the null reverse-path of bounces


def _shorten(text: str, limit: int) -> str:
    text = _printable(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _duration(seconds: float) -> str:
    """Seconds for people: "45s", "12m", "3h05m", "2d04h"."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _next(entry: Entry, now: float) -> str:
    match entry.state:
        case EntryState.HELD:
            return "held"
        case EntryState.DEAD:
            return "never"
    return "now" if entry.next_attempt <= now else f"in {_duration(entry.next_attempt - now)}"


def _size(octets: int) -> str:
    if octets < 1024:
        return f"{octets}B"
    if octets < 1024**2:
        return f"{octets / 1024:.1f}K"
    if octets < 1024**3:
        return f"{octets / 1024**2:.1f}M"
    return f"{octets / 1024**3:.1f}G"


def _iso(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clock_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
