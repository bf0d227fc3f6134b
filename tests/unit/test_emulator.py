"""The Iterable emulator against Iterable's documented behaviour, over both HTTP layers.

Every API test runs twice: in-process through `make_mock_transport` and over real HTTP through
`EmulatorServer`. The emulator's undocumented choices are checked too, so a change to one of them
shows up here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.emulator import EmulatorServer, FaultRule, IterableEmulator, make_mock_transport

KEY = "key-1"
Connect = Callable[..., httpx.Client]
REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["mock", "server"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """Make an httpx client for an emulator, in-process or over a real socket."""
    opened: list[tuple[IterableEmulator, httpx.Client, EmulatorServer | None]] = []

    def _connect(emu: IterableEmulator, api_key: str | None = KEY, timeout: float = 5.0) -> httpx.Client:
        headers = {"Api-Key": api_key} if api_key else {}
        server = EmulatorServer(emu) if request.param == "server" else None
        if server is None:
            client = httpx.Client(
                transport=make_mock_transport(emu),
                base_url="http://iterable.test",
                headers=headers,
                timeout=timeout,
            )
        else:
            client = httpx.Client(base_url=server.url, headers=headers, timeout=timeout)
        opened.append((emu, client, server))
        return client

    yield _connect
    for emu, client, server in opened:
        client.close()
        if server is not None:
            server.close()
        assert emu.internal_errors == []


@pytest.fixture
def emu() -> IterableEmulator:
    return IterableEmulator(api_keys=[KEY], seed=7)


@pytest.fixture
def api(emu: IterableEmulator, connect: Connect) -> httpx.Client:
    return connect(emu)


def new_list(api: httpx.Client, name: str = "audience") -> int:
    response = api.post("/api/lists", json={"name": name})
    assert response.status_code == 200
    list_id = response.json()["listId"]
    assert isinstance(list_id, int)
    return list_id


def subscribe(api: httpx.Client, list_id: int, *subscribers: dict[str, Any], **extra: Any) -> dict[str, Any]:
    response = api.post(
        "/api/lists/subscribe", json={"listId": list_id, "subscribers": list(subscribers), **extra}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def unsubscribe(api: httpx.Client, list_id: int, *subscribers: dict[str, Any]) -> dict[str, Any]:
    response = api.post("/api/lists/unsubscribe", json={"listId": list_id, "subscribers": list(subscribers)})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def failed(body: dict[str, Any]) -> dict[str, list[str]]:
    """The non-empty failedUpdates lists."""
    return {key: values for key, values in body["failedUpdates"].items() if values}


def error(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"msg", "code", "params"}
    return response.status_code, body["code"]


# auth, routing, lists --------------------------------------------------------------------------


def test_bad_or_missing_api_key_is_401_bad_api_key(emu: IterableEmulator, connect: Connect) -> None:
    for client in (connect(emu, api_key="wrong"), connect(emu, api_key=None)):
        response = client.get("/api/lists")
        assert response.status_code == 401
        assert response.json() == {"msg": "Invalid API key", "code": "BadApiKey", "params": None}
    legacy = connect(emu, api_key=None)
    assert legacy.get("/api/webhooks", headers={"Api_Key": KEY}).json() == {"webhooks": []}


def test_unknown_path_is_404_and_every_request_is_recorded(api: httpx.Client, emu: IterableEmulator) -> None:
    assert error(api.get("/api/nope")) == (404, "NotFound")
    api.post("/api/users/update", json={"email": "a@x.com"})
    recorded = emu.requests
    assert [(r.endpoint, r.status) for r in recorded] == [(None, 404), ("users/update", 200)]
    assert recorded[1].body == {"email": "a@x.com"}


def test_lists_create_get_duplicates_and_delete(api: httpx.Client, emu: IterableEmulator) -> None:
    first, second, other = new_list(api, "vip"), new_list(api, "vip"), new_list(api, "churn")
    assert first >= 100_000 and first < second < other
    lists = api.get("/api/lists").json()["lists"]
    assert [(item["id"], item["name"], item["listType"]) for item in lists] == [
        (first, "vip", "Standard"),
        (second, "vip", "Standard"),
        (other, "churn", "Standard"),
    ]
    assert all(isinstance(item["createdAt"], int) and item["createdAt"] > 1_600_000_000_000 for item in lists)
    assert emu.lists_named("vip") == [first, second]
    assert api.delete(f"/api/lists/{first}").json()["code"] == "Success"
    assert emu.lists_named("vip") == [second]
    assert error(api.delete(f"/api/lists/{first}")) == (404, "NotFound")
    assert error(api.post("/api/lists", json={})) == (400, "BadParams")


def test_bad_bodies(api: httpx.Client) -> None:
    headers = {"Content-Type": "application/json"}
    assert error(api.post("/api/lists/subscribe", content=b"{not json", headers=headers)) == (
        400,
        "BadJsonBody",
    )
    assert error(api.post("/api/lists/subscribe", content=b"")) == (400, "BadJsonBody")
    assert error(api.post("/api/lists/subscribe", json=[1])) == (400, "BadJsonBody")
    list_id = new_list(api)
    assert error(api.post("/api/lists/subscribe", json={"listId": list_id})) == (400, "BadParams")


# subscribe / unsubscribe -----------------------------------------------------------------------


def test_subscribe_is_a_set_and_counts_additions(api: httpx.Client, emu: IterableEmulator) -> None:
    list_id = new_list(api)
    body = subscribe(api, list_id, {"email": "a@x.com", "userId": "u1"}, {"email": "b@x.com"})
    assert (body["successCount"], body["failCount"], failed(body)) == (2, 0, {})
    assert body["invalidEmails"] == [] and body["invalidUserIds"] == []
    again = subscribe(api, list_id, {"email": "a@x.com", "userId": "u1"})
    assert again["successCount"] == 1
    assert emu.list_members(list_id) == {("a@x.com", "u1"), ("b@x.com", None)}
    assert emu.subscribe_count[(list_id, "u1")] == 1
    assert emu.subscribe_count[(list_id, "b@x.com")] == 1
    assert emu.redundant_subscribes[(list_id, "u1")] == 1


def test_unsubscribe_removes_members_and_reports_absent_ones(
    api: httpx.Client, emu: IterableEmulator
) -> None:
    list_id = new_list(api)
    subscribe(api, list_id, {"email": "a@x.com"}, {"userId": "u2"})
    body = unsubscribe(api, list_id, {"email": "a@x.com"}, {"email": "ghost@x.com"}, {"userId": "u2"})
    assert (body["successCount"], body["failCount"]) == (2, 1)
    assert failed(body) == {"notFoundEmails": ["ghost@x.com"]}
    body = unsubscribe(api, list_id, {"email": "a@x.com"})
    assert (body["successCount"], body["failCount"], failed(body)) == (0, 1, {"notFoundEmails": ["a@x.com"]})
    assert emu.list_members(list_id) == set()
    assert emu.user_by_email("a@x.com") is not None
    subscribe(api, list_id, {"email": "c@x.com"})
    response = api.post(
        "/api/lists/unsubscribe",
        json={
            "listId": list_id,
            "subscribers": [{"email": "c@x.com"}],
            "channelUnsubscribe": True,
            "campaignId": 5,
        },
    )
    assert response.json()["successCount"] == 1
    assert emu.channel_unsubscribes == {"c@x.com"}
    assert emu.unsubscribe_count[(list_id, "c@x.com")] == 1


def test_unknown_list_id_is_bad_params(api: httpx.Client) -> None:
    response = api.post("/api/lists/subscribe", json={"listId": 4242, "subscribers": [{"email": "a@x.com"}]})
    assert response.status_code == 400
    assert response.json() == {"msg": "List 4242 does not exist", "code": "BadParams", "params": None}
    assert error(api.get("/api/lists/getUsers", params={"listId": 4242})) == (400, "BadParams")


def test_more_than_1000_subscribers_or_4mb_is_batch_too_large(
    api: httpx.Client, emu: IterableEmulator
) -> None:
    list_id = new_list(api)
    too_many = [{"email": f"u{n}@x.com"} for n in range(1001)]
    response = api.post("/api/lists/subscribe", json={"listId": list_id, "subscribers": too_many})
    assert error(response) == (400, "BatchTooLarge")
    assert subscribe(api, list_id, *too_many[:1000])["successCount"] == 1000
    padding = "x" * 4_100
    heavy = [{"email": f"h{n}@x.com", "dataFields": {"pad": padding}} for n in range(1000)]
    response = api.post("/api/lists/subscribe", json={"listId": list_id, "subscribers": heavy})
    assert error(response) == (400, "BatchTooLarge")
    assert error(api.post("/api/users/bulkUpdate", json={"users": too_many})) == (400, "BatchTooLarge")
    assert error(api.post("/api/events/trackBulk", json={"events": [{}] * 1001})) == (400, "BatchTooLarge")
    assert len(emu.list_members(list_id)) == 1000


def test_invalid_and_forgotten_users_fail_per_item(api: httpx.Client, emu: IterableEmulator) -> None:
    emu.invalid_emails.add("Bounce@x.com")
    emu.forgotten.update({"gone@x.com", "u-gone"})
    list_id = new_list(api)
    body = subscribe(
        api,
        list_id,
        {"email": "not-an-email"},
        {"email": "bounce@x.com"},
        {"email": "ok@x.com"},
        {"email": "gone@x.com"},
        {"userId": "u-gone"},
        {"dataFields": {"a": 1}},
    )
    assert (body["successCount"], body["failCount"]) == (1, 5)
    assert failed(body) == {
        "invalidEmails": ["not-an-email", "bounce@x.com"],
        "forgottenEmails": ["gone@x.com"],
        "forgottenUserIds": ["u-gone"],
    }
    assert body["invalidEmails"] == ["not-an-email", "bounce@x.com"]
    assert emu.list_member_emails(list_id) == {"ok@x.com"}
    assert error(api.post("/api/users/update", json={"email": "nope"})) == (400, "InvalidEmailAddressError")
    assert error(api.post("/api/users/update", json={"email": "gone@x.com"})) == (409, "ForgottenUserError")
    assert error(api.post("/api/users/update", json={"dataFields": {}})) == (400, "BadParams")


def test_update_existing_users_only_reports_not_found(api: httpx.Client, emu: IterableEmulator) -> None:
    emu.add_user(email="known@x.com", user_id="k1")
    list_id = new_list(api)
    body = subscribe(
        api,
        list_id,
        {"email": "known@x.com"},
        {"email": "new@x.com"},
        {"userId": "nobody"},
        updateExistingUsersOnly=True,
    )
    assert (body["successCount"], body["failCount"]) == (1, 2)
    assert failed(body) == {"notFoundEmails": ["new@x.com"], "notFoundUserIds": ["nobody"]}
    assert emu.user_by_email("new@x.com") is None
    assert emu.list_member_user_ids(list_id) == {"k1"}


# identity rules by project type -----------------------------------------------------------------


def test_hybrid_conflict_and_email_follows_user(api: httpx.Client, emu: IterableEmulator) -> None:
    list_id = new_list(api)
    subscribe(api, list_id, {"email": "a@x.com", "userId": "u1"}, {"email": "b@x.com", "userId": "u2"})
    body = subscribe(api, list_id, {"email": "b@x.com", "userId": "u1"})
    assert failed(body) == {"conflictEmails": ["b@x.com"], "conflictUserIds": ["u1"]}
    subscribe(api, list_id, {"email": "a2@x.com", "userId": "u1"})
    assert emu.list_members(list_id) == {("a2@x.com", "u1"), ("b@x.com", "u2")}
    assert emu.user_by_email("a@x.com") is None
    assert emu.subscribe_count[(list_id, "u1")] == 1
    subscribe(api, list_id, {"email": "c@x.com"})
    subscribe(api, list_id, {"email": "c@x.com", "userId": "u3"})
    assert emu.list_member_user_ids(list_id) == {"u1", "u2", "u3"}
    conflict = api.post("/api/users/update", json={"email": "a2@x.com", "userId": "u2"})
    assert error(conflict) == (409, "ExternalKeyConflict")


def test_hybrid_lookup_by_user_id_first_and_case_insensitive_email(
    api: httpx.Client, emu: IterableEmulator
) -> None:
    list_id = new_list(api)
    subscribe(api, list_id, {"email": "Mixed@X.com", "userId": "U1"})
    assert emu.list_member_emails(list_id) == {"mixed@x.com"}
    body = unsubscribe(api, list_id, {"userId": "u1"})
    assert failed(body) == {"notFoundUserIds": ["u1"]}
    assert unsubscribe(api, list_id, {"email": "MIXED@x.com"})["successCount"] == 1


def test_email_project_rules(connect: Connect) -> None:
    emu = IterableEmulator(project_type="email", api_keys=KEY)
    api = connect(emu)
    list_id = new_list(api)
    body = subscribe(
        api,
        list_id,
        {"userId": "u1"},
        {"userId": "u2", "preferUserId": True},
        {"email": "a@x.com", "userId": "u3"},
        updateExistingUsersOnly=True,
    )
    assert (body["successCount"], body["failCount"], failed(body)) == (2, 1, {"notFoundUserIds": ["u1"]})
    placeholder = emu.user_by_user_id("u2")
    assert placeholder is not None and placeholder.email is not None
    assert placeholder.email.endswith("@placeholder.email")
    subscribe(api, list_id, {"email": "a@x.com", "userId": "u4"})
    assert emu.list_members(list_id) == {(placeholder.email, "u2"), ("a@x.com", "u4")}
    assert error(api.post("/api/users/update", json={"userId": "u9"})) == (400, "UnknownUserIdError")
    assert api.post("/api/users/update", json={"userId": "u4", "dataFields": {"x": 1}}).status_code == 200
    user = emu.user_by_email("a@x.com")
    assert user is not None and user.data_fields == {"x": 1}


def test_user_id_project_rules(connect: Connect) -> None:
    emu = IterableEmulator(project_type="userId", api_keys=KEY)
    api = connect(emu)
    list_id = new_list(api)
    body = subscribe(
        api,
        list_id,
        {"userId": "u1", "email": "same@x.com", "preferUserId": True},
        {"userId": "U1", "email": "same@x.com"},
        {"email": "only@x.com"},
        {"userId": "x" * 53},
    )
    assert (body["successCount"], body["failCount"]) == (2, 2)
    assert failed(body) == {"invalidUserIds": ["x" * 53]}
    assert emu.list_member_user_ids(list_id) == {"u1", "U1"}
    assert emu.list_members(list_id) == {("same@x.com", "u1"), ("same@x.com", "U1")}
    assert error(api.post("/api/users/update", json={"email": "e@x.com"})) == (400, "BadParams")
    assert error(api.post("/api/users/update", json={"userId": "y" * 53})) == (400, "InvalidUserIdError")


def test_update_email(api: httpx.Client, emu: IterableEmulator) -> None:
    list_id = new_list(api)
    subscribe(api, list_id, {"email": "old@x.com", "userId": "u1"}, {"email": "other@x.com"})
    moved = api.post(
        "/api/users/updateEmail",
        json={"currentEmail": "old@x.com", "currentUserId": "zzz", "newEmail": "new@x.com"},
    )
    assert moved.json()["code"] == "Success"
    assert emu.list_member_emails(list_id) == {"new@x.com", "other@x.com"}
    taken = api.post("/api/users/updateEmail", json={"currentUserId": "u1", "newEmail": "other@x.com"})
    assert error(taken) == (409, "EmailAlreadyExists")
    unknown = api.post("/api/users/updateEmail", json={"currentEmail": "who@x.com", "newEmail": "n@x.com"})
    assert error(unknown) == (400, "UnknownEmailError")
    unknown = api.post("/api/users/updateEmail", json={"currentUserId": "nobody", "newEmail": "n@x.com"})
    assert error(unknown) == (400, "UnknownUserIdError")
    invalid = api.post("/api/users/updateEmail", json={"currentUserId": "u1", "newEmail": "bad"})
    assert error(invalid) == (400, "InvalidEmailAddressError")


def test_users_update_and_bulk_update_merge_fields(api: httpx.Client, emu: IterableEmulator) -> None:
    api.post("/api/users/update", json={"email": "a@x.com", "dataFields": {"p": {"a": 1}, "n": 1}})
    api.post(
        "/api/users/update",
        json={"email": "a@x.com", "dataFields": {"p": {"b": 2}}, "mergeNestedObjects": True},
    )
    body = api.post(
        "/api/users/bulkUpdate",
        json={
            "users": [
                {"email": "a@x.com", "dataFields": {"n": 2}},
                {"email": "bad"},
                {"userId": "u9", "dataFields": "x"},
            ]
        },
    ).json()
    assert (body["successCount"], body["failCount"]) == (1, 2)
    assert failed(body) == {"invalidEmails": ["bad"], "invalidDataUserIds": ["u9"]}
    user = emu.user_by_email("a@x.com")
    assert user is not None and user.data_fields == {"p": {"a": 1, "b": 2}, "n": 2}


# getUsers and rate limits ------------------------------------------------------------------------


def test_get_users_text_format_and_5_per_minute(connect: Connect) -> None:
    clock = FakeClock()
    emu = IterableEmulator(api_keys=KEY, clock=clock)
    api = connect(emu)
    list_id = new_list(api)
    subscribe(api, list_id, {"email": "b@x.com", "userId": "u2"}, {"email": "a@x.com"}, {"userId": "u3"})
    response = api.get("/api/lists/getUsers", params={"listId": list_id})
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "a@x.com\nb@x.com\n"
    by_id = api.get("/api/lists/getUsers", params={"listId": list_id, "preferUserId": "true"})
    assert by_id.text == "u2\nu3\n"
    for _ in range(3):
        assert api.get("/api/lists/getUsers", params={"listId": list_id}).status_code == 200
    limited = api.get("/api/lists/getUsers", params={"listId": list_id})
    assert limited.status_code == 429 and "retry-after" not in limited.headers
    assert limited.json() == {
        "msg": "Exceeded rate limit for endpoint: /api/lists/getUsers, project: 1",
        "code": "RateLimitExceeded",
        "params": None,
    }
    clock.now += 12.0
    assert api.get("/api/lists/getUsers", params={"listId": list_id}).status_code == 200
    assert api.get("/api/lists/getUsers", params={"listId": list_id}).status_code == 429


def test_configurable_rate_limits_and_retry_after(connect: Connect) -> None:
    clock = FakeClock()
    emu = IterableEmulator(
        api_keys=KEY, clock=clock, rate_limits={"lists/subscribe": (1.0, 2.0)}, retry_after_header=2
    )
    api = connect(emu)
    list_id = new_list(api)
    assert [subscribe_status(api, list_id) for _ in range(3)] == [200, 200, 429]
    response = api.post("/api/lists/subscribe", json={"listId": list_id, "subscribers": []})
    assert response.headers["retry-after"] == "2"
    clock.now += 1.0
    assert subscribe_status(api, list_id) == 200
    emu.set_rate_limit("lists/subscribe", None)
    assert {subscribe_status(api, list_id) for _ in range(5)} == {200}
    assert emu.rate_limits["users/bulkUpdate"] == (5.0, 5.0)
    emu.set_rate_limit("GET lists", (1.0, 1.0))
    assert [api.get("/api/lists").status_code for _ in range(2)] == [200, 429]
    assert new_list(api) > list_id


def subscribe_status(api: httpx.Client, list_id: int) -> int:
    return api.post("/api/lists/subscribe", json={"listId": list_id, "subscribers": []}).status_code


# events and commerce ----------------------------------------------------------------------------


def test_track_with_same_id_updates_the_event(api: httpx.Client, emu: IterableEmulator) -> None:
    first = api.post(
        "/api/events/track",
        json={
            "eventName": "Signed Up",
            "email": "a@x.com",
            "id": "ev-1",
            "createdAt": 1700000000,
            "dataFields": {"v": 1},
        },
    )
    assert first.json() == {"msg": "Event tracked", "code": "Success", "params": {"id": "ev-1"}}
    api.post(
        "/api/events/track",
        json={"eventName": "Signed Up", "email": "a@x.com", "id": "ev-1", "dataFields": {"v": 2}},
    )
    generated = api.post("/api/events/track", json={"eventName": "Other", "userId": "u1"}).json()["params"][
        "id"
    ]
    events = emu.events
    assert set(events) == {"ev-1", generated}
    assert events["ev-1"]["dataFields"] == {"v": 2} and events["ev-1"]["writes"] == 2
    assert error(api.post("/api/events/track", json={"email": "a@x.com"})) == (400, "BadParams")


def test_track_bulk(api: httpx.Client, emu: IterableEmulator) -> None:
    body = api.post(
        "/api/events/trackBulk",
        json={
            "events": [
                {"eventName": "e", "email": "a@x.com", "id": "b1"},
                {"eventName": "e", "email": "a@x.com", "id": "b1"},
                {"email": "b@x.com"},
                {"eventName": "e", "email": "bad"},
            ]
        },
    ).json()
    assert (body["successCount"], body["failCount"]) == (2, 2)
    assert failed(body) == {"invalidDataEmails": ["b@x.com"], "invalidEmails": ["bad"]}
    assert list(emu.events) == ["b1"]


def test_track_purchase_validates_items_and_clears_cart(api: httpx.Client, emu: IterableEmulator) -> None:
    item = {"id": "sku-1", "name": "Mug", "price": 9.5, "quantity": 2}
    cart = api.post("/api/commerce/updateCart", json={"user": {"email": "a@x.com"}, "items": [item]})
    assert cart.json()["code"] == "Success"
    user = emu.user_by_email("a@x.com")
    assert user is not None and user.cart == [item]
    for broken in (
        {"name": "Mug", "price": 1, "quantity": 1},
        {**item, "price": "1"},
        {**item, "quantity": 1.5},
    ):
        response = api.post(
            "/api/commerce/trackPurchase", json={"user": {"email": "a@x.com"}, "items": [broken], "total": 1}
        )
        assert error(response) == (400, "BadParams")
    missing_total = api.post(
        "/api/commerce/trackPurchase", json={"user": {"email": "a@x.com"}, "items": [item]}
    )
    assert error(missing_total) == (400, "BadParams")
    assert emu.purchases == {}
    done = api.post(
        "/api/commerce/trackPurchase",
        json={
            "user": {"email": "a@x.com", "dataFields": {"vip": True}},
            "items": [item],
            "total": 19.0,
            "id": "order-1",
        },
    )
    assert done.json()["code"] == "Success"
    user = emu.user_by_email("a@x.com")
    assert user is not None and user.cart == [] and user.data_fields == {"vip": True}
    assert emu.purchases["order-1"]["total"] == 19.0


# fault injection -------------------------------------------------------------------------------


def test_status_fault_applies_nothing(api: httpx.Client, emu: IterableEmulator) -> None:
    list_id = new_list(api)
    emu.add_fault(FaultRule(endpoint="lists/subscribe", kind="status", count=1, status=503))
    response = api.post(
        "/api/lists/subscribe", json={"listId": list_id, "subscribers": [{"email": "a@x.com"}]}
    )
    assert response.status_code == 503
    assert response.json() == {"msg": "Internal error", "code": "GenericError", "params": None}
    assert emu.list_members(list_id) == set()
    assert subscribe(api, list_id, {"email": "a@x.com"})["successCount"] == 1
    assert emu.faults_injected["status"] == 1
    assert emu.requests_to("lists/subscribe")[0].fault == "status"


def test_rate_limit_fault(api: httpx.Client, emu: IterableEmulator) -> None:
    emu.add_fault(FaultRule(endpoint="users/update", kind="rate_limit", count=2))
    statuses = [api.post("/api/users/update", json={"email": "a@x.com"}).status_code for _ in range(3)]
    assert statuses == [429, 429, 200]
    assert emu.faults_injected["rate_limit"] == 2


def test_drop_before_and_drop_after(api: httpx.Client, emu: IterableEmulator) -> None:
    list_id = new_list(api)
    emu.add_fault(FaultRule(endpoint="lists/subscribe", kind="drop_before", count=1))
    with pytest.raises(httpx.RemoteProtocolError):
        api.post("/api/lists/subscribe", json={"listId": list_id, "subscribers": [{"email": "a@x.com"}]})
    assert emu.list_members(list_id) == set()
    emu.clear_faults()
    emu.add_fault(FaultRule(endpoint="*", kind="drop_after", count=1))
    with pytest.raises(httpx.RemoteProtocolError):
        api.post("/api/lists/subscribe", json={"listId": list_id, "subscribers": [{"email": "a@x.com"}]})
    assert emu.list_member_emails(list_id) == {"a@x.com"}
    assert api.get("/api/lists").status_code == 200
    assert emu.faults_injected == {"drop_before": 1, "drop_after": 1}


def test_delay_within_and_beyond_the_timeout(emu: IterableEmulator, connect: Connect) -> None:
    api = connect(emu, timeout=0.2)
    emu.add_fault(FaultRule(endpoint="users/update", kind="delay", count=1, delay_seconds=0.05))
    assert api.post("/api/users/update", json={"email": "slow@x.com"}).status_code == 200
    emu.add_fault(FaultRule(endpoint="users/update", kind="delay", count=1, delay_seconds=0.5))
    with pytest.raises(httpx.ReadTimeout):
        api.post("/api/users/update", json={"email": "late@x.com"})
    assert emu.user_by_email("late@x.com") is not None
    assert emu.faults_injected["delay"] == 2


def test_partial_fault_fails_a_fraction_unapplied(api: httpx.Client, emu: IterableEmulator) -> None:
    list_id = new_list(api)
    emu.add_fault(FaultRule(endpoint="lists/subscribe", kind="partial", count=1, partial_fraction=0.3))
    emu.add_fault(FaultRule(endpoint="users/update", kind="partial"))
    body = subscribe(api, list_id, *({"email": f"u{n}@x.com"} for n in range(10)))
    assert (body["successCount"], body["failCount"]) == (7, 3)
    rejected = set(failed(body)["invalidDataEmails"])
    assert len(rejected) == 3
    assert emu.list_member_emails(list_id) == {f"u{n}@x.com" for n in range(10)} - rejected
    assert api.post("/api/users/update", json={"email": "a@x.com"}).status_code == 200
    assert emu.faults_injected == {"partial": 1}


def test_probability_faults_are_seeded() -> None:
    def run(seed: int) -> list[int]:
        emu = IterableEmulator(api_keys=KEY, seed=seed)
        emu.add_fault(FaultRule(endpoint="users/update", kind="status", probability=0.3, status=500))
        with httpx.Client(
            transport=make_mock_transport(emu), base_url="http://i.test", headers={"Api-Key": KEY}
        ) as client:
            return [
                client.post("/api/users/update", json={"email": "a@x.com"}).status_code for _ in range(40)
            ]

    assert run(3) == run(3)
    assert 0 < run(3).count(500) < 40


def test_fault_rule_validation() -> None:
    with pytest.raises(ValueError):
        FaultRule(kind="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FaultRule(probability=1.5)


# drift helpers ---------------------------------------------------------------------------------


def test_drift_helpers(api: httpx.Client, emu: IterableEmulator) -> None:
    list_id = new_list(api)
    emu.add_list_member(list_id, email="drift@x.com")
    emu.add_list_member(list_id, user_id="drift-id")
    assert emu.list_members(list_id) == {("drift@x.com", None), (None, "drift-id")}
    assert emu.subscribe_count == {}
    assert emu.remove_list_member(list_id, email="drift@x.com")
    assert not emu.remove_list_member(list_id, email="drift@x.com")
    assert emu.delete_list(list_id) and not emu.delete_list(list_id)
    response = api.post(
        "/api/lists/subscribe", json={"listId": list_id, "subscribers": [{"email": "a@x.com"}]}
    )
    assert error(response) == (400, "BadParams")


# the real server specifically --------------------------------------------------------------------


def test_server_keep_alive_and_concurrency() -> None:
    emu = IterableEmulator(api_keys=KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server, httpx.Client(base_url=server.url, headers={"Api-Key": KEY}) as api:
        list_id = new_list(api)
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                for k in range(20):
                    subscribe(api, list_id, {"email": f"w{n}-{k}@x.com"})
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(emu.list_member_emails(list_id)) == 160
        assert emu.internal_errors == []


def test_server_close_cuts_idle_keep_alive_connections() -> None:
    emu = IterableEmulator(api_keys=KEY)
    server = EmulatorServer(emu)
    with httpx.Client(base_url=server.url, headers={"Api-Key": KEY}) as api:
        assert api.get("/api/webhooks").status_code == 200
        server.close()
        with pytest.raises(httpx.TransportError):
            api.get("/api/webhooks")


def test_server_latency_delays_every_answer() -> None:
    """Only a lower bound is checked: a loaded machine may add time, never remove it."""
    emu = IterableEmulator(api_keys=KEY)
    with EmulatorServer(emu, latency_seconds=0.2) as server:
        with httpx.Client(base_url=server.url, headers={"Api-Key": KEY}) as api:
            for _ in range(2):
                started = time.monotonic()
                assert api.get("/api/lists").status_code == 200
                assert time.monotonic() - started >= 0.2
            server.latency_seconds = 0.0
            assert api.get("/api/lists").status_code == 200
        with pytest.raises(ValueError, match="latency_seconds"):
            server.latency_seconds = -1.0
    assert len(emu.requests) == 3


def test_main_runs_a_standalone_server() -> None:
    command = [
        sys.executable,
        "-m",
        "tests.emulator",
        "--port",
        "0",
        "--project-type",
        "userId",
        "--api-key",
        "local",
    ]
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            url = line.strip().rsplit(" ", 1)[-1]
            assert "userId project" in line and url.startswith("http://127.0.0.1:")
            response = httpx.get(f"{url}/api/lists", headers={"Api-Key": "local"})
            assert response.status_code == 200 and json.loads(response.text) == {"lists": []}
        finally:
            process.terminate()
            process.wait(timeout=5)


@pytest.mark.parametrize("project_type", ["email", "hybrid", "userId"])
def test_a_new_email_per_project_type(connect: Connect, project_type: str) -> None:
    """users/update with a known userId and a new email: in hybrid and userId projects the userId
    finds the profile and its email changes; in email projects the email finds (here: creates)
    another profile and the userId moves to it, so only users/updateEmail renames the listed one."""
    emu = IterableEmulator(project_type=project_type, api_keys=KEY)  # type: ignore[arg-type]
    api = connect(emu)
    list_id = new_list(api)
    subscribe(api, list_id, {"email": "old@x.com", "userId": "u1"})
    assert api.post("/api/users/update", json={"userId": "u1", "email": "new@x.com"}).status_code == 200
    if project_type == "email":
        assert emu.list_members(list_id) == {("old@x.com", None)}
        assert {(u.email, u.user_id) for u in emu.users()} == {("old@x.com", None), ("new@x.com", "u1")}
        assert unsubscribe(api, list_id, {"userId": "u1"})["failCount"] == 1  # notFound: u1 is not listed
        renamed = api.post("/api/users/updateEmail", json={"currentEmail": "old@x.com", "newEmail": "kept@x.com"})
        assert renamed.json()["code"] == "Success"
        assert emu.list_members(list_id) == {("kept@x.com", None)}  # list membership follows the profile
        assert unsubscribe(api, list_id, {"email": "old@x.com"})["failCount"] == 1
    else:
        assert emu.list_members(list_id) == {("new@x.com", "u1")}
        assert len(emu.users()) == 1
        assert unsubscribe(api, list_id, {"userId": "u1"})["successCount"] == 1
