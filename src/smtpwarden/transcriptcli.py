"""What ``smtpwarden transcript`` and ``smtpwarden replay`` do.

``add_commands`` declares both commands on the main parser; ``run`` does
what the parsed arguments ask and returns an ``Outcome``: text for
standard output and failures for standard error. ``cli`` prints it and
picks the exit code. ``replay`` (``replaycli``) prints its dialogue as it
goes, through the ``emit`` it is given.

- ``transcript list``: one line per transcript, oldest first, filtered by
  time, client, sender, recipient and outcome;
- ``transcript show ID``: a readable dialogue, ``C:``/``S:`` for the client
  leg, ``U>``/``U<`` for the upstream leg, ``**`` for the relay's events,
  with each reply's latency;
- ``transcript capture``: switch a listener's capture mode in a running
  relay (``capturecontrol``), without a restart.

Rules kept here: never print, never exit (only ``cli`` does); reading takes
no lock, as transcripts are written once, by rename.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from smtpwarden import replaycli
from smtpwarden.capturecontrol import CaptureOverride, control_path, read_control, write_control
from smtpwarden.config import (
    CAPTURE_MODES,
    CLI_SOURCE,
    DEFAULT_SOURCE,
    ConfigError,
    ListenerTranscripts,
    TranscriptsConfig,
    load_config,
)
from smtpwarden.configcheck import Checker, suggest
from smtpwarden.configtls import read_networks
from smtpwarden.configtranscripts import describe, read_addresses
from smtpwarden.observe.dialogue import entries_of, latencies
from smtpwarden.observe.transcript import CHUNK, DATA, END, Direction, address_matches
from smtpwarden.observe.transcripts import TranscriptError, TranscriptStore
from smtpwarden.protocol.records import iso_time

Handler = Callable[[argparse.ArgumentParser, argparse.Namespace], int]

# How ``show`` marks each direction, and events.
PREFIXES: Final = {
    Direction.CLIENT_IN: "C:",
    Direction.CLIENT_OUT: "S:",
    Direction.UPSTREAM_OUT: "U>",
    Direction.UPSTREAM_IN: "U<",
    Direction.EVENT: "**",
}
# Characters of the addresses column of ``list``; ``show`` prints them all.
ADDRESS_COLUMN_CHARS: Final = 48
_AGO: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")
_UNITS_S: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Terminal control characters in what peers sent are shown escaped, never sent raw.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_DESCRIPTION = """\
Look at the session transcripts a relay wrote, and switch a listener's
capture mode while the relay runs. The folder is --dir FOLDER, else
transcripts.path of --config FILE, else ./transcripts."""

_EPILOG = """\
examples:
  smtpwarden transcript list --since 2h --outcome deferred
  smtpwarden transcript list --recipient @example.net --json
  smtpwarden transcript show 3e37a40000001
  smtpwarden transcript show 3e37a40000001 --leg client
  smtpwarden transcript capture --listener main --mode failure
  smtpwarden transcript capture --listener main --mode match --network 192.0.2.0/24 --sessions 5
  smtpwarden transcript capture --listener main --mode config"""

_SHOW_DESCRIPTION = """\
The dialogue of one transcript: C: what the client sent, S: what the relay
answered it, U> what went upstream, U< what the upstream answered, ** the
relay's events; each reply with its latency in milliseconds."""

_CAPTURE_DESCRIPTION = """\
Set a listener's capture mode in a running relay, without a restart: the
relay applies it within a second to the sessions that start afterwards,
until --mode config gives the configured mode back."""

_REPLAY_DESCRIPTION = """\
Replay the client side of a captured session against an SMTP server, so
that an incident becomes a reproducible test: every command the relay
passed upstream for the client, in order, each after the reply to the one
before, and each message as it was sent. The transcript must have been
captured with bodies. AUTH is never replayed (its credentials were never
kept). The dialogue is printed as it goes, with the replies the original
upstream gave where they differ."""

_REPLAY_EPILOG = """\
examples:
  smtpwarden replay 3e37a40000001 --to 127.0.0.1:2526
  smtpwarden replay 3e37a40000001 --to mta.example.net:25 --starttls"""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What ``run`` found: text for standard output, failures for standard error."""

    text: str | None = None
    failures: tuple[str, ...] = ()


def _add_location(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dir", metavar="FOLDER", help="the transcripts folder")
    where.add_argument(
        "-c", "--config", metavar="FILE", help="configuration whose transcripts.path to use"
    )


def add_commands(commands: argparse._SubParsersAction[Any], handler: Handler) -> None:
    """Declare ``transcript`` and ``replay``; ``handler`` runs either."""
    formatter = argparse.RawDescriptionHelpFormatter
    transcript = commands.add_parser(
        "transcript",
        help="list and show session transcripts; switch capture at run time",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    transcript.set_defaults(handler=handler)
    actions = transcript.add_subparsers(dest="transcript_action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="one line per transcript, oldest first",
        description="One line per transcript, oldest first; the filters combine.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    _add_location(listing)
    listing.add_argument("--since", metavar="WHEN", help="started at or after: a time, or 2h")
    listing.add_argument("--until", metavar="WHEN", help="started before: a time, or 30m")
    listing.add_argument("--client", metavar="NETWORK", help="client address or network")
    listing.add_argument("--sender", metavar="ADDRESS", help="a sender, or @domain")
    listing.add_argument("--recipient", metavar="ADDRESS", help="a recipient, or @domain")
    listing.add_argument("--outcome", metavar="OUTCOME", help="a transaction outcome or end")
    listing.add_argument("--json", action="store_true", help="print the headers as JSON")
    show = actions.add_parser(
        "show",
        help="the dialogue of one transcript",
        description=_SHOW_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    _add_location(show)
    show.add_argument("transcript_id", metavar="ID", help="transcript (session) id, or its file")
    legs = ("both", "client", "upstream")
    show.add_argument("--leg", choices=legs, default="both", help="which leg (default: both)")
    show.add_argument("--bodies", action="store_true", help="print message contents too")
    show.add_argument("--json", action="store_true", help="print the transcript file")
    capture = actions.add_parser(
        "capture",
        help="switch a listener's capture while it runs",
        description=_CAPTURE_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    _add_location(capture)
    capture.add_argument("--listener", metavar="NAME", required=True, help="the listener")
    modes = (*CAPTURE_MODES, "config")
    capture.add_argument(
        "--mode", choices=modes, required=True, help="config: back to the configured mode"
    )
    for option, what in (("network", "NETWORK"), ("sender", "ADDRESS"), ("recipient", "ADDRESS")):
        capture.add_argument(
            f"--{option}",
            metavar=what,
            action="append",
            default=[],
            help=f"match: a client {option}"
            if option == "network"
            else f"match: a {option} (user@example.org or @example.org); repeat for more",
        )
    capture.add_argument(
        "--sessions", metavar="N", type=int, default=0, help="match: N sessions (0: no limit)"
    )
    capture.add_argument("--bodies", action="store_true", help="keep message contents")
    for action in (listing, show, capture):
        action.set_defaults(command_parser=action)
    replay = commands.add_parser(
        "replay",
        help="replay a captured session's client side against an SMTP server",
        description=_REPLAY_DESCRIPTION,
        epilog=_REPLAY_EPILOG,
        formatter_class=formatter,
    )
    _add_location(replay)
    replay.add_argument("transcript_id", metavar="ID", help="transcript (session) id, or its file")
    replay.add_argument("--to", metavar="HOST:PORT", required=True, help="the server to replay to")
    replay.add_argument("--starttls", action="store_true", help="STARTTLS after the first EHLO")
    replay.add_argument("--insecure", action="store_true", help="with --starttls: no cert check")
    replay.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=replaycli.TIMEOUT_S,
        help=f"how long to wait for each reply (default: {replaycli.TIMEOUT_S:g})",
    )
    replay.set_defaults(handler=handler, command_parser=replay, transcript_action="replay")


def folder_of(args: argparse.Namespace) -> tuple[str, str, str]:
    """The transcripts folder, and the source and key that named it (for problems)."""
    if args.dir is not None:
        return args.dir, CLI_SOURCE, "--dir"
    if args.config is not None:
        return load_config(args.config).transcripts.path, args.config, "transcripts.path"
    return TranscriptsConfig().path, DEFAULT_SOURCE, "transcripts.path"


def _store(args: argparse.Namespace) -> TranscriptStore:
    folder, source, key = folder_of(args)
    if not Path(folder).is_dir():
        raise ConfigError(source, [f"{key}: expected a transcripts folder, got {folder!r}"])
    return TranscriptStore(folder)


def run(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    *,
    now: float,
    emit: Callable[[str], None],
) -> Outcome:
    """Do what ``args`` asks; ``now`` is the epoch time for relative times.

    Raises ConfigError for bad input or configuration, and the parser's
    usage error for options that do not go together.
    """
    action: str = args.transcript_action
    try:
        if action == "list":
            return _list(args, now)
        if action == "show":
            return _show(args)
        if action == "capture":
            return _capture(parser, args, now)
        content = _store(args).load(args.transcript_id)
        replaycli.run(content, args, emit)
    except (TranscriptError, replaycli.ReplayFailed) as error:
        return Outcome(failures=(str(error),))
    return Outcome()


# -- list ------------------------------------------------------------------------------


def parse_when(text: str, what: str, now: float) -> float:
    """Seconds since the epoch for ``--since``/``--until``: ISO 8601 (UTC unless
    it says otherwise), or an age such as 90s, 30m, 2h, 7d."""
    ago = _AGO.fullmatch(text)
    if ago is not None:
        return now - float(ago[1]) * _UNITS_S[ago[2]]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        problem = (
            f"{what}: expected a time (2025-03-01T09:15:00Z) or an age (30m, 2h), got {text!r}"
        )
        raise ConfigError(CLI_SOURCE, [problem]) from None
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()


def _epoch(stamp: object) -> float:
    return datetime.fromisoformat(str(stamp)).timestamp()


def _filters(args: argparse.Namespace, now: float) -> Callable[[Mapping[str, Any]], bool]:
    check = Checker()
    network = None
    if args.client is not None:
        networks = read_networks(check, {"--client": [args.client]}, "--client", "")
        network = networks[0] if networks else None
    patterns = {
        key: read_addresses(check, {option: [value]}, option, "")
        for key, option, value in (
            ("senders", "--sender", args.sender),
            ("recipients", "--recipient", args.recipient),
        )
        if value is not None
    }
    if check.problems:
        raise ConfigError(CLI_SOURCE, check.problems)
    since = None if args.since is None else parse_when(args.since, "--since", now)
    until = None if args.until is None else parse_when(args.until, "--until", now)

    def keep(header: Mapping[str, Any]) -> bool:
        started = _epoch(header["started"])
        if (since is not None and started < since) or (until is not None and started >= until):
            return False
        if network is not None:
            try:
                if ipaddress.ip_address(header["client"]["address"]) not in network:
                    return False
            except ValueError:
                return False
        for key, wanted in patterns.items():
            if not any(address_matches(address, wanted) for address in header[key]):
                return False
        outcome = args.outcome
        return outcome is None or outcome in header["outcomes"] or outcome == header["end"]

    return keep


def _addresses(header: Mapping[str, Any]) -> str:
    senders = ",".join(header["senders"]) or "-"
    recipients = header["recipients"]
    more = f" (+{len(recipients) - 1})" if len(recipients) > 1 else ""
    text = f"{senders} -> {recipients[0] if recipients else '-'}{more}"
    return text if len(text) <= ADDRESS_COLUMN_CHARS else text[: ADDRESS_COLUMN_CHARS - 3] + "..."


def _list(args: argparse.Namespace, now: float) -> Outcome:
    keep = _filters(args, now)
    store = _store(args)
    found = [header for _, header in store.headers() if keep(header)]
    if args.json:
        return Outcome(text=json.dumps(found, indent=2))
    if not found:
        return Outcome(text="no transcripts")
    rows = [("ID", "STARTED", "LISTENER", "CLIENT", "END", "OUTCOMES", "FROM -> TO")]
    for header in found:
        client = header["client"]
        address = client["address"]
        shown = f"[{address}]" if ":" in address else address
        outcomes = ",".join(header["outcomes"]) or "-"
        started = str(header["started"]).replace("T", " ")[:19]
        row = (header["id"], started, header["listener"], f"{shown}:{client['port']}")
        rows.append((*row, header["end"], outcomes, _addresses(header)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    widths[-1] = 0  # the last column is not padded
    padded = (zip(row, widths, strict=True) for row in rows)
    return Outcome(text="\n".join("  ".join(c.ljust(w) for c, w in row) for row in padded))


# -- show ------------------------------------------------------------------------------


def printable(text: str) -> list[str]:
    """Wire text (octets as latin-1) as UTF-8 lines for a terminal, controls escaped."""
    decoded = text.encode("latin-1").decode("utf-8", "replace").removesuffix("\r\n")
    return [_CONTROL.sub(_escaped, line) for line in decoded.split("\r\n")]


def _escaped(found: re.Match[str]) -> str:
    return f"\\x{ord(found[0]):02x}"


def render(content: Mapping[str, Any], *, leg: str = "both", bodies: bool = False) -> str:
    """A transcript as a readable dialogue. Raises TranscriptError for a bad one."""
    header = content["header"]
    client, upstream = header["client"], header["upstream"]
    tls = header.get("tls") or {}
    lines = [
        f"transcript {header['id']}: listener {header['listener']}, mode {header['mode']}"
        f"{', with bodies' if header.get('bodies') else ''}",
        f"client {client['address']}:{client['port']}, upstream {upstream['name']} "
        f"{upstream['address']}:{upstream['port']}",
        f"started {header['started']}, {header['duration_ms']} ms, end {header['end']}",
        f"tls client {tls.get('client', 'none')}, upstream {tls.get('upstream', 'none')}; "
        f"auth {header.get('auth') or '-'}; helo {header.get('helo') or '-'}",
    ]
    # The client chose its HELO name, the upstream its reply texts: no
    # control character of theirs reaches the operator's terminal.
    lines = [_CONTROL.sub(_escaped, line) for line in lines]
    if header.get("truncated"):
        cut = header["truncated"]
        lines.append(f"cut at max_bytes: {cut['entries']} entries ({cut['bytes']} bytes) missing")
    lines += ["", f"{'at ms':>10}  {'latency':>9}"]
    entries = entries_of(content)
    waits = latencies(entries)
    hidden: tuple[Direction, ...] = ()
    if leg == "client":
        hidden = (Direction.UPSTREAM_OUT, Direction.UPSTREAM_IN)
    elif leg == "upstream":
        hidden = (Direction.CLIENT_IN, Direction.CLIENT_OUT)
    for index, entry in enumerate(entries):
        content_relayed = leg == "upstream" and entry.tag in (DATA, END, CHUNK)
        if entry.direction in hidden and not content_relayed:
            continue
        text = entry.text
        if entry.tag in (DATA, END, CHUNK) and not bodies and not text.startswith("["):
            text = f"[content: {len(text)} octets]"
        wait = waits.get(index)
        left = f"{entry.at_ms:>10.3f}  {'' if wait is None else f'{wait:.3f}':>9}"
        prefix = "U>" if content_relayed else PREFIXES[entry.direction]
        shown = printable(text)
        lines.append(f"{left}  {prefix} {shown[0]}")
        lines += [f"{'':>21}  {prefix} {more}" for more in shown[1:]]
    lines.append("")
    for record in content.get("transactions", ()):
        final = record.get("final_reply") or {}
        reply = f"{final.get('code', '-')} {final.get('text', '')}".strip()
        pattern = (record.get("diagnosis") or {}).get("pattern", "none")
        line = (
            f"transaction {record['transaction_id']}: {record['outcome']}, {reply}"
            f"{'' if pattern == 'none' else f' ({pattern})'}"
        )
        lines.append(_CONTROL.sub(_escaped, line))
    return "\n".join(lines).rstrip("\n")


def _show(args: argparse.Namespace) -> Outcome:
    content = _store(args).load(args.transcript_id)
    if args.json:
        return Outcome(text=json.dumps(content, indent=2))
    return Outcome(text=render(content, leg=args.leg, bodies=args.bodies))


# -- capture ---------------------------------------------------------------------------


def _capture(parser: argparse.ArgumentParser, args: argparse.Namespace, now: float) -> Outcome:
    folder, _, _ = folder_of(args)
    if args.config is not None:
        names = [listener.name for listener in load_config(args.config).listeners]
        if args.listener not in names:
            problem = (
                f'--listener: no listener named "{args.listener}"{suggest(args.listener, names)}'
            )
            raise ConfigError(args.config, [problem])
    given = args.network or args.sender or args.recipient or args.sessions
    if given and args.mode != "match":
        parser.error("--network, --sender, --recipient and --sessions go with --mode match")
    if args.sessions < 0:
        parser.error("--sessions: expected 0 or more")
    path = control_path(folder)
    overrides = read_control(path)
    if args.mode == "config":
        overrides.pop(args.listener, None)
        write_control(path, overrides)
        return Outcome(text=f"listener {args.listener}: transcripts as configured")
    check = Checker()
    match = replace(
        ListenerTranscripts().match,
        networks=read_networks(check, {"--network": args.network}, "--network", ""),
        senders=read_addresses(check, {"--sender": args.sender}, "--sender", ""),
        recipients=read_addresses(check, {"--recipient": args.recipient}, "--recipient", ""),
        sessions=args.sessions,
    )
    if check.problems:
        raise ConfigError(CLI_SOURCE, check.problems)
    override = CaptureOverride(
        mode=args.mode, match=match, bodies=args.bodies, max_bytes=None, set_at=iso_time(now)
    )
    overrides[args.listener] = override
    write_control(path, overrides)
    settings = override.applied_to(ListenerTranscripts())
    return Outcome(
        text=f"listener {args.listener}: transcripts {describe(settings)} "
        f"(a running relay applies it within a second; --mode config undoes it)"
    )
