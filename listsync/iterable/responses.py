"""What an Iterable answer means. Status, body code and message are classified once here
(success, retryable, rate limited, refused key, missing list, permanent) so the client and the
pipelines never read raw responses."""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from enum import StrEnum
from typing import Any

import httpx

from listsync.errors import (
    AuthError,
    IterableError,
    ListNotFoundError,
    PermanentError,
    RateLimitedError,
    RetryableError,
)

_MAX_DETAIL_CHARS = 300


class ResponseClass(StrEnum):
    SUCCESS = "success"
    RETRYABLE = "retryable"
    RATE_LIMITED = "rate_limited"
    PERMANENT = "permanent"
    LIST_NOT_FOUND = "list_not_found"
    AUTH = "auth"


_ERROR_TYPES: dict[ResponseClass, type[IterableError]] = {
    ResponseClass.RETRYABLE: RetryableError,
    ResponseClass.RATE_LIMITED: RateLimitedError,
    ResponseClass.PERMANENT: PermanentError,
    ResponseClass.LIST_NOT_FOUND: ListNotFoundError,
    ResponseClass.AUTH: AuthError,
}


def _identity(text: str) -> str:
    return text


@dataclass(frozen=True)
class Classification:
    """The verdict on one attempt. `body` is the parsed JSON, or the text for text endpoints."""

    kind: ResponseClass
    status: int | None
    code: str | None = None
    msg: str | None = None
    params: Any = None
    retry_after: float | None = None
    body: Any = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind is ResponseClass.SUCCESS

    @property
    def retryable(self) -> bool:
        return self.kind in (ResponseClass.RETRYABLE, ResponseClass.RATE_LIMITED)

    def to_error(
        self, endpoint: str, *, attempts: int = 1, redact: Callable[[str], str] = _identity
    ) -> IterableError:
        if self.ok:
            raise ValueError("a successful response is not an error")
        message = redact(self._message(endpoint, attempts))
        if self.kind is ResponseClass.RATE_LIMITED:
            return RateLimitedError(message, status=self.status, code=self.code, retry_after=self.retry_after)
        return _ERROR_TYPES[self.kind](message, status=self.status, code=self.code)

    def _message(self, endpoint: str, attempts: int) -> str:
        if self.kind is ResponseClass.AUTH:
            # Iterable's msg is left out on purpose: a key-refusal message may echo the key.
            code = f", code {self.code}" if self.code else ""
            return f"{endpoint}: the API key was refused (HTTP {self.status}{code})"
        message = f"{endpoint}: {self.detail}"
        if self.retryable:
            message += f" (gave up after {attempts} attempt{'s' if attempts != 1 else ''})"
        return message


# Iterable does not document the wording for an unknown list id, so accept the usual phrasings:
# "List 123 does not exist", "listId 123 not found", "Unknown list", "No such list".
_LIST_MISSING = re.compile(
    r"\blist(?:\s*id)?(?:\s+with\s+id)?[\s:=#'\"]*\d*[\s'\"]*(?:was\s+|is\s+)?"
    r"(?:not\s+found|does\s*n[o']t\s+exist|not\s+exist|no\s+longer\s+exists)"
    r"|\b(?:unknown|no\s+such|non-?existent)\s+list\b",
    re.IGNORECASE,
)


_RETRYABLE_EXCEPTIONS = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
    httpx.DecodingError,
)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    try:
        seconds: float | None = float(value.strip())
    except ValueError:
        seconds = _seconds_until(value.strip(), time.time() if now is None else now)
    if seconds is None or not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _seconds_until(http_date: str, now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # HTTP dates are always GMT
    return when.timestamp() - now


def _read_json(response: httpx.Response) -> tuple[Any, bool]:
    try:
        return response.json(), True
    except ValueError:
        return None, False


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_DETAIL_CHARS else flat[:_MAX_DETAIL_CHARS] + "..."


def _class_for_status(status: int) -> ResponseClass:
    if status in (401, 403):
        return ResponseClass.AUTH
    if status == 429:
        return ResponseClass.RATE_LIMITED
    if status == 408 or (status >= 500 and status not in (501, 505)):
        return ResponseClass.RETRYABLE
    return ResponseClass.PERMANENT


def _says_list_missing(status: int, code: str | None, msg: str | None) -> bool:
    if status not in (400, 404):
        return False
    if msg and _LIST_MISSING.search(msg):
        return True
    return status == 404 and code == "NotFound"


CONNECT_FAILED = "ConnectFailed"


def _classify_exception(exc: BaseException) -> Classification:
    kind = ResponseClass.RETRYABLE if isinstance(exc, _RETRYABLE_EXCEPTIONS) else ResponseClass.PERMANENT
    # Not even a connection: the caller may stop a whole run rather than fail every batch in turn.
    code = CONNECT_FAILED if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) else None
    return Classification(kind, status=None, code=code, detail=_snippet(f"{type(exc).__name__}: {exc}"))


def _classify_success(response: httpx.Response, expect_json: bool) -> Classification:
    status = response.status_code
    if not expect_json:
        return Classification(ResponseClass.SUCCESS, status, body=response.text)
    body, is_json = _read_json(response)
    if not is_json:
        # Typically a proxy or maintenance page. We cannot tell whether Iterable applied the
        # request; every call here is safe to repeat, so retry rather than guess either way.
        detail = f"HTTP {status} with a body that is not JSON: {_snippet(response.text)!r}"
        return Classification(ResponseClass.RETRYABLE, status, detail=detail)
    fields = body if isinstance(body, dict) else {}
    return Classification(
        ResponseClass.SUCCESS,
        status,
        code=fields.get("code"),
        msg=fields.get("msg"),
        params=fields.get("params"),
        body=body,
    )


def _classify_failure(response: httpx.Response, list_scoped: bool, now: float | None) -> Classification:
    status = response.status_code
    body, is_json = _read_json(response)
    fields = body if isinstance(body, dict) else {}
    code = fields.get("code") if isinstance(fields.get("code"), str) else None
    msg = fields.get("msg") if isinstance(fields.get("msg"), str) else None
    kind = _class_for_status(status)
    if kind is ResponseClass.PERMANENT and list_scoped and _says_list_missing(status, code, msg):
        kind = ResponseClass.LIST_NOT_FOUND
    if status == 413 and code is None:
        # A bare 413 (usually from a proxy) means the same as Iterable's BatchTooLarge: callers halve.
        code = "BatchTooLarge"
    said = msg if msg is not None else ("" if is_json else _snippet(response.text))
    detail = f"HTTP {status}" + (f" {code}" if code else "") + (f": {said}" if said else "")
    return Classification(
        kind,
        status,
        code=code,
        msg=msg,
        params=fields.get("params"),
        body=body,
        retry_after=parse_retry_after(response.headers.get("Retry-After"), now),
        detail=_snippet(detail),
    )


def classify_response(
    outcome: httpx.Response | BaseException,
    *,
    expect_json: bool = True,
    list_scoped: bool = False,
    now: float | None = None,
) -> Classification:
    """Decide what one attempt means: success, retry, or which permanent failure.

    The HTTP status decides first and the body only refines it, because Iterable sometimes says
    code "Success" on an error. `outcome` is a response, or the exception raised instead of one.
    `list_scoped` marks endpoints that name a list id (subscribe, unsubscribe, getUsers) so that an
    unknown list becomes ListNotFoundError. `now` (epoch seconds) is for Retry-After dates in tests.
    """
    if isinstance(outcome, BaseException):
        return _classify_exception(outcome)
    if 200 <= outcome.status_code < 300:
        return _classify_success(outcome, expect_json)
    return _classify_failure(outcome, list_scoped, now)
