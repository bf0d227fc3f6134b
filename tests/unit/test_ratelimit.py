"""Token buckets: pacing, burst, adaptive slow-down on 429 and recovery, with a fake clock."""

from __future__ import annotations

import threading

import pytest

from listsync.errors import ConfigError
from listsync.iterable.ratelimit import UNDOCUMENTED_RATE, RateLimiter, TokenBucket
from tests.helpers import FakeClock


def test_burst_is_free_then_requests_are_paced_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock)
    waits = [bucket.acquire(clock.sleep) for _ in range(12)]
    assert waits[:10] == [0.0] * 10
    assert waits[10:] == pytest.approx([0.1, 0.1])


def test_sustained_throughput_matches_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock)
    for _ in range(110):
        bucket.acquire(clock.sleep)
    # 10 from the burst, then 100 at 10/s.
    assert clock.now - 1000.0 == pytest.approx(10.0)


def test_idle_time_refills_only_up_to_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock, burst=3)
    clock.now += 3600
    waits = [bucket.acquire(clock.sleep) for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(0.1)


def test_sub_one_per_second_rate_has_no_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    assert limiter.acquire("GET /api/lists/getUsers", clock.sleep) == 0.0
    assert limiter.acquire("GET /api/lists/getUsers", clock.sleep) == pytest.approx(12.0)


def test_429_halves_the_rate_and_drops_the_saved_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock)
    bucket.on_throttled()
    assert bucket.rate == 5.0
    # The unused burst is gone: the next request waits for a fresh token at the slower rate.
    assert bucket.acquire(clock.sleep) == pytest.approx(0.2)


def test_concurrent_429s_within_the_cooldown_count_once() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, clock=clock)
    for _ in range(5):
        bucket.on_throttled()
    assert bucket.rate == 50.0
    clock.now += 1.5
    bucket.on_throttled()
    assert bucket.rate == 25.0


def test_rate_never_drops_below_the_floor() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60.0, clock=clock)
    for _ in range(20):
        bucket.on_throttled()
        clock.now += 2
    assert bucket.rate == pytest.approx(1.0)


def test_burst_shrinks_with_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock)
    bucket.on_throttled()
    clock.now += 3600
    waits = [bucket.acquire(clock.sleep) for _ in range(6)]
    assert waits[:5] == [0.0] * 5
    assert waits[5] > 0


def test_successes_recover_the_rate_gradually_up_to_the_configured_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, clock=clock)
    bucket.on_throttled()
    for _ in range(9):
        bucket.on_success()
    assert bucket.rate == 50.0
    bucket.on_success()
    assert bucket.rate == pytest.approx(55.0)
    for _ in range(1000):
        bucket.on_success()
    assert bucket.rate == 100.0


def test_concurrent_reservations_lose_no_tokens() -> None:
    clock = FakeClock()  # frozen: nobody sleeps, so every token beyond the burst must queue
    bucket = TokenBucket(100.0, clock=clock)
    waits: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            wait = bucket.reserve()
            with lock:
                waits.append(wait)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = [0.0] * 100 + [n / 100 for n in range(1, 301)]
    assert sorted(waits) == pytest.approx(expected)


def test_limiter_uses_published_defaults_and_overrides() -> None:
    limiter = RateLimiter({"POST /api/lists/subscribe": 7}, clock=FakeClock())
    assert limiter.bucket("POST /api/events/trackBulk").rate == 10.0
    assert limiter.bucket("POST /api/users/bulkUpdate").rate == 5.0
    assert limiter.bucket("POST /api/lists/subscribe").rate == 7.0
    assert limiter.bucket("POST /api/commerce/updateCart").rate == UNDOCUMENTED_RATE
    assert limiter.bucket("GET /api/somethingNew").rate == UNDOCUMENTED_RATE


@pytest.mark.parametrize(
    "overrides",
    [
        {"POST /api/list/subscribe": 5},
        {"GET /api/lists": 0},
        {"GET /api/lists": float("inf")},
        {"GET /api/lists": True},
    ],
)
def test_bad_overrides_are_config_errors(overrides: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="rate_limits"):
        RateLimiter(overrides)


def test_disabled_limiter_never_waits() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock, enabled=False)
    assert all(limiter.acquire("GET /api/lists/getUsers", clock.sleep) == 0.0 for _ in range(10))
    assert clock.sleeps == []
