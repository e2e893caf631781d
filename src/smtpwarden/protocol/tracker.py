"""The session tracker: pairs commands with replies and writes the records.

RFC 2920 3.1: "the server MUST send its responses in the same order as the
commands were received". The tracker keeps one queue of commands awaiting an
answer, whether the upstream or smtpwarden itself gives it, and releases
local answers only when every earlier command has been answered, so a
pipelining client always reads replies in order.

Transactions are followed by replies, never by commands: a pipelined RSET
must not close a transaction whose RCPT replies are still on their way. Each
transaction ends in exactly one ``TransactionRecord``; the session ends in a
``SessionRecord``. Times are passed in; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from smtpwarden.protocol.errors import LocalProtocolError
from smtpwarden.protocol.events import Bdat, Command, MailFrom, RcptTo, Verb
from smtpwarden.protocol.records import (
    Address,
    Outcome,
    ReplyInfo,
    SessionInfo,
    SessionRecord,
    Step,
    TransactionRecord,
    outcome_of,
    text_of,
)
from smtpwarden.protocol.replies import Reply
from smtpwarden.protocol.sequence import OutOfSequence, out_of_sequence
from smtpwarden.protocol.transaction import (
    Awaiting,
    MessageDigest,
    Replay,
    Transaction,
    params_of,
    replay_of,
    session_record,
    transaction_record,
)

# The session timeline keeps the commands outside transactions; a session
# can run thousands of transactions, so only the first steps are kept.
MAX_SESSION_STEPS = 64
# A transaction's timeline holds MAIL, every RCPT (at most limits.max_recipients
# reach the upstream), DATA or BDAT and the end; past this many steps a
# client sending NOOP in a loop only stops adding to it.
MAX_TRANSACTION_STEPS = 2048


class SessionTracker:
    """Follows one relayed session. See the module docstring."""

    def __init__(
        self,
        *,
        info: SessionInfo,
        now: float,
        epoch_offset: float = 0.0,
        replays: Callable[[Reply], bool] | None = None,
        contradicts: Callable[[Reply], bool] | None = None,
    ) -> None:
        """Start tracking at ``now``.

        ``now`` and every later time come from one monotonic clock;
        ``epoch_offset`` turns them into seconds since the epoch for the
        records' ``time`` fields. ``replays`` decides, under the retry and
        requeue policies, whether the reply that ends a sent message calls
        for a replay: then the transaction stays open, ``replay`` says what
        to replay, and ``end_replay`` closes it.

        ``contradicts`` says whether a 2xx reports a failure in its text or
        enhanced code. Such a reply to the end of a message that is not
        replayed ends the transaction as deferred, and its entry comes back
        from ``upstream_reply`` with ``contradicted`` set: the client must
        get a 4xx instead (PRODUCT.md, invariant 1).
        """
        self.info = info
        self._replays = replays
        self._contradicts = contradicts
        self.replay: Replay | None = None
        self._epoch = epoch_offset
        self.started_at = now
        self.helo: str | None = None
        self.banner: ReplyInfo | None = None
        self.records: list[TransactionRecord] = []
        # A list, not a deque: it holds a few entries (at most the pipelining
        # limit), and an idle session's empty list is a fraction of a deque's
        # first block.
        self._queue: list[Awaiting] = []
        self._queue.append(Awaiting(name="CONNECT", verb=None, sent_at=now, command=None))
        self._tx: Transaction | None = None
        self._count = 0
        self._steps: list[Step] = []
        self._body_kind: str | None = None  # of the message being sent
        self._digest = MessageDigest(data=False)
        self._last_bdat: Awaiting | None = None

    # -- what the queue holds ------------------------------------------------

    @property
    def awaiting(self) -> int:
        """Number of commands still waiting for a reply."""
        return len(self._queue)

    def owed(self) -> tuple[int, bool]:
        """Replies the upstream still owes, and whether one answers a message's end."""
        owed = [entry for entry in self._queue if entry.local is None]
        return len(owed), any(entry.body is not None for entry in owed)

    def oldest(self) -> Awaiting | None:
        """The command whose reply comes next, if any."""
        return self._queue[0] if self._queue else None

    def newest(self) -> Awaiting | None:
        """The command sent last that still awaits its reply, if any."""
        return self._queue[-1] if self._queue else None

    @property
    def in_transaction(self) -> bool:
        """True between an accepted MAIL and the transaction's end."""
        return self._tx is not None

    def out_of_sequence(self, verb: Verb, mail_open: bool, recipients: int) -> OutOfSequence | None:
        """Why RCPT, DATA or BDAT may not be relayed now; see ``protocol.sequence``."""
        tx, queue, kind = self._tx, self._queue, self._body_kind
        return out_of_sequence(verb, tx, queue, kind, mail_open, recipients)

    # -- client to upstream --------------------------------------------------

    def forwarded(self, command: Command, now: float, *, takes_over: bool = False) -> None:
        """Record that ``command`` was sent upstream.

        ``takes_over``, for a RCPT: a 4xx to it is answered 250 and the
        recipient left to the spool, if the upstream accepted an earlier
        one. ``upstream_reply`` returns its entry with ``takes_over`` still
        True when that happened.
        """
        verb = command.verb
        name = verb._value_  # the plain attribute: ``value`` is a Python-level property
        if isinstance(command, MailFrom):
            self._start_body(None)
        elif verb is Verb.DATA:
            self._start_body("data")
        elif isinstance(command, Bdat):
            if self._body_kind != "bdat":
                self._start_body("bdat")
            if command.last:
                name = "BDAT LAST"
        entry = Awaiting(name=name, verb=verb, sent_at=now, command=command, takes_over=takes_over)
        if isinstance(command, Bdat):
            self._last_bdat = entry
        self._queue.append(entry)

    def forwarded_continuation(self, verb: Verb, now: float) -> None:
        """Record a line sent upstream that is not a command (an AUTH response)."""
        self._queue.append(Awaiting(name=verb._value_, verb=verb, sent_at=now, command=None))

    def forwarded_hidden(self, name: str, now: float) -> None:
        """Record a command of the relay's own; its reply is never the client's."""
        self._queue.append(Awaiting(name=name, verb=None, sent_at=now, command=None, hidden=True))

    def answered_locally(
        self, command: Command | None, verb: Verb | None, reply: Reply, now: float
    ) -> bytes:
        """Record a command smtpwarden answers itself.

        Returns the bytes to send the client now: the reply if nothing
        earlier is still waiting, else nothing (it goes out with
        ``ready_replies`` once the earlier replies have been sent).
        """
        name = verb.value if verb is not None else "UNKNOWN"
        entry = Awaiting(name=name, verb=verb, sent_at=now, command=command, local=reply)
        if self._queue:
            self._queue.append(entry)
            return b""
        self._answer(entry, reply, now)
        return reply.raw

    def body(self, data: bytes | memoryview) -> None:
        """Account for message content sent upstream (the hot path)."""
        self._digest.update(data)

    def end_of_body(self, now: float, *, replayable: bool = True) -> None:
        """The message has been sent: DATA's terminator or BDAT LAST's chunk.

        ``replayable`` is False when no copy of the message is held (its
        route is passthrough): its end is then never replayed.
        """
        body = self._digest.result()
        if self._body_kind == "data":
            self._queue.append(
                Awaiting(
                    name=".",
                    verb=None,
                    sent_at=now,
                    command=None,
                    body=body,
                    replayable=replayable,
                )
            )
        elif self._last_bdat is not None:
            self._last_bdat.body = body
            self._last_bdat.replayable = replayable

    def chunk_sent(self, now: float) -> None:
        """A BDAT chunk's last octet went upstream: its reply is due from now on."""
        if self._last_bdat is not None:
            self._last_bdat.sent_at = now

    # -- upstream to client --------------------------------------------------

    def upstream_reply(self, reply: Reply, now: float) -> Awaiting | None:
        """Pair an upstream reply with the command it answers.

        Returns the answered command, or None for a reply nobody asked for
        (the caller treats that as a broken upstream).
        """
        if not self._queue or self._queue[0].local is not None:
            return None
        entry = self._queue.pop(0)
        self._answer(entry, reply, now)
        return entry

    def ready_replies(self, now: float) -> bytes:
        """Local replies that may go out now that earlier ones have."""
        out = b""
        while self._queue and self._queue[0].local is not None:
            entry = self._queue.pop(0)
            reply = entry.local
            assert reply is not None  # noqa: S101 - checked by the loop condition
            self._answer(entry, reply, now)
            out += reply.raw
        return out

    def close(
        self,
        *,
        reason: str,
        now: float,
        client_bytes: int,
        upstream_bytes: int,
        failure: ReplyInfo | None = None,
    ) -> SessionRecord:
        """End the session; an open transaction gets its record first.

        ``failure`` is the 421 that ended the session because the upstream
        failed (the upstream's own or smtpwarden's), or None when the client
        went away. A transaction whose message was sent but never answered
        ends as "unknown" (the RFC 1047 window); one the upstream failed, as
        "deferred"; one the client left, as "aborted". Commands still
        waiting may hold several transactions (a MAIL pipelined after a
        final dot): each gets its own record.
        """
        sent: tuple[int, str] | None = None
        for entry in self._queue:
            command = entry.command
            if isinstance(command, MailFrom) and entry.local is None:
                if self._tx is not None:
                    self._end_unanswered(failure, sent, now)
                self._open(entry, command, None)
                sent = None
            self._step(entry, None, now)
            sent = sent or entry.body
        self._queue.clear()
        if self._tx is not None:
            self._end_unanswered(failure, sent or self._tx.sent, now)
        return session_record(
            self.info,
            started=self.started_at + self._epoch,
            helo=self.helo,
            banner=self.banner,
            transactions=self._count,
            timeline=tuple(self._steps),
            end=reason,
            client_bytes=client_bytes,
            upstream_bytes=upstream_bytes,
            duration_ms=round((now - self.started_at) * 1000, 3),
        )

    def _end_unanswered(
        self, failure: ReplyInfo | None, sent: tuple[int, str] | None, now: float
    ) -> None:
        if sent is not None:
            outcome = Outcome.UNKNOWN
        else:
            outcome = Outcome.ABORTED if failure is None else Outcome.DEFERRED
        self._finish(failure, outcome, now, sent)

    def _start_body(self, kind: str | None) -> None:
        self._body_kind = kind
        self._digest = MessageDigest(data=kind == "data")
        self._last_bdat = None

    def _step(self, entry: Awaiting, reply: Reply | None, now: float) -> None:
        tx = self._tx
        origin = tx.started_at if tx is not None else self.started_at
        step = Step(
            command=entry.name,
            at_ms=round((entry.sent_at - origin) * 1000, 3),
            latency_ms=None if reply is None else round((now - entry.sent_at) * 1000, 3),
            code=None if reply is None else reply.code,
            local=entry.local is not None,
        )
        if tx is not None:
            if len(tx.steps) < MAX_TRANSACTION_STEPS:
                tx.steps.append(step)
        elif len(self._steps) < MAX_SESSION_STEPS:
            self._steps.append(step)

    def _open(self, entry: Awaiting, command: MailFrom, reply: Reply | None) -> None:
        self._count += 1
        mail_from = Address(
            address=text_of(command.path),
            params=params_of(command.params),
            reply=None if reply is None else ReplyInfo.of(reply, local=entry.local is not None),
        )
        self._tx = Transaction(
            number=self._count,
            started_at=entry.sent_at,
            mail_from=mail_from,
            recipients=[],
            steps=[],
            mail_command=command,
            accepted=[],
            taken_over=[],
        )

    def _answer(self, entry: Awaiting, reply: Reply, now: float) -> None:
        if entry.local is not None:
            # smtpwarden answered: the upstream never saw the command, so
            # its transaction goes on unchanged. Only the timeline shows it.
            self._step(entry, reply, now)
            return
        local = False
        command = entry.command
        tx = self._tx
        if isinstance(command, MailFrom) and tx is None:
            self._open(entry, command, reply)
            self._step(entry, reply, now)
            if reply.code // 100 != 2:
                self._finish(ReplyInfo.of(reply, local=local), outcome_of(reply), now)
            return
        match entry.verb:
            case None if entry.name == "CONNECT":
                self.banner = ReplyInfo.of(reply, local=local)
                self._step(entry, reply, now)
            case Verb.HELO | Verb.EHLO:
                # RFC 5321 4.1.4: an accepted EHLO or HELO resets the
                # transaction; a refused one leaves it as it was.
                accepted = reply.code // 100 == 2
                if tx is not None and accepted:
                    self._finish(None, Outcome.ABORTED, now)
                self._step(entry, reply, now)
                if accepted and command is not None:
                    self.helo = text_of(command.argument)
            case Verb.RCPT:
                self._step(entry, reply, now)
                # Taken over only once the upstream has accepted another
                # recipient: the message itself still goes through it.
                taken = entry.takes_over and reply.code // 100 == 4
                entry.takes_over = False
                if tx is not None and isinstance(command, RcptTo):
                    if reply.code // 100 == 2:
                        tx.accepted.append(command)
                    elif taken and tx.accepted:
                        tx.taken_over.append(command)
                        entry.takes_over = True
                    tx.recipients.append(
                        Address(
                            address=text_of(command.path),
                            params=params_of(command.params),
                            reply=ReplyInfo.of(reply, local=local),
                        )
                    )
            case Verb.DATA:
                self._step(entry, reply, now)
                if tx is not None:
                    if reply.code == 354:
                        tx.body = "data"
                    else:
                        self._finish(ReplyInfo.of(reply, local=local), outcome_of(reply), now)
            case Verb.BDAT:
                self._step(entry, reply, now)
                if tx is not None:
                    tx.body = "bdat"
                    if entry.body is not None or reply.code // 100 != 2:
                        # RFC 3030 4.2: after a 4xx or 5xx to a chunk "the
                        # transaction should be considered failed".
                        self._end_message(tx, entry, reply, now)
            case None if entry.name == ".":
                self._step(entry, reply, now)
                if tx is not None:
                    self._end_message(tx, entry, reply, now)
            case Verb.RSET | Verb.QUIT:
                self._step(entry, reply, now)
                if tx is not None and reply.code // 100 == 2:
                    self._finish(None, Outcome.ABORTED, now)
            case _:
                self._step(entry, reply, now)

    def _end_message(self, tx: Transaction, entry: Awaiting, reply: Reply, now: float) -> None:
        tx.sent = entry.body or tx.sent
        if (
            self._replays is not None
            and tx.sent is not None
            and tx.accepted
            and not tx.no_replay
            and entry.replayable
        ):
            if self._replays(reply):
                tx.replaying = True
                self.replay = replay_of(tx, self.info.session_id, reply)
                return
            if tx.taken_over and reply.code // 100 == 2:
                # Delivered upstream; the 2xx waits until the spool has
                # the recipients the relay took over (invariant 1).
                tx.replaying = True
                self.replay = replace(replay_of(tx, self.info.session_id, reply), delivered=True)
                return
        if reply.code // 100 == 2 and self._contradicts is not None and self._contradicts(reply):
            entry.contradicted = True
            self._finish(ReplyInfo.of(reply, local=False), Outcome.DEFERRED, now, tx.sent)
            return
        self._finish(ReplyInfo.of(reply, local=False), outcome_of(reply), now, tx.sent)

    def lost_message(self, now: float) -> bool:
        """The upstream went away: replay the message it may not have taken.

        If the oldest command awaiting a reply is the end of a sent message
        and replays are on, that command is taken off the queue (its step
        shows no reply), ``replay`` is set and True is returned.
        """
        tx = self._tx
        if self._replays is None or tx is None or not self._queue:
            return False
        if not tx.accepted or tx.no_replay:
            return False
        entry = self._queue[0]
        if entry.body is None or not entry.replayable:
            return False
        self._queue.pop(0)
        self._step(entry, None, now)
        tx.sent = entry.body
        tx.replaying = True
        tx.duplicate_risk = True
        self.replay = replay_of(tx, self.info.session_id, None)
        return True

    def stop_replays(self) -> None:
        """No replay for the open transaction (its held copy is gone)."""
        if self._tx is not None:
            self._tx.no_replay = True

    def end_replay(
        self,
        final: ReplyInfo | None,
        outcome: Outcome,
        attempts: int,
        now: float,
        *,
        duplicate_risk: bool = False,
    ) -> None:
        """Close the transaction a replay was for."""
        tx = self._tx
        if tx is None or not tx.replaying:
            raise LocalProtocolError("no transaction awaits a replay")
        tx.duplicate_risk = tx.duplicate_risk or duplicate_risk
        self.replay = None
        self._finish(final, outcome, now, tx.sent, attempts=attempts)

    def _finish(
        self,
        final: ReplyInfo | None,
        outcome: Outcome,
        now: float,
        body: tuple[int, str] | None = None,
        *,
        attempts: int = 1,
    ) -> None:
        tx = self._tx
        assert tx is not None  # noqa: S101 - every caller checks
        self._tx = None
        record = transaction_record(
            tx,
            self.info,
            helo=self.helo,
            started=tx.started_at + self._epoch,
            final=final,
            outcome=outcome,
            body=body,
            attempts=attempts,
            duration_ms=round((now - tx.started_at) * 1000, 3),
        )
        self.records.append(record)
