"""Transcript capture across the relay: modes, the run-time switch, writing, retention.

``Recording`` is the relay's: it holds one ``ListenerCapture`` per
listener, watches the control file that ``smtpwarden transcript capture``
writes (``capturecontrol``), writes finished transcripts through the event
loop's executor, and enforces retention. The relay's tick calls ``tick``
once a second.

``ListenerCapture`` says whether a new session is recorded (``begin``),
and whether a finished one is kept (``finish``):

- ``off``: nothing is recorded;
- ``failure``: recorded in a ring (``max_bytes``), kept when a transaction
  ended other than delivered, retried or requeued, or the session ended on
  a failure (``FAILED_ENDS``);
- ``always``: every session is kept;
- ``match``: kept when the session matches every criterion given (client
  network, any sender, any recipient), for the first ``sessions`` matching
  sessions to end (0: no limit). A client outside ``networks`` is not even
  recorded once its real address is known.

A session takes the settings in force when it starts; a mode switched at
run time applies to the sessions that start after it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import stat
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Final

from smtpwarden.capturecontrol import CaptureOverride, control_path, read_control
from smtpwarden.config import Config, ConfigError, ListenerConfig, ListenerTranscripts
from smtpwarden.configtranscripts import describe
from smtpwarden.net.admission import Address, allowed, client_address
from smtpwarden.observe.transcript import Recorder, address_matches, document
from smtpwarden.observe.transcripts import TranscriptStore, file_name
from smtpwarden.protocol.records import SessionInfo, SessionRecord, TransactionRecord
from smtpwarden.protocol.transaction import MessageDigest

log = logging.getLogger("smtpwarden.transcripts")

# Retention looks at the folder this often; transcripts past their age or
# the folder's size wait at most this long. Our choice.
RETENTION_INTERVAL_S: Final = 60.0

# A transcript keeps the records of a session's last transactions, and its
# header the first addresses: a session can run thousands of transactions,
# and a transcript is read by a person. Our choice.
MAX_RECORDS: Final = 1000
MAX_ADDRESSES: Final = 1000

# Outcomes that are a clean delivery: mode failure does not keep them.
CLEAN_OUTCOMES: Final = frozenset({"delivered", "retried", "requeued"})
# Session ends that are failures whatever the transactions say.
FAILED_ENDS: Final = frozenset(
    {
        "upstream_unreachable",
        "upstream_lost",
        "upstream_timeout",
        "upstream_malformed",
        "upstream_unsolicited",
        "upstream_421",
        "tls_failed",
        "bare_line_ending",
        "too_many_errors",
        "message_too_big",
    }
)


class Capture:
    """One session's capture while it runs.

    It keeps the session's last ``MAX_RECORDS`` transaction records for the
    file, and what the header and the mode need from all of them: their
    outcomes, their senders and recipients (the first ``MAX_ADDRESSES`` of
    each), whether one failed, and whether one matched mode match's
    addresses.
    """

    __slots__ = (
        "digest",
        "echo",
        "failed",
        "generation",
        "outcomes",
        "recipient_matched",
        "recipients",
        "recorder",
        "records",
        "sender_matched",
        "senders",
        "settings",
        "transactions",
    )

    def __init__(self, settings: ListenerTranscripts, start: float, generation: int) -> None:
        self.settings = settings
        self.generation = generation  # of the listener's settings when it started
        self.recorder = Recorder(
            start=start, max_bytes=settings.max_bytes, ring=settings.mode == "failure"
        )
        self.records: deque[TransactionRecord] = deque(maxlen=MAX_RECORDS)
        self.transactions = 0
        self.outcomes: dict[str, None] = {}
        self.senders: dict[str, None] = {}
        self.recipients: dict[str, None] = {}
        self.failed = False
        self.sender_matched = False
        self.recipient_matched = False
        # Size and hash of the message or chunk being relayed (bodies off).
        self.digest: MessageDigest | None = None
        # The greeting the preamble read and hands on again: not recorded twice.
        self.echo = b""

    def add(self, records: Iterable[TransactionRecord]) -> None:
        """Take the session's finished transactions."""
        match = self.settings.match
        for record in records:
            self.records.append(record)
            self.transactions += 1
            self.outcomes[record.outcome.value] = None
            self.failed = self.failed or record.outcome.value not in CLEAN_OUTCOMES
            sender = record.mail_from.address
            recipients = [rcpt.address for rcpt in record.recipients]
            _remember(self.senders, [sender])
            _remember(self.recipients, recipients)
            self.sender_matched = self.sender_matched or address_matches(sender, match.senders)
            self.recipient_matched = self.recipient_matched or any(
                address_matches(address, match.recipients) for address in recipients
            )


def _remember(kept: dict[str, None], addresses: Iterable[str]) -> None:
    for address in addresses:
        if len(kept) >= MAX_ADDRESSES:
            return
        kept[address] = None


class ListenerCapture:
    """The capture of one listener's sessions; see the module docstring."""

    def __init__(self, name: str, configured: ListenerTranscripts, recording: Recording) -> None:
        self.name = name
        self.configured = configured
        self._recording = recording
        self.override: CaptureOverride | None = None
        self.settings = configured
        self.generation = 0
        self.remaining: int | None = configured.match.sessions or None

    def set_override(self, override: CaptureOverride | None) -> None:
        """Apply what the control file says; the count of sessions starts again."""
        if override == self.override:
            return
        self.override = override
        self.settings = (
            self.configured if override is None else override.applied_to(self.configured)
        )
        self.generation += 1
        self.remaining = self.settings.match.sessions or None
        source = "configuration" if override is None else f"capture control, set {override.set_at}"
        log.info("listener %s: transcripts %s (%s)", self.name, describe(self.settings), source)

    def begin(self, now: float) -> Capture | None:
        """A session starts at ``now``: its capture, or None if it is not recorded."""
        settings = self.settings
        if settings.mode == "off" or self.remaining == 0:
            return None
        return Capture(settings, now, self.generation)

    def admits(self, capture: Capture, address: Address | None) -> bool:
        """False if mode match rules the client's real address out."""
        settings = capture.settings
        return settings.mode != "match" or allowed(address, settings.match.networks)

    def finish(
        self, capture: Capture, info: SessionInfo, record: SessionRecord, epoch: float
    ) -> None:
        """The session ended: write its transcript if its mode keeps it.

        ``epoch`` turns the session's clock into seconds since the epoch.
        """
        if not self._keeps(capture, info, record.end):
            return
        started = capture.recorder.start + epoch
        settings = capture.settings
        header: dict[str, object] = {
            "id": info.session_id,
            "listener": info.listener,
            "client": info.client,
            "upstream": info.upstream,
            "started": record.time,
            "duration_ms": record.duration_ms,
            "end": record.end,
            "mode": settings.mode,
            "bodies": settings.bodies,
            "tls": info.tls,
            "auth": info.auth,
            "helo": record.helo,
            "transactions": capture.transactions,
            "senders": list(capture.senders),
            "recipients": list(capture.recipients),
            "outcomes": list(capture.outcomes),
        }
        self._recording.save(file_name(info.session_id, started), header, capture, record)

    def _keeps(self, capture: Capture, info: SessionInfo, end: str) -> bool:
        match capture.settings.mode:
            case "always":
                return True
            case "failure":
                return capture.failed or end in FAILED_ENDS
            case "match":
                return self._matches(capture, info)
            case _:
                return False

    def _matches(self, capture: Capture, info: SessionInfo) -> bool:
        match = capture.settings.match
        if not allowed(client_address(info.client.address), match.networks):
            return False
        if (match.senders and not capture.sender_matched) or (
            match.recipients and not capture.recipient_matched
        ):
            return False
        if capture.generation == self.generation and self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        return True


class Recording:
    """The relay's transcripts: listeners, the control file, writing, retention."""

    def __init__(self, config: Config) -> None:
        settings = config.transcripts
        self.config = settings
        self.store = TranscriptStore(settings.path)
        self.control = control_path(settings.path)
        self.listeners: dict[str, ListenerCapture] = {}
        self._control_key: tuple[int, int, int] | None = None
        self._overrides: Mapping[str, CaptureOverride] = {}
        self._last_retention = -math.inf
        self._retaining: asyncio.Future[None] | None = None
        self._check_control()

    def listener(self, listener: ListenerConfig) -> ListenerCapture:
        """The capture of a listener's sessions, with any override already in force."""
        capture = ListenerCapture(listener.name, listener.transcripts, self)
        capture.set_override(self._overrides.get(listener.name))
        self.listeners[listener.name] = capture
        return capture

    def configure(self, config: Config) -> None:
        """A reload: new retention limits, and new captures for the listeners whose
        ``transcripts`` changed (live sessions keep theirs). ``transcripts.path``
        cannot change (``configreload``)."""
        self.config = config.transcripts
        for listener in config.listeners:
            capture = self.listeners.get(listener.name)
            if capture is None:
                self.listener(listener)
            elif capture.configured != listener.transcripts:
                self.listener(listener)
                log.info(
                    "listener %s: transcripts %s (configuration reloaded)",
                    listener.name,
                    describe(self.listeners[listener.name].settings),
                )

    def tick(self, now: float) -> None:
        """Once a second: apply a changed control file; retention every minute."""
        self._check_control()
        if now - self._last_retention >= RETENTION_INTERVAL_S and self._retaining is None:
            self._last_retention = now
            self._retaining = asyncio.get_running_loop().run_in_executor(None, self.retain)
            self._retaining.add_done_callback(self._retained)

    def retain(self) -> None:
        """One retention pass over the folder (blocking: runs in the executor)."""
        settings = self.config
        done = self.store.enforce(
            now=time.time(), max_age=settings.max_age, max_total_bytes=settings.max_total_bytes
        )
        if done.removed:
            log.info(
                "transcripts: %d removed (%d bytes); %d kept (%d bytes)",
                done.removed,
                done.removed_bytes,
                done.kept,
                done.kept_bytes,
            )

    def _retained(self, future: asyncio.Future[None]) -> None:
        self._retaining = None
        if not future.cancelled() and future.exception() is not None:
            log.error("transcript retention failed: %s", future.exception())

    def save(self, name: str, header: dict[str, object], capture: Capture, session: object) -> None:
        """Write a finished transcript through the executor, off the event loop."""
        loop = asyncio.get_running_loop()
        recorder, records = capture.recorder, capture.records
        written = loop.run_in_executor(None, self._write, name, header, recorder, records, session)
        written.add_done_callback(_report)

    def _write(
        self,
        name: str,
        header: dict[str, object],
        recorder: Recorder,
        records: Iterable[TransactionRecord],
        session: object,
    ) -> None:
        self.store.write(name, document(header, recorder, records, session))

    def _check_control(self) -> None:
        try:
            status = self.control.stat()
        except OSError:
            key, regular = None, True
        else:
            key = (status.st_mtime_ns, status.st_ino, status.st_size)
            regular = stat.S_ISREG(status.st_mode)
        if key == self._control_key:
            return
        self._control_key = key
        if not regular:
            # A FIFO or a device would block the event loop in open().
            log.error("capture control ignored: %s is not a regular file", self.control)
            return
        try:
            overrides = read_control(self.control)
        except ConfigError as error:
            log.error("capture control ignored: %s", error)
            return
        self._overrides = overrides
        for name in overrides.keys() - self.listeners.keys():
            if self.listeners:
                log.warning("capture control: no listener named %s", name)
        for name, capture in self.listeners.items():
            capture.set_override(overrides.get(name))


def _report(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("transcript not written: %s", future.exception())
