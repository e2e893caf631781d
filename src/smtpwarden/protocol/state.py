"""State machines of the protocol core: enums and transition tables.

Rule 1: every state change goes through a table, ``(state, input) -> next``.
Rule 2: a pair missing from the table is a bug in the caller; the machine
moves to ERROR, raises ``LocalProtocolError``, and every later call fails.
"""

from __future__ import annotations

import enum

from smtpwarden.protocol.errors import LocalProtocolError


class ServerState(enum.Enum):
    """Where the client-facing reader is in the byte stream."""

    # Members are singletons: hashed by identity in C (Enum's own hash
    # is a Python call), as dict keys on the hot path.
    __hash__ = object.__hash__

    COMMAND = "command"  # reading command lines
    AWAIT_DATA = "await data"  # DATA sent upstream; its reply decides what follows
    DATA = "data"  # reading the body up to <CRLF>.<CRLF>
    CHUNK = "chunk"  # reading the octets of one BDAT chunk
    AWAIT_AUTH = "await auth"  # AUTH or a response sent; the upstream's reply decides
    AUTH_RESPONSE = "auth response"  # reading one line of an AUTH exchange (RFC 4954 4)
    AWAIT_TLS = "await tls"  # STARTTLS read; nothing more is read until TLS or refusal
    ERROR = "error"  # the stream can no longer be trusted


class ServerInput(enum.Enum):
    """What moves the client-facing reader."""

    # Members are singletons: hashed by identity in C (Enum's own hash
    # is a Python call), as dict keys on the hot path.
    __hash__ = object.__hash__

    DATA_COMMAND = "DATA command"
    DATA_ACCEPTED = "upstream answered 354"
    DATA_REFUSED = "upstream refused DATA"
    END_OF_DATA = "end of data"
    BDAT_COMMAND = "BDAT command"
    END_OF_CHUNK = "end of chunk"
    AUTH_COMMAND = "AUTH command"
    AUTH_CHALLENGE = "upstream answered 334"
    AUTH_ENDED = "AUTH exchange ended"
    END_OF_AUTH_RESPONSE = "end of AUTH response"
    AUTH_RESPONSE_REFUSED = "AUTH response refused"
    STARTTLS_COMMAND = "STARTTLS command"
    DISCARD = "discard pipelined octets"
    TLS_STARTED = "TLS handshake done"
    TLS_REFUSED = "STARTTLS refused"


SERVER_TRANSITIONS: dict[tuple[ServerState, ServerInput], ServerState] = {
    (ServerState.COMMAND, ServerInput.DATA_COMMAND): ServerState.AWAIT_DATA,
    (ServerState.AWAIT_DATA, ServerInput.DATA_ACCEPTED): ServerState.DATA,
    (ServerState.AWAIT_DATA, ServerInput.DATA_REFUSED): ServerState.COMMAND,
    (ServerState.DATA, ServerInput.END_OF_DATA): ServerState.COMMAND,
    (ServerState.COMMAND, ServerInput.BDAT_COMMAND): ServerState.CHUNK,
    (ServerState.CHUNK, ServerInput.END_OF_CHUNK): ServerState.COMMAND,
    # RFC 4954 4: after AUTH, and after each response line, only the
    # upstream's reply says whether the next line is a response (334) or a
    # command (any other reply). Refusing AUTH inside a transaction (503)
    # is the shell's decision, like any other refusal: it ends the exchange.
    (ServerState.COMMAND, ServerInput.AUTH_COMMAND): ServerState.AWAIT_AUTH,
    (ServerState.AWAIT_AUTH, ServerInput.AUTH_CHALLENGE): ServerState.AUTH_RESPONSE,
    (ServerState.AWAIT_AUTH, ServerInput.AUTH_ENDED): ServerState.COMMAND,
    (ServerState.AUTH_RESPONSE, ServerInput.END_OF_AUTH_RESPONSE): ServerState.AWAIT_AUTH,
    (ServerState.AUTH_RESPONSE, ServerInput.AUTH_RESPONSE_REFUSED): ServerState.COMMAND,
    # RFC 3207 4 and 5: after STARTTLS nothing is read until the handshake
    # (pipelined octets discarded, a fresh session after it) or a refusal.
    (ServerState.COMMAND, ServerInput.STARTTLS_COMMAND): ServerState.AWAIT_TLS,
    (ServerState.AWAIT_TLS, ServerInput.DISCARD): ServerState.AWAIT_TLS,
    (ServerState.AWAIT_TLS, ServerInput.TLS_STARTED): ServerState.COMMAND,
    (ServerState.AWAIT_TLS, ServerInput.TLS_REFUSED): ServerState.COMMAND,
}


class ServerMachine:
    """Holds a ``ServerState`` and moves it only along ``SERVER_TRANSITIONS``."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = ServerState.COMMAND

    def move(self, event: ServerInput) -> ServerState:
        """Apply ``event``; return the new state or raise ``LocalProtocolError``."""
        nxt = SERVER_TRANSITIONS.get((self.state, event))
        if nxt is None:
            current = self.state
            self.state = ServerState.ERROR
            raise LocalProtocolError(f"{event.value!r} is not allowed in state {current.value!r}")
        self.state = nxt
        return nxt

    def fail(self) -> None:
        """Move to ERROR after the peer broke the protocol."""
        self.state = ServerState.ERROR
