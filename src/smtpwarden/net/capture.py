"""The session's transcript glue: what each hook in the session records.

The session calls these methods only when its ``_capture`` is set, behind
one ``is None`` check at each hook, so that a session without capture pays
nothing else. Each method turns what the session has at hand (an event, the
octets it writes, a reply, a TLS summary) into transcript entries
(``observe.transcript``), and ``_captured_end`` hands the finished
transcript to the listener's ``ListenerCapture``.

Rules kept here:
- Credentials never reach the recorder: AUTH lines, AUTH responses and
  XCLIENT ``LOGIN=`` are recorded through the redaction functions, on
  both legs (PRODUCT.md, invariant 5). The AUTH identity is recorded as an
  event once the upstream accepted it, as the records have it.
- Message content is recorded once, on the client leg, as it is relayed:
  the upstream gets the same octets (PRODUCT.md, invariant 2). Without
  bodies a message leaves one entry with its size and SHA-256.
- Nothing here changes what the session does.
"""

from __future__ import annotations

import asyncio
import time

from smtpwarden.net.admission import Address
from smtpwarden.net.context import ListenerContext
from smtpwarden.net.recording import Capture
from smtpwarden.net.tls import TlsInfo
from smtpwarden.net.upstream import Target
from smtpwarden.observe.transcript import (
    AUTH,
    CHUNK,
    DATA,
    END,
    OWN,
    REDACTED,
    Direction,
    octets,
    redact_line,
    redact_refused,
    redact_response,
    summary,
)
from smtpwarden.protocol.events import AuthResponse, BadCommand, Body, Event, Verb
from smtpwarden.protocol.records import SessionRecord, TransactionRecord
from smtpwarden.protocol.replies import Reply
from smtpwarden.protocol.tracker import SessionTracker
from smtpwarden.protocol.transaction import MessageDigest

_now = time.monotonic


class CapturingSession(asyncio.Protocol):
    """Transcript hooks of a session; see the module docstring."""

    ctx: ListenerContext
    tracker: SessionTracker
    _capture: Capture | None

    def _start_capture(self) -> None:
        """The session starts: record it if its listener's mode says so."""
        capture = self._capture = self.ctx.capture.begin(self.tracker.started_at)
        if capture is None:
            return
        client = self.tracker.info.client
        settings = capture.settings
        capture.recorder.add(
            self.tracker.started_at,
            Direction.EVENT,
            f"connection from {client.address}:{client.port} to listener {self.ctx.name}"
            f" (transcript mode {settings.mode}{', with bodies' if settings.bodies else ''})",
        )

    def _captured_event(self, text: str) -> None:
        capture = self._capture
        if capture is not None:
            capture.recorder.add(_now(), Direction.EVENT, text)

    def _captured_admitted(self, address: Address | None) -> None:
        """The client's real address is known: mode match may rule it out."""
        capture = self._capture
        if capture is not None and not self.ctx.capture.admits(capture, address):
            self._capture = None

    # -- the client leg ----------------------------------------------------------

    def _captured_client(self, event: Event) -> None:
        """What the client sent, but message content (see ``_captured_body``)."""
        capture = self._capture
        if capture is None or isinstance(event, Body):
            return
        tag: str | None
        if isinstance(event, AuthResponse):
            text, tag = redact_response(event.line), AUTH
        elif isinstance(event, BadCommand) and event.verb is Verb.AUTH:
            text, tag = f"{REDACTED}\r\n", AUTH
        elif isinstance(event, BadCommand):
            text, tag = redact_refused(event.line)
        else:
            text, tag = redact_line(event.line)
        capture.recorder.add(_now(), Direction.CLIENT_IN, text, tag)

    def _captured_body(self, data: bytes | memoryview, *, kind: str, done: bool) -> None:
        """Message content as it is relayed: DATA (``kind`` "data") or a BDAT chunk.

        ``done``: the message (DATA) or the chunk (BDAT) ends here.
        """
        capture = self._capture
        if capture is None:
            return
        now = _now()
        if capture.settings.bodies:
            tag = CHUNK if kind == "bdat" else END if done else DATA
            capture.recorder.add(now, Direction.CLIENT_IN, octets(data), tag)
            return
        digest = capture.digest
        if digest is None:
            digest = capture.digest = MessageDigest(data=kind == "data")
        digest.update(data)
        if done:
            capture.digest = None
            if kind == "bdat":
                capture.recorder.add(now, Direction.CLIENT_IN, summary("chunk", digest), CHUNK)
            else:
                capture.recorder.add(now, Direction.CLIENT_IN, summary("message", digest), END)

    def _captured_to_client(self, data: bytes) -> None:
        capture = self._capture
        if capture is not None:
            capture.recorder.add(_now(), Direction.CLIENT_OUT, octets(data))

    def _captured_client_tls(self, info: TlsInfo | None) -> None:
        if info is not None:
            peer = f", client certificate {info.peer}" if info.peer else ""
            self._captured_event(f"TLS with the client: {info.summary}{peer}")

    # -- the upstream leg --------------------------------------------------------

    def _captured_relayed(self, line: bytes) -> None:
        """A command line of the client's, as relayed upstream."""
        capture = self._capture
        if capture is not None:
            text, tag = redact_line(line)
            capture.recorder.add(_now(), Direction.UPSTREAM_OUT, text, tag)

    def _captured_response(self, line: bytes) -> None:
        """An AUTH response line, as relayed upstream."""
        capture = self._capture
        if capture is not None:
            capture.recorder.add(_now(), Direction.UPSTREAM_OUT, redact_response(line), AUTH)

    def _captured_own(self, line: bytes) -> None:
        """A line the relay sends upstream on its own behalf."""
        capture = self._capture
        if capture is not None:
            text, _ = redact_line(line)
            capture.recorder.add(_now(), Direction.UPSTREAM_OUT, text, OWN)

    def _captured_reply(self, reply: Reply) -> None:
        """A reply the upstream sent (the preamble's, or the session's)."""
        capture = self._capture
        if capture is None:
            return
        echo, capture.echo = capture.echo, b""
        if echo and reply.raw == echo:
            return  # the greeting, read once already during the preamble
        capture.recorder.add(_now(), Direction.UPSTREAM_IN, octets(reply.raw))

    def _captured_connecting(self, target: Target) -> None:
        capture = self._capture
        if capture is not None:
            capture.echo = b""
            where = f"{target.host}:{target.port}"
            self._captured_event(f"connecting to upstream {target.name} ({where})")

    def _captured_upstream(self, target: Target, secured: TlsInfo | None, greeting: bytes) -> None:
        """The session's upstream connection is ready; ``greeting`` is handed on next."""
        capture = self._capture
        if capture is None:
            return
        capture.echo = greeting
        where = f"{target.host}:{target.port}"
        self._captured_event(f"relaying to upstream {target.name} ({where})")
        if secured is not None:
            peer = f", certificate {secured.peer}" if secured.peer else ""
            checked = "" if target.tls.verify else " (certificate not verified)"
            self._captured_event(f"TLS with the upstream: {secured.summary}{peer}{checked}")

    # -- the end -----------------------------------------------------------------

    def _captured_records(self, records: list[TransactionRecord]) -> None:
        capture = self._capture
        if capture is not None:
            capture.add(records)

    def _captured_end(self, record: SessionRecord) -> None:
        """The session ended with ``record``: hand the transcript over."""
        capture = self._capture
        if capture is None:
            return
        self._capture = None
        recorder = capture.recorder
        now = _now()
        if capture.digest is not None:
            recorder.add(now, Direction.CLIENT_IN, "[message cut off: its end never came]", DATA)
        recorder.add(now, Direction.EVENT, f"session end: {record.end}")
        self.ctx.capture.finish(capture, self.tracker.info, record, self.ctx.epoch_offset)
