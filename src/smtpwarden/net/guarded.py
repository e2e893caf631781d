"""The session's side of guarded delivery: routes, replays and their answers.

Each transaction follows one route (``routing``): the first RCPT chooses
it, and decides whether the message is held for a replay.

Under retry and requeue, the session hands the end of a held message to
``replay.Guard`` when the upstream's verdict calls for a replay (or never
comes), and gives the client the replay's answer when it is there. Until
then nothing the client pipelined after the message is relayed, so replies
keep their order (RFC 2920 3.1).
"""

from __future__ import annotations

import time
from dataclasses import replace

from smtpwarden.net.ending import SessionEnd
from smtpwarden.net.flow import Hold
from smtpwarden.net.replay import ReplayResult
from smtpwarden.net.routing import Route
from smtpwarden.net.upstream import Target
from smtpwarden.protocol.errors import LocalProtocolError
from smtpwarden.protocol.events import Command, RcptTo
from smtpwarden.protocol.records import ReplyInfo

_now = time.monotonic


class GuardedSession(SessionEnd):
    """Replay glue between ``SessionEnd`` and ``Session``."""

    target: Target
    _route: Route | None  # the current transaction's, once it has a RCPT
    _recipients: int  # RCPTs sent in the current transaction
    _message_bytes: int  # octets of the current message so far
    _message_failed: bool  # a BDAT chunk was refused: so is the rest
    _awaiting_end: bool
    _resume_pump: bool
    _quitting: bool
    _client_eof: bool

    def _pump_client(self) -> None:
        """Relay what the client sent; see ``Session``."""
        raise NotImplementedError

    def _new_transaction(self) -> None:
        """MAIL, RSET, EHLO or HELO: what belonged to the last transaction goes."""
        self._recipients = 0
        self._message_bytes = 0
        self._message_failed = False
        self._route = None
        self.guard.release()  # a held copy belongs to one transaction

    def _message_route(self) -> Route:
        """The route the message now starting follows.

        After AUTH it is relayed as under passthrough: a replay or a spool
        delivery could not authenticate again, since the relay keeps no
        credentials, and an upstream that wants AUTH would refuse it for
        good. The client, told 4xx, tries again itself.
        """
        route = self._route or self.ctx.routes.default
        if route.guarded and self.tracker.info.auth is not None:
            return replace(route, policy="passthrough")
        return route

    def _same_route(self, command: Command) -> bool:
        """True if this RCPT follows the transaction's route (its first RCPT sets it)."""
        routes = self.ctx.routes
        if not routes.by_domain:
            return True
        assert isinstance(command, RcptTo)  # noqa: S101 - the parser's type for RCPT
        route = routes.for_recipient(command.path)
        if self._route is None:
            self._route = route
        return route is self._route

    def _replay_lost(self) -> bool:
        """Replay a sent message whose reply will not come, if the policy says so."""
        if self.guard.held is None or self.guard.replaying:
            return False
        if self.ctx.config.retry.lost_outcome != "retry" or not self.tracker.lost_message(_now()):
            return False
        self._abort_upstream()
        self._start_replay()
        return True

    def _release_held(self) -> None:
        self.guard.release()
        self._awaiting_end = False
        self.gate.resume(Hold.REPLAY)
        self._resume_pump = True

    def _start_replay(self) -> None:
        wanted = self.tracker.replay
        if wanted is None:
            raise LocalProtocolError("a replay with nothing to replay")
        self._awaiting_end = True
        self.gate.pause(Hold.REPLAY)
        if self._capture is not None:
            self._captured_event("the message's end calls for a replay on a fresh connection")
        self.guard.start(wanted, self.target, self._replayed)

    def _replayed(self, result: ReplayResult) -> None:
        if self._closed:
            return
        info = ReplyInfo.of(result.reply, local=result.local)
        if self._capture is not None:
            outcome, attempts = result.outcome.value, result.attempts
            self._captured_event(f"replay: {outcome} after {attempts} attempts: {info.code}")
        self.tracker.end_replay(
            info, result.outcome, result.attempts, _now(), duplicate_risk=result.duplicate_risk
        )
        self._write_records()
        self._to_client.append(result.reply.raw)
        if self.upstream is None:
            # The upstream connection went with the lost reply; the message
            # has its answer, and the session ends here.
            self._end(self.ctx.replies.upstream_failed, "upstream_lost")
            return
        self._release_held()
        self._resume_pump = False
        self._pump_client()
        self._flush()
        if self._all_answered():
            self._end(None, "quit" if self._quitting else "client_closed")

    def _all_answered(self) -> bool:
        """The client said QUIT or half-closed, and has every reply it awaits."""
        return (
            (self._quitting or self._client_eof)
            and not self.tracker.awaiting
            and not self._awaiting_end
            and not self.guard.replaying
        )
