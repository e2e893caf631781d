"""Finding the end of a DATA section, safely, without a loop per line.

RFC 5321 4.1.1.4: the mail data ends with "<CRLF>.<CRLF>", and 2.3.8: "In
addition, the appearance of "bare" "CR" or "LF" characters in text (i.e.,
either without the other) has a long history of causing problems in mail
implementations ... SMTP client implementations MUST NOT transmit these
characters except when they are intended as line terminators and then MUST,
as indicated above, transmit them only as a <CRLF> sequence."

SMTP smuggling hides a second message behind an end marker that one server
reads as the end of data and another does not (``<LF>.<LF>``,
``<CR>.<CR>``, ``<LF>.<CR><LF>`` ...). Every such marker needs a bare CR or
LF, so ``DataReader`` refuses any bare CR or LF before a single byte of the
chunk that holds it is released: the upstream can only ever see the one end
marker smtpwarden itself found.

Each chunk costs one ``find`` and three ``count`` calls, all in C.
"""

from __future__ import annotations

from smtpwarden.protocol.errors import BareLineEnding


# The session cannot go on: the client's idea of where this message ends is
# not the RFC's, so nothing it sends next can be trusted to be a command.
# RFC 7504 521 closes the connection; Postfix answers the same way.
def _bare(detail: str) -> BareLineEnding:
    return BareLineEnding(
        detail, code=521, text="Bare CR or LF in message data is not allowed; closing connection"
    )


END_OF_DATA = b"\r\n.\r\n"
_CR = 13
# The marker is 5 octets: a marker that began in the previous chunk started
# at most 4 octets before this one, so 4 octets of history suffice.
_HISTORY = 4


class DataReader:
    """Scans DATA chunks for the end marker and for bare CR or LF.

    One reader serves one DATA section; ``reset`` readies it for the next.
    A CR at the very end of a chunk is held back (left unreleased) until the
    next chunk shows whether an LF follows, so every octet released has
    been judged in full and the upstream never sees half of a bad pair.
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        # The DATA command line ended with CRLF, so a body of just ".\r\n"
        # is an empty message: start as if CRLF had just been read.
        self._tail = b"\r\n"

    def reset(self) -> None:
        """Forget the previous section."""
        self._tail = b"\r\n"

    def scan(self, buf: bytes, start: int) -> tuple[int, bool]:
        """Scan ``buf[start:]`` (not empty) as body data.

        Returns ``(stop, done)``: ``buf[start:stop]`` may be released, and
        ``done`` says it ends with the end marker. Without the marker,
        ``stop`` is the end of ``buf``, less a final CR held back. Raises
        ``BareLineEnding`` if ``buf[start:stop]`` holds a bare CR or LF; then
        no part of the chunk may be released.
        """
        tail = self._tail
        head = tail + buf[start : start + _HISTORY]
        found = head.find(END_OF_DATA)
        done = True
        if 0 <= found < len(tail):
            stop = start + found + len(END_OF_DATA) - len(tail)
        else:
            found = buf.find(END_OF_DATA, start)
            if found >= 0:
                stop = found + len(END_OF_DATA)
            else:
                done = False
                stop = len(buf)
                if buf[stop - 1] == _CR:
                    stop -= 1
        if stop > start:
            # Every CR must start a CRLF pair and every LF end one.
            pairs = buf.count(b"\r\n", start, stop)
            if buf.count(b"\n", start, stop) != pairs:
                raise _bare("bare LF in message data")
            if buf.count(b"\r", start, stop) != pairs:
                raise _bare("bare CR in message data")
            if stop - start >= _HISTORY:
                self._tail = buf[stop - _HISTORY : stop]
            else:
                self._tail = (tail + buf[start:stop])[-_HISTORY:]
        return stop, done
