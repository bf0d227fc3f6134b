"""Receive -> **validate**, the common case: `accepted_row` gives the inbox row `validate_event`
would make of an event of the usual shape, or None when it cannot be sure (the caller then
validates the event in full, which also names any problem).

The usual shape: an identify/track/page/screen whose JSON text (orjson's own, or a line orjson
parsed without a backslash in it) shows no problem at any depth (`validate.plainly_fine_bytes`: no
NUL, no write key, not too deep), a string messageId, userId and anonymousId within their
limits, objects where objects belong. Everything else (ints as ids, derived messageIds,
group/alias, anything odd) takes the full path. Both paths must agree on every event this one
accepts; tests/unit/test_fast_path.py checks it on generated and hostile events.

Pure: no database, no HTTP, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

from listsync.domain import InboundEvent
from listsync.ingest import audience, validate
from listsync.ingest.extract import MAX_EVENT_BYTES, InvalidEvent

_FAST_TYPES = frozenset({"identify", "track", "page", "screen"})


class InboxRow(NamedTuple):
    """An accepted event as the inbox stores it (`db.inbox.store_events`)."""

    message_id: str
    type: str
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    email: str | None
    timestamp: datetime
    payload: Mapping[str, Any]
    is_audience: bool


def row_of(event: InboundEvent) -> InboxRow:
    """The inbox row of an event `validate_event` accepted."""
    return InboxRow(
        event.message_id, event.type, event.event, event.user_id, event.anonymous_id, event.email,
        event.timestamp, event.raw, audience.is_audience_event(event),
    )  # fmt: skip


def accepted_row(
    raw: Mapping[str, Any], size: int | None, text: bytes | None, received_at: datetime
) -> InboxRow | None:
    """`row_of(validate_event(raw, ...))` for an event of the usual shape; None: validate in full.

    `text`: JSON text of `raw` as `validate.plainly_fine_bytes` requires it, or None.
    `received_at` must be in UTC."""
    if text is None or size is None or size > MAX_EVENT_BYTES or not validate.plainly_fine_bytes(text, 0):
        return None
    kind = raw.get("type")
    objects = _objects(raw)
    message_id = raw.get("messageId")
    user_id = raw.get("userId")
    anonymous_id = raw.get("anonymousId")
    if (
        type(kind) is not str
        or kind not in _FAST_TYPES
        or objects is None
        or not _plain_text(message_id, validate.MAX_NAME_LENGTH)
        or not (user_id is None or (_plain_text(user_id, validate.MAX_USER_ID_LENGTH) and user_id == user_id.strip()))
        or not (anonymous_id is None or _plain_text(anonymous_id, validate.MAX_NAME_LENGTH))
        or (user_id is None and anonymous_id is None)
    ):
        return None
    event = raw.get("event")
    if not (_plain_text(event, validate.MAX_NAME_LENGTH) if kind == "track" else _optional_name(event)):
        return None
    if not _optional_name(raw.get("name")):
        return None
    try:
        timestamp = validate.event_timestamp(raw, received_at)
    except InvalidEvent:
        return None
    email, _problem = validate.event_email(objects)
    is_audience = audience.is_audience_of(kind, event, audience.personas_of(objects["context"]))
    if is_audience and not _audience_fine(kind, objects, user_id, email):
        return None
    return InboxRow(message_id, kind, event, user_id, anonymous_id, email, timestamp, raw, is_audience)  # type: ignore[arg-type]


def _plain_text(value: Any, limit: int) -> bool:
    return type(value) is str and 0 < len(value) <= limit


def _optional_name(value: Any) -> bool:
    return value is None or (type(value) is str and len(value) <= validate.MAX_NAME_LENGTH)


def _objects(raw: Mapping[str, Any]) -> dict[str, Mapping[str, Any]] | None:
    """The event's objects as `validate_event` reads them (null is {}); None if one is not an object."""
    objects: dict[str, Mapping[str, Any]] = {}
    for name in validate.OBJECT_FIELDS:
        value = raw.get(name)
        if value is None:
            value = {}
        elif type(value) is not dict:
            return None
        objects[name] = value
    return objects


def _audience_fine(kind: str, objects: Mapping[str, Mapping[str, Any]], user_id: Any, email: str | None) -> bool:
    """`validate._check_audience` passes: a usable audience key and settings, a userId or an email."""
    personas = audience.personas_of(objects["context"])
    key = audience.audience_key_of(kind, objects["properties"], personas)
    if key is None or len(key) > validate.MAX_NAME_LENGTH or (user_id is None and email is None):
        return False
    try:
        audience.audience_settings(personas.get("audience_settings"))
    except InvalidEvent:
        return False
    return True
