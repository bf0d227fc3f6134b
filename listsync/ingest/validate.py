"""Receive -> **validate** -> store: the value checks of one Segment event (`validate_event`).

Pure: no database, no HTTP, no clock (the time of receipt is passed in). The reason codes are
listed in `listsync.ingest.extract`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from listsync import json_text
from listsync.domain import InboundEvent, Rejection
from listsync.ingest import audience
from listsync.ingest.extract import MAX_DEPTH, MAX_EVENT_BYTES, SEGMENT_TYPES, TOO_DEEP_MARK, InvalidEvent
from listsync.ingest.scrub import NOT_ALNUM
from listsync.json_text import canonical, json_type

MAX_USER_ID_LENGTH = 52
# Stored in VARCHAR(255) columns (and used as Iterable list names): longer would fail in the database.
MAX_NAME_LENGTH = 255
MAX_EMAIL_LENGTH = 320

OBJECT_FIELDS = ("traits", "properties", "context")  # the objects an event carries, validated as objects
# Transport metadata that a client may change on a retry of the same event; left out of the
# derived messageId so a retried event still dedupes.
_UNHASHED_FIELDS = frozenset({"sentAt", "receivedAt", "writeKey"})
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

def validate_event(
    raw: Mapping[str, Any], *, received_at: datetime, encoded_size: int | None = None
) -> InboundEvent | Rejection:
    """Check one Segment event and normalise it, or say precisely why it cannot be accepted.

    Decisions beyond Segment's own rules:

    * userId / anonymousId may be strings or integers (integers become strings, as Segment's
      libraries allow numeric ids); an empty string counts as absent. userId is otherwise kept
      exactly, but surrounding whitespace or more than 52 characters is a rejection, because
      Iterable would store a different or truncated id.
    * timestamp comes from `timestamp`, else `originalTimestamp`, else `received_at`. An
      offset-less timestamp is read as UTC. A present but unreadable timestamp is a rejection,
      not a silent fallback, so an event is never re-dated.
    * email is the first non-empty of traits.email, properties.email, context.traits.email,
      trimmed and lower-cased. An unusable value (not a string, no "name@domain.tld" shape) is
      dropped, not fatal: it rejects the event only when the event is an audience event that
      has no userId, since then nothing identifies the member.
    * Audience events need a userId or an email (Iterable lists need one); audience events
      without an audience key are rejected rather than passed on as ordinary events.
    """
    if received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware")
    try:
        return _validated(raw, received_at.astimezone(UTC), encoded_size)
    except InvalidEvent as exc:
        return Rejection(str(exc))


def _validated(raw: Mapping[str, Any], received_at: datetime, encoded_size: int | None) -> InboundEvent:
    nested_write_key = _check_values(raw)
    _check_size(raw, encoded_size)
    kind = _event_type(raw)
    objects = {name: _object_field(raw, name) for name in OBJECT_FIELDS}
    user_id = _identifier(raw, "userId", "invalid_user_id")
    anonymous_id = _identifier(raw, "anonymousId", "invalid_anonymous_id")
    _check_user_id(user_id)
    if user_id is None and anonymous_id is None:
        raise InvalidEvent("missing_identifier: event has neither userId nor anonymousId")
    _check_type_specific(raw, kind)
    email, email_problem = event_email(objects)
    stored = _without_write_keys(raw, nested=nested_write_key)
    event = InboundEvent(
        type=kind,
        message_id=_message_id(raw),
        timestamp=event_timestamp(raw, received_at),
        user_id=user_id,
        anonymous_id=anonymous_id,
        email=email,
        event=_name(raw, "event"),
        name=_name(raw, "name"),
        traits=objects["traits"],
        properties=objects["properties"],
        context=objects["context"],
        raw=stored,
    )
    _check_audience(event, email_problem)
    return event


def _check_values(raw: Mapping[str, Any]) -> bool:
    """Refuse what the database, apply or an Iterable request body could not take, anywhere in
    the event: nesting deeper than MAX_DEPTH, NUL characters and lone surrogates in keys or
    strings, non-finite numbers (`1e999` parses as infinity; JSON has no way to send it).

    Returns whether a write key is nested below the top level, so the stored copy is rebuilt only
    for events that need it. Most events are plainly fine, which one C-speed encoding shows; the
    others are walked to say exactly what and where the problem is.
    """
    if _plainly_fine(raw):
        return False
    return _walk_values(raw)


# A key that `_is_write_key` may call a write key: the letters of "writekey" in order, anything but
# other letters and digits between them (JSON escapes included). Broader than the rule, never
# narrower: a match only sends the event down `_walk_values`, which applies the rule itself.
# Two characters outside ASCII fold to letters of it: lower() makes U+0130 (İ) "i" and a mark, and
# U+212A (the Kelvin sign) "k"; in UTF-8 they are letters too. Their lead bytes are never read as
# separators: were they both, a run of them could be split every way and the search would take
# minutes on a few kilobytes (every event passes here).
_SEPARATORS = rb'(?:\\u[0-9a-f]{4}|\\.|\xc4(?!\xb0)|\xe2(?!\x84\xaa)|[^a-z0-9"\\\xc4\xe2])*'
_LETTERS = (b"r", b"(?:i|\xc4\xb0)", b"t", b"e", b"(?:k|\xe2\x84\xaa)", b"e", b"y")
_NESTED_WRITE_KEY = re.compile(
    b'"w' + b"".join(_SEPARATORS + letter for letter in _LETTERS) + _SEPARATORS + rb'"\s*:', re.IGNORECASE
)
_TOO_DEEP_BYTES = TOO_DEEP_MARK.encode("utf-8")


def _plainly_fine(raw: Mapping[str, Any]) -> bool:
    """True when encoding shows none of the problems `_walk_values` looks for (False: walk it).

    orjson refuses lone surrogates and depth past its limit; it writes non-finite floats as
    null, so a `null` in its text is checked against the stdlib's, which refuses them."""
    encoded = json_text.dumps_bytes(raw)
    if encoded is None:
        return False
    if b"null" in encoded and not _finite(raw):
        return False
    return plainly_fine_bytes(encoded, 0)


def _plainly_fine_text(text: str, enclosing: int) -> bool:
    """`_plainly_fine` for `text`, JSON encoded with ensure_ascii off (lone surrogates must fail to encode) and allow_nan off, of a value
    nested `enclosing` levels deep in its event."""
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return plainly_fine_bytes(encoded, enclosing)


def plainly_fine_bytes(encoded: bytes, enclosing: int) -> bool:
    """True when the JSON text `encoded` of a value nested `enclosing` levels deep shows none of
    the problems `_walk_values` looks for, a write key at any depth included. The text must be
    orjson's encoding of the value, or text orjson parsed that has no backslash (then no escape
    hides a NUL or a letter of a key, and orjson refused lone surrogates and non-finite numbers)."""
    if b"\\u0000" in encoded or encoded.count(b"{") + encoded.count(b"[") > MAX_DEPTH - enclosing:
        return False
    if _TOO_DEEP_BYTES in encoded:
        return False
    return _NESTED_WRITE_KEY.search(encoded) is None


def _finite(raw: Mapping[str, Any]) -> bool:
    try:
        json.dumps(raw, allow_nan=False, default=str)
    except (ValueError, RecursionError):
        return False
    return True


def _walk_values(raw: Mapping[str, Any]) -> bool:
    """`_check_values` the slow way: walks iteratively (no recursion, whatever the depth)."""
    nested_write_key = False
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(raw, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                raise InvalidEvent(f"too_deep: {_path_text(path)} is nested more than {MAX_DEPTH} levels deep")
            for key, item in value.items():
                _check_text(key, (path, key), "a key")
                nested_write_key |= depth > 1 and _is_write_key(key)
                stack.append((item, depth + 1, (path, key)))
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise InvalidEvent(f"too_deep: {_path_text(path)} is nested more than {MAX_DEPTH} levels deep")
            stack.extend((item, depth + 1, (path, index)) for index, item in enumerate(value))
        elif isinstance(value, str):
            if value == TOO_DEEP_MARK:
                raise InvalidEvent(f"too_deep: {_path_text(path)} is nested more than {MAX_DEPTH} levels deep")
            _check_text(value, path, "a value")
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidEvent(f"invalid_number: {_path_text(path)} is not a finite number")
    return nested_write_key


def _check_text(text: str, path: tuple[Any, ...], what: str) -> None:
    if "\x00" in text:
        raise InvalidEvent(
            f"invalid_text: {what} at {_path_text(path)} contains a NUL character (\\u0000), "
            "which cannot be stored"
        )
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidEvent(
                f"invalid_text: {what} at {_path_text(path)} contains a lone UTF-16 surrogate, "
                "which is not text"
            ) from None


def _path_text(path: tuple[Any, ...]) -> str:
    """`properties.items[0].name` from the linked (parent, key) tuples of `_check_values`."""
    keys: list[Any] = []
    while path:
        path, key = path
        keys.append(key)
    text = ""
    for key in reversed(keys):
        text += f"[{key}]" if isinstance(key, int) else f"{'.' if text else ''}{str(key)[:60]!r}"
    return text or "the event"


def _check_size(raw: Mapping[str, Any], encoded_size: int | None) -> None:
    size = json_text.encoded_size(raw) if encoded_size is None else encoded_size
    if size is None:  # too deep to encode; `_check_values` refuses it first
        raise InvalidEvent(f"too_deep: the event is nested more than {MAX_DEPTH} levels deep")
    if size > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event_too_large: {size} bytes > {MAX_EVENT_BYTES}")


def _event_type(raw: Mapping[str, Any]) -> str:
    kind = raw.get("type")
    if kind is None:
        raise InvalidEvent("missing_type: event has no type")
    if not isinstance(kind, str) or kind not in SEGMENT_TYPES:
        known = ", ".join(sorted(SEGMENT_TYPES))
        raise InvalidEvent(f"unknown_type: {kind!r} is not one of {known}")
    return kind


def _object_field(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A JSON object field; null counts as absent, as Segment's libraries send it."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidEvent(f"wrong_type: {name} must be an object, got {json_type(value)}")
    return value


def _identifier(raw: Mapping[str, Any], name: str, code: str) -> str | None:
    value = raw.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidEvent(f"{code}: {name} must be a string, got {json_type(value)}")
    text = str(value) if isinstance(value, str) or abs(value) < 10**MAX_NAME_LENGTH else ""
    if not text or len(text) > MAX_NAME_LENGTH:
        raise InvalidEvent(f"{code}: {name} is longer than {MAX_NAME_LENGTH} characters")
    return text


def _check_user_id(user_id: str | None) -> None:
    if user_id is None:
        return
    if user_id != user_id.strip():
        raise InvalidEvent("invalid_user_id: userId has leading or trailing spaces")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise InvalidEvent(f"invalid_user_id: userId is longer than {MAX_USER_ID_LENGTH} characters")


def _check_type_specific(raw: Mapping[str, Any], kind: str) -> None:
    """Fields Segment's spec requires for one call type."""
    if kind == "track":
        name = raw.get("event")
        if name is not None and not isinstance(name, str):
            raise InvalidEvent(f"wrong_type: event must be a string, got {json_type(name)}")
        if not name:
            raise InvalidEvent("missing_event: track without event name")
    elif kind == "group" and _identifier(raw, "groupId", "wrong_type") is None:
        raise InvalidEvent("missing_group_id: group without groupId")
    elif kind == "alias" and _identifier(raw, "previousId", "wrong_type") is None:
        raise InvalidEvent("missing_previous_id: alias without previousId")


def _optional_string(raw: Mapping[str, Any], name: str) -> str | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidEvent(f"wrong_type: {name} must be a string, got {json_type(value)}")
    return value


def _name(raw: Mapping[str, Any], name: str) -> str | None:
    value = _optional_string(raw, name)
    if value is not None and len(value) > MAX_NAME_LENGTH:
        raise InvalidEvent(f"wrong_type: {name} is longer than {MAX_NAME_LENGTH} characters")
    return value


def _message_id(raw: Mapping[str, Any]) -> str:
    """The sender's messageId, or one derived from the content so an identical replay dedupes."""
    given = raw.get("messageId")
    if given is not None and not isinstance(given, str):
        raise InvalidEvent(f"invalid_message_id: messageId must be a string, got {json_type(given)}")
    if given and len(given) > MAX_NAME_LENGTH:
        raise InvalidEvent(f"invalid_message_id: messageId is longer than {MAX_NAME_LENGTH} characters")
    if given:
        return given
    hashed = {k: v for k, v in raw.items() if k not in _UNHASHED_FIELDS}
    digest = hashlib.sha256(canonical(hashed).encode("utf-8")).hexdigest()
    return f"ls-{digest[:32]}"


def event_timestamp(raw: Mapping[str, Any], received_at: datetime) -> datetime:
    for name in ("timestamp", "originalTimestamp"):
        value = raw.get(name)
        if value is not None:
            return _parse_time(name, value)
    return received_at


def _parse_time(name: str, value: Any) -> datetime:
    if not isinstance(value, str):
        raise InvalidEvent(f"invalid_timestamp: {name} must be an ISO-8601 string, got {json_type(value)}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidEvent(f"invalid_timestamp: {name} {value[:40]!r} is not ISO-8601") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is past the last representable instant
        raise InvalidEvent(f"invalid_timestamp: {name} {value[:40]!r} is out of range in UTC") from None


def event_email(objects: Mapping[str, Mapping[str, Any]]) -> tuple[str | None, str | None]:
    """(normalised email, None) or (None, why the given email is unusable)."""
    context_traits = objects["context"].get("traits")
    sources = [
        ("traits.email", objects["traits"]),
        ("properties.email", objects["properties"]),
        ("context.traits.email", context_traits if isinstance(context_traits, dict) else {}),
    ]
    for where, source in sources:
        value = source.get("email")
        if value is None or value == "":
            continue
        return _normalised_email(where, value)
    return None, None


def _normalised_email(where: str, value: Any) -> tuple[str | None, str | None]:
    if not isinstance(value, str):
        return None, f"{where} must be a string, got {json_type(value)}"
    email = value.strip().lower()
    if len(email) > MAX_EMAIL_LENGTH or not _EMAIL_RE.fullmatch(email):
        return None, f"{where} {value[:60]!r} is not an email address"
    return email, None


def _check_audience(event: InboundEvent, email_problem: str | None) -> None:
    if not audience.is_audience_event(event):
        return
    _check_audience_key(audience.audience_key(event))
    audience.audience_settings(audience.personas(event).get("audience_settings"))
    if event.user_id is None and event.email is None:
        if email_problem:
            raise InvalidEvent(f"invalid_email: {email_problem}")
        raise InvalidEvent("missing_identifier: audience event has neither userId nor email")


def _check_audience_key(key: str | None) -> None:
    if key is None:
        raise InvalidEvent("missing_audience_key: audience event without a computation or audience key")
    if len(key) > MAX_NAME_LENGTH:
        raise InvalidEvent(f"missing_audience_key: the audience key is longer than {MAX_NAME_LENGTH} characters")


# ---------------------------------------------------------------------------------------------
# Storage helpers


def _without_write_keys(raw: Mapping[str, Any], *, nested: bool) -> dict[str, Any]:
    """The event to store: write keys dropped (at any depth when `nested`), everything else kept
    (unlike `redact`, which also drops tokens and passwords from payloads kept for diagnosis).
    Only the top level is copied unless a write key hides deeper."""
    if not nested:
        return {k: v for k, v in raw.items() if not _is_write_key(k)}
    return _drop_write_keys(raw)  # type: ignore[no-any-return]


def _drop_write_keys(value: Any) -> Any:
    # Recursion is bounded: `_check_values` refused anything deeper than MAX_DEPTH.
    if isinstance(value, Mapping):
        return {k: _drop_write_keys(v) for k, v in value.items() if not _is_write_key(k)}
    if isinstance(value, list):
        return [_drop_write_keys(v) for v in value]
    return value


def _is_write_key(key: str) -> bool:
    return key[:1] in "wW" and len(key) < 24 and NOT_ALNUM.sub("", key.lower()) == "writekey"


@dataclass(frozen=True)
class CheckedMember:
    """One audience member as `validate_member` normalised it (see there)."""

    user_id: str | None
    email: str | None
    traits: Mapping[str, Any]


def validate_member(
    audience_key: Any,
    user_id: str | None,
    email: str | None,
    traits: Mapping[str, Any],
    *,
    traits_json: str | None = None,
) -> CheckedMember | Rejection:
    """What `validate_event` makes of an audience event for this member, checked field by field
    with the same rules and without building the event: for sources that build their own events
    from typed columns and check each member once, where it enters (the SQL source).

    The event is taken to carry `traits` among its properties (write keys among them are dropped
    from the result, as from a stored event), userId `user_id`, else anonymousId
    `email:<normalised email>`, and the email as properties.email. `traits_json`, the traits
    encoded with ensure_ascii off (lone surrogates must fail to encode) and allow_nan off, spares walking them when it shows no problem.
    The event's size is the caller's to bound: pass anything that could exceed MAX_EVENT_BYTES
    through `validate_event` instead.
    """
    try:
        return _validated_member(audience_key, user_id, email, traits, traits_json)
    except InvalidEvent as exc:
        return Rejection(str(exc))


def _validated_member(
    audience_key: Any, user_id: str | None, email: str | None, traits: Mapping[str, Any], traits_json: str | None
) -> CheckedMember:
    if not isinstance(audience_key, str) or not audience_key:
        raise InvalidEvent(f"missing_audience_key: the audience key must be a non-empty string, got {audience_key!r}")
    for name, value in (("audience_key", audience_key), ("userId", user_id), ("email", email)):
        if isinstance(value, str):
            _check_text(value, ((), name), "a value")
    plainly_fine = traits_json is not None and _plainly_fine_text(traits_json, 2)  # in event.properties
    if not plainly_fine and _walk_values({"properties": traits}):
        traits = _drop_write_keys(traits)
    _check_audience_key(audience_key)
    checked_user_id = _identifier({"userId": user_id}, "userId", "invalid_user_id")
    _check_user_id(checked_user_id)
    checked_email, email_problem = (None, None) if not email else _normalised_email("properties.email", email)
    if checked_user_id is None:
        if checked_email is None:
            if email_problem:
                raise InvalidEvent(f"invalid_email: {email_problem}")
            raise InvalidEvent("missing_identifier: audience event has neither userId nor email")
        _identifier({"anonymousId": f"email:{checked_email}"}, "anonymousId", "invalid_anonymous_id")
    return CheckedMember(checked_user_id, checked_email, traits)
