"""When to try a spooled message again, and when to give up on it.

Pure arithmetic: no clock, no I/O, no global random state. Times (epoch
seconds) and a ``random.Random`` are passed in, so a test fixes both.

The delay after the n-th failed attempt is ``initial * factor ** (n - 1)``,
capped at ``maximum``, then spread by up to ``jitter`` of itself either way
(and capped again). Without jitter the delays never shrink as attempts grow;
with one random draw per message they do not either, since every delay of
that draw is the same multiple of the base delay.

Defaults follow Postfix (postconf(5), ``src/global/mail_params.h``):
``minimal_backoff_time`` 300 s, ``maximal_backoff_time`` 4000 s and
``maximal_queue_lifetime`` 5 days. Postfix has no factor setting: its queue
manager waits for the message's time in the queue, clamped between the two
backoff times (``qmgr_active.c``), which doubles the wait at each attempt
("after each failed attempt the backoff time ... is doubled until it
reaches the maximum", ``mail_params.h``). A factor of 2 draws that curve.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Postfix minimal_backoff_time, default $queue_run_delay = 300s since
# Postfix 2.4 (1000s before): the wait after the first failed attempt.
MINIMAL_BACKOFF_S = 300.0
# Postfix maximal_backoff_time, default 4000s: the longest wait between attempts.
MAXIMAL_BACKOFF_S = 4000.0
# Postfix maximal_queue_lifetime, default 5d: past this age, dead letters.
MAXIMAL_QUEUE_LIFETIME_S = 5 * 24 * 3600.0
# Postfix doubles the wait after each failed attempt (see the docstring).
BACKOFF_FACTOR = 2.0
# Our choice, not Postfix's: messages deferred together by one upstream
# outage would otherwise all come back in the same second. A tenth either
# way spreads them without changing the schedule's shape.
JITTER_FRACTION = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """A retry schedule. Raises ValueError when built with nonsense values."""

    initial_s: float = MINIMAL_BACKOFF_S
    factor: float = BACKOFF_FACTOR
    maximum_s: float = MAXIMAL_BACKOFF_S
    jitter: float = JITTER_FRACTION
    max_age_s: float = MAXIMAL_QUEUE_LIFETIME_S

    def __post_init__(self) -> None:
        problems = []
        if not self.initial_s > 0:
            problems.append(f"initial_s must be > 0, got {self.initial_s}")
        if not self.factor >= 1:
            problems.append(f"factor must be >= 1, got {self.factor}")
        if not self.maximum_s >= self.initial_s:
            problems.append(f"maximum_s must be >= initial_s, got {self.maximum_s}")
        if not 0 <= self.jitter < 1:
            problems.append(f"jitter must be in [0, 1), got {self.jitter}")
        if not self.max_age_s > 0:
            problems.append(f"max_age_s must be > 0, got {self.max_age_s}")
        if problems:
            raise ValueError("; ".join(problems))


DEFAULT_BACKOFF = Backoff()


def base_delay(attempts: int, backoff: Backoff = DEFAULT_BACKOFF) -> float:
    """The wait after ``attempts`` failed attempts, before jitter; raises ValueError if < 1."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    try:
        grown = backoff.initial_s * backoff.factor ** (attempts - 1)
    except OverflowError:  # far past the cap
        return backoff.maximum_s
    return min(grown, backoff.maximum_s)


def delay(attempts: int, rng: random.Random, backoff: Backoff = DEFAULT_BACKOFF) -> float:
    """The wait after ``attempts`` failed attempts, jitter included.

    Within ``base * (1 - jitter)`` and ``min(base * (1 + jitter), maximum)``.
    Draws one number from ``rng``. Raises ValueError if ``attempts`` < 1.
    """
    base = base_delay(attempts, backoff)
    spread = backoff.jitter * (2.0 * rng.random() - 1.0)
    return min(base * (1.0 + spread), backoff.maximum_s)


def next_attempt(
    attempts: int, now: float, rng: random.Random, backoff: Backoff = DEFAULT_BACKOFF
) -> float:
    """When to try again (epoch seconds) after ``attempts`` failed attempts at ``now``."""
    return now + delay(attempts, rng, backoff)


def expired(created: float, now: float, max_age_s: float = MAXIMAL_QUEUE_LIFETIME_S) -> bool:
    """True when a message spooled at ``created`` is too old to try again at ``now``."""
    return now - created >= max_age_s
