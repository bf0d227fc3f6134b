"""IterableClient against httpx.MockTransport handlers: classification, retries, dry run, secrets."""

from __future__ import annotations

import email.utils
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from listsync import __version__
from listsync.errors import (
    AuthError,
    ConfigError,
    IterableError,
    ListNotFoundError,
    PermanentError,
    RateLimitedError,
    RetryableError,
)
from listsync.iterable.client import EU_BASE_URL, US_BASE_URL, IterableClient, base_url_for
from listsync.iterable.payloads import (
    ENVELOPE_BYTES,
    BulkResult,
    ItemOutcome,
    Subscriber,
    chunk_by_limits,
    dumps,
)
from listsync.iterable.responses import ResponseClass, classify_response
from listsync.iterable.retry import RetryPolicy
from tests.helpers import FakeClock

KEY = "k3y-7f3a9c1e5b2d4e6f8a0b1c2d3e4f5a6b"
NOW = 1_700_000_000.0
Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """Wraps a handler and keeps every request it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)


def make_client(
    handler: Handler, *, api_key: str = KEY, **kwargs: Any
) -> tuple[IterableClient, Recorder, FakeClock]:
    recorder = Recorder(handler)
    clock = FakeClock(50.0)
    client = IterableClient(
        api_key=api_key,
        base_url="https://api.test/",
        transport=httpx.MockTransport(recorder),
        sleep=clock.sleep,
        clock=clock,
        rng=random.Random(7),
        **kwargs,
    )
    return client, recorder, clock


def sequence(*answers: httpx.Response | Exception) -> Handler:
    """A handler that gives the answers in order, raising the exceptions, then repeats the last."""
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler


def ok_bulk(count: int = 1) -> httpx.Response:
    return httpx.Response(200, json={"successCount": count, "failCount": 0})


def err(status: int, code: str | None = None, msg: str = "", **headers: str) -> httpx.Response:
    body = {"msg": msg, "code": code, "params": None} if code else None
    return (
        httpx.Response(status, json=body, headers=headers)
        if body
        else httpx.Response(status, headers=headers)
    )


ALICE = Subscriber(email="alice@example.com")


# -- classify_response: one table for every kind of answer -------------------------------------

HTTP_DATE_IN_120S = email.utils.formatdate(NOW + 120, usegmt=True)
LIST_MISSING = {"msg": "List 4242 does not exist", "code": "BadParams", "params": None}

CASES: list[
    tuple[str, httpx.Response, bool, ResponseClass, type[IterableError] | None, str | None, float | None]
] = [
    # id, response, list_scoped, class, error type, code, retry_after
    (
        "200",
        httpx.Response(200, json={"msg": "", "code": "Success", "params": None}),
        False,
        ResponseClass.SUCCESS,
        None,
        "Success",
        None,
    ),
    (
        "200-partial",
        httpx.Response(
            200, json={"successCount": 1, "failCount": 2, "failedUpdates": {"notFoundEmails": ["b@x.com"]}}
        ),
        True,
        ResponseClass.SUCCESS,
        None,
        None,
        None,
    ),
    (
        "200-not-json",
        httpx.Response(200, text="<html>maintenance</html>"),
        False,
        ResponseClass.RETRYABLE,
        RetryableError,
        None,
        None,
    ),
    (
        "400-badparams",
        err(400, "BadParams", "email is invalid"),
        False,
        ResponseClass.PERMANENT,
        PermanentError,
        "BadParams",
        None,
    ),
    (
        "400-batch-too-large",
        err(400, "BatchTooLarge", "too many"),
        True,
        ResponseClass.PERMANENT,
        PermanentError,
        "BatchTooLarge",
        None,
    ),
    (
        "400-list-missing",
        httpx.Response(400, json=LIST_MISSING),
        True,
        ResponseClass.LIST_NOT_FOUND,
        ListNotFoundError,
        "BadParams",
        None,
    ),
    (
        "400-list-missing-elsewhere",
        httpx.Response(400, json=LIST_MISSING),
        False,
        ResponseClass.PERMANENT,
        PermanentError,
        "BadParams",
        None,
    ),
    (
        "400-says-success",
        err(400, "Success", "bad"),
        False,
        ResponseClass.PERMANENT,
        PermanentError,
        "Success",
        None,
    ),
    (
        "401",
        err(401, "BadApiKey", "Invalid API key"),
        False,
        ResponseClass.AUTH,
        AuthError,
        "BadApiKey",
        None,
    ),
    ("403", err(403, "Forbidden", "nope"), True, ResponseClass.AUTH, AuthError, "Forbidden", None),
    (
        "404-list",
        err(404, "NotFound", "not found"),
        True,
        ResponseClass.LIST_NOT_FOUND,
        ListNotFoundError,
        "NotFound",
        None,
    ),
    (
        "404-other",
        err(404, "NotFound", "not found"),
        False,
        ResponseClass.PERMANENT,
        PermanentError,
        "NotFound",
        None,
    ),
    (
        "409",
        err(409, "ForgottenUserError", "Contact is GDPR forgotten"),
        False,
        ResponseClass.PERMANENT,
        PermanentError,
        "ForgottenUserError",
        None,
    ),
    ("413", err(413), False, ResponseClass.PERMANENT, PermanentError, "BatchTooLarge", None),
    (
        "429",
        err(429, "RateLimitExceeded", "Exceeded rate limit for endpoint"),
        False,
        ResponseClass.RATE_LIMITED,
        RateLimitedError,
        "RateLimitExceeded",
        None,
    ),
    (
        "429-retry-after-seconds",
        err(429, "RateLimitExceeded", "slow down", **{"Retry-After": "17"}),
        False,
        ResponseClass.RATE_LIMITED,
        RateLimitedError,
        "RateLimitExceeded",
        17.0,
    ),
    (
        "429-retry-after-date",
        err(429, "RateLimitExceeded", "slow down", **{"Retry-After": HTTP_DATE_IN_120S}),
        False,
        ResponseClass.RATE_LIMITED,
        RateLimitedError,
        "RateLimitExceeded",
        120.0,
    ),
    ("408", err(408), False, ResponseClass.RETRYABLE, RetryableError, None, None),
    (
        "500",
        err(500, "DatabaseError", "oops"),
        False,
        ResponseClass.RETRYABLE,
        RetryableError,
        "DatabaseError",
        None,
    ),
    ("501", err(501), False, ResponseClass.PERMANENT, PermanentError, None, None),
    (
        "502-html",
        httpx.Response(502, text="<html>Bad Gateway</html>"),
        False,
        ResponseClass.RETRYABLE,
        RetryableError,
        None,
        None,
    ),
    ("503", err(503, **{"Retry-After": "3"}), False, ResponseClass.RETRYABLE, RetryableError, None, 3.0),
    ("504", err(504), False, ResponseClass.RETRYABLE, RetryableError, None, None),
    ("505", err(505), False, ResponseClass.PERMANENT, PermanentError, None, None),
    ("418", err(418), False, ResponseClass.PERMANENT, PermanentError, None, None),
]


@pytest.mark.parametrize(
    ("response", "list_scoped", "kind", "error_type", "code", "retry_after"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_classify_response(
    response: httpx.Response,
    list_scoped: bool,
    kind: ResponseClass,
    error_type: type[IterableError] | None,
    code: str | None,
    retry_after: float | None,
) -> None:
    verdict = classify_response(response, list_scoped=list_scoped, now=NOW)
    assert verdict.kind is kind
    assert verdict.code == code
    assert verdict.retry_after == (pytest.approx(retry_after) if retry_after is not None else None)
    if error_type is None:
        assert verdict.ok
        return
    error = verdict.to_error("POST /api/x")
    assert type(error) is error_type
    assert error.status == response.status_code
    assert error.code == code


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.ReadTimeout("read timed out"), ResponseClass.RETRYABLE),
        (httpx.ConnectTimeout("connect timed out"), ResponseClass.RETRYABLE),
        (httpx.ConnectError("refused"), ResponseClass.RETRYABLE),
        (httpx.ReadError("reset by peer"), ResponseClass.RETRYABLE),
        (httpx.RemoteProtocolError("server disconnected"), ResponseClass.RETRYABLE),
        (httpx.UnsupportedProtocol("ftp"), ResponseClass.PERMANENT),
    ],
)
def test_classify_transport_failures(exc: Exception, kind: ResponseClass) -> None:
    verdict = classify_response(exc)
    assert verdict.kind is kind
    assert verdict.status is None


def test_text_endpoint_success_keeps_the_text() -> None:
    verdict = classify_response(httpx.Response(200, text="a@x.com\nb@x.com\n"), expect_json=False)
    assert verdict.ok
    assert verdict.body == "a@x.com\nb@x.com\n"


def test_auth_error_message_names_the_refusal_and_code() -> None:
    error = classify_response(err(401, "BadApiKey", "Invalid API key")).to_error("GET /api/lists")
    assert str(error) == "GET /api/lists: the API key was refused (HTTP 401, code BadApiKey)"


def test_permanent_error_carries_iterables_code_and_message() -> None:
    error = classify_response(err(400, "BadParams", "eventName is required")).to_error(
        "POST /api/events/track"
    )
    assert "BadParams" in str(error) and "eventName is required" in str(error)


# -- per-item outcomes of a 2xx bulk answer ----------------------------------------------------


def test_bulk_result_outcomes_per_item() -> None:
    body = {
        "successCount": 2,
        "failCount": 6,
        "invalidEmails": ["Legacy@Example.com"],  # deprecated top-level bucket
        "failedUpdates": {
            "notFoundEmails": ["gone@example.com"],
            "notFoundUserIds": ["u-gone"],
            "forgottenEmails": ["FORGOT@example.com"],
            "conflictUserIds": ["u-conflict"],
            "invalidDataEmails": ["typed@example.com"],
            "invalidUserIds": [],
        },
    }
    result = BulkResult.from_json(body, http_status=200, elapsed_ms=12)
    assert (result.success_count, result.fail_count) == (2, 6)
    assert result.failed["invalidEmails"] == frozenset({"Legacy@Example.com"})
    assert "invalidUserIds" not in result.failed
    assert result.outcome("legacy@example.com", None) is ItemOutcome.INVALID
    assert result.outcome("Gone@Example.COM", None) is ItemOutcome.NOT_FOUND
    assert result.outcome(None, "u-gone") is ItemOutcome.NOT_FOUND
    assert result.outcome(None, "U-GONE") is ItemOutcome.OK  # userIds are case-sensitive
    assert result.outcome("forgot@example.com", "u1") is ItemOutcome.FORGOTTEN
    assert result.outcome("fine@example.com", "u-conflict") is ItemOutcome.CONFLICT
    assert result.outcome("typed@example.com", None) is ItemOutcome.INVALID_DATA
    assert result.outcome("fine@example.com", "u-fine") is ItemOutcome.OK


def test_forgotten_wins_over_not_found_for_one_user() -> None:
    body = {
        "successCount": 0,
        "failCount": 1,
        "failedUpdates": {"notFoundUserIds": ["u1"], "forgottenEmails": ["a@x.com"]},
    }
    result = BulkResult.from_json(body, http_status=200, elapsed_ms=1)
    assert result.outcome("a@x.com", "u1") is ItemOutcome.FORGOTTEN


def test_track_bulk_reads_disallowed_event_names() -> None:
    client, _, _ = make_client(
        lambda r: httpx.Response(
            200, json={"successCount": 1, "failCount": 1, "disallowedEventNames": ["blocked"]}
        )
    )
    result = client.track_bulk([{"eventName": "ok", "email": "a@x.com"}, {"eventName": "blocked"}])
    assert result.failed["disallowedEventNames"] == frozenset({"blocked"})


def test_subscribe_partial_failure_through_the_client() -> None:
    client, _, _ = make_client(
        lambda r: httpx.Response(
            200, json={"successCount": 1, "failCount": 1, "failedUpdates": {"notFoundEmails": ["b@x.com"]}}
        )
    )
    result = client.subscribe(7, [ALICE, Subscriber(email="B@x.com")], update_existing_users_only=True)
    assert result.http_status == 200
    assert result.outcome("alice@example.com", None) is ItemOutcome.OK
    assert result.outcome("B@x.com", None) is ItemOutcome.NOT_FOUND


# -- request shapes ----------------------------------------------------------------------------


def test_subscribe_and_unsubscribe_bodies_and_headers() -> None:
    client, recorder, _ = make_client(lambda r: ok_bulk())
    rich = Subscriber(email="a@x.com", user_id="u1", data_fields={"plan": "pro"}, prefer_user_id=True)
    client.subscribe(5, [rich], update_existing_users_only=False)
    client.unsubscribe(5, [rich], campaign_id=None, channel_unsubscribe=False)
    client.unsubscribe(5, [Subscriber(user_id="u2")], campaign_id=99, channel_unsubscribe=True)
    sub, unsub, unsub_campaign = (json.loads(r.content) for r in recorder.requests)
    assert sub == {
        "listId": 5,
        "updateExistingUsersOnly": False,
        "subscribers": [
            {"email": "a@x.com", "userId": "u1", "dataFields": {"plan": "pro"}, "preferUserId": True}
        ],
    }
    assert unsub == {
        "listId": 5,
        "channelUnsubscribe": False,
        "subscribers": [{"email": "a@x.com", "userId": "u1"}],
    }
    assert unsub_campaign == {
        "listId": 5,
        "channelUnsubscribe": True,
        "campaignId": 99,
        "subscribers": [{"userId": "u2"}],
    }
    first = recorder.requests[0]
    assert str(first.url) == "https://api.test/api/lists/subscribe"
    assert first.headers["Api-Key"] == KEY
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"] == f"listsync/{__version__}"


def test_subscriber_needs_an_identity() -> None:
    with pytest.raises(ValueError, match="email or a user_id"):
        Subscriber(email=None, user_id=None)


def test_get_list_users_parses_text_lines() -> None:
    client, recorder, _ = make_client(
        lambda r: httpx.Response(200, text="u1\nu2\r\n\n u3 \n", headers={"Content-Type": "text/plain"})
    )
    assert client.get_list_users(12, prefer_user_id=True) == ["u1", "u2", "u3"]
    assert client.get_list_users(12, prefer_user_id=False) == ["u1", "u2", "u3"]
    assert dict(recorder.requests[0].url.params) == {"listId": "12", "preferUserId": "true"}
    assert dict(recorder.requests[1].url.params) == {"listId": "12"}


def test_get_list_users_on_a_deleted_list() -> None:
    client, _, _ = make_client(lambda r: httpx.Response(400, json=LIST_MISSING))
    with pytest.raises(ListNotFoundError):
        client.get_list_users(4242, prefer_user_id=False)


def test_get_lists_and_create_list() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(
                200,
                json={
                    "lists": [{"id": 1, "name": "vip", "createdAt": 1600000000000, "listType": "Standard"}]
                },
            )
        return httpx.Response(200, json={"listId": 77})

    client, recorder, _ = make_client(handler)
    lists = client.get_lists()
    assert [(item.id, item.name, item.list_type) for item in lists] == [(1, "vip", "Standard")]
    assert client.create_list("new_audience") == 77
    assert json.loads(recorder.requests[1].content) == {"name": "new_audience"}


def test_unreadable_2xx_shape_is_retryable_not_permanent() -> None:
    client, _, _ = make_client(lambda r: httpx.Response(200, json={"unexpected": True}))
    with pytest.raises(RetryableError, match="listId"):
        client.create_list("x")


def test_single_endpoints_return_api_results() -> None:
    client, recorder, _ = make_client(
        lambda r: httpx.Response(200, json={"msg": "", "code": "Success", "params": None})
    )
    assert client.update_user({"email": "a@x.com"}).code == "Success"
    assert client.track_event({"eventName": "e", "email": "a@x.com", "id": "ev1"}).status == 200
    assert client.track_purchase({"user": {"email": "a@x.com"}, "items": [], "total": 0}).code == "Success"
    assert client.update_cart({"user": {"email": "a@x.com"}, "items": []}).code == "Success"
    assert client.update_email(new_email="n@x.com", current_user_id="u1").code == "Success"
    assert client.bulk_update_users([{"email": "a@x.com"}]).success_count == 0
    paths = [r.url.path for r in recorder.requests]
    assert paths == [
        "/api/users/update",
        "/api/events/track",
        "/api/commerce/trackPurchase",
        "/api/commerce/updateCart",
        "/api/users/updateEmail",
        "/api/users/bulkUpdate",
    ]
    assert json.loads(recorder.requests[4].content) == {"newEmail": "n@x.com", "currentUserId": "u1"}
    with pytest.raises(ValueError):
        client.update_email(new_email="n@x.com")


# -- batch limits ------------------------------------------------------------------------------


def test_client_refuses_oversized_batches_without_sending() -> None:
    client, recorder, _ = make_client(lambda r: ok_bulk())
    with pytest.raises(ValueError, match="1001 subscribers"):
        client.subscribe(
            1, [Subscriber(email=f"u{i}@x.com") for i in range(1001)], update_existing_users_only=False
        )
    fat = [Subscriber(email=f"u{i}@x.com", data_fields={"blob": "x" * 2_100_000}) for i in range(2)]
    with pytest.raises(ValueError, match="bytes"):
        client.subscribe(1, fat, update_existing_users_only=False)
    with pytest.raises(ValueError, match="no events"):
        client.track_bulk([])
    assert recorder.requests == []


def test_chunk_by_item_count() -> None:
    chunks = chunk_by_limits(list(range(2500)))
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    assert [x for c in chunks for x in c] == list(range(2500))
    assert chunk_by_limits([]) == []


def test_chunk_by_bytes_counts_commas_and_envelope() -> None:
    # 100-byte items: 3 of them take 100 + 101 + 101 = 302 bytes of the 350 left after the envelope.
    chunks = chunk_by_limits(list(range(10)), max_bytes=ENVELOPE_BYTES + 350, size_of=lambda _: 100)
    assert [len(c) for c in chunks] == [3, 3, 3, 1]


def test_chunks_of_real_subscribers_serialise_within_the_limit() -> None:
    rng = random.Random(3)
    subs = [
        Subscriber(email=f"user{i}@example.com", data_fields={"note": "é" * rng.randint(0, 3000)})
        for i in range(300)
    ]
    limit = 60_000
    chunks = chunk_by_limits(subs, max_bytes=limit)
    assert len(chunks) > 1
    for chunk in chunks:
        body = {
            "listId": 2_147_483_647,
            "subscribers": [s.to_json() for s in chunk],
            "updateExistingUsersOnly": False,
        }
        assert len(dumps(body)) <= limit


def test_single_oversized_item_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"item 1 is 5000 bytes .* cannot be sent"):
        chunk_by_limits(["a", "b", "c"], max_bytes=4000, size_of=lambda s: 5000 if s == "b" else 10)


# -- retries -----------------------------------------------------------------------------------


def test_two_503s_then_success() -> None:
    client, recorder, clock = make_client(sequence(err(503), err(503), ok_bulk()))
    result = client.subscribe(1, [ALICE], update_existing_users_only=False)
    assert result.success_count == 1
    assert result.attempts == 3
    assert len(recorder.requests) == 3
    assert len(clock.sleeps) == 2
    assert 0 <= clock.sleeps[0] <= 0.5 and 0 <= clock.sleeps[1] <= 1.0  # full jitter under the cap


def test_retry_after_is_honoured_exactly() -> None:
    client, _, clock = make_client(sequence(err(503, **{"Retry-After": "7"}), ok_bulk()))
    client.subscribe(1, [ALICE], update_existing_users_only=False)
    assert clock.sleeps == [7.0]


def test_429_retries_and_slows_the_endpoint_down() -> None:
    client, recorder, clock = make_client(
        sequence(err(429, "RateLimitExceeded", "Exceeded rate limit", **{"Retry-After": "2"}), ok_bulk())
    )
    client.subscribe(1, [ALICE], update_existing_users_only=False)
    assert len(recorder.requests) == 2
    assert clock.sleeps[0] == 2.0
    assert client._limiter.bucket("POST /api/lists/subscribe").rate == 50.0


def test_retry_after_beyond_the_cap_gives_up_at_once() -> None:
    client, recorder, clock = make_client(
        sequence(err(429, "RateLimitExceeded", "later", **{"Retry-After": "900"}))
    )
    with pytest.raises(RateLimitedError) as caught:
        client.subscribe(1, [ALICE], update_existing_users_only=False)
    assert caught.value.retry_after == 900.0
    assert len(recorder.requests) == 1
    assert clock.sleeps == []


def test_persistent_503_exhausts_into_retryable_error() -> None:
    client, recorder, clock = make_client(sequence(err(503)), retry=RetryPolicy(max_attempts=4))
    with pytest.raises(RetryableError) as caught:
        client.track_event({"eventName": "e", "email": "a@x.com"})
    assert type(caught.value) is RetryableError
    assert "gave up after 4 attempts" in str(caught.value)
    assert len(recorder.requests) == 4
    assert len(clock.sleeps) == 3
    assert all(0 <= s <= cap for s, cap in zip(clock.sleeps, [0.5, 1.0, 2.0], strict=True))


def test_persistent_429_exhausts_into_rate_limited_error() -> None:
    client, recorder, _ = make_client(sequence(err(429, "RateLimitExceeded", "slow")))
    with pytest.raises(RateLimitedError):
        client.get_lists()
    assert len(recorder.requests) == 5


def test_backoff_is_capped_at_max_delay() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=4.0)
    rng = random.Random(1)
    delays = [policy.delay(attempt, None, rng) for attempt in range(1, 30)]
    assert all(d is not None and 0 <= d <= 4.0 for d in delays)
    assert max(d for d in delays if d is not None) > 2.0


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_are_not_retried(status: int) -> None:
    client, recorder, clock = make_client(sequence(err(status, "BadApiKey", "Invalid API key")))
    with pytest.raises(AuthError, match="the API key was refused"):
        client.subscribe(1, [ALICE], update_existing_users_only=False)
    assert len(recorder.requests) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("status", [400, 404, 409, 413, 501, 505])
def test_permanent_failures_are_not_retried(status: int) -> None:
    client, recorder, _ = make_client(sequence(err(status, "BadParams", "no")))
    with pytest.raises(PermanentError):
        client.update_user({"email": "a@x.com"})
    assert len(recorder.requests) == 1


def test_subscribe_to_a_deleted_list_raises_list_not_found() -> None:
    client, recorder, _ = make_client(sequence(httpx.Response(400, json=LIST_MISSING)))
    with pytest.raises(ListNotFoundError) as caught:
        client.subscribe(4242, [ALICE], update_existing_users_only=False)
    assert caught.value.code == "BadParams" and caught.value.status == 400
    assert len(recorder.requests) == 1


def test_batch_too_large_is_permanent_with_its_code() -> None:
    client, _, _ = make_client(sequence(err(400, "BatchTooLarge", "Batch too large")))
    with pytest.raises(PermanentError) as caught:
        client.track_bulk([{"eventName": "e", "email": "a@x.com"}])
    assert caught.value.code == "BatchTooLarge"


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ConnectError("connection refused"),
        httpx.ReadError("connection reset"),
    ],
)
def test_timeouts_and_dropped_connections_are_retried(exc: Exception) -> None:
    client, recorder, _ = make_client(sequence(exc, ok_bulk()))
    assert client.unsubscribe(3, [ALICE], campaign_id=None, channel_unsubscribe=False).success_count == 1
    assert len(recorder.requests) == 2


def test_persistent_timeouts_exhaust_into_retryable_error() -> None:
    client, recorder, _ = make_client(sequence(httpx.ReadTimeout("timed out")))
    with pytest.raises(RetryableError, match="ReadTimeout"):
        client.track_event({"eventName": "e", "email": "a@x.com"})
    assert len(recorder.requests) == 5


def test_non_json_200_is_retried() -> None:
    client, recorder, _ = make_client(sequence(httpx.Response(200, text="<html>oops</html>"), ok_bulk()))
    client.subscribe(1, [ALICE], update_existing_users_only=False)
    assert len(recorder.requests) == 2


def test_timeouts_are_configured() -> None:
    client, _, _ = make_client(lambda r: ok_bulk(), timeout=12.0)
    assert client._http.timeout.read == 12.0
    assert client._http.timeout.connect == 5.0


# -- dry run -----------------------------------------------------------------------------------


def test_dry_run_sends_nothing_and_answers_in_shape(caplog: pytest.LogCaptureFixture) -> None:
    def must_not_be_called(request: httpx.Request) -> httpx.Response:
        raise AssertionError("dry run reached the transport")

    caplog.set_level(logging.DEBUG)
    client, recorder, clock = make_client(must_not_be_called, api_key="")
    assert client.is_dry_run
    subs = [ALICE, Subscriber(user_id="u2"), Subscriber(email="c@x.com")]
    result = client.subscribe(9, subs, update_existing_users_only=False)
    assert (result.success_count, result.fail_count, dict(result.failed)) == (3, 0, {})
    assert client.unsubscribe(9, subs[:1], campaign_id=None, channel_unsubscribe=False).success_count == 1
    assert client.get_lists() == []
    first = client.create_list("vip_users")
    assert first < 0
    assert client.create_list("vip_users") == first
    assert client.create_list("other") not in (first, 0)
    assert client.get_list_users(9, prefer_user_id=False) == []
    assert client.track_event({"eventName": "e", "email": "a@x.com"}).code == "Success"
    assert client.track_bulk([{"eventName": "e"}] * 4).success_count == 4
    assert recorder.requests == []
    assert clock.sleeps == []
    messages = [r.getMessage() for r in caplog.records]
    assert "dry run: would send POST /api/lists/subscribe (3 items)" in messages
    assert any(m.startswith("dry run body: ") and "alice@example.com" in m for m in messages)


def test_dry_run_still_enforces_batch_limits() -> None:
    client, _, _ = make_client(lambda r: ok_bulk(), api_key="")
    with pytest.raises(ValueError):
        client.bulk_update_users([{"email": f"u{i}@x.com"} for i in range(1001)])


# -- secrets -----------------------------------------------------------------------------------


def test_api_key_never_reaches_logs_exceptions_or_reprs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "listsync"):
        caplog.set_level(logging.DEBUG, logger=name)  # restored after the test, unlike setLevel
    echo = f"Invalid API key: {KEY}"
    scenarios: list[tuple[Handler, Callable[[IterableClient], object]]] = [
        (lambda r: ok_bulk(), lambda c: c.subscribe(1, [ALICE], update_existing_users_only=False)),
        (sequence(err(503), ok_bulk()), lambda c: c.subscribe(1, [ALICE], update_existing_users_only=False)),
        (sequence(err(401, "BadApiKey", echo)), lambda c: c.get_lists()),
        (sequence(err(400, "BadParams", echo)), lambda c: c.track_event({"eventName": "e"})),
        (sequence(err(500, "GenericError", echo)), lambda c: c.update_user({"email": "a@x.com"})),
        (sequence(httpx.Response(200, text=echo)), lambda c: c.update_cart({"user": {}, "items": []})),
        (sequence(httpx.ReadTimeout(echo)), lambda c: c.track_purchase({"user": {}})),
        (sequence(err(429, "RateLimitExceeded", echo)), lambda c: c.get_list_users(1, prefer_user_id=False)),
    ]
    seen: list[str] = []
    sent_keys: list[str] = []
    for handler, call in scenarios:

        def spy(request: httpx.Request, handler: Handler = handler) -> httpx.Response:
            sent_keys.append(request.headers["Api-Key"])
            return handler(request)

        client, _, _ = make_client(spy)
        seen.append(repr(client))
        try:
            call(client)
        except IterableError as exc:
            seen.extend([str(exc), repr(exc), repr(exc.args)])
        client.close()
    for record in caplog.records:
        seen.append(record.getMessage())
        seen.extend(str(value) for value in vars(record).values())
    assert sent_keys and set(sent_keys) == {KEY}  # the key was really in play
    assert any("iterable_request" in s for s in seen)
    leaks = [s for s in seen if KEY in s]
    assert leaks == []


# -- hosts -------------------------------------------------------------------------------------


def test_base_url_selection() -> None:
    assert base_url_for("US") == US_BASE_URL == "https://api.iterable.com"
    assert base_url_for("eu") == EU_BASE_URL == "https://api.eu.iterable.com"
    assert base_url_for("EU", "http://localhost:8099/") == "http://localhost:8099"
    with pytest.raises(ConfigError, match="'US' or 'EU'"):
        base_url_for("APAC")


def test_client_uses_the_base_url_host() -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json={"lists": []}))
    with IterableClient(
        api_key=KEY, base_url=base_url_for("EU"), transport=httpx.MockTransport(recorder)
    ) as client:
        client.get_lists()
    assert recorder.requests[0].url.host == "api.eu.iterable.com"
