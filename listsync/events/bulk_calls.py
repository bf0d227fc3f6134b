"""The bulk calls of one delivery pass on the wire. Each bulk key (endpoint, updateOnly) has its own
worker thread that sends the key's calls one after another, in the order they were queued, each
paced by the rate limiter: so one key's calls reach Iterable in order, and the routing thread can
queue the next ones (up to a bound) instead of waiting for each answer. The sender reads the
answers back in the same order (`pop`, `pop_done`) and records them.

Which users each key has queued or on the wire is counted, so the sender can wait for a user's
earlier call before their next row of the same endpoint goes into another call. `wire_body` and
`bulk_chunks` make a key's rows into the items and calls that go on the wire.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from listsync.domain import PendingDelivery
from listsync.iterable.payloads import (
    ENVELOPE_BYTES,
    MAX_BATCH_ITEMS,
    MAX_BODY_BYTES,
    BulkResult,
    chunk_by_limits,
    json_size,
)
from listsync.json_text import dumps_bytes

Key = tuple[str, bool]  # (endpoint, updateOnly)
Send = Callable[[Key, list[dict[str, Any]]], BulkResult]


@dataclass
class Call:
    """One queued bulk call; its future holds None when it was never sent (the pass was halted)."""

    future: Future[BulkResult | None]
    rows: list[PendingDelivery]
    users: frozenset[str]


class BulkCalls:
    def __init__(self, send: Send, *, stopped: Callable[[], bool] = lambda: False) -> None:
        self._send = send
        self._stopped = stopped
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
        """Send one call unless the pass was halted or must stop (`stopped`: a graceful stop of
        the daemon); a call that raises (a refused key, Iterable unreachable) halts the pass, so
        the calls queued behind it stay pending."""
        if self._halted.is_set() or self._stopped():
            return None
        try:
            return self._send(key, items)
        except BaseException:
            self._halted.set()
            raise

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


# Kept in a delivery's stored body beside the request, never sent in it.
_DIRECTIVE_KEYS = ("newEmail", "updateOnly")


def wire_body(body: dict[str, Any]) -> dict[str, Any]:
    """The stored body as Iterable gets it, without listsync's own directives."""
    if "newEmail" not in body and "updateOnly" not in body:
        return body
    return {key: value for key, value in body.items() if key not in _DIRECTIVE_KEYS}


def bulk_chunks(rows: list[PendingDelivery]) -> list[list[PendingDelivery]]:
    """The rows of one bulk key in calls that fit Iterable's limits. Measuring every item exactly
    (the stdlib's encoding) is needed only near the byte limit: when orjson's size of all of them,
    doubled (the stdlib never spells a number twice as long), leaves room, one call takes them."""
    if len(rows) <= MAX_BATCH_ITEMS:
        fast = dumps_bytes([wire_body(row.body) for row in rows])
        if fast is not None and 2 * len(fast) + ENVELOPE_BYTES <= MAX_BODY_BYTES:
            return [rows] if rows else []
    return chunk_by_limits(rows, size_of=lambda row: json_size(wire_body(row.body)))
