"""The smtpwarden command line: parse arguments, build a Config, run it.

This is the only module that prints a `ConfigError` and picks the exit
code: 0 success, 2 bad configuration or usage, 1 runtime failure. The
network modules are imported only when a command needs them, so
`check-config` and `--help` work without loading them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from smtpwarden import __version__, queuecli, reportcli, transcriptcli
from smtpwarden.config import (
    CLI_SOURCE,
    DEFAULT_SINK_FOLDER,
    EVENT_LOOPS,
    Config,
    ConfigError,
    Document,
    EventLoop,
    config_of,
    default_document,
    load_config,
    parse_hostport,
    read_document,
    simple_document,
)
from smtpwarden.protocol.diagnosis import Diagnosis, diagnose_text
from smtpwarden.spool import EntryState, SpoolError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # argparse's own code for usage errors; bad configuration shares it
WORKER_COMMAND = "_worker"  # net.worker.WORKER_COMMAND, without importing the network code

DEFAULT_SINK_LISTEN = "127.0.0.1:2526"  # one above the relay's default 2525

_MAIN_DESCRIPTION = """\
smtpwarden is an SMTP relay proxy. It sits between SMTP clients and an
upstream MTA, relays every session, parses every reply and writes one JSON
record per transaction."""

_MAIN_EPILOG = """\
examples:
  smtpwarden run                            relay 127.0.0.1:2525 into ./mail
  smtpwarden run --config smtpwarden.yaml   run from a configuration file
  smtpwarden check-config smtpwarden.yaml   validate a configuration file
  smtpwarden sink --dir ./captured          a test upstream that stores mail
  smtpwarden diagnose '550 5.1.1 No user'   explain a reply (or - for a transcript)
  smtpwarden queue list                     list the messages waiting in the spool
  smtpwarden transcript list                list captured session transcripts
  smtpwarden replay ID --to HOST:PORT       replay a captured session against an MTA
  smtpwarden report transactions.jsonl      summarise a transaction log (--html FILE for a page)

Run "smtpwarden COMMAND --help" for the options of each command."""

_RUN_DESCRIPTION = """\
Run the relay. With no option it uses the built-in default: a listener on
127.0.0.1:2525 in front of a sink upstream that writes each message to
./mail. --config reads a YAML file; --listen and --upstream (always given
together) relay one address to one upstream with every other setting at its
default. SIGTERM stops gracefully, SIGINT faster. With "workers" above 1
in the configuration, this process supervises that many relay processes
on the same ports."""

_RUN_EPILOG = """\
examples:
  smtpwarden run
  smtpwarden run --config configs/smtpwarden.yaml
  smtpwarden run --listen 0.0.0.0:25 --upstream mta.example.com:25
  smtpwarden run --listen [::1]:2525 --upstream sink:./mail --event-loop asyncio"""

_CHECK_DESCRIPTION = """\
Load and validate a configuration file without starting anything. Every
problem is listed with its key path; the exit code is 0 when the file is
valid and 2 when it is not."""

_CHECK_EPILOG = """\
examples:
  smtpwarden check-config smtpwarden.yaml
  smtpwarden check-config configs/quickstart.yaml && smtpwarden run -c configs/quickstart.yaml"""

_SINK_DESCRIPTION = f"""\
Run a minimal SMTP server that accepts every message and writes it to a
folder, one file per message. Use it as a test upstream, or to capture what
an application sends. It listens on {DEFAULT_SINK_LISTEN} by default."""

_SINK_EPILOG = """\
examples:
  smtpwarden sink
  smtpwarden sink --listen 127.0.0.1:2526 --dir ./captured

  then, to relay through smtpwarden into it:
  smtpwarden run --listen 127.0.0.1:2525 --upstream 127.0.0.1:2526"""


_DIAGNOSE_DESCRIPTION = """\
Explain an SMTP reply, or every reply of a pasted transcript: the failure
pattern (for example a 250 whose text reports a failure), the cause, whether
a retry can help, and what to do. Give the reply as one argument, or - to
read a reply or a whole transcript (lines like "S: 250 ok" / "C: DATA",
"<<< 250 ok" / ">>> DATA", or swaks output) from standard input."""

_DIAGNOSE_EPILOG = """\
examples:
  smtpwarden diagnose '250 Mail transaction failed: http://mailserver/failed.aspx'
  smtpwarden diagnose '452 4.2.2 The email account that you tried to reach is over quota'
  swaks --to a@example.com --server mx.example.com | smtpwarden diagnose -
  smtpwarden diagnose --json - < transcript.txt"""

_QUEUE_DESCRIPTION = """\
Look at the spool of the requeue policy and act on its entries. The spool
folder is --spool FOLDER, else spool.path of --config FILE, else that of the
built-in default (./spool). The folder must exist: it is never created.

Safe while the relay runs. Reading takes no lock. A change takes the entry's
lock, as a delivery does, and waits at most --wait seconds (default 1) for a
delivery to let go; an entry still being delivered is reported as busy. The
command never runs crash recovery: that is the relay's job at start, and
the relay skips its cleanup while another process has the spool open.

Exit status: 0 when every id was handled; 1 when some were not (no such
entry, busy, or a state that does not allow the action), each reported on
standard error with its id; 2 for a usage or configuration error."""

_QUEUE_EPILOG = """\
states and actions:
  queued    waiting for its first attempt, or retried by hand
  deferred  an attempt failed; tried again at its next attempt time
  held      not delivered until released
  dead      given up (too old, or by hand); kept until deleted or retried

  retry     queued, deferred or dead -> queued, due now (release a held one)
  hold      queued or deferred -> held
  release   held -> queued, or deferred if it was tried before
  dead      any state -> dead, with the reason "operator"
  delete    any state -> removed, message and all

examples:
  smtpwarden queue list
  smtpwarden queue --config smtpwarden.yaml list --state deferred
  smtpwarden queue --spool ./spool show 20250102T030405.123456-1a2b3c4d
  smtpwarden queue show 20250102T030405.123456-1a2b3c4d --message > message.eml
  smtpwarden queue hold 20250102T030405.123456-1a2b3c4d
  smtpwarden queue retry --all
  smtpwarden queue list --state dead --json | jq -r '.[].id' | xargs smtpwarden queue delete"""

_QUEUE_ACTIONS = {
    "list": "one line per entry, oldest first",
    "show": "everything about one entry, or its message with --message",
    "retry": "make entries due now (--all: every deferred entry)",
    "hold": "stop delivering entries until released",
    "release": "let held entries be delivered again",
    "delete": "remove entries and their messages for good",
    "dead": 'move entries to dead letters with the reason "operator"',
}


class _UsageError(Exception):
    """A command-line usage error, raised instead of letting argparse exit."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors reach `main` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


def _add_event_loop(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        help=f"event loop; auto picks uvloop when installed, else asyncio (default: {default})",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _add_spool_location(parser: argparse.ArgumentParser) -> None:
    # Accepted before and after ACTION, so absent unless given: a default
    # set by the action's parser would overwrite the one given before it.
    where, absent = parser.add_mutually_exclusive_group(), argparse.SUPPRESS
    config_help = "YAML configuration file whose spool.path to use"
    where.add_argument("-c", "--config", metavar="FILE", default=absent, help=config_help)
    where.add_argument("--spool", metavar="FOLDER", default=absent, help="the spool folder")


def _add_queue(commands: argparse._SubParsersAction[_Parser]) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    queue = commands.add_parser(
        "queue",
        help="list, show, retry, hold, release, delete or bury spooled messages",
        description=_QUEUE_DESCRIPTION,
        epilog=_QUEUE_EPILOG,
        formatter_class=formatter,
    )
    _add_spool_location(queue)
    queue.set_defaults(handler=_queue)
    actions = queue.add_subparsers(dest="queue_action", metavar="ACTION", required=True)
    for name, summary in _QUEUE_ACTIONS.items():
        action = actions.add_parser(
            name,
            help=summary,
            description=f"{summary.capitalize()}.",
            epilog=_QUEUE_EPILOG,
            formatter_class=formatter,
        )
        _add_spool_location(action)
        action.add_argument("--json", action="store_true", help="print JSON")
        action.set_defaults(command_parser=action)
        if name == "list":
            states = [state.value for state in EntryState]
            action.add_argument("--state", choices=states, help="only entries in this state")
        elif name == "show":
            action.add_argument("queue_id", metavar="ID", help="queue id")
            action.add_argument(
                "--message",
                action="store_true",
                help="print the message (a DATA body without its dot-stuffing)",
            )
        else:
            nargs = "*" if name == "retry" else "+"
            action.add_argument("ids", metavar="ID", nargs=nargs, help="queue ids")
            if name == "retry":
                action.add_argument("--all", action="store_true", help="every deferred entry")
            wait = queuecli.BUSY_WAIT_S
            action.add_argument(
                "--wait",
                metavar="SECONDS",
                type=_seconds,
                default=wait,
                help=f"how long to wait for a delivery to let go (default: {wait:g})",
            )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every smtpwarden command."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="smtpwarden",
        description=_MAIN_DESCRIPTION,
        epilog=_MAIN_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run the relay",
        description=_RUN_DESCRIPTION,
        epilog=_RUN_EPILOG,
        formatter_class=formatter,
    )
    run.add_argument("-c", "--config", metavar="FILE", help="YAML configuration file")
    run.add_argument(
        "--listen", metavar="HOST:PORT", help="address to accept clients on (IPv6 as [::1]:25)"
    )
    run.add_argument(
        "--upstream",
        metavar="HOST:PORT|sink:FOLDER",
        help="upstream MTA to relay to, or sink:FOLDER to write each message to FOLDER",
    )
    _add_event_loop(run, "the configuration's, else auto")
    run.set_defaults(handler=_run, command_parser=run)

    # Hidden (no help): how the supervisor of `workers` starts each worker.
    worker = commands.add_parser(WORKER_COMMAND)
    worker.set_defaults(handler=_worker, command_parser=worker)

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file",
        description=_CHECK_DESCRIPTION,
        epilog=_CHECK_EPILOG,
        formatter_class=formatter,
    )
    check.add_argument("file", metavar="FILE", help="YAML configuration file")
    check.set_defaults(handler=_check_config, command_parser=check)

    sink = commands.add_parser(
        "sink",
        help="run a test SMTP server that writes each message to a folder",
        description=_SINK_DESCRIPTION,
        epilog=_SINK_EPILOG,
        formatter_class=formatter,
    )
    sink.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=DEFAULT_SINK_LISTEN,
        help=f"address to accept clients on (default: {DEFAULT_SINK_LISTEN})",
    )
    sink.add_argument(
        "--dir",
        metavar="FOLDER",
        default=DEFAULT_SINK_FOLDER,
        help=f"folder where messages are written (default: {DEFAULT_SINK_FOLDER})",
    )
    _add_event_loop(sink, "auto")
    sink.set_defaults(handler=_sink, command_parser=sink)

    diagnose = commands.add_parser(
        "diagnose",
        help="explain an SMTP reply or a pasted transcript",
        description=_DIAGNOSE_DESCRIPTION,
        epilog=_DIAGNOSE_EPILOG,
        formatter_class=formatter,
    )
    diagnose.add_argument(
        "reply", metavar="REPLY", help='the reply, quoted (e.g. "550 5.1.1 User unknown"), or -'
    )
    diagnose.add_argument("--json", action="store_true", help="print a JSON list")
    diagnose.set_defaults(handler=_diagnose, command_parser=diagnose)

    _add_queue(commands)
    transcriptcli.add_commands(commands, _transcript)
    reportcli.add_command(commands)
    return parser


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    # Until the relay handles it: SIGHUP's default action would end a relay
    # still starting (a reload asked for during a restart), and a service
    # manager would take that for a clean exit. The start reads every file.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if args.config is not None and (args.listen is not None or args.upstream is not None):
        parser.error("--config cannot be combined with --listen or --upstream")
    if (args.listen is None) != (args.upstream is None):
        parser.error("--listen and --upstream must be given together")
    document: Document
    if args.config is not None:
        document = read_document(args.config)
    elif args.listen is not None:
        document = simple_document(listen=args.listen, upstream=args.upstream)
    else:
        document = default_document()
    config = config_of(document)
    if config.workers > 1:
        # Imported here so that --help and check-config never load the network code.
        from smtpwarden.net.workers import run_supervisor

        return run_supervisor(config, document, event_loop=args.event_loop, path=args.config)
    if args.event_loop is not None:
        config = dataclasses.replace(config, event_loop=args.event_loop)

    from smtpwarden.net.server import run_relay

    load = None
    if args.config is not None:
        path, event_loop = args.config, args.event_loop

        def load() -> Config:
            # SIGHUP: the same file, with the same command-line choices.
            again = config_of(read_document(path))
            if event_loop is None:
                return again
            return dataclasses.replace(again, event_loop=event_loop)

    return run_relay(config, load=load)


def _worker(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from smtpwarden.net.worker import run_worker

    return run_worker()


def _check_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = load_config(args.file)
    listeners = _plural(len(config.listeners), "listener")
    upstreams = _plural(len(config.upstreams), "upstream")
    print(f"{args.file}: ok ({listeners}, {upstreams})")
    return EXIT_OK


def _sink(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    host, port = parse_hostport(args.listen, what="--listen", allow_zero=True)
    if not args.dir:
        raise ConfigError(CLI_SOURCE, ['--dir: expected a folder path, got ""'])
    event_loop: EventLoop = args.event_loop if args.event_loop is not None else "auto"

    from smtpwarden.net.sink import run_sink

    return run_sink(host=host, port=port, folder=args.dir, event_loop=event_loop)


def _diagnosis_fields(reply: str, found: Diagnosis) -> dict[str, str | bool | None]:
    return {
        "reply": reply,
        "pattern": found.pattern.value,
        "cause": found.cause.value,
        "retryable": found.retryable,
        "advice": found.advice,
        "evidence": found.evidence,
    }


def _diagnose(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    pasted: str = sys.stdin.read() if args.reply == "-" else args.reply
    results = diagnose_text(pasted)
    if not results:
        parser.error('no SMTP reply found; a reply starts with a three-digit code, like "250 Ok"')
    if args.json:
        print(json.dumps([_diagnosis_fields(reply, found) for reply, found in results], indent=2))
        return EXIT_OK
    blocks = []
    for reply, found in results:
        lines = [reply]
        lines.append(f"  pattern:   {found.pattern.value}")
        lines.append(f"  cause:     {found.cause.value}")
        lines.append(f"  retryable: {'yes' if found.retryable else 'no'}")
        lines.append(f"  advice:    {found.advice}")
        if found.evidence is not None and found.evidence != " ".join(reply.split()):
            lines.append(f"  evidence:  {found.evidence}")
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return EXIT_OK


def _queue(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    outcome = queuecli.run(parser, args, now=time.time())
    if outcome.text is not None:
        print(outcome.text)
    if outcome.message is not None:
        sys.stdout.flush()
        for block in outcome.message:
            sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()
    for failure in outcome.failures:
        print(f"smtpwarden queue: {failure}", file=sys.stderr)
    return EXIT_FAILURE if outcome.failures else EXIT_OK


def _transcript(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    outcome = transcriptcli.run(parser, args, now=time.time(), emit=_emit)
    if outcome.text is not None:
        print(outcome.text)
    for failure in outcome.failures:
        print(f"smtpwarden {parser.prog.split()[-1]}: {failure}", file=sys.stderr)
    return EXIT_FAILURE if outcome.failures else EXIT_OK


def _emit(line: str) -> None:
    print(line, flush=True)


_Handler = Callable[[argparse.ArgumentParser, argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the smtpwarden command line and return the process exit code.

    --help and --version print and raise SystemExit(0), as argparse does.
    Usage errors and ConfigError are printed to stderr and return 2; an
    OSError from a running command (for example a port already in use) or
    a SpoolError (a spool that cannot be opened or read) returns 1.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler: _Handler = args.handler
        return handler(args.command_parser, args)
    except _UsageError as err:
        err.parser.print_usage(sys.stderr)
        print(f"{err.parser.prog}: error: {err.message}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except (OSError, SpoolError) as err:
        print(f"smtpwarden: {err}", file=sys.stderr)
        return EXIT_FAILURE
