"""Properties of the tracker's pure helpers (``protocol/transaction.py``)."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.protocol.transaction import MessageDigest, dedupe_key, params_of
from strategies import cut, cut_points, mail_params, octets, scaled


@given(octets(max_size=80), cut_points, st.booleans())
def test_a_data_section_is_hashed_without_its_terminator_however_it_is_cut(
    message: bytes, points: list[int], views: bool
) -> None:
    # The octets sent for DATA end with the terminator's ".<CRLF>", which is
    # not part of the message.
    section = message + b".\r\n"
    digest = MessageDigest(data=True)
    for chunk in cut(section, points):
        digest.update(memoryview(chunk) if views else chunk)
    assert digest.result() == (len(message), hashlib.sha256(message).hexdigest())


@given(octets(max_size=80), cut_points, st.booleans())
def test_bdat_chunks_are_hashed_whole_however_they_are_cut(
    message: bytes, points: list[int], views: bool
) -> None:
    digest = MessageDigest(data=False)
    for chunk in cut(message, points):
        digest.update(memoryview(chunk) if views else chunk)
    assert digest.result() == (len(message), hashlib.sha256(message).hexdigest())


# Command lines: CRLF-terminated, no other CR or LF (what the reader passes on).
_lines = st.lists(st.sampled_from([b"M", b"R", b"a", b":", b"<", b">", b"\xff"]), max_size=4).map(
    lambda parts: b"".join(parts) + b"\r\n"
)
_sha = st.sampled_from([hashlib.sha256(bytes([n])).hexdigest() for n in range(3)])
envelopes = st.tuples(_lines, st.lists(_lines, max_size=3).map(tuple), _sha)


@given(envelopes, envelopes)
def test_the_dedupe_key_is_the_same_exactly_for_the_same_message(
    one: tuple[bytes, tuple[bytes, ...], str], other: tuple[bytes, tuple[bytes, ...], str]
) -> None:
    key = dedupe_key(one[0], list(one[1]), one[2])
    assert key == dedupe_key(one[0], iter(one[1]), one[2])  # any iterable
    assert len(key) == 64
    assert int(key, 16) >= 0
    # Lines end with their CRLF, so the envelope is never ambiguous: a
    # different MAIL, recipient list or body gives a different key.
    assert (key == dedupe_key(other[0], list(other[1]), other[2])) == (one == other)


@scaled(0.5)
@given(st.lists(mail_params, max_size=5, unique_by=lambda p: p[0]))
def test_params_of_keeps_every_parameter_as_text(params: list[tuple[bytes, bytes | None]]) -> None:
    shown = params_of(tuple(params))
    assert list(shown) == [key.decode("ascii") for key, _ in params]
    for key, value in params:
        text = shown[key.decode("ascii")]
        if value is None:
            assert text is None
            continue
        assert text is not None
        try:
            assert text == value.decode("utf-8")
        except UnicodeDecodeError:
            assert "\ufffd" in text  # invalid UTF-8 is shown, never raised
