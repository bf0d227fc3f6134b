"""Iterable API access: the client, its result types, batch splitting and the dry-run transport.

Everything the sync engine and actions need is re-exported here; the submodules are internals.
"""

from __future__ import annotations

from listsync.iterable.client import (
    EU_BASE_URL,
    US_BASE_URL,
    Classification,
    IterableClient,
    ResponseClass,
    RetryPolicy,
    base_url_for,
    classify_response,
)
from listsync.iterable.payloads import (
    MAX_BATCH_ITEMS,
    MAX_BODY_BYTES,
    ApiResult,
    BulkResult,
    ItemOutcome,
    IterableList,
    Subscriber,
    chunk_by_limits,
)
from listsync.iterable.transports import DryRunTransport

__all__ = [
    "EU_BASE_URL",
    "MAX_BATCH_ITEMS",
    "MAX_BODY_BYTES",
    "US_BASE_URL",
    "ApiResult",
    "BulkResult",
    "Classification",
    "DryRunTransport",
    "ItemOutcome",
    "IterableClient",
    "IterableList",
    "ResponseClass",
    "RetryPolicy",
    "Subscriber",
    "base_url_for",
    "chunk_by_limits",
    "classify_response",
]
