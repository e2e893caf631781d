"""The upstream circuit breaker."""

from __future__ import annotations

from smtpwarden.config import HealthConfig
from smtpwarden.net.upstream import Health, Target

A = Target(name="a", host="127.0.0.1", port=25)
B = Target(name="b", host="127.0.0.1", port=26)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_in_a_row_mark_down_and_a_cool_down_allows_one_probe() -> None:
    clock = Clock()
    health = Health(HealthConfig(failures=2, cooldown=30.0), clock)
    assert health.order([A, B]) == [A, B]
    health.failed(A)
    assert health.order([A, B]) == [A, B]
    health.failed(A)
    assert health.is_down("a")
    assert health.order([A, B]) == [B, A]
    clock.now += 31
    assert health.order([A, B]) == [A, B]  # the probe
    assert health.order([A, B]) == [B, A]  # others wait for it
    health.succeeded(A)
    assert not health.is_down("a")
    assert health.order([A, B]) == [A, B]


def test_a_success_clears_the_count() -> None:
    health = Health(HealthConfig(failures=2, cooldown=30.0), Clock())
    health.failed(A)
    health.succeeded(A)
    health.failed(A)
    assert not health.is_down("a")
