"""Several relay processes on the same ports: the supervisor of ``workers``.

With ``workers`` above 1, ``smtpwarden run`` runs ``run_supervisor``: a
small asyncio loop that relays no mail itself. In order, it

1. reserves every listener's port (``net.reservation``): sockets bound with
   SO_REUSEADDR and SO_REUSEPORT, never listening, kept for its whole life,
   so that a port 0 becomes one port the workers share and keep across
   restarts, and a port another program holds is reported once, here;
2. recovers the spool once, when a route requeues: workers never do, as a
   worker restarted beside running ones would remove their puts under way;
3. serves the HTTP endpoint, if configured (``net.workerhttp``);
4. starts the workers (``net.worker``) and keeps them running: a worker
   that exits while the supervisor is not stopping has crashed; it is
   logged, counted, and started again with the same index after a backoff
   (``net.workerslot.Backoff``).

Each worker is ``python -m smtpwarden _worker``, in a session of its own
(a terminal's Ctrl-C reaches the supervisor only, which passes it on once),
handed the configuration document on its standard input, which stays open:
its end tells the worker the supervisor is gone. A worker reports ready on
a pipe of its own; its standard output (records, with
``log.transactions: "-"``) is passed on a whole line at a time, so that
lines of different workers never mix; its standard error is the
supervisor's.

Signals: SIGTERM and SIGINT are passed on to every worker, as a stop line
on its standard input (a worker not ready yet gets the signal), and it stops
as a lone relay does; the supervisor waits for them, at most the grace plus
``STOP_MARGIN_S``, then SIGKILLs what is left, and exits 0. A second
SIGTERM or SIGINT is passed on too (the workers' grace ends). A line rather
than the signal: ``pkill`` reaches the workers directly as well, and the
signal passed on would be a second one to them.

SIGHUP: the supervisor reads the configuration file again and checks it as
a lone relay does (``net.reload``): a file that does not validate, or that
changes a setting that needs a restart, is refused with its problems logged
once, here. It then sends every ready worker a reload line on its standard
input (``net.worker``) with the configuration in force, the new one or the
running one, which the worker applies to its new sessions (and so reloads
its certificates). Workers started afterwards are handed the configuration
in force; one that was starting during a SIGHUP gets the last reload line
once ready (its log, opened before, must be reopened too).

Rule 1: after recovery the supervisor never touches the spool, a client or
an upstream: it starts, watches, signals and scrapes workers.

Rule 2: it never spins: every restart waits its backoff, and a supervisor
none of whose workers becomes ready within ``STARTUP_TIMEOUT_S`` stops
them and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from typing import BinaryIO, Final

from smtpwarden.config import Config, ConfigError, Document, EventLoop, config_of, read_document
from smtpwarden.configreload import changed_sections, restart_changes, spool_opened
from smtpwarden.net.forwarding import LineForwarder
from smtpwarden.net.notify import Notifier, without_notify_socket
from smtpwarden.net.reservation import Reservation
from smtpwarden.net.worker import (
    STOP,
    STOP_NOW,
    WORKER_COMMAND,
    WorkerBrief,
    reload_line,
    worker_document,
)
from smtpwarden.net.workerhttp import SupervisorEndpoint
from smtpwarden.net.workerslot import MAX_STATUS_BYTES, WorkerSlot, describe_exit, read_status
from smtpwarden.spool import Spool, SpoolError

log = logging.getLogger("smtpwarden.workers")

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2  # a worker that exits 2 found the configuration unusable

# A worker needs well under a second to start on an idle machine; this
# leaves room for a loaded one before the supervisor gives up on all of
# them, or ends one that hangs before it is ready (and starts it again).
STARTUP_TIMEOUT_S: Final = 30.0
# After the grace, the workers' own closing: two lingers of the closing
# replies (net.ending.LINGER_S), the log's flush and fsync, a busy machine.
STOP_MARGIN_S: Final = 10.0


class Supervisor:
    """Runs ``config.workers`` relay processes (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        document: Document,
        *,
        event_loop: EventLoop | None,
        path: str | None = None,
    ) -> None:
        self.config = config
        self.document = worker_document(config, document)
        self.event_loop = event_loop
        self.path = path  # the configuration file, read again on SIGHUP
        self.spool_path = spool_opened(config)  # recovered here, fixed for the workers
        self.generation = 0  # configurations accepted since the start
        self.hangups = 0  # SIGHUPs since the start
        self.last_accepted = True  # whether the last SIGHUP's file was
        self.notifier = Notifier()  # the service manager, under systemd's Type=notify
        self.slots = [WorkerSlot(index) for index in range(config.workers)]
        self.reservation = Reservation()
        self.exit_code = EXIT_OK
        self.endpoint: SupervisorEndpoint | None = None
        self._output = LineForwarder(sys.stdout.fileno())
        self._stop_signal = signal.SIGTERM
        self._deadline: float | None = None
        self._killer: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()  # set when the stop begins: ends backoff waits
        self._any_ready = asyncio.Event()
        self._last_exit = "none has exited"  # for the error when none becomes ready

    @property
    def stopping(self) -> bool:
        """True once a signal (or a failure to start) began the stop."""
        return self._stopped.is_set()

    async def run(self) -> int:
        """Reserve, recover, serve, start the workers; return the exit code once all exited."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        try:
            try:
                self.reservation.reserve(
                    self.config.listeners, exclusive=not self.config.reuse_port
                )
                self._recover_spool()
            except (OSError, SpoolError) as error:
                log.error("cannot start: %s", error)
                return EXIT_FAILURE
            for listener in self.config.listeners:
                host, port = listener.host, self.reservation.ports[listener.name]
                shown = f"[{host}]" if ":" in host else host
                log.info(
                    "listener %s on %s:%s, shared by %d workers",
                    listener.name,
                    shown,
                    port,
                    len(self.slots),
                )
            if self.config.http.enabled:
                self.endpoint = SupervisorEndpoint(
                    self.config.http,
                    self.slots,
                    lambda: self.stopping,
                    reuse_port=self.config.reuse_port,
                )
                await self.endpoint.start()
            keepers = [loop.create_task(self._keep(slot)) for slot in self.slots]
            watchdog = loop.create_task(self._watch_startup())
            await asyncio.gather(*keepers)
            watchdog.cancel()
            if self._killer is not None:
                self._killer.cancel()
            log.info("every worker has exited")
            return self.exit_code
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            if self.endpoint is not None:
                await self.endpoint.close()
            self.reservation.close()

    def _recover_spool(self) -> None:
        """Recover the spool once, before any worker starts (as a lone relay does)."""
        if not any(route.policy == "requeue" for route in self.config.routes):
            return
        path = self.config.spool.path
        with Spool(path) as spool:
            report = spool.recover()
        log.info("spool %s: %s", path, report.summary())

    async def _keep(self, slot: WorkerSlot) -> None:
        """Run a worker in ``slot``, and again after each crash, until stopping."""
        loop = asyncio.get_running_loop()
        first = True
        while not self._stopped.is_set():
            if not first:
                slot.restarts += 1
            first = False
            started = loop.time()
            ended = await self._run_one(slot)
            if self._stopped.is_set():
                return
            if ended == EXIT_USAGE and not self._any_ready.is_set():
                self._fail(EXIT_USAGE, f"worker {slot.index}: the configuration is not usable")
                return
            wait = slot.backoff.after_exit(loop.time() - started)
            log.info("starting worker %d again in %g s", slot.index, wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), wait)

    async def _run_one(self, slot: WorkerSlot) -> int | None:
        """Start one worker process and wait for its end; its return code, or None
        if it could not be started."""
        read_fd, write_fd = os.pipe()
        status = os.fdopen(read_fd, "rb", buffering=0)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smtpwarden",
                WORKER_COMMAND,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                start_new_session=True,
                env=without_notify_socket(),  # only the supervisor speaks to systemd
            )
        except OSError as error:
            status.close()
            log.error("worker %d could not be started: %s", slot.index, error)
            return None
        finally:
            os.close(write_fd)
        slot.process, slot.generation, slot.hangups = process, self.generation, self.hangups
        if self.stopping:  # the stop began while the process was being made
            _send(process, self._stop_signal)
        brief = WorkerBrief(
            index=slot.index,
            config=self.document.data,
            source=self.document.source,
            event_loop=self.event_loop,
            ports=dict(self.reservation.ports),
            status_fd=write_fd,
            spool=self.spool_path,
        )
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._await_ready(slot, status))]
        watching = tasks[0]
        if process.stdout is not None:  # asked for with PIPE: always there
            tasks.append(loop.create_task(self._output.forward(process.stdout)))
        # A worker that hangs before it is ready is ended, and started again.
        overdue = loop.call_later(STARTUP_TIMEOUT_S, self._overdue, slot, process)
        try:
            await _hand_over(process, brief)
            code = await process.wait()
        finally:
            overdue.cancel()
            watching.cancel()
            if process.stdin is not None:
                process.stdin.close()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Only now: the watcher's transport has let go of the descriptor,
            # whose number another worker's pipe may take next.
            status.close()
            slot.process, slot.ready, slot.http = None, False, None
        ended = f"worker {slot.index} (pid {process.pid}) {describe_exit(code)}"
        if self.stopping:
            log.info("%s", ended)
        else:
            log.error("%s", ended)
            self._last_exit = f"the last: {ended}"
        return code

    async def _await_ready(self, slot: WorkerSlot, status: BinaryIO) -> None:
        """Read the worker's ready line (see ``net.worker``) and mark it ready."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_STATUS_BYTES)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), status
        )
        try:
            line = await reader.readline()
        except ValueError:  # longer than a status line can be
            line = b""
        finally:
            transport.close()
        readable, http = read_status(line)
        if not readable or slot.process is None:
            return  # it exited first, or does not speak the protocol: its exit will tell
        slot.ready, slot.http = True, http
        log.info("worker %d (pid %d) ready", slot.index, slot.process.pid)
        self._catch_up(slot)
        if all(other.ready for other in self.slots):
            log.info("smtpwarden running: %d workers ready", len(self.slots))
        if not self.stopping:  # serving from the first ready worker, as /readyz says
            count = sum(other.ready for other in self.slots)
            self.notifier.ready(f"running: {count} of {len(self.slots)} workers ready")
        self._any_ready.set()

    def _overdue(self, slot: WorkerSlot, process: asyncio.subprocess.Process) -> None:
        if slot.process is process and not slot.ready and not self.stopping:
            log.error(
                "worker %d (pid %d) not ready within %g s: SIGKILL",
                slot.index,
                process.pid,
                STARTUP_TIMEOUT_S,
            )
            _send(process, signal.SIGKILL)

    async def _watch_startup(self) -> None:
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT_S):
                await self._any_ready.wait()
        except TimeoutError:
            timeout = STARTUP_TIMEOUT_S
            self._fail(
                EXIT_FAILURE, f"no worker became ready within {timeout:g} s ({self._last_exit})"
            )

    def _fail(self, code: int, reason: str) -> None:
        """Give up: log ``reason``, stop every worker, exit with ``code``."""
        if self.stopping:
            return
        log.error("cannot start: %s; stopping", reason)
        self.exit_code = code
        self._begin_stop(signal.SIGTERM, self.config.shutdown.grace)

    def _on_stop_signal(self, signum: int) -> None:
        shutdown = self.config.shutdown
        grace = shutdown.grace if signum == signal.SIGTERM else shutdown.fast
        name = signal.Signals(signum).name
        if not self.stopping:
            log.info("%s: stopping %d workers, %.1f s grace", name, len(self.slots), grace)
            self._begin_stop(signum, grace)
            return
        log.info("%s again: the workers close every session now", name)
        self._stop_all(signum, STOP_NOW)
        self._kill_after(STOP_MARGIN_S)

    def _begin_stop(self, signum: int, grace: float) -> None:
        self.notifier.stopping()
        self._stop_signal = signal.Signals(signum)
        self._stopped.set()
        self._stop_all(signum, f"{STOP} {grace}\n".encode())
        self._kill_after(grace + STOP_MARGIN_S)

    def _stop_all(self, signum: int, line: bytes) -> None:
        """Tell every worker to stop: ready ones on their standard input.

        A line, not the signal: ``kill`` or ``pkill`` aimed at every process
        also reaches the workers directly, and a stop signal passed on as
        well would be a second one to them, which ends their grace. A stop
        line to a worker already stopping changes nothing. A worker not ready
        yet has no sessions: it gets the signal.
        """
        for slot in self.slots:
            process = slot.process
            if process is None:
                continue
            if slot.ready and process.stdin is not None and not process.stdin.is_closing():
                process.stdin.write(line)
            else:
                _send(process, signum)

    def _on_hangup(self) -> None:
        self.notifier.reloading()
        self.hangups += 1
        try:
            self.last_accepted = self._reread()
        except Exception:
            # The workers must still be told: their logs are to be reopened.
            log.exception("configuration not reloaded, the running one is kept")
            self.last_accepted = False
        line = reload_line(self.document, accepted=self.last_accepted)
        ready = [slot for slot in self.slots if slot.ready and slot.process is not None]
        log.info("SIGHUP: passed on to %d ready workers", len(ready))
        for slot in ready:
            self._write(slot, line)
            slot.generation, slot.hangups = self.generation, self.hangups
        if not self.stopping:
            verdict = (
                "reloaded" if self.last_accepted else "the last reload was refused, see the log"
            )
            self.notifier.ready(f"running: {verdict}")

    def _catch_up(self, slot: WorkerSlot) -> None:
        """A worker now ready missed reloads while it started: the last one, for it."""
        if slot.hangups == self.hangups:
            return
        accepted = slot.generation != self.generation or self.last_accepted
        self._write(slot, reload_line(self.document, accepted=accepted))
        slot.generation, slot.hangups = self.generation, self.hangups

    def _as_run(self, config: Config) -> Config:
        """``config`` with ``run --event-loop`` applied, as the workers run it."""
        if self.event_loop is None:
            return config
        return dataclasses.replace(config, event_loop=self.event_loop)

    def _reread(self) -> bool:
        """Read the configuration file again; False (logged) if it is refused."""
        if self.path is None:
            return True  # no file: the running configuration, applied again
        kept = "configuration not reloaded, the running one is kept"
        try:
            document = read_document(self.path)
            config = config_of(document)
            carried = worker_document(config, document)
        except ConfigError as error:
            log.error("%s: %s", kept, error)
            return False
        problems = restart_changes(
            self._as_run(self.config), self._as_run(config), spool=self.spool_path
        )
        if problems:
            shown = "\n  ".join(["these settings change only with a restart:", *problems])
            log.error("%s: %s", kept, shown)
            return False
        changed = changed_sections(self._as_run(self.config), self._as_run(config))
        if config.log.level != self.config.log.level:
            logging.getLogger().setLevel(config.log.level.upper())
        self.config, self.document = config, carried
        self.generation += 1
        log.info(
            "configuration read again from %s: %s",
            self.path,
            "changed " + ", ".join(changed) if changed else "no setting changed",
        )
        return True

    @staticmethod
    def _write(slot: WorkerSlot, line: bytes) -> None:
        """Write ``line`` on a ready worker's standard input, if it is still open."""
        process = slot.process
        if process is not None and process.stdin is not None and not process.stdin.is_closing():
            process.stdin.write(line)

    def _kill_after(self, seconds: float) -> None:
        """SIGKILL the workers left ``seconds`` from now, unless an earlier deadline holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        if self._deadline is not None and self._deadline <= deadline:
            return
        self._deadline = deadline
        if self._killer is not None:
            self._killer.cancel()
        self._killer = loop.create_task(self._kill_at(deadline))

    async def _kill_at(self, deadline: float) -> None:
        await asyncio.sleep(deadline - asyncio.get_running_loop().time())
        for slot in self.slots:
            if slot.process is not None:
                log.warning(
                    "worker %d (pid %d) still running after the grace: SIGKILL",
                    slot.index,
                    slot.process.pid,
                )
                _send(slot.process, signal.SIGKILL)


def _send(process: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just exited
        process.send_signal(signum)


async def _hand_over(process: asyncio.subprocess.Process, brief: WorkerBrief) -> None:
    """Write the brief on the worker's standard input, which then stays open."""
    if process.stdin is None:
        return
    process.stdin.write(brief.encode())
    with contextlib.suppress(ConnectionError):  # it died at once: its exit tells why
        await process.stdin.drain()


def run_supervisor(
    config: Config, document: Document, *, event_loop: EventLoop | None, path: str | None = None
) -> int:
    """Run ``config.workers`` relay processes until a signal stops them; the exit code.

    ``document`` is what ``config`` was parsed from; ``event_loop`` is
    ``run --event-loop``, for the workers. Raises ConfigError when the
    document cannot be handed to the workers. ``path`` is the configuration
    file, read again on SIGHUP. The supervisor's own loop is asyncio's.
    """
    logging.basicConfig(
        level=config.log.level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    supervisor = Supervisor(config, document, event_loop=event_loop, path=path)
    with asyncio.Runner() as runner:
        return runner.run(supervisor.run())
