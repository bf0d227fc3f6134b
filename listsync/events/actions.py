"""Map -> **build**: the request each Iterable action sends for one event. Pure: the event's
timestamp and messageId come in with the event, nothing reads a clock.

`build` resolves a mapping's fields and returns a `Request` (endpoint + body, the same body on
every attempt), a `Skip` (recorded with its reason, never sent), or None (the mapping does not
apply after all: a page call that the classic page settings do not track).

Decisions beyond Segment's Iterable (Actions) destination (reference §2):

* Every event and purchase carries an `id`. Custom Event maps `$.messageId` (Segment's default);
  Track Purchase maps `order_id` and, without one, derives the id from the messageId and the
  mapping. Iterable updates an event or purchase with a known id instead of adding one, so a
  retry after an unanswered request cannot double it.
* `createdAt` falls back to the event's own timestamp, not the time of sending (Segment uses
  "now"): a retry then sends the same body.
* Commerce items keep custom product keys in the item's dataFields (Segment's default mapping
  drops them); product_id -> id, category -> categories, image_url -> imageUrl.
* Emails are trimmed and lower-cased, as the inbox stores them; Iterable compares them so anyway.
* Optional numeric fields that cannot be read as numbers (campaignId "abc") are left out rather
  than failing the event; required ones (total, items, eventName) fail it with the reason.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from listsync.domain import ActionKind, ProjectType
from listsync.events.mapping import ActionMapping
from listsync.iterable.dates import convert_dates, unix_seconds
from listsync.json_text import finite_dumps

MAX_EVENT_ID_BYTES = 512
ENDPOINTS = {
    (ActionKind.UPSERT_USER, False): "users/update",
    (ActionKind.UPSERT_USER, True): "users/bulkUpdate",
    (ActionKind.CUSTOM_EVENT, False): "events/track",
    (ActionKind.CUSTOM_EVENT, True): "events/trackBulk",
    (ActionKind.TRACK_PURCHASE, False): "commerce/trackPurchase",
    (ActionKind.CART_UPDATES, False): "commerce/updateCart",
}
BULK_ENDPOINTS = frozenset({"users/bulkUpdate", "events/trackBulk"})


@dataclass(frozen=True)
class PageSettings:
    """The classic destination's page settings (reference §6 and the seed's settings table)."""

    map_all_pages: bool = False
    track_all_pages: bool = False
    track_categorized_pages: bool = False
    track_named_pages: bool = False


@dataclass
class Request:
    """One delivery: the endpoint and body (for bulk endpoints, the body is one item). Not frozen:
    `build` sets body_json once the body is checked (dataclasses.replace costs more than the check)."""

    endpoint: str
    body: dict[str, Any]
    user_id: str | None
    email: str | None
    iterable_id: str | None = None
    new_email: str | None = None  # explicit newEmail: the profile's email is changed to it
    update_only: bool = False  # users/bulkUpdate's updateOnly (Iterable enables it per project)
    body_json: str | None = field(default=None, compare=False)  # `body` as JSON text, once checked


@dataclass(frozen=True)
class Skip:
    """Not sent. `failed` False: nothing to send (no identifier); True: the event is malformed."""

    reason: str
    failed: bool = False


class _Invalid(Exception):
    pass


def _email(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Invalid(f"invalid_field: email must be a string, got {type(value).__name__}")
    return value.strip().lower() or None


def _user_id(value: Any) -> str | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    if not isinstance(value, str | int):
        raise _Invalid(f"invalid_field: userId must be a string, got {type(value).__name__}")
    return str(value)


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,18}\s*", value):
        return int(value)
    return None


def _number(value: Any) -> float | int | None:
    """A finite number, from a number or a numeric string; None otherwise (Iterable's JSON has no
    Infinity or NaN, and `float("nan")` would accept the strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and len(value) < 64:
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def _object(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Invalid(f"invalid_field: {name} must be an object, got {type(value).__name__}")
    return dict(value)


def derived_id(message_id: str, mapping_name: str) -> str:
    """A stable id for one (event, mapping): the same on every attempt, distinct per mapping."""
    digest = hashlib.sha256(f"{message_id}\x00{mapping_name}".encode()).hexdigest()
    return f"ls-{digest[:40]}"


def _event_id(value: Any, message_id: str, mapping_name: str) -> str:
    text = _user_id(value)
    if text is None or len(text.encode("utf-8")) > MAX_EVENT_ID_BYTES:
        return derived_id(message_id, mapping_name)
    return text


def _check_identity(email: str | None, user_id: str | None, project_type: ProjectType) -> Skip | None:
    if email is None and user_id is None:
        return Skip("missing_identifier: the event maps to neither an email nor a userId")
    if project_type is ProjectType.USER_ID and user_id is None:
        return Skip("missing_identifier: a userId-based project needs a userId")
    return None


def _optional(body: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        body[key] = value


def _user_object(fields: Mapping[str, Any]) -> dict[str, Any]:
    """email, userId, dataFields (dates converted, phoneNumber added) and mergeNestedObjects."""
    user: dict[str, Any] = {}
    _optional(user, "email", _email(fields.get("email")))
    _optional(user, "userId", _user_id(fields.get("userId")))
    data = convert_dates(_object(fields.get("dataFields"), "dataFields"))
    if "phoneNumber" in fields:
        phone = fields["phoneNumber"]
        data["phoneNumber"] = None if phone is None else str(phone)  # null clears the SMS number
    user["dataFields"] = data
    user["mergeNestedObjects"] = fields.get("mergeNestedObjects") is True
    return user


def _upsert_user(mapping: ActionMapping, fields: Mapping[str, Any], endpoint: str) -> Request:
    """users/update, or one users/bulkUpdate item. newEmail is carried beside the body: delivery
    changes the email the way the project type wants (`identity.email_update`) in both modes,
    where Segment's batch mode writes dataFields.email and works in hybrid projects only."""
    user = _user_object(fields)
    new_email = _email(fields.get("newEmail"))
    update_only = mapping.batch and fields.get("updateOnly") is True
    return Request(endpoint, user, user.get("userId"), user.get("email"), None, new_email, update_only)


def page_event_name(event: Mapping[str, Any], pages: PageSettings) -> str | None:
    """The classic name of a page/screen call, or None when the page settings do not track it.

    "<name> page" / "<name> screen" (the documented current behaviour); "Loaded a Page" /
    "Loaded a Screen" with map_all_pages or when the call has neither name nor category.
    """
    kind = "screen" if event.get("type") == "screen" else "page"
    name, category = _page_attr(event, "name"), _page_attr(event, "category")
    tracked = (
        pages.track_all_pages
        or (pages.track_categorized_pages and category is not None)
        or (pages.track_named_pages and name is not None)
    )
    if not tracked:
        return None
    if pages.map_all_pages or (name is None and category is None):
        return f"Loaded a {kind.title()}"
    return f"{name if name is not None else category} {kind}"


def _page_attr(event: Mapping[str, Any], key: str) -> str | None:
    properties = event.get("properties")
    value = event.get(key) or (properties.get(key) if isinstance(properties, Mapping) else None)
    return str(value) if value not in (None, "") else None


def _custom_event(
    mapping: ActionMapping, event: Mapping[str, Any], fields: Mapping[str, Any], pages: PageSettings
) -> Request | None:
    data = _object(fields.get("dataFields"), "dataFields")
    name = fields.get("eventName")
    if mapping.classic_pages and event.get("type") in ("page", "screen"):
        name = page_event_name(event, pages)
        if name is None:
            return None
        data.update({k: v for k in ("name", "category") if (v := _page_attr(event, k)) is not None})
    if not isinstance(name, str) or not name.strip():
        raise _Invalid("missing_field: eventName (the event has no name)")
    body: dict[str, Any] = {}
    _optional(body, "email", _email(fields.get("email")))
    _optional(body, "userId", _user_id(fields.get("userId")))
    message_id = str(event.get("messageId"))
    body.update(eventName=name, id=_event_id(fields.get("id"), message_id, mapping.name))
    body["createdAt"] = _created_at(fields, event)
    body["dataFields"] = convert_dates(data)
    _attribution(body, fields)
    endpoint = ENDPOINTS[(ActionKind.CUSTOM_EVENT, mapping.batch)]
    return Request(endpoint, body, body.get("userId"), body.get("email"), body["id"])


def _created_at(fields: Mapping[str, Any], event: Mapping[str, Any]) -> int:
    seconds = unix_seconds(fields.get("createdAt"))
    if seconds is None:
        seconds = unix_seconds(event.get("timestamp"))
    return seconds if seconds is not None else 0


def _attribution(body: dict[str, Any], fields: Mapping[str, Any]) -> None:
    _optional(body, "campaignId", _integer(fields.get("campaignId")))
    _optional(body, "templateId", _integer(fields.get("templateId")))


ITEM_KEYS = ("id", "sku", "name", "price", "quantity", "categories", "url", "imageUrl", "description")
_ITEM_RENAMES = {"product_id": "id", "productId": "id", "category": "categories", "image_url": "imageUrl"}


def commerce_item(product: Any, index: int) -> dict[str, Any]:
    """One Iterable CommerceItem from a Segment product; other keys go to the item's dataFields."""
    if not isinstance(product, Mapping):
        raise _Invalid(f"invalid_field: items[{index}] must be an object")
    item: dict[str, Any] = {}
    extra: dict[str, Any] = dict(_object(product.get("dataFields"), f"items[{index}].dataFields"))
    # product_id wins over id (Segment's ecommerce spec names it so); the first name found is kept.
    for key in ("product_id", "productId", *ITEM_KEYS, "category", "image_url"):
        if key in product and product[key] is not None:
            item.setdefault(_ITEM_RENAMES.get(key, key), product[key])
    extra.update({k: v for k, v in product.items() if k not in _ITEM_RENAMES and k not in ITEM_KEYS})
    extra.pop("dataFields", None)
    _normalise_item(item, index)
    if extra:
        item["dataFields"] = convert_dates(extra)
    return item


def _normalise_item(item: dict[str, Any], index: int) -> None:
    """Types as Iterable's CommerceItem schema has them: id, sku and name strings, categories an
    array of strings. Numbers are turned into strings; anything else is refused, naming the field."""
    for key in ("id", "sku", "name"):
        if key in item:
            item[key] = _item_text(item[key], f"items[{index}].{key}")
    if "categories" in item:
        categories = item["categories"]
        listed = categories if isinstance(categories, list) else [categories]
        item["categories"] = [_item_text(c, f"items[{index}].categories") for c in listed]
    price, quantity = _number(item.get("price")), _integer(item.get("quantity"))
    _optional(item, "price", price)
    _optional(item, "quantity", quantity)
    for key, ok in (("id", bool(item.get("id"))), ("name", bool(item.get("name"))),
                    ("price", price is not None), ("quantity", quantity is not None)):
        if not ok:
            raise _Invalid(f"invalid_field: items[{index}].{key} is required (id, name, price, quantity)")


def _item_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _Invalid(f"invalid_field: {where} must be a string, got {type(value).__name__}")


def _items(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _Invalid("missing_field: items (properties.products must list the products)")
    return [commerce_item(product, index) for index, product in enumerate(value)]


def _track_purchase(mapping: ActionMapping, event: Mapping[str, Any], fields: Mapping[str, Any]) -> Request:
    user = _user_object(_object(fields.get("user"), "user"))
    total = _number(fields.get("total"))
    if total is None:
        raise _Invalid("missing_field: total (a number, properties.total)")
    data = _object(fields.get("dataFields"), "dataFields")
    data.pop("products", None)
    body: dict[str, Any] = {"id": _event_id(fields.get("id"), str(event.get("messageId")), mapping.name)}
    body.update(user=user, items=_items(fields.get("items")), total=total)
    body["createdAt"] = _created_at(fields, event)
    body["dataFields"] = convert_dates(data)
    _attribution(body, fields)
    return Request("commerce/trackPurchase", body, user.get("userId"), user.get("email"), body["id"])


def _update_cart(fields: Mapping[str, Any]) -> Request:
    user = _user_object(_object(fields.get("user"), "user"))
    body = {"user": user, "items": _items(fields.get("items"))}
    return Request("commerce/updateCart", body, user.get("userId"), user.get("email"))


def build(
    mapping: ActionMapping,
    event: Mapping[str, Any],
    *,
    project_type: ProjectType = ProjectType.HYBRID,
    pages: PageSettings = PageSettings(),
) -> Request | Skip | None:
    """The request `mapping` sends for `event` (which carries messageId and timestamp). An event
    naming neither an email nor a userId is refused with that reason by every action, in single
    and batch mode alike, before anything else is checked."""
    if mapping.classic_pages and event.get("type") in ("page", "screen") and page_event_name(event, pages) is None:
        return None  # a page call the classic page settings do not track
    try:
        fields = mapping.resolve(event)
        email, user_id = _identifiers(mapping, fields)
        refused = _check_identity(email, user_id, project_type)
        if refused is not None:
            return refused
        request = _build(mapping, event, fields, pages)
        return None if request is None else _check_sendable(request)
    except _Invalid as exc:
        return Skip(str(exc), failed=True)
    except (ValueError, TypeError, LookupError, ArithmeticError, RecursionError) as exc:
        # One event's odd data must fail that delivery alone, never the routing of the others.
        return Skip(f"invalid_event: {type(exc).__name__}: {str(exc)[:200]}", failed=True)


MAX_ITERABLE_ID_LENGTH = 512  # event_deliveries.event_id


def _check_sendable(request: Request) -> Request:
    """What the body builder produced can go on the wire: JSON without non-finite numbers, an id
    the ledger can hold. The request comes back with the JSON text, so routing stores it as is."""
    try:
        text = finite_dumps(request.body)
    except ValueError:
        raise _Invalid("invalid_field: a number in the request is not finite (JSON cannot carry it)") from None
    if request.iterable_id is not None and len(request.iterable_id) > MAX_ITERABLE_ID_LENGTH:
        raise _Invalid(f"invalid_field: the event id is longer than {MAX_ITERABLE_ID_LENGTH} characters")
    request.body_json = text
    return request


def _identifiers(mapping: ActionMapping, fields: Mapping[str, Any]) -> tuple[str | None, str | None]:
    if mapping.action in (ActionKind.TRACK_PURCHASE, ActionKind.CART_UPDATES):
        fields = _object(fields.get("user"), "user")
    return _email(fields.get("email")), _user_id(fields.get("userId"))


def _build(
    mapping: ActionMapping, event: Mapping[str, Any], fields: Mapping[str, Any], pages: PageSettings
) -> Request | None:
    if mapping.action is ActionKind.UPSERT_USER:
        return _upsert_user(mapping, fields, ENDPOINTS[(ActionKind.UPSERT_USER, mapping.batch)])
    if mapping.action is ActionKind.CUSTOM_EVENT:
        return _custom_event(mapping, event, fields, pages)
    if mapping.action is ActionKind.TRACK_PURCHASE:
        return _track_purchase(mapping, event, fields)
    return _update_cart(fields)
