"""Flow control: when to stop reading from a peer.

Reading from the client pauses for several independent reasons, and resumes
only when none is left. Keeping the reasons apart avoids the classic bug
where one reason's "resume" undoes another's "pause".
"""

from __future__ import annotations

import asyncio
from typing import Final

# Write buffer high-water mark per side: past it, reading from the other side
# pauses. 64 KiB is asyncio's own default and keeps a session's memory small.
WRITE_HIGH_WATER_BYTES = 64 * 1024


class Hold:
    """Why the client's input is not taken: bits, combined with ``|``.

    Each pauses reading from the client's socket at once, except the soft
    ones (``SOFT_HOLDS``), which pause it only once input waits behind them.

    Plain integers rather than an ``enum.IntFlag``: the gate tests and sets
    them several times per command, and flag arithmetic on an enum costs
    a few microseconds each time.
    """

    FLOW: Final = 1  # the upstream's write buffer is above its high-water mark
    VERDICT: Final = 2  # DATA or AUTH awaits the upstream's reply
    QUEUE: Final = 4  # too many pipelined commands await replies
    CONNECT: Final = 8  # the upstream is not ready yet
    CLIENT: Final = 16  # the client's write buffer is full: it is not reading replies
    REPLAY: Final = 32  # the end of a held message awaits its reply or a replay
    TLS: Final = 64  # a TLS handshake with the client is on its way


# Reasons that stop the session from taking the client's input without
# stopping the transport at once: the transport is paused only when input
# is actually waiting behind the hold (see ``ReadGate.overflowing``), so that
# neither more input nor the client's EOF is read ahead of it. A client that
# waits for its replies, as nearly all do, then costs no pause and resume of
# the socket per message.
SOFT_HOLDS: Final = Hold.VERDICT | Hold.CONNECT


class ReadGate:
    """Pauses and resumes reading from one transport, reason by reason."""

    __slots__ = ("_holds", "_paused", "_transport")

    def __init__(self, transport: asyncio.ReadTransport) -> None:
        self._transport = transport
        self._holds = 0
        self._paused = False  # the transport is paused

    def holds(self, reason: int) -> bool:
        """True while ``reason`` keeps reading paused."""
        return bool(self._holds & reason)

    def pause(self, reason: int) -> None:
        """Stop reading until ``resume(reason)`` (a soft reason: see SOFT_HOLDS)."""
        self._holds |= reason
        if reason & ~SOFT_HOLDS:
            self._stop()

    def resume(self, reason: int) -> None:
        """Lift one reason; read again when none is left."""
        if not self._holds & reason:
            return
        self._holds &= ~reason
        if not self._holds:
            self._start()

    def overflowing(self) -> None:
        """Input waits behind a hold: stop the transport until every hold lifts."""
        if self._holds:
            self._stop()

    def rebind(self, transport: asyncio.ReadTransport) -> None:
        """Go on with ``transport`` (the same connection, now encrypted)."""
        self._transport = transport
        if self._paused and not transport.is_closing():
            transport.pause_reading()

    def release(self) -> None:
        """Drop every reason and read again (to drain before closing)."""
        self._holds = 0
        self._start()

    def _stop(self) -> None:
        if not self._paused and not self._transport.is_closing():
            self._transport.pause_reading()
            self._paused = True

    def _start(self) -> None:
        if self._paused:
            self._paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()
