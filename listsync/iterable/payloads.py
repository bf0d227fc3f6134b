"""Values that cross the Iterable boundary: request items, parsed results, batch splitting.

Pure code only (no HTTP), so the sync engine can build and split batches, and tests can check the
result parsing, without a client.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any, TypeVar

T = TypeVar("T")

# Iterable documents only the 4 MB body limit (bulkUpdate); 1000 items is common practice and what the
# reference notes recommend for every bulk and list call. 4_000_000 rather than 4 MiB: the safe side.
MAX_BATCH_ITEMS = 1000
MAX_BODY_BYTES = 4_000_000
# Room for the envelope around the item array ({"listId":...,"subscribers":[...],"campaignId":...}).
# The real envelopes are under 150 bytes; a generous allowance costs nothing at 4 MB.
ENVELOPE_BYTES = 1024


def dumps(obj: Any) -> bytes:
    """Serialise a request body exactly as the client sends it (compact, UTF-8).

    `allow_nan=False`: JSON has no Infinity or NaN, and Iterable would refuse the whole batch;
    validation refuses such numbers when events arrive, this keeps any that slip by off the wire.
    """
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _jsonable(item: Any) -> Any:
    to_json = getattr(item, "to_json", None)
    return to_json() if callable(to_json) else item


def json_size(item: Any) -> int:
    """Bytes an item adds to a request body (Subscribers are measured in their wire form)."""
    return len(dumps(_jsonable(item)))


@dataclass(frozen=True)
class Subscriber:
    """One user in a lists/subscribe or lists/unsubscribe call."""

    email: str | None = None
    user_id: str | None = None
    data_fields: Mapping[str, Any] | None = None
    prefer_user_id: bool = False

    def __post_init__(self) -> None:
        if not self.email and not self.user_id:
            raise ValueError("a Subscriber needs an email or a user_id")

    def to_json(self) -> dict[str, Any]:
        """The subscribe form: only the keys that carry a value, as Segment sends them."""
        body = self.identity_json()
        if self.data_fields:
            body["dataFields"] = dict(self.data_fields)
        if self.prefer_user_id:
            body["preferUserId"] = True
        return body

    def identity_json(self) -> dict[str, Any]:
        """The unsubscribe form: Iterable's schema takes only email and userId there."""
        body: dict[str, Any] = {}
        if self.email:
            body["email"] = self.email
        if self.user_id:
            body["userId"] = self.user_id
        return body


@dataclass(frozen=True)
class IterableList:
    """One entry of GET /api/lists."""

    id: int
    name: str
    list_type: str | None = None
    created_at: int | None = None
    description: str | None = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> IterableList:
        return cls(
            id=int(raw["id"]),
            name=str(raw["name"]),
            list_type=raw.get("listType"),
            created_at=raw.get("createdAt"),
            description=raw.get("description"),
        )


class ItemOutcome(StrEnum):
    """What a bulk response says about one user."""

    OK = "ok"
    NOT_FOUND = "not_found"
    INVALID = "invalid"
    FORGOTTEN = "forgotten"
    CONFLICT = "conflict"
    INVALID_DATA = "invalid_data"


# Bucket -> (outcome, keyed by email?). Order is precedence when one user appears in several
# buckets: forgotten first because it forbids ever resending, not_found last because it is the
# only outcome a caller may treat as harmless (unsubscribing a non-member).
_BUCKETS: dict[str, tuple[ItemOutcome, bool]] = {
    "forgottenEmails": (ItemOutcome.FORGOTTEN, True),
    "forgottenUserIds": (ItemOutcome.FORGOTTEN, False),
    "conflictEmails": (ItemOutcome.CONFLICT, True),
    "conflictUserIds": (ItemOutcome.CONFLICT, False),
    "invalidEmails": (ItemOutcome.INVALID, True),
    "invalidUserIds": (ItemOutcome.INVALID, False),
    "invalidDataEmails": (ItemOutcome.INVALID_DATA, True),
    "invalidDataUserIds": (ItemOutcome.INVALID_DATA, False),
    "notFoundEmails": (ItemOutcome.NOT_FOUND, True),
    "notFoundUserIds": (ItemOutcome.NOT_FOUND, False),
}
_DEPRECATED_TOP_LEVEL = ("invalidEmails", "invalidUserIds")
_EXTRA_BUCKETS = ("disallowedEventNames",)


def _strings(value: Any) -> frozenset[str]:
    if not isinstance(value, list):
        return frozenset()
    return frozenset(str(v) for v in value if v is not None)


def parse_failed(body: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    """Collect every failure bucket of a bulk response; empty buckets are left out."""
    nested = body.get("failedUpdates")
    nested = nested if isinstance(nested, Mapping) else {}
    failed: dict[str, frozenset[str]] = {}
    for name in _BUCKETS:
        failed[name] = _strings(nested.get(name))
    for name in _DEPRECATED_TOP_LEVEL:
        failed[name] = failed[name] | _strings(body.get(name))
    for name in _EXTRA_BUCKETS:
        failed[name] = _strings(body.get(name)) | _strings(nested.get(name))
    return {name: values for name, values in failed.items() if values}


@dataclass(frozen=True)
class BulkResult:
    """A 2xx answer from subscribe, unsubscribe, users/bulkUpdate or events/trackBulk.

    A 2xx can still carry per-user failures; `outcome()` says what happened to one user. Users not
    named in any bucket count as OK even when fail_count > 0: Iterable gives no other detail.
    """

    success_count: int
    fail_count: int
    failed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    http_status: int = 200
    elapsed_ms: int = 0
    attempts: int = 1

    @classmethod
    def from_json(
        cls, body: Mapping[str, Any], *, http_status: int, elapsed_ms: int, attempts: int = 1
    ) -> BulkResult:
        return cls(
            success_count=int(body.get("successCount") or 0),
            fail_count=int(body.get("failCount") or 0),
            failed=parse_failed(body),
            http_status=http_status,
            elapsed_ms=elapsed_ms,
            attempts=attempts,
        )

    @cached_property
    def _lookup(self) -> list[tuple[ItemOutcome, bool, frozenset[str]]]:
        table = []
        for name, (outcome, by_email) in _BUCKETS.items():
            values = self.failed.get(name, frozenset())
            if by_email:
                values = frozenset(v.casefold() for v in values)
            table.append((outcome, by_email, values))
        return table

    def outcome(self, email: str | None, user_id: str | None) -> ItemOutcome:
        """Emails match case-insensitively (Iterable treats them so); userIds are case-sensitive."""
        folded = email.casefold() if email else None
        for outcome, by_email, values in self._lookup:
            key = folded if by_email else user_id
            if key is not None and key in values:
                return outcome
        return ItemOutcome.OK


@dataclass(frozen=True)
class ApiResult:
    """A 2xx answer in Iterable's standard shape {"msg", "code", "params"}."""

    status: int
    code: str | None
    msg: str | None
    params: Any
    elapsed_ms: int
    attempts: int = 1


def chunk_by_limits(
    items: Sequence[T],
    max_items: int = MAX_BATCH_ITEMS,
    max_bytes: int = MAX_BODY_BYTES,
    size_of: Callable[[T], int] = json_size,
    envelope_bytes: int = ENVELOPE_BYTES,
) -> list[list[T]]:
    """Split items, in order, into chunks whose serialised request body fits both limits.

    A chunk's body is counted as envelope_bytes + the items' sizes + one comma between items, which
    matches `dumps` of the envelope around a JSON array. An item that cannot fit even alone is a
    ValueError: no split can send it, so the caller must reject that item.
    """
    if max_items < 1:
        raise ValueError("max_items must be at least 1")
    room = max_bytes - envelope_bytes
    chunks: list[list[T]] = []
    current: list[T] = []
    used = 0
    for index, item in enumerate(items):
        size = size_of(item)
        if size > room:
            raise ValueError(
                f"item {index} is {size} bytes when serialised; a request body is limited to "
                f"{max_bytes} bytes ({room} for items after the envelope), so it cannot be sent"
            )
        extra = size + (1 if current else 0)
        if current and (len(current) >= max_items or used + extra > room):
            chunks.append(current)
            current, used, extra = [], 0, size
        current.append(item)
        used += extra
    if current:
        chunks.append(current)
    return chunks
