"""How the Iterable client waits between attempts: capped exponential backoff with full jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter; a server's Retry-After replaces the guess."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    # Retry-After gets its own, larger cap: the server knows its recovery time better than our
    # backoff curve does, but a worker thread should not sleep for an hour on its say-so.
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("retry delays must not be negative")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float | None:
        """Seconds to wait after failed attempt number `attempt`; None means stop retrying now.

        A Retry-After beyond max_retry_after stops at once: sleeping the cap and retrying early
        would only earn another refusal, while the caller can reschedule the work for later.
        """
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
