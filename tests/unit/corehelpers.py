"""Helpers for feeding the protocol core in every possible split."""

from __future__ import annotations

from collections.abc import Iterator

from smtpwarden.protocol.errors import RemoteProtocolError
from smtpwarden.protocol.events import AuthResponse, BadCommand, Body, Command, Signal, Verb
from smtpwarden.protocol.replies import Reply, ReplyReader
from smtpwarden.protocol.server import ServerConnection
from smtpwarden.protocol.state import ServerState


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Yield ``data`` whole, byte by byte, and cut in two at every offset."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


Summary = tuple[str, bytes]


def summarize_server(chunks: list[bytes], *, accept_data: bool = True) -> list[Summary]:
    """Feed a ServerConnection and describe what came out.

    Consecutive Body events are merged (how the body was cut depends on the
    split); DATA is answered with 354 when ``accept_data`` is set. AUTH and
    STARTTLS are taken as refused (commands follow). Errors raised by the
    core end the list with ("error", reply bytes).
    """
    conn = ServerConnection()
    out: list[Summary] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as error:
                out.append(("error", error.reply_bytes()))
                return out
            if isinstance(event, Signal):
                if event is Signal.PAUSED:
                    if conn.state is ServerState.AWAIT_AUTH:
                        conn.auth_done()
                    elif conn.state is ServerState.AWAIT_TLS:
                        conn.refuse_tls()
                    elif accept_data:
                        conn.start_data()
                    else:
                        conn.refuse_data()
                    continue
                break
            describe(out, event)
    return out


def describe(out: list[Summary], event: object) -> None:
    """Add ``event`` to ``out``; a Body is merged with the body before it."""
    if isinstance(event, Body):
        data = bytes(event.data)
        if not data:
            pass
        elif out and out[-1][0] == "body":
            out[-1] = ("body", out[-1][1] + data)
        else:
            out.append(("body", data))
        if event.done:
            out.append(("done", b""))
    elif isinstance(event, AuthResponse):
        out.append(("response", event.line))
    elif isinstance(event, BadCommand):
        out.append(("bad", event.error.reply_bytes()))
    elif isinstance(event, Command):
        out.append((event.verb.value, event.line))


def read_replies(chunks: list[bytes], **limits: int) -> list[Reply]:
    """Feed a ReplyReader and return the complete replies."""
    reader = ReplyReader(**limits)
    replies = []
    for chunk in chunks:
        reader.receive_data(chunk)
        while (reply := reader.next_reply()) is not None:
            replies.append(reply)
    return replies


__all__ = ["Verb", "read_replies", "splits", "summarize_server"]
