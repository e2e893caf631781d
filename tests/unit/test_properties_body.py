"""Properties of the DATA end-of-data scanner (``protocol/body.py``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.protocol.body import END_OF_DATA, DataReader
from smtpwarden.protocol.errors import BareLineEnding
from strategies import cut, cut_points, octets, scaled

# Streams where end markers, smuggling markers and held CRs are common.
_tokens = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"x", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n"]
)
streams = st.lists(_tokens, max_size=30).map(b"".join)


def bare(data: bytes) -> bool:
    """True if ``data`` holds a CR not followed by LF or an LF not after a CR."""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


class Scan:
    """Drive a DataReader the way ServerConnection does: unreleased octets stay."""

    def __init__(self) -> None:
        self.reader = DataReader()
        self.pending = b""
        self.released = b""
        self.done = False
        self.failed: int | None = None

    def feed(self, chunk: bytes, junk: bytes) -> None:
        # ``junk``: octets already consumed before ``start`` in the same buffer.
        if self.done or self.failed is not None:
            return
        self.pending += chunk
        while self.pending and not self.done:
            buf = junk + self.pending
            start = len(junk)
            try:
                stop, done = self.reader.scan(buf, start)
            except BareLineEnding as error:
                self.failed = error.code  # RFC 7504 521: the session ends
                return
            assert start <= stop <= len(buf)
            if not done:
                # Only a final CR may be held back.
                assert buf[stop:] in (b"", b"\r")
            self.released += buf[start:stop]
            self.pending = buf[stop:]
            self.done = done
            if stop == start:
                return


@scaled(cap=10_000)
@given(streams, cut_points, octets(max_size=6))
def test_scanning_finds_the_first_end_marker_and_refuses_any_bare_line_ending(
    stream: bytes, points: list[int], junk: bytes
) -> None:
    scan = Scan()
    for chunk in cut(stream, points):
        scan.feed(chunk, junk)
    # RFC 5321 4.1.1.4: the data ends at the first <CRLF>.<CRLF>; the CRLF
    # that ended the DATA line counts as the first one.
    found = (b"\r\n" + stream).find(END_OF_DATA)
    if found >= 0:
        section = stream[: found + len(END_OF_DATA) - 2]
    else:
        section = stream[:-1] if stream.endswith(b"\r") else stream
    # Nothing released ever holds a bare CR or LF, and nothing past the end.
    assert not bare(scan.released)
    assert section.startswith(scan.released)
    if bare(section):
        assert scan.failed == 521
        assert not scan.done
    else:
        assert scan.failed is None
        assert scan.released == section
        assert scan.done == (found >= 0)


@given(streams, st.integers(1, 8))
def test_reset_forgets_the_previous_section(stream: bytes, step: int) -> None:
    # A section ended (or left) in any state reads the next one afresh.
    used = Scan()
    for i in range(0, len(stream), step):
        used.feed(stream[i : i + step], b"")
    used.reader.reset()
    fresh = DataReader()
    for message in (b".\r\n", b"a\r\n.\r\n", b"\r\n.\r\n", b"a.\r\n"):
        assert used.reader.scan(message, 0) == fresh.scan(message, 0)
        used.reader.reset()
        fresh.reset()
