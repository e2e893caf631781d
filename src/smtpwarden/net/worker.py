"""One relay process under the supervisor (``workers``; ``net.workers``).

The supervisor starts each worker as ``python -m smtpwarden _worker`` and
writes one line on its standard input, a JSON object (``WorkerBrief``):

- ``index``: the worker's number, 0 to ``workers`` - 1, kept across restarts;
- ``config`` and ``source``: the configuration document as the supervisor
  loaded it, and its name, parsed here exactly as there (a file that
  changed since is not read again);
- ``event_loop``: ``run --event-loop``, or null;
- ``ports``: each listener's port, as the supervisor reserved it (a
  listener's port 0 becomes the one port all workers share);
- ``status_fd``: the descriptor of the pipe the worker reports on;
- ``spool``: the path of the spool the supervisor recovered at its start,
  or null: the worker opens that one and delivers it, whatever routes the
  document it is handed has (a reload may have removed every requeue route
  since, and put one back later).

The worker then runs a relay like ``smtpwarden run`` does, except that its
listeners bind with SO_REUSEPORT beside the other workers', it never
recovers the spool (the supervisor did, before any worker started; a
worker restarted while others run would remove their puts under way), and
its HTTP endpoint, if any, listens on 127.0.0.1 port 0 for the supervisor
alone. Once its listeners are up it writes one line on ``status_fd``:
``{"pid": ..., "http": [host, port] or null}``. Its log lines name it
("worker 2"). Records for standard output (``log.transactions: "-"``) go
to its standard output, which the supervisor passes on a whole line at a
time.

Standard input stays open while the supervisor lives. Once the worker is
ready, the supervisor writes its requests there, one line each: stop
(``stop GRACE``, then ``now``), and reload (``reload`` and a JSON object:
``config`` and ``source`` as in the brief, and ``accepted``, false when the
supervisor refused the file and the worker is only to apply its running
configuration again; ``net.reload``). End of file means the supervisor is
gone, and the worker shuts down as on SIGTERM.

``worker_document`` runs in the supervisor, before any worker starts: it
checks that the document reaches the workers through JSON unchanged.

Rule: no worker decides anything for the others; it serves, reports ready,
and stops when told or orphaned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import BinaryIO, Final, cast

from smtpwarden.config import (
    EVENT_LOOPS,
    Config,
    ConfigError,
    Document,
    EventLoop,
    HttpConfig,
    parse_config,
)
from smtpwarden.net.server import Relay, run_relay

log = logging.getLogger("smtpwarden.worker")

WORKER_COMMAND: Final = "_worker"
WORKER_SOURCE: Final = "<worker brief>"
# The brief is one line of JSON holding the configuration document; a YAML
# file of a few hundred KiB is already an unusual configuration. Our choice.
MAX_BRIEF_BYTES: Final = 16 * 1024 * 1024
# The worker's own HTTP endpoint: on loopback, on a free port, for the
# supervisor's scrapes and probes only.
INTERNAL_HTTP_HOST: Final = "127.0.0.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerBrief:
    """What the supervisor tells a worker (see the module docstring)."""

    index: int
    config: object
    source: str
    event_loop: EventLoop | None
    ports: dict[str, int]
    status_fd: int
    spool: str | None = None

    def encode(self) -> bytes:
        """The brief as the one line the worker reads; raises ValueError or TypeError
        for a document JSON cannot carry."""
        fields = dataclasses.asdict(self)
        return json.dumps(fields, allow_nan=False, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> WorkerBrief:
        """Read a brief; raises ConfigError naming what is wrong with it."""
        try:
            raw = json.loads(line)
        except ValueError as error:
            raise ConfigError(WORKER_SOURCE, [f"not a JSON line: {error}"]) from None
        problems: list[str] = []
        if not isinstance(raw, dict):
            raise ConfigError(WORKER_SOURCE, ["expected a JSON object"])
        index, source, loop = raw.get("index"), raw.get("source"), raw.get("event_loop")
        ports, status = raw.get("ports"), raw.get("status_fd")
        spool = raw.get("spool")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            problems.append("index: expected an integer >= 0")
        if not isinstance(source, str):
            problems.append("source: expected a string")
        if loop is not None and loop not in EVENT_LOOPS:
            problems.append(f"event_loop: expected one of {', '.join(EVENT_LOOPS)} or null")
        if not isinstance(ports, dict) or not all(
            isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
            for port in ports.values()
        ):
            problems.append("ports: expected a mapping of listener names to ports 1-65535")
        if not isinstance(status, int) or isinstance(status, bool) or status < 0:
            problems.append("status_fd: expected a file descriptor")
        if spool is not None and not isinstance(spool, str):
            problems.append("spool: expected a path or null")
        if "config" not in raw:
            problems.append("config: missing")
        if problems:
            raise ConfigError(WORKER_SOURCE, problems)
        return cls(
            index=cast(int, index),
            config=raw["config"],
            source=cast(str, source),
            event_loop=cast("EventLoop | None", loop),
            ports=cast(dict[str, int], ports),
            status_fd=cast(int, status),
            spool=cast("str | None", spool),
        )


def worker_config(config: Config, brief: WorkerBrief) -> Config:
    """``config`` as this worker runs it: the reserved ports, the internal endpoint.

    Raises ConfigError if the brief names no port for a listener.
    """
    missing = [item.name for item in config.listeners if item.name not in brief.ports]
    if missing:
        raise ConfigError(WORKER_SOURCE, [f"ports: no port for listener {missing[0]}"])
    listeners = tuple(
        dataclasses.replace(item, port=brief.ports[item.name]) for item in config.listeners
    )
    http = config.http
    if http.enabled:
        http = HttpConfig(enabled=True, host=INTERNAL_HTTP_HOST, port=0)
    event_loop = brief.event_loop or config.event_loop
    return dataclasses.replace(config, listeners=listeners, http=http, event_loop=event_loop)


def worker_document(config: Config, document: Document) -> Document:
    """``document`` as the workers will read it: through JSON, and checked.

    Raises ConfigError when JSON cannot carry it, when it would not give
    the workers the configuration the supervisor runs (YAML data that JSON
    changes, such as a mapping key that is not a string), or when it is
    longer than a worker reads (``MAX_BRIEF_BYTES``).
    """
    probe = WorkerBrief(
        index=0,
        config=document.data,
        source=document.source,
        event_loop=None,
        ports={},
        status_fd=1,
    )
    problem = ["the configuration cannot be handed to worker processes as JSON"]
    try:
        line = probe.encode()
        carried = WorkerBrief.decode(line).config
    except (TypeError, ValueError) as error:
        raise ConfigError(document.source, [f"{problem[0]}: {error}"]) from None
    if len(line) > MAX_BRIEF_BYTES:
        raise ConfigError(
            document.source, [f"{problem[0]}: {len(line)} bytes, over {MAX_BRIEF_BYTES}"]
        )
    if parse_config(carried, source=document.source) != config:
        raise ConfigError(document.source, problem)
    return Document(carried, document.source)


def run_worker(stdin: BinaryIO | None = None) -> int:
    """Read the brief on standard input, run the relay; return the exit code.

    Raises ConfigError for a brief or configuration that does not parse
    (``cli.main`` reports it, exit 2), OSError as ``run_relay`` does.
    """
    # Until the relay handles them: SIGHUP must not end a starting worker,
    # and SIGINT (from the supervisor only: a worker has its own session)
    # stops it quietly rather than with a KeyboardInterrupt trace.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    stream = stdin if stdin is not None else sys.stdin.buffer
    line = stream.readline(MAX_BRIEF_BYTES + 1)
    if not line.endswith(b"\n"):
        raise ConfigError(WORKER_SOURCE, ["expected one line of JSON on standard input"])
    brief = WorkerBrief.decode(line)
    config = worker_config(parse_config(brief.config, source=brief.source), brief)
    logging.basicConfig(
        level=config.log.level.upper(),
        format=f"%(asctime)s worker {brief.index} %(name)s %(levelname)s %(message)s",
    )
    input_fd = stream.fileno()
    watching: list[asyncio.Task[None]] = []  # a task the loop alone would not keep

    def ready(relay: Relay) -> None:
        _report_ready(brief.status_fd, relay)
        watch = _watch_supervisor(input_fd, relay, brief)
        watching.append(asyncio.get_running_loop().create_task(watch))

    return run_relay(config, worker=True, ready=ready, spool_path=brief.spool)


def _report_ready(status_fd: int, relay: Relay) -> None:
    """Tell the supervisor this worker serves: one JSON line, then the pipe is closed."""
    address = relay.http_address()
    status = {"pid": os.getpid(), "http": list(address) if address is not None else None}
    try:
        os.write(status_fd, json.dumps(status).encode() + b"\n")
    except OSError as error:  # the supervisor is gone: standard input says so too
        log.warning("cannot report to the supervisor: %s", error)
    finally:
        os.close(status_fd)


# What the supervisor writes on a ready worker's standard input, one line
# each: stop with this grace ("stop 30.0"), close every session now, or
# reload ("reload {...}").
STOP: Final = "stop"
STOP_NOW: Final = b"now\n"
RELOAD: Final = b"reload "


def reload_line(document: Document, *, accepted: bool) -> bytes:
    """The reload request for the workers: ``document`` is the supervisor's, as
    ``worker_document`` checked it, so JSON carries it."""
    fields = {"accepted": accepted, "config": document.data, "source": document.source}
    return RELOAD + json.dumps(fields, allow_nan=False, separators=(",", ":")).encode() + b"\n"


def read_reload(payload: bytes, brief: WorkerBrief) -> Config | None:
    """The configuration a reload line hands over, as this worker runs it; None
    when the supervisor refused the file. Raises ConfigError."""
    try:
        fields = json.loads(payload)
        accepted, data, source = fields["accepted"], fields["config"], fields["source"]
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(WORKER_SOURCE, [f"not a reload request: {error}"]) from None
    if accepted is not True:
        return None
    return worker_config(parse_config(data, source=str(source)), brief)


class _SupervisorPipe(asyncio.Protocol):
    """Standard input: the supervisor's requests; its end means the supervisor is gone."""

    def __init__(self, relay: Relay, brief: WorkerBrief, gone: asyncio.Future[None]) -> None:
        self._relay = relay
        self._brief = brief
        self._gone = gone
        self._buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if line.startswith(RELOAD):
                self._reload(line[len(RELOAD) :])
            else:
                self._command(line.decode("ascii", "replace").split())
        # A reload line carries a document the supervisor checked against
        # MAX_BRIEF_BYTES (worker_document), with a few fields around it.
        if len(self._buf) > 2 * MAX_BRIEF_BYTES:
            log.warning("unexpected input from the supervisor: ignored")
            self._buf.clear()

    def _reload(self, payload: bytes) -> None:
        try:
            config = read_reload(payload, self._brief)
        except ConfigError as error:
            # The supervisor validated it: only a file changed under it can
            # fail here, as a restarted worker would.
            log.error("configuration not reloaded, the running one is kept: %s", error)
            self._relay.reloads.request(refused=True)
            return
        self._relay.reloads.request(config, refused=config is None)

    def _command(self, words: list[str]) -> None:
        relay = self._relay
        if words == [STOP_NOW.decode().strip()]:
            if not relay.stopping:
                relay.request_stop(0.0)
            relay.request_stop(0.0)  # asked again while stopping: every session now
        elif len(words) == 2 and words[0] == STOP:
            try:
                grace = float(words[1])
            except ValueError:
                grace = -1.0
            if not grace >= 0:
                log.warning("unexpected stop line from the supervisor: ignored")
            elif not relay.stopping:  # a stop under way (a signal of its own) keeps its grace
                relay.request_stop(grace)
        else:
            log.warning("unexpected line from the supervisor: ignored")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._gone.done():
            self._gone.set_result(None)


async def _watch_supervisor(input_fd: int, relay: Relay, brief: WorkerBrief) -> None:
    """Follow the supervisor's requests; once standard input ends, stop as SIGTERM does."""
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    pipe = os.fdopen(input_fd, "rb", buffering=0, closefd=False)
    transport, _ = await loop.connect_read_pipe(lambda: _SupervisorPipe(relay, brief, gone), pipe)
    try:
        await gone
    finally:
        transport.close()
    if not relay.stopping:  # a stop under way keeps its grace
        log.warning("the supervisor is gone (standard input closed): shutting down")
        relay.request_stop(relay.config.shutdown.grace)
