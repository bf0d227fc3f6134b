"""Per-endpoint token buckets with Iterable's published per-project limits as defaults.

A limit is ``(rate_per_second, burst)`` or None for unlimited. Keys name an endpoint the way fault
rules do: ``"lists/subscribe"`` matches every method on that path, ``"GET lists"`` only GET. An
exact "METHOD endpoint" key wins over the bare endpoint key. Buckets start full. A request answered
429 takes no token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

Limit = tuple[float, float] | None

DEFAULT_RATE_LIMITS: dict[str, Limit] = {
    "events/track": (2000.0, 2000.0),
    "events/trackBulk": (10.0, 10.0),
    "users/update": (500.0, 500.0),
    "users/bulkUpdate": (5.0, 5.0),
    "GET lists": (100.0, 100.0),
    "lists/getUsers": (5.0 / 60.0, 5.0),
    "lists/subscribe": None,
    "lists/unsubscribe": None,
    "commerce/trackPurchase": None,
    "commerce/updateCart": None,
}


@dataclass
class TokenBucket:
    """Classic token bucket: `burst` tokens, refilled at `rate` per second."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class RateLimiter:
    """The set of buckets for one emulated project. Not locked: the caller locks."""

    def __init__(self, limits: Mapping[str, Limit] | None, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._limits: dict[str, Limit] = dict(DEFAULT_RATE_LIMITS)
        self._buckets: dict[str, TokenBucket] = {}
        for key, limit in (limits or {}).items():
            self.set(key, limit)

    @property
    def limits(self) -> dict[str, Limit]:
        """A copy of the configured limits."""
        return dict(self._limits)

    def set(self, key: str, limit: Limit) -> None:
        """Configure (or with None remove) the limit for `key`; its bucket starts full again."""
        if limit is not None and (limit[0] <= 0 or limit[1] < 1):
            raise ValueError(f"rate must be > 0 and burst >= 1, got {limit!r}")
        self._limits[key] = limit
        self._buckets.pop(key, None)

    def allow(self, method: str, endpoint: str) -> bool:
        """Take a token from the bucket governing this request, if any."""
        key = self._key_for(method, endpoint)
        if key is None:
            return True
        limit = self._limits[key]
        assert limit is not None
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(rate=limit[0], burst=limit[1], tokens=limit[1], stamp=self._clock())
            self._buckets[key] = bucket
        return bucket.take(self._clock())

    def _key_for(self, method: str, endpoint: str) -> str | None:
        for key in (f"{method} {endpoint}", endpoint):
            if self._limits.get(key) is not None:
                return key
        return None
