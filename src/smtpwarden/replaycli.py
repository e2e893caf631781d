"""``smtpwarden replay``: the client side of a transcript, sent to an SMTP server.

The steps come from ``observe.dialogue.replay_script``: every line the
relay passed upstream for the client, and each message as it was sent. The
replay behaves as a plain client: it reads the greeting, sends one command,
waits for its reply, and so on; after a 354 it sends the message octets
exactly as captured (dot-stuffing and ``.<CRLF>`` included), and a BDAT
line goes with its chunk. The server thus receives the octets the original
upstream received from the relay, commands one at a time. A message the
capture does not hold to its end is not completed: the replay closes the
connection instead, as the relay did. It ends with QUIT unless the capture
did.

With ``--starttls`` the replay says the capture's first EHLO, STARTTLS,
and after the handshake starts the captured session from the top.

Every line sent and received is printed (``emit``), and each reply whose
code differs from the original upstream's is followed by that reply.

Rule: never print, never exit; the dialogue goes to ``emit``, failures
raise ``ReplayFailed`` (``cli`` prints it, exit code 1).
"""

from __future__ import annotations

import argparse
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Final

from smtpwarden.config import parse_hostport
from smtpwarden.observe.dialogue import NotReplayable, Step, replay_script
from smtpwarden.protocol.errors import MalformedReply
from smtpwarden.protocol.replies import Reply, ReplyReader

# RFC 5321 4.5.3.2 asks clients to wait minutes; a replay against a test
# server wants an answer sooner. The default suits both; --timeout changes it.
TIMEOUT_S: Final = 60.0
READ_BYTES: Final = 65536  # one read from the server; our choice, as the relay's own reads
QUIT: Final = b"QUIT\r\n"


class ReplayFailed(Exception):
    """The replay could not be run or went wrong; the message says how."""


def _shown(data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace").removesuffix("\r\n")
    return [line.encode("unicode_escape").decode("ascii") for line in text.split("\r\n")]


class _Link:
    """One blocking connection to the server, reading whole replies."""

    def __init__(self, host: str, port: int, timeout: float, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.reader = ReplyReader()
        try:
            self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        except OSError as error:
            raise ReplayFailed(f"cannot connect to {host}:{port}: {error}") from error

    def send(self, data: bytes, shown: str | None = None) -> None:
        for line in [shown] if shown is not None else _shown(data):
            self.emit(f"C: {line}")
        try:
            self.sock.sendall(data)
        except OSError as error:
            raise ReplayFailed(f"sending failed: {error}") from error

    def reply(self, original: str | None = None) -> Reply:
        try:
            while (reply := self.reader.next_reply()) is None:
                data = self.sock.recv(READ_BYTES)
                if not data:
                    raise ReplayFailed("the server closed the connection")
                self.reader.receive_data(data)
        except MalformedReply as error:
            raise ReplayFailed(f"the server sent a malformed reply: {error}") from error
        except OSError as error:
            raise ReplayFailed(f"no reply: {error}") from error
        for line in _shown(reply.raw):
            self.emit(f"S: {line}")
        if original is not None and original[:3] != str(reply.code):
            self.emit(f"   (the original upstream answered: {original})")
        return reply

    def starttls(self, context: ssl.SSLContext, host: str) -> None:
        if self.reader.buffered:
            raise ReplayFailed("the server sent data after its 220 to STARTTLS")
        try:
            secured = context.wrap_socket(self.sock, server_hostname=host)
        except (OSError, ssl.SSLError) as error:
            raise ReplayFailed(f"TLS handshake failed: {error}") from error
        self.sock = secured
        self.emit(f"** TLS: {secured.version()} {(secured.cipher() or ('',))[0]}")

    def close(self) -> None:
        self.sock.close()


def _context(insecure: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _secure(link: _Link, steps: tuple[Step, ...], args: argparse.Namespace, host: str) -> None:
    greeting = next(
        (step.line for step in steps if step.line[:4].upper() in (b"EHLO", b"HELO")),
        b"EHLO localhost\r\n",
    )
    link.send(b"EHLO" + greeting[4:] if greeting[:4].upper() == b"HELO" else greeting)
    link.reply()
    link.send(b"STARTTLS\r\n")
    if link.reply().code != 220:
        raise ReplayFailed("the server refused STARTTLS")
    link.starttls(_context(args.insecure), host)


def _step(link: _Link, step: Step) -> bool:
    """Send one step and read its replies; False if the replay must stop here."""
    if step.kind == "bdat":
        shown = f"{step.line.decode('latin-1').strip()} [{len(step.body)} octets]"
        link.send(step.line + step.body, shown)
        reply = link.reply(step.original)
        return step.complete and reply.code != 421
    link.send(step.line)
    reply = link.reply(step.original)
    if reply.code == 421:
        return False
    if step.kind != "data" or reply.code != 354:
        return True
    if not step.complete:
        link.emit("** the capture does not hold this message to its end: closing, as the relay did")
        return False
    link.send(step.body, f"[message: {len(step.body)} octets, sent as captured]")
    return link.reply(step.original_end).code != 421


def run(content: Mapping[str, Any], args: argparse.Namespace, emit: Callable[[str], None]) -> None:
    """Replay a loaded transcript as ``args`` says (``to``, ``starttls``, ``insecure``,
    ``timeout``). Raises ReplayFailed; ConfigError for a bad ``--to``."""
    host, port = parse_hostport(args.to, what="--to")
    try:
        script = replay_script(content)
    except NotReplayable as error:
        raise ReplayFailed(f"{content['header'].get('id')}: cannot replay: {error}") from error
    emit(f"** replaying transcript {content['header'].get('id')} to {host}:{port}")
    for note in script.notes:
        emit(f"** {note}")
    link = _Link(host, port, args.timeout, emit)
    try:
        if link.reply().code != 220:
            raise ReplayFailed("the server did not greet with 220")
        if args.starttls:
            _secure(link, script.steps, args, host)
        quitted = False
        for step in script.steps:
            quitted = step.line.upper().startswith(QUIT[:4])
            if not _step(link, step):
                emit("** replay stopped")
                return
        if not quitted:
            link.send(QUIT)
            link.reply()
        emit("** replay done")
    finally:
        link.close()
