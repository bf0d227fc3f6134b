"""Fault injection: rules that make chosen requests fail the ways Iterable and networks fail.

Kinds:

* ``status``: answer `status` (default 503) with ``{"msg":"Internal error","code":"GenericError"}``
  and apply nothing.
* ``rate_limit``: answer 429 ``RateLimitExceeded`` exactly like a real bucket overflow.
* ``drop_before``: close the connection without answering and without applying the change.
* ``drop_after``: apply the change, then close the connection without answering.
* ``delay``: apply the change and answer after `delay_seconds` (the client may time out first,
  which is the "ambiguous outcome" case).
* ``partial``: apply the request but fail ``ceil(partial_fraction * n)`` randomly chosen items of
  a bulk call, reported under ``failedUpdates.invalidDataEmails`` / ``invalidDataUserIds``. Only
  bulk endpoints (lists/subscribe, lists/unsubscribe, users/bulkUpdate, events/trackBulk) match.

Firing: `count` alone fires on the first N matching requests; `probability` alone fires at random
(seeded, so runs reproduce); both together fire at random at most N times; neither fires on every
matching request. Rules are checked in the order they were added and the first that fires wins.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

FaultKind = Literal["status", "rate_limit", "drop_before", "drop_after", "delay", "partial"]
FAULT_KINDS: tuple[str, ...] = ("status", "rate_limit", "drop_before", "drop_after", "delay", "partial")


@dataclass
class FaultRule:
    """One fault. `endpoint` is "*" or an endpoint key like "lists/subscribe" or "GET lists"."""

    endpoint: str = "*"
    kind: FaultKind = "status"
    probability: float | None = None
    count: int | None = None
    status: int = 503
    delay_seconds: float = 0.0
    partial_fraction: float = 0.3
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {FAULT_KINDS}, not {self.kind!r}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        if self.count is not None and self.count < 0:
            raise ValueError("count must be >= 0")
        if not 0.0 <= self.partial_fraction <= 1.0:
            raise ValueError("partial_fraction must be within [0, 1]")

    def matches(self, method: str, endpoint: str, bulk: bool) -> bool:
        """Whether this rule applies to the request at all."""
        if self.kind == "partial" and not bulk:
            return False
        return self.endpoint in ("*", endpoint, f"{method} {endpoint}")

    @property
    def exhausted(self) -> bool:
        """True once `count` firings have happened."""
        return self.count is not None and self.fired >= self.count


class FaultPlan:
    """The active rules plus counts of injected faults. Not locked: the caller locks."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.rules: list[FaultRule] = []
        self.injected: Counter[str] = Counter()

    def add(self, rule: FaultRule) -> FaultRule:
        """Activate a rule (checked after those already active)."""
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule; injected counts are kept."""
        self.rules.clear()

    def pick(self, method: str, endpoint: str, bulk: bool) -> FaultRule | None:
        """The rule that fires for this request, if any, counting it as injected."""
        for rule in self.rules:
            if not rule.matches(method, endpoint, bulk) or rule.exhausted:
                continue
            if rule.probability is not None and self.rng.random() >= rule.probability:
                continue
            rule.fired += 1
            self.injected[rule.kind] += 1
            return rule
        return None
