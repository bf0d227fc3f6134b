"""Per-endpoint token buckets that keep listsync under Iterable's per-project rate limits.

Each endpoint ("METHOD /api/path") has its own bucket. A 429 halves that bucket's rate and
successes bring it back in small steps, so a project that shares its limit with other senders
settles below the limit instead of bouncing off it. The clock is injected so tests need no sleeping.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping

from listsync.errors import ConfigError

# Iterable's published per-project limits, in requests per second.
DEFAULT_RATES: dict[str, float] = {
    "GET /api/lists": 100.0,
    "GET /api/lists/getUsers": 5.0 / 60.0,
    "POST /api/events/track": 2000.0,
    "POST /api/events/trackBulk": 10.0,
    "POST /api/users/update": 500.0,
    "POST /api/users/bulkUpdate": 5.0,
}
# Undocumented endpoints. 100/s matches GET lists, the closest documented sibling; list creation is
# rare and each one is a lasting object, so it gets a gentler pace.
UNDOCUMENTED_RATE = 100.0
UNDOCUMENTED_RATES: dict[str, float] = {
    "POST /api/lists": 10.0,
    "POST /api/lists/subscribe": UNDOCUMENTED_RATE,
    "POST /api/lists/unsubscribe": UNDOCUMENTED_RATE,
    "POST /api/users/updateEmail": UNDOCUMENTED_RATE,
    "POST /api/commerce/trackPurchase": UNDOCUMENTED_RATE,
    "POST /api/commerce/updateCart": UNDOCUMENTED_RATE,
}
KNOWN_ENDPOINTS = frozenset(DEFAULT_RATES) | frozenset(UNDOCUMENTED_RATES)

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class TokenBucket:
    """A thread-safe token bucket whose rate adapts to 429s.

    `acquire` reserves a token under the lock and sleeps outside it: the token count may go
    negative, which queues concurrent callers in arrival order without holding the lock while asleep.
    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Clock,
        burst: float | None = None,
        floor_fraction: float = 1 / 60,
        recover_every: int = 10,
        recover_factor: float = 1.1,
        throttle_cooldown: float = 1.0,
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number, got {rate!r}")
        self._configured = rate
        self._rate = rate
        # One second's worth of requests, but at least one: a 5-per-minute endpoint gets no burst.
        self._burst = burst if burst is not None else max(1.0, rate)
        self._floor = rate * floor_fraction
        self._recover_every = recover_every
        self._recover_factor = recover_factor
        self._cooldown = throttle_cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = self._burst
        self._stamp = clock()
        self._successes = 0
        self._last_throttle: float | None = None

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def configured_rate(self) -> float:
        return self._configured

    def _capacity(self) -> float:
        # The burst shrinks with the rate, or a slowed bucket would refill to a full-speed burst.
        return max(1.0, self._burst * self._rate / self._configured)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity(), self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def reserve(self) -> float:
        """Take a token; return how many seconds the caller must wait before using it."""
        with self._lock:
            self._refill()
            self._tokens -= 1.0
            return max(0.0, -self._tokens / self._rate)

    def acquire(self, sleep: Sleep) -> float:
        wait = self.reserve()
        if wait > 0:
            sleep(wait)
        return wait

    def on_throttled(self) -> None:
        """A 429 came back: halve the rate (not below the floor) and drop any saved-up burst."""
        with self._lock:
            now = self._clock()
            # Concurrent requests rejected by the same overload should count as one signal.
            if self._last_throttle is not None and now - self._last_throttle < self._cooldown:
                return
            self._refill()
            self._last_throttle = now
            self._rate = max(self._floor, self._rate / 2)
            self._tokens = min(self._tokens, 0.0)
            self._successes = 0

    def on_success(self) -> None:
        """Step a slowed bucket back up by recover_factor every recover_every successes."""
        with self._lock:
            if self._rate >= self._configured:
                return
            self._successes += 1
            if self._successes >= self._recover_every:
                self._refill()
                self._rate = min(self._configured, self._rate * self._recover_factor)
                self._successes = 0


def _validated(overrides: Mapping[str, float]) -> dict[str, float]:
    rates: dict[str, float] = {}
    for endpoint, rate in overrides.items():
        if endpoint not in KNOWN_ENDPOINTS:
            known = ", ".join(sorted(KNOWN_ENDPOINTS))
            raise ConfigError(f"rate_limits: unknown endpoint {endpoint!r}; known endpoints: {known}")
        if isinstance(rate, bool) or not (isinstance(rate, int | float) and rate > 0 and math.isfinite(rate)):
            raise ConfigError(f"rate_limits[{endpoint!r}] must be a positive number of requests/second")
        rates[endpoint] = float(rate)
    return rates


class RateLimiter:
    """The buckets of one client, created on first use. enabled=False (dry run) never waits."""

    def __init__(
        self,
        overrides: Mapping[str, float] | None = None,
        *,
        clock: Clock = time.monotonic,
        enabled: bool = True,
    ) -> None:
        self._rates = {**DEFAULT_RATES, **UNDOCUMENTED_RATES, **_validated(overrides or {})}
        self._clock = clock
        self._enabled = enabled
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def bucket(self, endpoint: str) -> TokenBucket:
        with self._lock:
            found = self._buckets.get(endpoint)
            if found is None:
                rate = self._rates.get(endpoint, UNDOCUMENTED_RATE)
                found = self._buckets[endpoint] = TokenBucket(rate, clock=self._clock)
            return found

    def acquire(self, endpoint: str, sleep: Sleep) -> float:
        return self.bucket(endpoint).acquire(sleep) if self._enabled else 0.0

    def on_throttled(self, endpoint: str) -> None:
        self.bucket(endpoint).on_throttled()

    def on_success(self, endpoint: str) -> None:
        self.bucket(endpoint).on_success()
