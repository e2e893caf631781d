"""Record times: RFC 3339 UTC with milliseconds, as datetime formats them."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.protocol.records import iso_time


def formatted(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def test_a_known_time() -> None:
    assert iso_time(1764975004.2896) == "2025-12-05T22:50:04.289Z"


def test_a_second_boundary_rounds_up_to_the_next_second() -> None:
    assert iso_time(1764975004.9999996) == "2025-12-05T22:50:05.000Z"


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_the_same_as_datetime_for_any_time(epoch_s: float) -> None:
    assert iso_time(epoch_s) == formatted(epoch_s)


@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_the_same_as_datetime_for_whole_milliseconds(millis: int) -> None:
    assert iso_time(millis / 1000) == formatted(millis / 1000)
