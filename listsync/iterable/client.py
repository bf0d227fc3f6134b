"""The Iterable REST client: one place that sends, paces, retries and classifies.

Every method returns only on a 2xx and raises from `listsync.errors` otherwise, so callers decide
what to do from the exception class alone. `classify_response` is the single judge of what an
answer (or a failure to get one) means; the retry loop only acts on its verdict.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from listsync import __version__, metrics
from listsync.config import IterableSettings
from listsync.errors import (
    ConfigError,
    IterableError,
    RetryableError,
)
from listsync.iterable.payloads import (
    MAX_BATCH_ITEMS,
    MAX_BODY_BYTES,
    ApiResult,
    BulkResult,
    IterableList,
    Subscriber,
    dumps,
)
from listsync.iterable.ratelimit import RateLimiter
from listsync.iterable.responses import Classification, ResponseClass, classify_response
from listsync.iterable.retry import RetryPolicy
from listsync.iterable.transports import DryRunTransport

logger = logging.getLogger("listsync.iterable")

US_BASE_URL = "https://api.iterable.com"
EU_BASE_URL = "https://api.eu.iterable.com"
_DATA_CENTERS = {"US": US_BASE_URL, "EU": EU_BASE_URL}
# A connect that takes longer than this is a dead route, not a slow server; fail fast and retry.
CONNECT_TIMEOUT = 5.0


def base_url_for(data_center: str, override: str = "") -> str:
    """The API host for a data centre ("US" or "EU"); a non-empty override wins."""
    if override.strip():
        return override.strip().rstrip("/")
    try:
        return _DATA_CENTERS[data_center.strip().upper()]
    except KeyError:
        # No silent fallback to US (Segment's choice): EU data sent to the US host is a compliance
        # problem, and the key would be refused there anyway.
        raise ConfigError(f"Iterable data center must be 'US' or 'EU', got {data_center!r}") from None




@dataclass(frozen=True)
class _Sent:
    verdict: Classification
    elapsed_ms: int
    attempts: int


def _encode_bulk(body: dict[str, Any], key: str) -> bytes:
    count = len(body[key])
    if count == 0:
        raise ValueError(f"no {key} to send")
    if count > MAX_BATCH_ITEMS:
        raise ValueError(
            f"{count} {key} in one request; the limit is {MAX_BATCH_ITEMS}: split them with chunk_by_limits"
        )
    content = dumps(body)
    if len(content) > MAX_BODY_BYTES:
        raise ValueError(
            f"request body is {len(content)} bytes; the limit is {MAX_BODY_BYTES}: "
            "split the items with chunk_by_limits"
        )
    return content


class IterableClient:
    """A thread-safe Iterable API client; one connection pool per instance.

    api_key == "" selects dry run: requests go to DryRunTransport (any `transport` is ignored) and
    are not rate-limited, since nothing reaches Iterable.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        rate_limits: Mapping[str, float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        keep_alive: int = 20,
    ) -> None:
        self._api_key = api_key
        self._dry_run = api_key == ""
        self._base_url = base_url.rstrip("/")
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._limiter = RateLimiter(rate_limits, clock=clock, enabled=not self._dry_run)
        self._http = httpx.Client(
            base_url=self._base_url,
            transport=DryRunTransport() if self._dry_run else transport,
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
            headers={"User-Agent": f"listsync/{__version__}"},
            follow_redirects=False,
            # Kept-alive connections for at least every request in flight ([sync] max_in_flight).
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=max(20, keep_alive)),
        )

    @property
    def is_dry_run(self) -> bool:
        return self._dry_run

    def __repr__(self) -> str:
        return f"IterableClient(base_url={self._base_url!r}, dry_run={self._dry_run})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> IterableClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- lists ---------------------------------------------------------------------------------

    def get_lists(self) -> list[IterableList]:
        sent = self._send("GET", "/api/lists")
        raw = self._field(sent, "GET /api/lists", "lists", list)
        try:
            return [IterableList.from_json(item) for item in raw]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._shape_error("GET /api/lists", sent, f"a list entry is malformed ({exc})") from None

    def create_list(self, name: str) -> int:
        """POST /api/lists is not idempotent: Iterable keeps two lists with one name. So after an
        attempt that may have been applied without our hearing of it (no answer, or a 5xx), the
        name is looked up before trying again, instead of a blind retry that could make a twin."""
        body = dumps({"name": name})
        for attempt in range(1, self._retry.max_attempts + 1):
            try:
                sent = self._send("POST", "/api/lists", content=body, items=1, max_attempts=1)
                return int(self._field(sent, "POST /api/lists", "listId", int))
            except RetryableError as exc:
                if attempt == self._retry.max_attempts:
                    raise
                if exc.status is None or exc.status >= 500:
                    found = sorted(lst.id for lst in self.get_lists() if lst.name == name)
                    if found:
                        return found[0]
                wait = self._retry.delay(attempt, getattr(exc, "retry_after", None), self._rng)
                if wait is None:
                    raise
                self._sleep(wait)
        raise AssertionError("unreachable: the loop returns or raises")

    def subscribe(
        self, list_id: int, subscribers: Sequence[Subscriber], *, update_existing_users_only: bool
    ) -> BulkResult:
        body = {
            "listId": list_id,
            "subscribers": [s.to_json() for s in subscribers],
            "updateExistingUsersOnly": update_existing_users_only,
        }
        return self._bulk("/api/lists/subscribe", body, "subscribers", list_scoped=True)

    def unsubscribe(
        self,
        list_id: int,
        subscribers: Sequence[Subscriber],
        *,
        campaign_id: int | None,
        channel_unsubscribe: bool,
    ) -> BulkResult:
        body: dict[str, Any] = {
            "listId": list_id,
            "subscribers": [s.identity_json() for s in subscribers],
            "channelUnsubscribe": channel_unsubscribe,
        }
        if campaign_id is not None:
            body["campaignId"] = campaign_id
        return self._bulk("/api/lists/unsubscribe", body, "subscribers", list_scoped=True)

    def get_list_users(self, list_id: int, *, prefer_user_id: bool) -> list[str]:
        params: dict[str, str | int] = {"listId": list_id}
        if prefer_user_id:
            params["preferUserId"] = "true"
        sent = self._send("GET", "/api/lists/getUsers", params=params, expect_json=False, list_scoped=True)
        return [line.strip() for line in str(sent.verdict.body).splitlines() if line.strip()]

    # -- users ---------------------------------------------------------------------------------

    def update_user(self, body: dict[str, Any]) -> ApiResult:
        return self._single("/api/users/update", body)

    def bulk_update_users(self, users: Sequence[dict[str, Any]], *, update_only: bool = False) -> BulkResult:
        """updateOnly (not in Iterable's swagger; Segment sends it, Iterable enables it per project)
        is included only when true, as Segment does."""
        body: dict[str, Any] = {"updateOnly": True} if update_only else {}
        return self._bulk("/api/users/bulkUpdate", {**body, "users": list(users)}, "users")

    def update_email(
        self, *, new_email: str, current_email: str | None = None, current_user_id: str | None = None
    ) -> ApiResult:
        if bool(current_email) == bool(current_user_id):
            # Iterable's spec: currentEmail or currentUserId, not both.
            raise ValueError("update_email needs exactly one of current_email and current_user_id")
        body: dict[str, Any] = {"newEmail": new_email}
        if current_email:
            body["currentEmail"] = current_email
        if current_user_id:
            body["currentUserId"] = current_user_id
        return self._single("/api/users/updateEmail", body)

    # -- events and commerce -------------------------------------------------------------------

    def track_event(self, body: dict[str, Any]) -> ApiResult:
        return self._single("/api/events/track", body)

    def track_bulk(self, events: Sequence[dict[str, Any]]) -> BulkResult:
        return self._bulk("/api/events/trackBulk", {"events": list(events)}, "events")

    def track_purchase(self, body: dict[str, Any]) -> ApiResult:
        return self._single("/api/commerce/trackPurchase", body)

    def update_cart(self, body: dict[str, Any]) -> ApiResult:
        return self._single("/api/commerce/updateCart", body)

    # -- plumbing ------------------------------------------------------------------------------

    def _single(self, path: str, body: dict[str, Any]) -> ApiResult:
        sent = self._send("POST", path, content=dumps(body), items=1)
        verdict = sent.verdict
        return ApiResult(
            status=verdict.status or 0,
            code=verdict.code,
            msg=verdict.msg,
            params=verdict.params,
            elapsed_ms=sent.elapsed_ms,
            attempts=sent.attempts,
        )

    def _bulk(self, path: str, body: dict[str, Any], key: str, *, list_scoped: bool = False) -> BulkResult:
        content = _encode_bulk(body, key)
        sent = self._send("POST", path, content=content, items=len(body[key]), list_scoped=list_scoped)
        parsed = sent.verdict.body
        if not isinstance(parsed, dict):
            raise self._shape_error(f"POST {path}", sent, "expected a JSON object")
        return BulkResult.from_json(
            parsed, http_status=sent.verdict.status or 0, elapsed_ms=sent.elapsed_ms, attempts=sent.attempts
        )

    def _field(self, sent: _Sent, endpoint: str, key: str, kind: type) -> Any:
        body = sent.verdict.body
        value = body.get(key) if isinstance(body, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self._shape_error(endpoint, sent, f"expected {key!r} of type {kind.__name__}")
        return value

    def _shape_error(self, endpoint: str, sent: _Sent, problem: str) -> RetryableError:
        # A 2xx we cannot read is not the items' fault, so never a PermanentError that would
        # dead-letter them; not retried here either, as the same answer would come back at once.
        return RetryableError(
            self._redact(f"{endpoint}: HTTP {sent.verdict.status} but {problem}"),
            status=sent.verdict.status,
            code=sent.verdict.code,
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[redacted]") if self._api_key else text

    def _send(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        params: Mapping[str, str | int] | None = None,
        items: int = 0,
        expect_json: bool = True,
        list_scoped: bool = False,
        max_attempts: int | None = None,
    ) -> _Sent:
        endpoint = f"{method} {path}"
        started = self._clock()
        attempt = 0
        while True:
            attempt += 1
            self._limiter.acquire(endpoint, self._sleep)
            verdict = self._attempt(method, path, content, params, expect_json, list_scoped)
            if not self._dry_run:
                metrics.count_request(endpoint, verdict.status)
            if verdict.ok:
                self._limiter.on_success(endpoint)
                sent = _Sent(verdict, self._elapsed_ms(started), attempt)
                self._log_success(endpoint, sent, items)
                return sent
            if verdict.kind is ResponseClass.RATE_LIMITED:
                self._limiter.on_throttled(endpoint)
            delay = self._next_delay(verdict, attempt, max_attempts or self._retry.max_attempts)
            if delay is None:
                raise self._give_up(endpoint, verdict, attempt, items, started)
            logger.warning(
                "iterable request failed, retrying",
                extra={
                    "event": "iterable_retry",
                    "endpoint": endpoint,
                    "status": verdict.status,
                    "code": verdict.code,
                    "attempt": attempt,
                    "delay_s": round(delay, 3),
                },
            )
            self._sleep(delay)

    def _attempt(
        self,
        method: str,
        path: str,
        content: bytes | None,
        params: Mapping[str, str | int] | None,
        expect_json: bool,
        list_scoped: bool,
    ) -> Classification:
        headers = {"Api-Key": self._api_key} if self._api_key else {}
        if content is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(method, path, content=content, params=params, headers=headers)
        except httpx.RequestError as exc:
            return classify_response(exc)
        return classify_response(response, expect_json=expect_json, list_scoped=list_scoped)

    def _next_delay(self, verdict: Classification, attempt: int, max_attempts: int) -> float | None:
        if not verdict.retryable or attempt >= max_attempts:
            return None
        return self._retry.delay(attempt, verdict.retry_after, self._rng)

    def _give_up(
        self, endpoint: str, verdict: Classification, attempts: int, items: int, started: float
    ) -> IterableError:
        error = verdict.to_error(endpoint, attempts=attempts, redact=self._redact)
        logger.warning(
            "iterable request failed: %s",
            error,
            extra={
                "event": "iterable_request_failed",
                "endpoint": endpoint,
                "status": verdict.status,
                "code": verdict.code,
                "error_class": type(error).__name__,
                "attempts": attempts,
                "items": items,
                "elapsed_ms": self._elapsed_ms(started),
            },
        )
        return error

    def _log_success(self, endpoint: str, sent: _Sent, items: int) -> None:
        # List calls are few and worth a line each; one line per single-event call would bury the
        # log under thousands of deliveries, whose counts the run summary reports instead.
        level = logging.INFO if "/lists" in endpoint or items > 1 else logging.DEBUG
        logger.log(
            level,
            "iterable request %s: HTTP %s, %d items, %d ms",
            endpoint,
            sent.verdict.status,
            items,
            sent.elapsed_ms,
            extra={
                "event": "iterable_request",
                "endpoint": endpoint,
                "status": sent.verdict.status,
                "items": items,
                "attempts": sent.attempts,
                "elapsed_ms": sent.elapsed_ms,
            },
        )

    def _elapsed_ms(self, started: float) -> int:
        return round((self._clock() - started) * 1000)


def client_from_settings(
    settings: IterableSettings, *, transport: httpx.BaseTransport | None = None, keep_alive: int = 20
) -> IterableClient:
    """The client the configuration asks for; an empty api_key gives the dry-run client."""
    return IterableClient(
        api_key=settings.api_key.get_secret_value(),
        base_url=base_url_for(settings.data_center, settings.base_url),
        transport=transport,
        timeout=settings.timeout_seconds,
        retry=RetryPolicy(
            max_attempts=settings.max_attempts,
            base_delay=settings.retry_base_seconds,
            max_delay=settings.retry_max_seconds,
        ),
        rate_limits=settings.rate_limits or None,
        keep_alive=keep_alive,
    )
