"""The retry schedule: Postfix-like defaults, backoff growth, jitter bounds, expiry."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpwarden.spool.schedule import (
    DEFAULT_BACKOFF,
    MAXIMAL_QUEUE_LIFETIME_S,
    Backoff,
    base_delay,
    delay,
    expired,
    next_attempt,
)

NO_JITTER = Backoff(jitter=0.0)


class FixedDraw(random.Random):
    """A Random whose every draw is ``value`` (to pin the jitter's extremes)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_defaults_are_postfix_defaults() -> None:
    assert DEFAULT_BACKOFF.initial_s == 300.0  # minimal_backoff_time
    assert DEFAULT_BACKOFF.maximum_s == 4000.0  # maximal_backoff_time
    assert DEFAULT_BACKOFF.max_age_s == MAXIMAL_QUEUE_LIFETIME_S == 432_000.0  # 5d
    assert DEFAULT_BACKOFF.factor == 2.0


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        pytest.param(
            DEFAULT_BACKOFF, [300, 600, 1200, 2400, 4000, 4000, 4000], id="postfix-defaults"
        ),
        pytest.param(
            Backoff(initial_s=10, factor=3, maximum_s=100), [10, 30, 90, 100, 100], id="factor-3"
        ),
        pytest.param(Backoff(initial_s=60, factor=1, maximum_s=60), [60, 60, 60], id="constant"),
        pytest.param(
            Backoff(initial_s=1, factor=1.5, maximum_s=5), [1, 1.5, 2.25, 3.375, 5], id="factor-1.5"
        ),
    ],
)
def test_base_delays_grow_to_the_cap(backoff: Backoff, expected: list[float]) -> None:
    assert [base_delay(n, backoff) for n in range(1, len(expected) + 1)] == expected


def test_a_huge_attempt_count_stays_at_the_cap() -> None:
    assert base_delay(10**9) == 4000.0
    assert base_delay(10**9, Backoff(factor=1.0)) == 300.0


@pytest.mark.parametrize("attempts", [0, -1])
def test_attempts_count_from_one(attempts: int) -> None:
    with pytest.raises(ValueError, match="attempts"):
        base_delay(attempts)


@pytest.mark.parametrize(
    ("draw", "attempts", "expected"),
    [
        pytest.param(0.0, 1, 270.0, id="lowest-first"),
        pytest.param(0.5, 1, 300.0, id="middle-first"),
        pytest.param(0.0, 9, 3600.0, id="lowest-at-cap"),
        pytest.param(0.999999, 9, 4000.0, id="highest-capped"),
        pytest.param(0.75, 2, 630.0, id="above-middle"),
    ],
)
def test_jitter_spreads_a_tenth_either_way(draw: float, attempts: int, expected: float) -> None:
    assert delay(attempts, FixedDraw(draw)) == pytest.approx(expected)


def test_without_jitter_the_delay_is_the_base() -> None:
    rng = random.Random(1)
    assert [delay(n, rng, NO_JITTER) for n in range(1, 7)] == [base_delay(n) for n in range(1, 7)]


def test_next_attempt_adds_the_delay_to_now() -> None:
    assert next_attempt(3, 1_700_000_000.0, FixedDraw(0.5)) == 1_700_001_200.0
    assert next_attempt(1, 50.0, random.Random(7), NO_JITTER) == 350.0


@pytest.mark.parametrize(
    ("created", "now", "max_age", "expected"),
    [
        pytest.param(0.0, 0.0, 100.0, False, id="new"),
        pytest.param(0.0, 99.9, 100.0, False, id="just-before"),
        pytest.param(0.0, 100.0, 100.0, True, id="at-the-limit"),
        pytest.param(1000.0, 1000.0 + 5 * 86400, MAXIMAL_QUEUE_LIFETIME_S, True, id="five-days"),
        pytest.param(1000.0, 999.0, 100.0, False, id="clock-went-back"),
    ],
)
def test_expired(created: float, now: float, max_age: float, expected: bool) -> None:
    assert expired(created, now, max_age) is expected


def test_expired_defaults_to_five_days() -> None:
    assert not expired(0.0, 5 * 86400 - 1)
    assert expired(0.0, 5 * 86400)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"initial_s": 0}, "initial_s", id="zero-initial"),
        pytest.param({"factor": 0.5}, "factor", id="shrinking"),
        pytest.param({"maximum_s": 10}, "maximum_s", id="cap-below-initial"),
        pytest.param({"jitter": 1.0}, "jitter", id="jitter-1"),
        pytest.param({"jitter": -0.1}, "jitter", id="negative-jitter"),
        pytest.param({"max_age_s": 0}, "max_age_s", id="no-age"),
        pytest.param({"initial_s": float("nan")}, "initial_s", id="nan"),
    ],
)
def test_nonsense_settings_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**settings)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError, match=r"factor.*jitter"):
        Backoff(factor=0, jitter=2)


backoffs = st.builds(
    lambda initial, factor, spread, jitter: Backoff(
        initial_s=initial, factor=factor, maximum_s=initial * spread, jitter=jitter
    ),
    initial=st.floats(min_value=0.001, max_value=1e6),
    factor=st.floats(min_value=1.0, max_value=10.0),
    spread=st.floats(min_value=1.0, max_value=1e4),
    jitter=st.floats(min_value=0.0, max_value=0.99),
)


@given(backoff=backoffs, seed=st.integers(min_value=0, max_value=2**32))
def test_delays_never_shrink_as_attempts_grow(backoff: Backoff, seed: int) -> None:
    bases = [base_delay(n, backoff) for n in range(1, 60)]
    assert bases[0] == min(backoff.initial_s, backoff.maximum_s)
    assert all(a <= b for a, b in itertools.pairwise(bases))
    assert all(b <= backoff.maximum_s for b in bases)
    # One draw per message: the same draw at every attempt keeps the order.
    jittered = [delay(n, random.Random(seed), backoff) for n in range(1, 60)]
    assert all(a <= b for a, b in itertools.pairwise(jittered))


@given(
    backoff=backoffs,
    attempts=st.integers(min_value=1, max_value=10_000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_jitter_stays_within_its_fraction_and_the_cap(
    backoff: Backoff, attempts: int, seed: int
) -> None:
    base = base_delay(attempts, backoff)
    got = delay(attempts, random.Random(seed), backoff)
    assert base * (1 - backoff.jitter) <= got * (1 + 1e-12)
    assert got <= min(base * (1 + backoff.jitter), backoff.maximum_s) * (1 + 1e-12)
    assert got > 0


@given(
    attempts=st.integers(min_value=1, max_value=100),
    now=st.floats(min_value=0, max_value=4e9),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_the_next_attempt_is_always_in_the_future(attempts: int, now: float, seed: int) -> None:
    assert next_attempt(attempts, now, random.Random(seed)) > now
