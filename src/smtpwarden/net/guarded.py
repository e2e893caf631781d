"""The session's side of guarded delivery: routes, replays and their answers.

Each transaction follows one route (``routing``): the first RCPT chooses
it, and decides whether the message is held for a replay. A RCPT, DATA or
BDAT that cannot belong to a transaction is refused here, never relayed
(``protocol.sequence``), and so is every BDAT chunk past a refused one, and
a command with 8-bit octets the upstream was not told to expect (RFC 6531).

Under retry and requeue, the session hands the end of a held message to
``replay.Guard`` when the upstream's verdict calls for a replay (or never
comes), and gives the client the replay's answer when it is there. Until
then nothing the client pipelined after the message is relayed, so replies
keep their order (RFC 2920 3.1).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import assert_never

from smtpwarden.net.ending import SessionEnd
from smtpwarden.net.flow import Hold
from smtpwarden.net.replay import ReplayResult
from smtpwarden.net.routing import Route
from smtpwarden.net.upstream import Target
from smtpwarden.protocol.errors import LocalProtocolError
from smtpwarden.protocol.events import Bdat, Command, MailFrom, RcptTo, Verb
from smtpwarden.protocol.records import ReplyInfo
from smtpwarden.protocol.replies import Reply
from smtpwarden.protocol.sequence import OutOfSequence

_now = time.monotonic


def asks_utf8(command: Command) -> bool:
    """True for a MAIL with the SMTPUTF8 parameter (RFC 6531 3.4)."""
    if not isinstance(command, MailFrom):
        return False
    return any(key.upper() == b"SMTPUTF8" for key, _ in command.params)


class GuardedSession(SessionEnd):
    """Replay glue between ``SessionEnd`` and ``Session``."""

    target: Target
    _route: Route | None  # the current transaction's, once it has a RCPT
    _recipients: int  # RCPTs sent in the current transaction
    _message_bytes: int  # octets of the current message so far
    _message_failed: bool  # a BDAT chunk was refused: so is the rest
    _chunking: bool  # the upstream offered CHUNKING (to the client's last EHLO)
    _chunk_last: bool  # the current BDAT chunk is the LAST one
    _chunk_dropped: bool  # the current BDAT chunk was refused locally
    _body_kind: str  # "data" or "bdat" for the message being sent
    _utf8: bool  # SMTPUTF8 was offered to the client's last EHLO
    _utf8_mail: bool  # the transaction's MAIL carried SMTPUTF8
    _mail_open: bool  # the client sent MAIL since the last RSET, greeting or message end
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
        self._mail_open = False
        self._in_body = False  # a chunk refused upstream left its message unended
        self._message_bytes = 0
        self._message_failed = False
        self._utf8_mail = False
        self._route = None
        self.guard.release()  # a held copy belongs to one transaction

    def _command_refusal(self, command: Command) -> Reply | None:
        """The reply refusing a command that must not be relayed; None if it may go on.

        BDAT is left to ``_start_chunk``, which must drop its chunk too.
        """
        verb = command.verb
        if verb is Verb.BDAT:
            return None
        if not command.line.isascii():
            refusal = self._non_ascii_refusal(command)
            if refusal is not None:
                return refusal
        if verb is Verb.RCPT or verb is Verb.DATA:
            return self._sequence_refusal(verb)
        return None

    def _non_ascii_refusal(self, command: Command) -> Reply | None:
        """The reply refusing a command line with 8-bit octets; None if it may go on.

        A UTF-8 mailbox needs SMTPUTF8 on its transaction's MAIL (RFC 6531
        3.4); anything else 8-bit needs SMTPUTF8 offered on this session,
        and then the upstream judges it.
        """
        replies = self.ctx.replies
        if isinstance(command, MailFrom):
            return None if asks_utf8(command) and self._utf8 else replies.non_ascii_address
        if isinstance(command, RcptTo):
            return None if self._utf8_mail else replies.non_ascii_address
        return None if self._utf8 else replies.non_ascii_command

    def _sequence_refusal(self, verb: Verb) -> Reply | None:
        """The reply refusing a RCPT, DATA or BDAT out of sequence; None if it may go on."""
        why = self.tracker.out_of_sequence(verb, self._mail_open, self._recipients)
        replies = self.ctx.replies
        match why:
            case None:
                return None
            case OutOfSequence.NEED_MAIL:
                return replies.need_mail
            case OutOfSequence.NEED_RCPT:
                return replies.need_rcpt
            case OutOfSequence.NO_VALID_RECIPIENTS:
                return replies.no_valid_recipients
            case OutOfSequence.DATA_AFTER_BDAT:
                return replies.data_after_bdat
            case _:
                assert_never(why)

    def _start_chunk(self, command: Bdat) -> bool:
        """Take a BDAT chunk on its way upstream; False if it is refused.

        A refused chunk is read and dropped so the stream stays in step
        (RFC 3030 2: the size says where it ends).
        """
        self._chunk_last = command.last
        replies = self.ctx.replies
        refusal = None if self._chunking else replies.chunking_not_offered
        refusal = refusal or self._sequence_refusal(Verb.BDAT)
        if refusal is not None:
            self._chunk_dropped = True
            self._refuse(command, Verb.BDAT, refusal)
            return False
        self._chunk_dropped = False
        self._message_bytes += command.size
        limit = self.ctx.config.limits.max_message_bytes
        if self._message_failed or (limit and self._message_bytes > limit):
            # Refused before a byte of it goes on, and so is every later
            # chunk: RFC 3030 4.2, the transaction has failed and the
            # client's RSET clears it. A chunk let through now would leave
            # a hole in the message.
            self._message_failed = True
            self._chunk_dropped = True
            self._in_body = False
            self.guard.release()
            self._answer(command, Verb.BDAT, replies.message_too_big)
            return False
        self._in_body = True
        self._body_kind = "bdat"
        self.guard.hold("bdat", self._message_route())
        return True

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
