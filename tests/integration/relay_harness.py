"""Running a ``Relay`` in a background thread, and reading what it logged.

Each ``RunningRelay`` owns one thread with its own event loop, made by
``smtpwarden.net.loop.loop_factory`` (asyncio or uvloop), so a test drives it
from the main thread with blocking clients. Readiness is an event set once
every listener is bound; stopping schedules ``Relay.stop`` on the relay's
loop and waits for it.

Every record read back is checked against the JSON Schemas in
``smtpwarden/observe/schema/`` when they exist.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
from jsonschema.protocols import Validator

from smtpwarden.config import parse_config
from smtpwarden.net.loop import loop_factory
from smtpwarden.net.server import Relay

T = TypeVar("T")

LISTENER = "main"
UPSTREAM = "up"
HOSTNAME = "relay.test"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 20.0  # on top of the grace
WAIT_S = 10.0
POLL_S = 0.02  # between two looks at a condition that has no event to wait on

# Timeouts short enough that a test stuck on one fails fast, long enough not
# to fire on a busy machine.
TEST_TIMEOUTS: dict[str, float] = {
    "connect": 5.0,
    "banner": 20.0,
    "command": 20.0,
    "mail": 20.0,
    "rcpt": 20.0,
    "data_init": 20.0,
    "data_block": 20.0,
    "data_end": 20.0,
    "reply": 20.0,
}

SCHEMA_FILES = {
    "transaction": "transaction.schema.json",
    "session": "session.schema.json",
    "delivery": "delivery.schema.json",
}


@functools.cache
def load_schemas() -> dict[str, Validator]:
    """Return a validator per record type for each schema file present."""
    folder = resources.files("smtpwarden") / "observe" / "schema"
    validators: dict[str, Validator] = {}
    for record_type, name in SCHEMA_FILES.items():
        path = folder / name
        if not path.is_file():
            continue
        schema = json.loads(path.read_text(encoding="utf-8"))
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        validators[record_type] = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return validators


def validate_records(records: list[dict[str, Any]], first: int = 0) -> None:
    """Check each record against its schema, when the schema file exists.

    Raises AssertionError naming the first record that does not validate.
    """
    validators = load_schemas()
    for index, record in enumerate(records):
        validator = validators.get(record.get("type", ""))
        if validator is None:
            continue
        errors = sorted(validator.iter_errors(record), key=lambda error: list(error.path))
        if errors:
            details = "; ".join(
                f"{'/'.join(str(part) for part in error.path) or '(root)'}: {error.message}"
                for error in errors[:5]
            )
            raise AssertionError(
                f"log record {first + index} breaks its schema: {details}\n{record}"
            )


def read_records(path: Path) -> list[dict[str, Any]]:
    """Parse a transaction log: one JSON object per line."""
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def relay_config(
    *,
    loop_kind: str,
    upstream: Mapping[str, object],
    log_path: Path,
    limits: Mapping[str, object] | None = None,
    timeouts: Mapping[str, float] | None = None,
    shutdown: Mapping[str, float] | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The configuration document for one listener relaying to one upstream.

    ``extra`` adds or replaces top-level sections (routes, more upstreams);
    its ``health`` and ``http`` keys are laid over the test defaults: no
    timed health checks (they would be upstream connections no test made)
    and the HTTP endpoint on an ephemeral port.
    """
    extra = dict(extra or {})
    health = {"check_interval": 0, **_section(extra.pop("health", None))}
    http = {"port": 0, **_section(extra.pop("http", None))}
    return {
        "event_loop": loop_kind,
        "hostname": HOSTNAME,
        "listeners": [{"name": LISTENER, "host": "127.0.0.1", "port": 0, "upstream": UPSTREAM}],
        "upstreams": [{"name": UPSTREAM, **upstream}],
        "limits": dict(limits or {}),
        "timeouts": {**TEST_TIMEOUTS, **(timeouts or {})},
        "shutdown": dict(shutdown or {}),
        "log": {"transactions": str(log_path), "sessions": True, "level": "info"},
        "health": health,
        "http": http,
        **extra,
    }


def _section(raw: object) -> dict[str, object]:
    assert raw is None or isinstance(raw, dict), raw
    return dict(raw or {})


class RunningRelay:
    """A relay serving in its own thread and event loop."""

    def __init__(self, document: dict[str, object], log_path: Path) -> None:
        self.config = parse_config(document, source="test")
        self.log_path = log_path
        self.relay: Relay | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False
        self._validated = 0  # records of the log already checked against the schemas
        self.open_after_stop: list[str] = []
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise AssertionError("relay did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        factory, _ = loop_factory(self.config.event_loop)

        async def serve() -> None:
            relay = Relay(self.config)
            self.relay = relay
            self.loop = asyncio.get_running_loop()
            await relay.start()
            self._ready.set()
            await relay.stopped.wait()
            # Let callbacks already scheduled by the stop (connection_lost) run.
            await asyncio.sleep(0)
            # A session leaves the registry when its client connection is lost:
            # anything left is a client socket the stop did not close.
            self.open_after_stop = [session.tracker.info.session_id for session in relay.sessions]

        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(serve())
        except BaseException as error:  # reported to the test thread
            self._error = error
            self._ready.set()

    def _running(self) -> tuple[Relay, asyncio.AbstractEventLoop]:
        assert self.relay is not None
        assert self.loop is not None
        return self.relay, self.loop

    def address(self, listener: str = LISTENER) -> tuple[str, int]:
        relay, _ = self._running()
        return relay.address(listener)

    def http_address(self) -> tuple[str, int]:
        """Where the relay's HTTP endpoint listens."""
        relay, _ = self._running()
        address = self.call(relay.http_address)
        assert address is not None, "the HTTP endpoint is not running"
        return address

    def call(self, function: Callable[[], T], timeout: float = WAIT_S) -> T:
        """Run ``function`` on the relay's loop and return its result."""
        _, loop = self._running()

        async def run() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def begin_stop(self, grace: float) -> concurrent.futures.Future[None]:
        """Start a graceful stop, as SIGTERM does; return its future."""
        relay, loop = self._running()
        self._stopped = True
        return asyncio.run_coroutine_threadsafe(relay.stop(grace), loop)

    def stop(self, grace: float = 1.0) -> None:
        """Stop (if not already stopping), join the thread and close the log."""
        if not self._stopped:
            self.begin_stop(grace).result(grace + STOP_TIMEOUT_S)
        self.join(grace + STOP_TIMEOUT_S)

    def join(self, timeout: float) -> None:
        """Wait for a stop begun with ``begin_stop`` to end; close the log.

        Raises AssertionError if ``Relay.stop`` returned while client
        connections were still open, and re-raises what the relay's thread
        raised (such as the event loop refusing to close).
        """
        relay, _ = self._running()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "relay thread did not end"
        relay.close_log()
        # Whatever the closed loop left behind is reported now, in this test.
        gc.collect()
        assert not self.open_after_stop, (
            f"Relay.stop() returned with client connections still open "
            f"(sessions {self.open_after_stop}); the event loop then closes under them"
            + (f", and raised {self._error!r}" if self._error is not None else "")
        )
        if self._error is not None:
            raise self._error

    def wait_idle(self, timeout: float = WAIT_S) -> None:
        """Wait until the relay has seen every client connection go."""
        relay, _ = self._running()
        deadline = time.monotonic() + timeout
        while self.call(lambda: len(relay.sessions)):
            if time.monotonic() > deadline:
                raise AssertionError(f"client connections still open after {timeout} s")
            time.sleep(POLL_S)

    @property
    def stopping(self) -> bool:
        """True once a stop has been asked for."""
        return self._stopped

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def records(self, record_type: str | None = None) -> list[dict[str, Any]]:
        """The log so far (flushed first while the relay runs), schema-checked."""
        if self._thread.is_alive() and not self._stopped:
            relay, _ = self._running()
            self.call(relay.records.flush)
        records = read_records(self.log_path)
        # Each record is checked once, however often the log is read.
        validate_records(records[self._validated :], first=self._validated)
        self._validated = len(records)
        if record_type is None:
            return records
        return [record for record in records if record["type"] == record_type]

    def wait_records(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool],
        record_type: str | None = None,
        timeout: float = WAIT_S,
    ) -> list[dict[str, Any]]:
        """Poll the log until ``predicate(records)`` holds; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records(record_type)
            if predicate(records):
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"log condition not met within {timeout} s: {records}")
            time.sleep(POLL_S)


def check_log_invariants(records: list[dict[str, Any]]) -> None:
    """What must hold for any log besides its schema: one record per transaction."""
    for record_type, key in (("transaction", "transaction_id"), ("session", "session_id")):
        counts = Counter(record[key] for record in records if record["type"] == record_type)
        repeated = sorted(ident for ident, count in counts.items() if count > 1)
        assert not repeated, f"{record_type} records written more than once: {repeated[:10]}"


StartRelay = Callable[..., RunningRelay]
"""The ``start_relay`` fixture: start a relay in front of an upstream."""


def free_port() -> int:
    """A port that was free a moment ago, for programs that cannot bind port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


MAX_REPLY_BYTES = 1 << 20  # far beyond any reply; past it the peer is not speaking SMTP
REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])")


class WireClient:
    """A plain-socket SMTP client for raw bytes and misbehaving-client tests."""

    def __init__(self, address: tuple[str, int], timeout: float = WAIT_S) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        # Small writes go out at once, so a test controls how its bytes are split.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = b""

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_REPLY_BYTES:
                raise AssertionError(f"no line end in {len(self.buf)} octets of reply")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> tuple[int, bytes]:
        """Read one complete (possibly multi-line) reply: its code and raw bytes."""
        raw = b""
        while True:
            line = self._line()
            raw += line
            found = REPLY_LINE.match(line)
            assert found is not None, f"not a reply line: {line!r}"
            if found.group(2) == b" ":
                return int(found.group(1)), raw

    def expect(self, code: int) -> bytes:
        got, raw = self.reply()
        assert got == code, f"expected {code}, got {raw!r}"
        return raw

    def command(self, line: bytes, code: int) -> bytes:
        self.send(line)
        return self.expect(code)

    def start_transaction(
        self,
        mail_from: bytes = b"MAIL FROM:<sender@example.org>",
        rcpt_to: bytes = b"RCPT TO:<rcpt@example.net>",
    ) -> bytes:
        """Read the banner, say EHLO, MAIL and RCPT; return the EHLO reply."""
        self.expect(220)
        ehlo = self.command(b"EHLO client.test\r\n", 250)
        self.command(mail_from + b"\r\n", 250)
        self.command(rcpt_to + b"\r\n", 250)
        return ehlo

    def open_data(self) -> None:
        """Start a transaction and send DATA, up to the 354."""
        self.start_transaction()
        self.command(b"DATA\r\n", 354)

    def closed_by_peer(self) -> bool:
        """True if the peer has closed (EOF) once all buffered replies are read."""
        if self.buf:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def read_to_eof(self) -> bytes:
        """Everything the peer sends until it closes (bounded by the timeout)."""
        data, self.buf = self.buf, b""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
        raise AssertionError(f"peer still open after {self.timeout} s; read {data!r}")
