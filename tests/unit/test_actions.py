"""Payload builders of the four actions: exact bodies, dates, items, page naming (pure, table-driven)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from listsync.domain import ProjectType
from listsync.events import actions, mapping
from listsync.events.actions import PageSettings, Request, Skip
from listsync.events.mapping import MappingSpec
from listsync.iterable import dates

PRESETS = {spec.name: mapping.compile_mapping(spec) for spec in (*mapping.PRESETS, mapping.PAGE_PRESET)}
STAMP = "2026-03-01T12:00:00Z"
STAMP_S = 1772366400


def _build(name: str, event: dict[str, Any], **kwargs: Any) -> Request | Skip | None:
    return actions.build(PRESETS[name], {"messageId": "m-1", "timestamp": STAMP, **event}, **kwargs)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2023-05-17T10:00:00+02:00", "2023-05-17 08:00:00 +00:00"),
        ("2023-05-17T10:00:00Z", "2023-05-17 10:00:00 +00:00"),
        ("2023-05-17T10:00:00.123456Z", "2023-05-17 10:00:00 +00:00"),
        ("2023-05-17 23:30-01:00", "2023-05-18 00:30:00 +00:00"),
        ("2023-05-17T1000", "2023-05-17 10:00:00 +00:00"),
        ("2023-05-17T10:00:00", "2023-05-17 10:00:00 +00:00"),  # no zone: UTC
        ("2023-05-17", None),  # plain dates stay
        ("1234", None),
        ("1234-12", None),
        ("1234-12-00", None),
        ("1234-12-99", None),
        ("2023-05-17T25:00:00Z", None),
        ("not a date", None),
    ],
)
def test_iterable_date(value: str, expected: str | None) -> None:
    assert dates.iterable_date(value) == expected


def test_convert_dates_walks_objects_and_lists_and_leaves_other_values() -> None:
    raw = {"at": "2023-01-01T00:00:00Z", "day": "2023-01-01", "n": 5, "ok": True,
           "deep": [{"when": "2023-01-01T01:00:00+01:00"}, "x"]}
    assert dates.convert_dates(raw) == {
        "at": "2023-01-01 00:00:00 +00:00", "day": "2023-01-01", "n": 5, "ok": True,
        "deep": [{"when": "2023-01-01 00:00:00 +00:00"}, "x"],
    }


@pytest.mark.parametrize(
    ("product", "expected"),
    [
        ({"product_id": 507, "name": "Uno", "price": 3, "quantity": 2},
         {"id": "507", "name": "Uno", "price": 3, "quantity": 2}),
        ({"product_id": "p1", "id": "ignored", "sku": "S", "name": "N", "price": "9.5", "quantity": "3",
          "category": "games", "image_url": "http://i", "url": "http://u", "description": "d",
          "color": "red", "added": "2023-01-01T00:00:00Z"},
         {"id": "p1", "sku": "S", "name": "N", "price": 9.5, "quantity": 3, "categories": ["games"],
          "imageUrl": "http://i", "url": "http://u", "description": "d",
          "dataFields": {"color": "red", "added": "2023-01-01 00:00:00 +00:00"}}),
        ({"id": "x", "name": "N", "price": 1, "quantity": 1, "categories": ["a", "b"], "dataFields": {"k": 1}},
         {"id": "x", "name": "N", "price": 1, "quantity": 1, "categories": ["a", "b"], "dataFields": {"k": 1}}),
    ],
)
def test_commerce_item(product: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actions.commerce_item(product, 0) == expected


@pytest.mark.parametrize(
    ("pages", "event", "expected"),
    [
        (PageSettings(track_all_pages=True), {"type": "page", "name": "shoppingCart"}, "shoppingCart page"),
        (PageSettings(track_all_pages=True), {"type": "screen", "name": "Home"}, "Home screen"),
        (PageSettings(track_all_pages=True), {"type": "page"}, "Loaded a Page"),
        (PageSettings(track_all_pages=True, map_all_pages=True), {"type": "page", "name": "X"}, "Loaded a Page"),
        (PageSettings(track_all_pages=True, map_all_pages=True), {"type": "screen", "name": "X"}, "Loaded a Screen"),
        (PageSettings(track_named_pages=True), {"type": "page", "name": "X"}, "X page"),
        (PageSettings(track_named_pages=True), {"type": "page", "category": "Docs"}, None),
        (PageSettings(track_categorized_pages=True), {"type": "page", "category": "Docs"}, "Docs page"),
        (PageSettings(track_categorized_pages=True), {"type": "page", "name": "X"}, None),
        (PageSettings(track_named_pages=True), {"type": "page", "properties": {"name": "P"}}, "P page"),
        (PageSettings(), {"type": "page", "name": "X"}, None),
    ],
)
def test_page_event_name(pages: PageSettings, event: dict[str, Any], expected: str | None) -> None:
    assert actions.page_event_name(event, pages) == expected


IDENTIFY = {"type": "identify", "userId": "u1",
            "traits": {"email": " A@X.com ", "phone": "+14158675309", "born": "1990-02-03T04:05:06-01:00",
                       "since": "2020-01-01", "settings": {"mobile": True}},
            "integrations": {"Iterable": {"mergeNestedObjects": True}}}


def test_upsert_user_body() -> None:
    built = _build("Identify Calls", IDENTIFY)
    assert built == Request(
        "users/update",
        {"email": "a@x.com", "userId": "u1",
         "dataFields": {"email": " A@X.com ", "phone": "+14158675309", "born": "1990-02-03 05:05:06 +00:00",
                        "since": "2020-01-01", "settings": {"mobile": True}, "phoneNumber": "+14158675309"},
         "mergeNestedObjects": True},
        "u1", "a@x.com",
    )


def test_upsert_user_new_email_single_and_batched() -> None:
    spec = MappingSpec("U", 'type = "identify"', "upsert_user", {"newEmail": {"@path": "$.traits.new_email"}})
    event = {"type": "identify", "userId": "u1", "messageId": "m", "traits": {"email": "a@x.com", "new_email": "B@x.com"}}
    single = actions.build(mapping.compile_mapping(spec), event)
    assert isinstance(single, Request) and single.new_email == "b@x.com" and "newEmail" not in single.body
    batched = actions.build(mapping.compile_mapping(MappingSpec(**{**spec.__dict__, "batch": True})), event)
    assert isinstance(batched, Request) and batched.endpoint == "users/bulkUpdate"
    # delivery changes the email per project type (identity.email_update), in both modes
    assert batched.new_email == "b@x.com" and batched.body["dataFields"]["email"] == "a@x.com"


def test_custom_event_body_with_campaign_and_template() -> None:
    event = {"type": "track", "event": "Clicked", "userId": "u1", "context": {"traits": {"email": "c@x.com"}},
             "properties": {"campaignId": "123", "templateId": 456, "at": "2023-01-01T00:00:00Z"}}
    assert _build("Track Calls", event) == Request(
        "events/track",
        {"email": "c@x.com", "userId": "u1", "eventName": "Clicked", "id": "m-1", "createdAt": STAMP_S,
         "dataFields": {"campaignId": "123", "templateId": 456, "at": "2023-01-01 00:00:00 +00:00"},
         "campaignId": 123, "templateId": 456},
        "u1", "c@x.com", "m-1",
    )


def test_custom_event_drops_unreadable_optional_numbers() -> None:
    built = _build("Track Calls", {"type": "track", "event": "E", "userId": "u", "properties": {"campaignId": "abc"}})
    assert isinstance(built, Request) and "campaignId" not in built.body


ORDER = {"type": "track", "event": "Order Completed", "userId": "u1",
         "context": {"traits": {"email": "o@x.com", "phone": "+1555", "vip": True}},
         "properties": {"order_id": "o-9", "total": 23, "coupon": "X", "campaignId": 7,
                        "products": [{"product_id": "p1", "name": "A", "price": 10, "quantity": 2, "color": "red"},
                                     {"product_id": "p2", "name": "B", "price": 3, "quantity": 1}]}}


def test_track_purchase_body() -> None:
    assert _build("Order Completed Calls", ORDER) == Request(
        "commerce/trackPurchase",
        {"id": "o-9",
         "user": {"email": "o@x.com", "userId": "u1", "dataFields": {"email": "o@x.com", "phone": "+1555", "vip": True,
                                                                    "phoneNumber": "+1555"},
                  "mergeNestedObjects": False},
         "items": [{"id": "p1", "name": "A", "price": 10, "quantity": 2, "dataFields": {"color": "red"}},
                   {"id": "p2", "name": "B", "price": 3, "quantity": 1}],
         "total": 23, "createdAt": STAMP_S,
         "dataFields": {"order_id": "o-9", "total": 23, "coupon": "X", "campaignId": 7},
         "campaignId": 7},
        "u1", "o@x.com", "o-9",
    )


def test_track_purchase_without_order_id_gets_a_stable_id_from_the_message_id() -> None:
    event = {**ORDER, "properties": {k: v for k, v in ORDER["properties"].items() if k != "order_id"}}
    first, again = _build("Order Completed Calls", event), _build("Order Completed Calls", event)
    assert isinstance(first, Request) and isinstance(again, Request)
    assert first.body["id"] == again.body["id"] == actions.derived_id("m-1", "Order Completed Calls")


def test_cart_updates_body() -> None:
    event = {"type": "track", "event": "Cart Updated", "userId": "u1",
             "properties": {"products": [{"product_id": 1, "name": "A", "price": 1.5, "quantity": 4}]}}
    assert _build("Update Cart Calls", event) == Request(
        "commerce/updateCart",
        {"user": {"userId": "u1", "dataFields": {}, "mergeNestedObjects": False},
         "items": [{"id": "1", "name": "A", "price": 1.5, "quantity": 4}]},
        "u1", None,
    )


def test_page_call_as_custom_event() -> None:
    event = {"type": "page", "userId": "u1", "name": "shoppingCart", "category": "Shop", "properties": {"path": "/c"}}
    built = _build("Page and Screen Calls", event, pages=PageSettings(track_named_pages=True))
    assert isinstance(built, Request)
    assert built.body["eventName"] == "shoppingCart page"
    assert built.body["dataFields"] == {"path": "/c", "name": "shoppingCart", "category": "Shop"}
    assert _build("Page and Screen Calls", event, pages=PageSettings()) is None


@pytest.mark.parametrize(
    ("name", "event", "project_type", "reason", "failed"),
    [
        ("Track Calls", {"type": "track", "event": "E", "anonymousId": "a"}, ProjectType.HYBRID,
         "missing_identifier: the event maps to neither", False),
        ("Track Calls", {"type": "track", "event": "E", "properties": {"email": "a@x.com"}}, ProjectType.USER_ID,
         "missing_identifier: a userId-based project", False),
        ("Order Completed Calls", {"type": "track", "event": "Order Completed", "userId": "u", "properties": {}},
         ProjectType.HYBRID, "missing_field: total", True),
        ("Order Completed Calls", {"type": "track", "event": "Order Completed", "userId": "u",
                                   "properties": {"total": 1}}, ProjectType.HYBRID, "missing_field: items", True),
        ("Update Cart Calls", {"type": "track", "event": "Cart Updated", "userId": "u",
                               "properties": {"products": [{"product_id": "p", "price": 1, "quantity": 1}]}},
         ProjectType.HYBRID, "items[0].name is required", True),
        ("Identify Calls", {"type": "identify", "userId": "u", "traits": "oops"}, ProjectType.HYBRID,
         "dataFields must be an object", True),
    ],
)
def test_skips_say_why(name: str, event: dict[str, Any], project_type: ProjectType, reason: str, failed: bool) -> None:
    built = _build(name, event, project_type=project_type)
    assert isinstance(built, Skip) and reason in built.reason and built.failed is failed


ANONYMOUS = {
    "Identify Calls": {"type": "identify", "anonymousId": "a", "traits": {"plan": "pro"}},
    "Track Calls": {"type": "track", "event": "E", "anonymousId": "a"},
    "Order Completed Calls": {"type": "track", "event": "Order Completed", "anonymousId": "a", "properties": {}},
    "Update Cart Calls": {"type": "track", "event": "Cart Updated", "anonymousId": "a",
                          "properties": {"products": [{"product_id": "p", "name": "P", "price": 1, "quantity": 1}]}},
}


@pytest.mark.parametrize("name", sorted(ANONYMOUS))
@pytest.mark.parametrize("batch", [False, True])
def test_no_email_and_no_user_id_is_refused_with_a_reason_by_every_action(name: str, batch: bool) -> None:
    """Segment: "Must include email or userId." in every action; listsync also in batch mode, and
    before any other check (an anonymous purchase is refused for its identity, not its total)."""
    spec = next(s for s in mapping.PRESETS if s.name == name)
    compiled = mapping.compile_mapping(MappingSpec(**{**spec.__dict__, "batch": batch and spec.action in (
        "upsert_user", "custom_event")}))
    built = actions.build(compiled, {"messageId": "m-1", "timestamp": STAMP, **ANONYMOUS[name]})
    assert built == Skip("missing_identifier: the event maps to neither an email nor a userId")


def test_phone_number_null_passes_and_absent_stays_absent() -> None:
    cleared = _build("Identify Calls", {"type": "identify", "userId": "u", "traits": {"phone": None, "plan": None}})
    assert isinstance(cleared, Request)
    assert cleared.body["dataFields"] == {"phone": None, "plan": None, "phoneNumber": None}
    absent = _build("Identify Calls", {"type": "identify", "userId": "u", "traits": {"plan": "pro"}})
    assert isinstance(absent, Request) and absent.body["dataFields"] == {"plan": "pro"}


def test_update_only_is_a_field_of_batched_upsert_user() -> None:
    spec = MappingSpec("U", 'type = "identify"', "upsert_user", {"updateOnly": True}, batch=True)
    built = actions.build(mapping.compile_mapping(spec), {"type": "identify", "userId": "u", "messageId": "m"})
    assert isinstance(built, Request) and built.update_only and "updateOnly" not in built.body
    single = actions.build(mapping.compile_mapping(MappingSpec(**{**spec.__dict__, "batch": False})),
                           {"type": "identify", "userId": "u", "messageId": "m"})
    assert isinstance(single, Request) and not single.update_only  # batch only, as in Segment


def test_long_event_ids_are_replaced_by_a_derived_one() -> None:
    built = _build("Track Calls", {"type": "track", "event": "E", "userId": "u", "messageId": "x" * 600})
    assert isinstance(built, Request) and built.body["id"] == actions.derived_id("x" * 600, "Track Calls")


@pytest.mark.parametrize(
    ("value", "sendable"),
    [(1.5, True), (None, True), ("nullable", True), (2**70, True), ("\ud800", True),
     (float("nan"), False), (float("inf"), False), (-float("inf"), False)],  # fmt: skip
)
def test_a_body_is_stored_as_json_that_reads_back_as_it_and_non_finite_numbers_fail_the_event(
    value: Any, sendable: bool
) -> None:
    built = _build("Track Calls", {"type": "track", "event": "E", "userId": "u", "properties": {"v": value}})
    if not sendable:
        assert built == Skip("invalid_field: a number in the request is not finite (JSON cannot carry it)", failed=True)
        return
    assert isinstance(built, Request) and built.body_json is not None
    assert json.loads(built.body_json) == built.body and built.body["dataFields"]["v"] == value
