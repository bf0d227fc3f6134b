"""httpx transports for the Iterable client; today only the dry run.

Dry run is a transport rather than a flag so every layer above the client runs its real code
path: the client serialises, checks batch limits, classifies and parses exactly as in production,
and only the network hop is replaced by a log line and a synthetic success.
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import Any

import httpx

logger = logging.getLogger("listsync.iterable.dry_run")

_BULK_KEYS = {
    "/api/lists/subscribe": "subscribers",
    "/api/lists/unsubscribe": "subscribers",
    "/api/users/bulkUpdate": "users",
    "/api/events/trackBulk": "events",
}
_STANDARD_SUCCESS = {"msg": "", "code": "Success", "params": None}


def dry_run_list_id(name: str) -> int:
    """A negative id derived from the list name.

    Derived rather than counted so the same name maps to the same id across restarts: ids stored
    during one dry run still line up with the next, and negative ids can never collide with real ones.
    """
    return -(zlib.crc32(name.encode("utf-8")) % 2_000_000_000 + 1)


def _decode(request: httpx.Request) -> Any:
    raw = request.read()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _item_count(path: str, body: Any) -> int:
    key = _BULK_KEYS.get(path)
    if key and isinstance(body, dict) and isinstance(body.get(key), list):
        return len(body[key])
    return 1


def _answer(method: str, path: str, body: Any) -> httpx.Response:
    if method == "GET" and path == "/api/lists/getUsers":
        return httpx.Response(200, text="", headers={"Content-Type": "text/plain"})
    if method == "GET" and path == "/api/lists":
        return httpx.Response(200, json={"lists": []})
    if method == "POST" and path == "/api/lists":
        name = body.get("name", "") if isinstance(body, dict) else ""
        return httpx.Response(200, json={"listId": dry_run_list_id(str(name))})
    if path in _BULK_KEYS:
        count = _item_count(path, body)
        return httpx.Response(200, json={"successCount": count, "failCount": 0, "failedUpdates": {}})
    return httpx.Response(200, json=_STANDARD_SUCCESS)


class DryRunTransport(httpx.BaseTransport):
    """Answers every request with a success of the endpoint's shape and sends nothing."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        body = _decode(request)
        items = _item_count(path, body)
        extra = {"event": "iterable_dry_run", "endpoint": f"{method} {path}", "items": items}
        logger.info("dry run: would send %s %s (%d items)", method, path, items, extra=extra)
        if body is not None:
            logger.debug("dry run body: %s", json.dumps(body, ensure_ascii=False), extra=extra)
        return _answer(method, path, body)
