"""The bulk calls of one delivery pass on the wire. Each bulk key (endpoint, updateOnly) has its own
worker thread that sends the key's calls one after another, in the order they were queued, each
paced by the rate limiter: so one key's calls reach Iterable in order, and the routing thread can
queue the next ones (up to a bound) instead of waiting for each answer. The sender reads the
answers back in the same order (`pop`, `pop_done`) and records them.

Which users each key has queued or on the wire is counted, so the sender can wait for a user's
earlier call before their next row of the same endpoint goes into another call.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from listsync.domain import PendingDelivery
from listsync.iterable.payloads import BulkResult

Key = tuple[str, bool]  # (endpoint, updateOnly)
Send = Callable[[Key, list[dict[str, Any]]], BulkResult]


@dataclass
class Call:
    """One queued bulk call; its future holds None when it was never sent (the pass was halted)."""

    future: Future[BulkResult | None]
    rows: list[PendingDelivery]
    users: frozenset[str]


class BulkCalls:
    def __init__(self, send: Send) -> None:
        self._send = send
        self._halted = threading.Event()
        self._pools: dict[Key, ThreadPoolExecutor] = {}
        self._calls: dict[Key, deque[Call]] = defaultdict(deque)
        self._users: dict[Key, Counter[str]] = defaultdict(Counter)

    def submit(self, key: Key, rows: Sequence[PendingDelivery], items: list[dict[str, Any]]) -> None:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="listsync-bulk")
        users = frozenset(row.user_key for row in rows)
        self._calls[key].append(Call(pool.submit(self._run, key, items), list(rows), users))
        self._users[key].update(users)

    def _run(self, key: Key, items: list[dict[str, Any]]) -> BulkResult | None:
        if self._halted.is_set():
            return None
        return self._send(key, items)

    def queued(self, key: Key) -> int:
        """Calls of `key` not read back yet (queued, on the wire, or answered)."""
        return len(self._calls[key])

    def busy_keys(self) -> list[Key]:
        """Keys with calls not read back yet."""
        return [key for key, calls in self._calls.items() if calls]

    def holds(self, key: Key, user_key: str) -> bool:
        return self._users[key][user_key] > 0

    def pop(self, key: Key) -> Call | None:
        """The key's oldest call (the caller waits for its answer), or None."""
        calls = self._calls[key]
        if not calls:
            return None
        call = calls.popleft()
        users = self._users[key]
        for user in call.users:
            users[user] -= 1
            if users[user] <= 0:
                del users[user]
        return call

    def pop_done(self, key: Key) -> Call | None:
        """The key's oldest call if it has its answer already, else None."""
        calls = self._calls[key]
        return self.pop(key) if calls and calls[0].future.done() else None

    def halt(self) -> None:
        """Calls not started yet are not sent (their future holds None)."""
        self._halted.set()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True)
