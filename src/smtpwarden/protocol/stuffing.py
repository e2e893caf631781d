"""Dot-stuffing: turning message octets into a DATA section (RFC 5321 4.5.2).

A message received with BDAT is held as plain octets. To replay it on an
upstream without CHUNKING it must travel as DATA, and 4.5.2 says how:
"Before sending a line of mail text, the SMTP client checks the first
character of the line. If it is a period, one additional period is inserted
at the beginning of the line." The section then ends with "<CRLF>.<CRLF>";
a message whose last line lacks its CRLF gets one, because the terminator's
CRLF is the end of the last line, never part of the message's text.

Rule 1: the output never holds a bare CR or LF. The input is refused
(``BareLineEnding``) as soon as one shows, before any octet of the chunk
holding it is released: a bare LF before a "." is how SMTP smuggling ends
data early on a lenient upstream, and 2.3.8 says a client "MUST NOT
transmit these characters except when they are intended as line
terminators". A CR at the end of a chunk is held back until the next chunk
shows whether an LF follows.

Rule 2: state is two flags, whatever the size of the message or its chunks;
chunks are never joined.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from smtpwarden.protocol.errors import BareLineEnding

CRLF = b"\r\n"
# RFC 5321 4.1.1.4: the terminator a DATA section ends with, after the CRLF
# that ends the message's last line.
TERMINATOR = b".\r\n"


def _bare(detail: str) -> BareLineEnding:
    # The message cannot be carried by DATA; the reply is for a caller that
    # wants to tell its own client (RFC 3463 5.6.0: other media error).
    return BareLineEnding(
        detail,
        code=554,
        enhanced="5.6.0",
        text="Message holds a bare CR or LF; DATA cannot carry it",
    )


def stuff(chunks: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    """Yield the DATA section for a message given as chunks of octets.

    The section is what a client sends after the 354: the message with every
    line that starts with "." given one more, a CRLF added if the message
    does not end with one, then ".<CRLF>". An empty message yields just
    ".<CRLF>". Chunk boundaries may fall anywhere, even inside a CRLF.

    Raises ``BareLineEnding`` (from the generator) when the message holds a
    CR not followed by LF or an LF not preceded by CR; nothing of the chunk
    holding it has been yielded then.
    """
    line_start = True  # the octets so far end with CRLF (or there are none)
    held_cr = False  # the last chunk ended with a CR, not yet yielded
    for chunk in chunks:
        data = bytes(chunk)
        if not data:
            continue
        head = b""
        if held_cr:
            if data[0] != 10:  # 10 is LF
                raise _bare("bare CR in message")
            head, data, line_start = CRLF, data[1:], True
        held_cr = data.endswith(b"\r")
        if held_cr:
            data = data[:-1]
        pairs = data.count(CRLF)
        if data.count(b"\n") != pairs:
            raise _bare("bare LF in message")
        if data.count(b"\r") != pairs:
            raise _bare("bare CR in message")
        if not data:
            if head:
                yield head
            continue
        if line_start and data[0] == 46:  # 46 is "."
            head += b"."
        if head:
            yield head
        yield data.replace(b"\r\n.", b"\r\n..")
        line_start = data.endswith(b"\n")
    if held_cr:
        raise _bare("bare CR at the end of the message")
    if not line_start:
        yield CRLF
    yield TERMINATOR
