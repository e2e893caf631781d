"""TLS-capable upstreams for the integration tests, on 127.0.0.1 with an ephemeral port.

``ScriptedTlsUpstream`` speaks just enough SMTP over blocking sockets to
record every command line with the leg it came on (plaintext or TLS), with
STARTTLS or implicit TLS, and can misbehave on purpose: refuse STARTTLS, or
send octets right after its 220 to STARTTLS (a STARTTLS injection).

``AiosmtpdTlsUpstream`` runs aiosmtpd, a real server implementation, with
STARTTLS required before MAIL, or with implicit TLS, and records each
message its handler is given.

Both serve in background threads; every wait is bounded by a deadline and
readiness is the bound listening socket, never a sleep.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

from integration.recording_upstreams import (
    DEFAULT_EHLO,
    PeerClosed,
    SocketUpstream,
    ThreadedServer,
    _LineReader,
)

STARTTLS_READY = b"220 2.0.0 Ready to start TLS\r\n"


def server_side(leaf: trustme.LeafCert) -> ssl.SSLContext:
    """A server context serving ``leaf``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    return context


def write_pair(leaf: trustme.LeafCert, folder: Path, name: str) -> tuple[str, str]:
    """Write ``leaf``'s chain and key as PEM files; return their paths."""
    certificate, key = folder / f"{name}.pem", folder / f"{name}.key"
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(certificate), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    return str(certificate), str(key)


@dataclass(frozen=True)
class Section:
    """A held DATA section, handed out whole."""

    section: bytes

    @property
    def size(self) -> int:
        return len(self.section)

    def chunks(self) -> Iterator[bytes | memoryview]:
        return iter((self.section,))


@dataclass
class TlsConnection:
    """What one connection received, and how its TLS went."""

    commands: list[bytes] = field(default_factory=list)  # CRLF included
    secure: list[bool] = field(default_factory=list)  # per command: came over TLS
    data: list[bytes] = field(default_factory=list)  # DATA sections as received
    version: str | None = None  # TLS version once a handshake succeeded
    server_name: str | None = None  # the SNI the client sent, if any
    client_subject: object = None  # the client certificate's subject, if any
    handshake_error: str | None = None
    ended: bool = False

    def plaintext(self) -> list[bytes]:
        return [line for line, secure in zip(self.commands, self.secure, strict=True) if not secure]


class _HandshakeFailed(Exception):
    pass


class ScriptedTlsUpstream(SocketUpstream[TlsConnection]):
    """A scripted SMTP server with STARTTLS or implicit TLS, recording everything.

    ``context`` is the server's TLS context (its SNI callback is set here).
    ``offer_starttls`` puts STARTTLS in the plaintext EHLO reply;
    ``starttls_reply`` answers STARTTLS (anything but a 220 keeps the session
    in plaintext) and ``after_starttls`` is sent in the same write, right
    after it. ``replies`` maps an upper-cased verb (or "." for the end of
    data) to raw reply bytes that replace the usual reply.
    """

    name = "tls-upstream"

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        implicit: bool = False,
        offer_starttls: bool = True,
        starttls_reply: bytes = STARTTLS_READY,
        after_starttls: bytes = b"",
        ehlo: tuple[str, ...] = DEFAULT_EHLO,
        replies: dict[str, bytes] | None = None,
    ) -> None:
        self.context = context
        self.implicit = implicit
        self.offer_starttls = offer_starttls
        self.starttls_reply = starttls_reply
        self.after_starttls = after_starttls
        self.ehlo = ehlo
        self.replies = dict(replies or {})
        self._names: list[str | None] = []
        context.sni_callback = self._on_server_name
        super().__init__(TlsConnection)

    def _on_server_name(self, _conn: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        with self._changed:
            self._names.append(name)

    def _handshake(self, sock: socket.socket, record: TlsConnection) -> ssl.SSLSocket:
        try:
            secure = self.context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as error:
            with self._changed:
                record.handshake_error = str(error) or type(error).__name__
                self._changed.notify_all()
            raise _HandshakeFailed from None
        with self._changed:
            record.version = secure.version()
            record.server_name = self._names[-1] if self._names else None
            peer = secure.getpeercert()
            record.client_subject = peer.get("subject") if peer else None
            self._open.append(secure)
            self._changed.notify_all()
        return secure

    def _ehlo_reply(self, secure: bool) -> bytes:
        keywords = list(self.ehlo)
        if self.offer_starttls and not secure and not self.implicit:
            keywords.append("STARTTLS")
        lines = ["tls-upstream.test", *keywords]
        out = [f"250-{line}\r\n" for line in lines[:-1]] + [f"250 {lines[-1]}\r\n"]
        return "".join(out).encode("ascii")

    def _serve(self, sock: socket.socket, record: TlsConnection) -> None:
        secure = False
        try:
            if self.implicit:
                sock = self._handshake(sock, record)
                secure = True
            lines = _LineReader(sock)
            sock.sendall(b"220 tls-upstream.test ESMTP scripted\r\n")
            while True:
                line = lines.line()
                with self._changed:
                    record.commands.append(line)
                    record.secure.append(secure)
                    self._changed.notify_all()
                verb = line.split(b" ")[0].strip().upper()
                if verb == b"STARTTLS" and not secure and self.offer_starttls:
                    sock.sendall(self.starttls_reply + self.after_starttls)
                    if self.starttls_reply.startswith(b"220"):
                        sock = self._handshake(sock, record)
                        secure = True
                        lines = _LineReader(sock)
                elif verb in (b"EHLO", b"HELO"):
                    sock.sendall(self._ehlo_reply(secure))
                elif verb == b"DATA":
                    sock.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    section = lines.data_section()
                    with self._changed:
                        record.data.append(section)
                        self._changed.notify_all()
                    sock.sendall(self.replies.get(".", b"250 2.0.0 Ok: queued\r\n"))
                elif verb == b"QUIT":
                    sock.sendall(b"221 2.0.0 Bye\r\n")
                    return
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    sock.sendall(self.replies.get(verb.decode("ascii"), b"250 2.0.0 Ok\r\n"))
                else:
                    refused = b"502 5.5.2 Error: command not recognized\r\n"
                    sock.sendall(self.replies.get(verb.decode("ascii", "replace"), refused))
        except (_HandshakeFailed, PeerClosed, OSError):
            pass
        finally:
            with self._changed:
                record.ended = True
                self._changed.notify_all()
            sock.close()


@dataclass
class Received:
    """One message aiosmtpd's handler was given, and the leg it came on."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool


class _Handler:
    def __init__(self, owner: AiosmtpdTlsUpstream) -> None:
        self.owner = owner

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        transport = server.transport
        secure = transport is not None and transport.get_extra_info("ssl_object") is not None
        received = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            content=envelope.original_content or b"",
            tls=secure,
        )
        with self.owner.changed:
            self.owner.received.append(received)
            self.owner.changed.notify_all()
        return "250 2.0.0 Ok: received"


class AiosmtpdTlsUpstream(ThreadedServer):
    """aiosmtpd in a thread: STARTTLS required before MAIL, or implicit TLS."""

    name = "aiosmtpd TLS upstream"

    def __init__(self, context: ssl.SSLContext, *, implicit: bool = False) -> None:
        super().__init__()
        self.received: list[Received] = []
        self._context = context
        self._implicit = implicit
        self._start(context if implicit else None)

    def factory(self) -> SMTP:
        options: dict[str, Any] = {"hostname": "aiosmtpd-tls.test"}
        if not self._implicit:
            options.update(tls_context=self._context, require_starttls=True)
        return SMTP(_Handler(self), **options)
