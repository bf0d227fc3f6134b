"""The Iterable endpoints the emulator serves: routing plus one handler per endpoint.

Handlers receive the emulator (already locked by the request pipeline) and a parsed `ApiRequest`,
and either return a `Reply` or raise `ApiError`. Every handler validates the whole request before
changing anything, so an error answer never leaves a half-applied change behind.

Choices where Iterable documents nothing (see also the package docstring):

* an unknown ``listId`` in a body or query is 400 ``BadParams`` "List <id> does not exist";
  ``DELETE /api/lists/<id>`` of an unknown list is 404 ``NotFound``;
* a request item that names no user counts in ``failCount`` without being listed anywhere;
* unsubscribing a user who is unknown or not a member reports ``notFound*`` (and ``failCount``);
* trackBulk items without ``eventName`` (or with a bad ``id``/``dataFields``) are reported under
  ``invalidDataEmails``/``invalidDataUserIds``;
* purchases are kept by ``id`` like events: a second purchase with the same id replaces the first;
* single endpoints map identity failures to: invalid email 400 ``InvalidEmailAddressError``,
  invalid userId 400 ``InvalidUserIdError``, unknown user 400 ``UnknownEmailError`` /
  ``UnknownUserIdError``, forgotten user 409 ``ForgottenUserError``, email/userId conflict 409
  ``ExternalKeyConflict``; updateEmail to an email owned by someone else is 409
  ``EmailAlreadyExists``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tests.emulator.replies import (
    ApiError,
    BulkOutcome,
    Reply,
    bad_params,
    json_reply,
    success_reply,
    text_reply,
)
from tests.emulator.users import IdentityFailure, Mode, User

if TYPE_CHECKING:
    from tests.emulator.state import IterableEmulator, ListRecord

MAX_EVENT_ID_BYTES = 512


@dataclass(frozen=True)
class ApiRequest:
    """A routed, authorised request whose body (if any) parsed as JSON."""

    method: str
    path: str
    endpoint: str
    query: dict[str, str]
    payload: Any
    path_id: int | None = None
    partial_fraction: float | None = None


Handler = Callable[["IterableEmulator", ApiRequest], Reply]


# shared validation ---------------------------------------------------------------------------


def body_object(req: ApiRequest) -> dict[str, Any]:
    """The JSON object body, or 400 BadJsonBody."""
    if req.payload is None:
        raise ApiError(400, "BadJsonBody", "Request body is missing")
    if not isinstance(req.payload, dict):
        raise ApiError(400, "BadJsonBody", "Request body must be a JSON object")
    return req.payload


def is_number(value: Any) -> bool:
    """A JSON number (booleans excluded)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """A JSON integer (booleans excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_list(emu: IterableEmulator, raw: Any) -> ListRecord:
    """The list named by a listId parameter, or 400 BadParams."""
    if not is_integer(raw):
        raise bad_params("listId is required and must be an integer")
    record = emu.list_records.get(raw)
    if record is None:
        raise bad_params(f"List {raw} does not exist")
    return record


def require_batch(emu: IterableEmulator, body: Mapping[str, Any], key: str) -> list[Any]:
    """The array under `key`; more than `emu.max_batch` items is 400 BatchTooLarge."""
    items = body.get(key)
    if not isinstance(items, list):
        raise bad_params(f"{key} is required and must be an array")
    if len(items) > emu.max_batch:
        raise ApiError(400, "BatchTooLarge", f"{key} has {len(items)} items; at most {emu.max_batch} allowed")
    return items


def identity_error(failure: IdentityFailure) -> ApiError:
    """How a single-user endpoint reports an identity failure."""
    if failure.kind == "invalid":
        if failure.email is not None:
            return ApiError(400, "InvalidEmailAddressError", f"Invalid email: {failure.email}")
        return ApiError(400, "InvalidUserIdError", f"Invalid userId: {failure.user_id}")
    if failure.kind == "notFound":
        if failure.email is None:
            return ApiError(400, "UnknownUserIdError", f"No user exists with userId {failure.user_id}")
        return ApiError(400, "UnknownEmailError", f"No user exists with email {failure.email}")
    if failure.kind == "forgotten":
        return ApiError(409, "ForgottenUserError", "Contact is GDPR forgotten")
    if failure.kind == "conflict":
        return ApiError(409, "ExternalKeyConflict", "Email and userId belong to different users")
    if failure.kind == "invalidData":
        return bad_params("dataFields must be an object")
    if failure.email is not None:
        return bad_params("userId is required in a userId-based project")
    return bad_params("A user identifier (email or userId) is required")


def single_user(
    emu: IterableEmulator, item: Any, mode: Mode = "upsert", fields: str | None = "dataFields"
) -> User:
    """Upsert one user for a single-user endpoint, mapping failures to error answers."""
    if not isinstance(item, Mapping):
        raise bad_params("user must be an object")
    try:
        return emu.store.upsert(item, mode, fields)
    except IdentityFailure as failure:
        raise identity_error(failure) from None


def run_bulk(
    emu: IterableEmulator, req: ApiRequest, items: list[Any], apply: Callable[[Any], object]
) -> BulkOutcome:
    """Apply `apply` to each item, collecting failures; a partial fault fails some items unapplied."""
    outcome = BulkOutcome()
    sabotaged = emu.partial_indexes(req.partial_fraction, len(items))
    for index, item in enumerate(items):
        try:
            if index in sabotaged or not isinstance(item, Mapping):
                raise emu.store.blame(item)
            apply(item)
        except IdentityFailure as failure:
            outcome.fail(failure.entries)
        else:
            outcome.ok()
    return outcome


def not_found(emu: IterableEmulator, item: Mapping[str, Any]) -> IdentityFailure:
    """notFound naming the item's identifiers (only userId in userId projects)."""
    ident = emu.store.parse(item)
    if emu.store.project_type == "userId":
        return IdentityFailure("notFound", user_id=ident.user_id)
    return IdentityFailure("notFound", ident.email, ident.user_id)


# lists ---------------------------------------------------------------------------------------


def get_lists(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """GET /api/lists."""
    records = sorted(emu.list_records.values(), key=lambda record: record.id)
    return json_reply(200, {"lists": [record.summary() for record in records]})


def create_list(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """POST /api/lists; duplicate names are allowed, as in Iterable."""
    body = body_object(req)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise bad_params("name is required")
    description = body.get("description")
    list_id = emu.create_list(name, description if isinstance(description, str) else None)
    return json_reply(200, {"listId": list_id})


def delete_list(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """DELETE /api/lists/{listId}."""
    if req.path_id not in emu.list_records:
        raise ApiError(404, "NotFound", f"List {req.path_id} does not exist")
    del emu.list_records[req.path_id]
    return success_reply(f"Deleted list {req.path_id}")


def get_list_users(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """GET /api/lists/getUsers: one email (or with preferUserId=true, userId) per line."""
    raw = req.query.get("listId", "")
    if not raw.isdigit():
        raise bad_params("listId is required and must be an integer")
    record = require_list(emu, int(raw))
    prefer_user_id = req.query.get("preferUserId", "").lower() == "true"
    users = [emu.store.users[iid] for iid in record.members]
    values = [user.user_id if prefer_user_id else user.email for user in users]
    return text_reply(sorted(value for value in values if value))


def subscribe(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """POST /api/lists/subscribe."""
    body = body_object(req)
    record = require_list(emu, body.get("listId"))
    items = require_batch(emu, body, "subscribers")
    existing_only = body.get("updateExistingUsersOnly") is True and emu.store.project_type != "email"
    mode: Mode = "update" if existing_only else "upsert"
    outcome = run_bulk(emu, req, items, lambda item: _subscribe_one(emu, record, item, mode))
    return json_reply(200, outcome.payload())


def _subscribe_one(emu: IterableEmulator, record: ListRecord, item: Mapping[str, Any], mode: Mode) -> None:
    user = emu.store.upsert(item, mode)
    key = (record.id, user.key)
    if user.iid in record.members:
        emu.redundant_subscribes[key] += 1
    else:
        record.members[user.iid] = None
        emu.subscribe_count[key] += 1


def unsubscribe(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """POST /api/lists/unsubscribe."""
    body = body_object(req)
    record = require_list(emu, body.get("listId"))
    items = require_batch(emu, body, "subscribers")
    channel = body.get("channelUnsubscribe") is True
    outcome = run_bulk(emu, req, items, lambda item: _unsubscribe_one(emu, record, item, channel))
    return json_reply(200, outcome.payload())


def _unsubscribe_one(
    emu: IterableEmulator, record: ListRecord, item: Mapping[str, Any], channel: bool
) -> None:
    try:
        user = emu.store.resolve(emu.store.parse(item), "lookup")
    except IdentityFailure as failure:
        if failure.kind == "notFound":
            raise not_found(emu, item) from None
        raise
    if user.iid not in record.members:
        raise not_found(emu, item)
    del record.members[user.iid]
    emu.unsubscribe_count[(record.id, user.key)] += 1
    if channel:
        emu.channel_unsubscribes.add(user.key)


# users ---------------------------------------------------------------------------------------


def update_user(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """POST /api/users/update."""
    single_user(emu, body_object(req))
    return success_reply("User updated")


def bulk_update_users(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """POST /api/users/bulkUpdate (``updateOnly`` is ignored: it is not in Iterable's API spec)."""
    items = require_batch(emu, body_object(req), "users")
    outcome = run_bulk(emu, req, items, lambda item: emu.store.upsert(item, "upsert"))
    return json_reply(200, outcome.payload())


def update_email(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """POST /api/users/updateEmail; currentEmail wins over currentUserId."""
    body = body_object(req)
    new_email = _new_email(emu, body.get("newEmail"))
    user = _current_user(emu, body)
    owner = emu.store.find_email(new_email)
    if emu.store.project_type != "userId" and owner is not None and owner is not user:
        raise ApiError(409, "EmailAlreadyExists", f"Email {new_email} already exists")
    emu.store.set_email(user, new_email)
    return success_reply("Email updated")


def _new_email(emu: IterableEmulator, raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise bad_params("newEmail is required")
    try:
        email = emu.store.parse_email(raw)
        assert email is not None
        emu.store.check_forgotten(email, None)
    except IdentityFailure as failure:
        raise identity_error(failure) from None
    return email


def _current_user(emu: IterableEmulator, body: Mapping[str, Any]) -> User:
    current_email, current_user_id = body.get("currentEmail"), body.get("currentUserId")
    if isinstance(current_email, str) and current_email:
        user = emu.store.find_email(current_email)
        failure = IdentityFailure("notFound", email=current_email.lower())
    elif isinstance(current_user_id, str) and current_user_id:
        user = emu.store.find_user_id(current_user_id)
        failure = IdentityFailure("notFound", user_id=current_user_id)
    else:
        raise bad_params("currentEmail or currentUserId is required")
    try:
        if user is None:
            raise failure
        emu.store.check_forgotten(user.email, user.user_id)
    except IdentityFailure as found:
        raise identity_error(found) from None
    return user


# events --------------------------------------------------------------------------------------


def track_event(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """POST /api/events/track; an existing event id is updated, not duplicated."""
    body = body_object(req)
    problem = _event_problem(body)
    if problem:
        raise bad_params(problem)
    user = single_user(emu, body, fields=None)
    event_id = _store_event(emu, body, user)
    return success_reply("Event tracked", {"id": event_id})


def track_bulk(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """POST /api/events/trackBulk."""
    items = require_batch(emu, body_object(req), "events")
    outcome = run_bulk(emu, req, items, lambda item: _track_bulk_one(emu, item))
    return json_reply(200, outcome.payload(disallowedEventNames=[]))


def _track_bulk_one(emu: IterableEmulator, item: Mapping[str, Any]) -> None:
    if _event_problem(item):
        raise emu.store.blame(item)
    _store_event(emu, item, emu.store.upsert(item, "upsert", None))


def _event_problem(item: Mapping[str, Any]) -> str | None:
    name, event_id, fields = item.get("eventName"), item.get("id"), item.get("dataFields")
    if not isinstance(name, str) or not name:
        return "eventName is required"
    if event_id is not None and (
        not isinstance(event_id, str) or len(event_id.encode()) > MAX_EVENT_ID_BYTES
    ):
        return f"id must be a string of at most {MAX_EVENT_ID_BYTES} bytes"
    if fields is not None and not isinstance(fields, Mapping):
        return "dataFields must be an object"
    if item.get("createdAt") is not None and not is_number(item.get("createdAt")):
        return "createdAt must be a number (unix seconds)"
    return None


def _store_event(emu: IterableEmulator, item: Mapping[str, Any], user: User) -> str:
    event_id = item.get("id") or emu.new_id()
    previous = emu.event_records.get(event_id)
    emu.event_records[event_id] = {
        "id": event_id,
        "eventName": item["eventName"],
        "email": user.email,
        "userId": user.user_id,
        "createdAt": item.get("createdAt", emu.now_seconds()),
        "dataFields": copy.deepcopy(item.get("dataFields") or {}),
        "campaignId": item.get("campaignId"),
        "templateId": item.get("templateId"),
        "writes": 1 if previous is None else previous["writes"] + 1,
    }
    return event_id


# commerce ------------------------------------------------------------------------------------

_ITEM_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("id", lambda value: isinstance(value, str) and bool(value), "a non-empty string"),
    ("name", lambda value: isinstance(value, str) and bool(value), "a non-empty string"),
    ("price", is_number, "a number"),
    ("quantity", is_integer, "an integer"),
)


def _commerce_items(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    items = body.get("items")
    if not isinstance(items, list):
        raise bad_params("items is required and must be an array")
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise bad_params(f"items[{index}] must be an object")
        for key, check, expected in _ITEM_RULES:
            if not check(item.get(key)):
                raise bad_params(f"items[{index}].{key} is required and must be {expected}")
    return copy.deepcopy(items)


def track_purchase(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """POST /api/commerce/trackPurchase: stores the purchase and empties the user's cart."""
    body = body_object(req)
    items = _commerce_items(body)
    if not is_number(body.get("total")):
        raise bad_params("total is required and must be a number")
    purchase_id = body.get("id")
    if purchase_id is not None and (not isinstance(purchase_id, str) or not purchase_id):
        raise bad_params("id must be a non-empty string")
    user = single_user(emu, body.get("user"))
    user.cart = []
    purchase_id = purchase_id or emu.new_id()
    emu.purchase_records[purchase_id] = _purchase_record(emu, body, user, items, purchase_id)
    return success_reply("Purchase tracked", {"id": purchase_id})


def _purchase_record(
    emu: IterableEmulator, body: Mapping[str, Any], user: User, items: list[dict[str, Any]], purchase_id: str
) -> dict[str, Any]:
    return {
        "id": purchase_id,
        "email": user.email,
        "userId": user.user_id,
        "items": items,
        "total": body["total"],
        "createdAt": body.get("createdAt", emu.now_seconds()),
        "dataFields": copy.deepcopy(body.get("dataFields") or {}),
        "campaignId": body.get("campaignId"),
        "templateId": body.get("templateId"),
    }


def update_cart(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """POST /api/commerce/updateCart: replaces the user's cart."""
    body = body_object(req)
    items = _commerce_items(body)
    user = single_user(emu, body.get("user"))
    user.cart = items
    return success_reply("Cart updated")


# misc and routing ----------------------------------------------------------------------------


def get_webhooks(emu: IterableEmulator, req: ApiRequest) -> Reply:
    """GET /api/webhooks (used as an auth test)."""
    return json_reply(200, {"webhooks": []})


@dataclass(frozen=True)
class Route:
    """One endpoint: method, path pattern (one optional numeric group), key and handler."""

    method: str
    pattern: re.Pattern[str]
    endpoint: str
    handler: Handler
    bulk: bool = False
    reads_body: bool = True


def _route(method: str, path: str, handler: Handler, bulk: bool = False) -> Route:
    endpoint = path.removeprefix("/api/").replace(r"(\d+)", "{listId}")
    return Route(method, re.compile(path), endpoint, handler, bulk, reads_body=method == "POST")


ROUTES: tuple[Route, ...] = (
    _route("GET", "/api/lists", get_lists),
    _route("POST", "/api/lists", create_list),
    _route("DELETE", r"/api/lists/(\d+)", delete_list),
    _route("GET", "/api/lists/getUsers", get_list_users),
    _route("POST", "/api/lists/subscribe", subscribe, bulk=True),
    _route("POST", "/api/lists/unsubscribe", unsubscribe, bulk=True),
    _route("POST", "/api/users/update", update_user),
    _route("POST", "/api/users/bulkUpdate", bulk_update_users, bulk=True),
    _route("POST", "/api/users/updateEmail", update_email),
    _route("POST", "/api/events/track", track_event),
    _route("POST", "/api/events/trackBulk", track_bulk, bulk=True),
    _route("POST", "/api/commerce/trackPurchase", track_purchase),
    _route("POST", "/api/commerce/updateCart", update_cart),
    _route("GET", "/api/webhooks", get_webhooks),
)


def match_route(method: str, path: str) -> tuple[Route, int | None] | None:
    """The route for this request and its numeric path parameter, if any."""
    path = path.rstrip("/") or "/"
    for route in ROUTES:
        found = route.pattern.fullmatch(path) if route.method == method else None
        if found is not None:
            return route, int(found.group(1)) if found.groups() else None
    return None
