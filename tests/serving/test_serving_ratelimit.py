"""RateLimiter: a token bucket per key."""

from __future__ import annotations

import pytest

from serving.ratelimit import RateLimiter
from tests.serving.serving_fakes import FakeClock


def test_burst_then_refill_per_key():
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("a")
    assert wait == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # keys do not share a bucket
    clock.now += 0.5
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0


def test_retry_after_is_whole_seconds_at_least_one():
    assert RateLimiter.retry_after(0.01) == "1"
    assert RateLimiter.retry_after(2.2) == "3"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)
