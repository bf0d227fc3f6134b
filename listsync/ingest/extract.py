"""Receive -> **extract** -> store: turn Segment-format request bodies into domain values.

The receiver (and `listsync ingest`) hands raw bytes to `parse_body`, checks each item with
`validate_event`, and asks `extract_deltas` / `extract_email_change` what the event means for
Iterable lists and profiles. Rejected items are stored through `redact`.

This module is pure: no database, no HTTP, no clock. The time of receipt is passed in.

Every rejection reason starts with a stable code followed by a colon, so people and scripts can
group `rejected_events` by `split_part(reason, ':', 1)`:

    body_too_large, malformed_json, not_an_object, invalid_batch, type_mismatch, missing_type,
    unknown_type, event_too_large, wrong_type, invalid_user_id, invalid_anonymous_id,
    invalid_message_id, missing_identifier, missing_event, missing_group_id, missing_previous_id,
    invalid_timestamp, invalid_email, missing_audience_key, too_deep, invalid_text, invalid_number,
    invalid_audience_setting

and, from the receiver, the pollers and the stages after validation: invalid_encoding, request_timeout,
bad_file (a drop-folder file quarantined), storage_refused (the database refused an event that
passed validation), apply_failed (folding it failed), internal_error (a defect of listsync's; the
body is kept for a replay).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from listsync.domain import Desired, EmailChange, InboundEvent, MembershipDelta, Rejection
from listsync.ingest.scrub import redact, redact_value

SEGMENT_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_USER_ID_LENGTH = 52
# Stored in VARCHAR(255) columns (and used as Iterable list names): longer would fail in the database.
MAX_NAME_LENGTH = 255
MAX_EMAIL_LENGTH = 320
# Deeper events are refused: nothing Iterable takes is nested this far, and walking them recursively
# (to redact, to build request bodies) must stay far from Python's recursion limit.
MAX_DEPTH = 64
# What `_loads` puts in place of a subtree too deep for Python's parser (batch and item levels
# above MAX_DEPTH are allowed for), refused by `_check_values` as too_deep.
TOO_DEEP_MARK = "[listsync: nested too deep to parse]"
_CUT_DEPTH = MAX_DEPTH + 4
_STRUCTURE = re.compile(r'"(?:[^"\\]++|\\.)*+"|\\.|[\[\]{}]', re.DOTALL)

AUDIENCE_ENTERED = "Audience Entered"
AUDIENCE_EXITED = "Audience Exited"

_OBJECT_FIELDS = ("traits", "properties", "context")
# Transport metadata that a client may change on a retry of the same event; left out of the
# derived messageId so a retried event still dedupes.
_UNHASHED_FIELDS = frozenset({"sentAt", "receivedAt", "writeKey"})
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_FLAG_STRINGS = {"true": True, "false": False}
_NOT_ALNUM = re.compile(r"[^a-z0-9]")
# Engage's per-audience settings (context.personas.audience_settings) in listsync's own names.
_ENGAGE_SETTING_NAMES = {
    "updateExistingUsersOnly": "update_existing_users_only",
    "globalUnsubscribe": "channel_unsubscribe",
    "channelUnsubscribe": "channel_unsubscribe",
    "campaignId": "campaign_id",
}
_BOOLEAN_SETTINGS = frozenset({"update_existing_users_only", "channel_unsubscribe"})


@dataclass(frozen=True)
class RawEvent:
    """One event object out of a request body, not yet validated.

    Attributes:
        raw: the event, with its path type and the batch's context/integrations applied.
        size: bytes of the item as sent (before merging), checked against MAX_EVENT_BYTES.
    """

    raw: dict[str, Any]
    size: int | None


@dataclass(frozen=True)
class RejectedItem:
    """One item of a body that was rejected before validation.

    `payload` is the item's JSON text with secrets removed, ready for `rejected_events`.
    """

    rejection: Rejection
    payload: str


BodyItem = RawEvent | RejectedItem


class _Invalid(Exception):
    """Internal: carries a rejection reason out of the field checks."""


# ---------------------------------------------------------------------------------------------
# Bodies


def parse_body(body: bytes, *, path_type: str | None) -> Rejection | list[BodyItem]:
    """Split a request body for `/v1/<path_type>` (or `/v1/batch` when None) into items.

    Returns a `Rejection` when the whole body is unusable; otherwise one item per event, each
    either a `RawEvent` to validate or a `RejectedItem`. One bad item never sinks its batch.
    """
    if path_type is not None and path_type not in SEGMENT_TYPES:
        raise ValueError(f"not a Segment endpoint type: {path_type!r}")
    if len(body) > MAX_BATCH_BYTES:
        return Rejection(f"body_too_large: {len(body)} bytes > {MAX_BATCH_BYTES}")
    try:
        decoded = _loads(body)
    except ValueError as exc:
        return Rejection(f"malformed_json: {exc}")
    if not isinstance(decoded, dict):
        return Rejection(f"not_an_object: body must be a JSON object, got {_json_type(decoded)}")
    if path_type is None:
        return _split_batch(decoded)
    return [_single_item(decoded, len(body), path_type)]


def parse_line(line: bytes | str) -> BodyItem:
    """Parse one line of a JSON-lines file (`listsync ingest`); the type comes from the event."""
    if isinstance(line, bytes):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            # The receiver refuses the same bytes; a file must not turn them into U+FFFD silently.
            reason = f"malformed_json: line is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            return RejectedItem(Rejection(reason), line.decode("utf-8", errors="replace"))
    else:
        text = line
    try:
        decoded = _loads(text)
    except ValueError as exc:
        return RejectedItem(Rejection(f"malformed_json: {exc}"), text)
    if not isinstance(decoded, dict):
        reason = f"not_an_object: event must be a JSON object, got {_json_type(decoded)}"
        return RejectedItem(Rejection(reason), _dump(redact_value(decoded)))
    return RawEvent(decoded, len(line) if isinstance(line, bytes) else len(text.encode("utf-8", "replace")))


def parse_webhook_body(body: bytes) -> Rejection | list[BodyItem]:
    """Split a `/v1/webhook` body, as Segment's Webhooks destinations send it, into items.

    One event object (its own `type` says which call it is), or a JSON array of them (Webhooks
    (Actions) with batching on). Array items are checked one by one, as in a batch; there is no
    shared context to merge. An empty array is an empty list.
    """
    if len(body) > MAX_BATCH_BYTES:
        return Rejection(f"body_too_large: {len(body)} bytes > {MAX_BATCH_BYTES}")
    try:
        decoded = _loads(body)
    except ValueError as exc:
        return Rejection(f"malformed_json: {exc}")
    if isinstance(decoded, dict):
        return [RawEvent(decoded, len(body))]
    if isinstance(decoded, list):
        return [_batch_item(item, {}) for item in decoded]
    got = _json_type(decoded)
    return Rejection(f"not_an_object: body must be a JSON object or an array of objects, got {got}")


def _loads(body: bytes | str) -> Any:
    """json.loads, but NaN/Infinity count as malformed, and runaway nesting is cut, not fatal.

    Python's parser gives up (RecursionError) somewhere below 1000 levels, and where exactly
    depends on the caller's stack. Rather than refusing a whole batch for one deep event, the
    text is parsed again with every subtree deeper than `_CUT_DEPTH` replaced by a marker that
    `_check_values` refuses: the deep event is rejected alone, the others are kept.
    """
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        pass
    # JSONDecodeError and UnicodeDecodeError are both ValueErrors.
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    try:
        return json.loads(_cut_deep(text, _CUT_DEPTH), parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise ValueError("nesting too deep") from exc


def _cut_deep(text: str, limit: int) -> str:
    """`text` with each subtree that starts below `limit` levels replaced by TOO_DEEP_MARK.

    One pass over the structural characters (strings are skipped whole by the pattern, escapes
    consumed so a stray backslash never opens one), so linear in the text.
    """
    parts: list[str] = []
    depth = 0
    done = 0
    cut_from: int | None = None
    for token in _STRUCTURE.finditer(text):
        symbol = token.group()
        if symbol in "[{":
            depth += 1
            if depth == limit + 1 and cut_from is None:
                cut_from = token.start()
        elif symbol in "]}":
            if depth == limit + 1 and cut_from is not None:
                parts += [text[done:cut_from], json.dumps(TOO_DEEP_MARK)]
                done, cut_from = token.end(), None
            depth -= 1
    parts.append(text[done:])
    return "".join(parts)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _single_item(event: dict[str, Any], size: int, path_type: str) -> BodyItem:
    explicit = event.get("type")
    if explicit is not None and explicit != path_type:
        reason = f"type_mismatch: type {explicit!r} sent to /v1/{path_type}"
        return RejectedItem(Rejection(reason), _dump(redact(event)))
    return RawEvent({**event, "type": path_type}, size)


def _split_batch(body: dict[str, Any]) -> Rejection | list[BodyItem]:
    batch = body.get("batch")
    if not isinstance(batch, list):
        got = "nothing" if batch is None else _json_type(batch)
        return Rejection(f"invalid_batch: batch must be a list, got {got}")
    shared: dict[str, dict[str, Any]] = {}
    for key in ("context", "integrations"):
        value = body.get(key)
        if value is not None and not isinstance(value, dict):
            return Rejection(f"wrong_type: batch {key} must be an object, got {_json_type(value)}")
        shared[key] = value or {}
    return [_batch_item(item, shared) for item in batch]


def _batch_item(item: Any, shared: Mapping[str, Mapping[str, Any]]) -> BodyItem:
    if not isinstance(item, dict):
        reason = f"not_an_object: batch item must be an object, got {_json_type(item)}"
        return RejectedItem(Rejection(reason), _dump(redact_value(item)))
    return RawEvent(_merge_shared(item, shared), _encoded_size(item))


def _merge_shared(item: dict[str, Any], shared: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Apply the batch's context/integrations as defaults, as Segment does: the item's keys win.

    An item whose own context is not an object is left alone for `validate_event` to reject.
    """
    merged = dict(item)
    for key, defaults in shared.items():
        own = item.get(key)
        if defaults and (own is None or isinstance(own, dict)):
            merged[key] = {**defaults, **(own or {})}
    return merged


# ---------------------------------------------------------------------------------------------
# Events


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
    except _Invalid as exc:
        return Rejection(str(exc))


def _validated(raw: Mapping[str, Any], received_at: datetime, encoded_size: int | None) -> InboundEvent:
    nested_write_key = _check_values(raw)
    _check_size(raw, encoded_size)
    kind = _event_type(raw)
    objects = {name: _object_field(raw, name) for name in _OBJECT_FIELDS}
    user_id = _identifier(raw, "userId", "invalid_user_id")
    anonymous_id = _identifier(raw, "anonymousId", "invalid_anonymous_id")
    _check_user_id(user_id)
    if user_id is None and anonymous_id is None:
        raise _Invalid("missing_identifier: event has neither userId nor anonymousId")
    _check_type_specific(raw, kind)
    email, email_problem = _email(objects)
    stored = _without_write_keys(raw, nested=nested_write_key)
    event = InboundEvent(
        type=kind,
        message_id=_message_id(raw),
        timestamp=_timestamp(raw, received_at),
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


_NESTED_WRITE_KEY = re.compile(r'"write[_-]?key"\s*:', re.IGNORECASE)


def _plainly_fine(raw: Mapping[str, Any]) -> bool:
    """True when encoding shows none of the problems `_walk_values` looks for (False: walk it)."""
    try:
        text = json.dumps(raw, ensure_ascii=False, allow_nan=False, default=str)
        text.encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return False
    if "\\u0000" in text or text.count("{") + text.count("[") > MAX_DEPTH or TOO_DEEP_MARK in text:
        return False
    return _NESTED_WRITE_KEY.search(text) is None


def _walk_values(raw: Mapping[str, Any]) -> bool:
    """`_check_values` the slow way: walks iteratively (no recursion, whatever the depth)."""
    nested_write_key = False
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(raw, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                raise _Invalid(f"too_deep: {_path_text(path)} is nested more than {MAX_DEPTH} levels deep")
            for key, item in value.items():
                _check_text(key, (path, key), "a key")
                nested_write_key |= depth > 1 and _is_write_key(key)
                stack.append((item, depth + 1, (path, key)))
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise _Invalid(f"too_deep: {_path_text(path)} is nested more than {MAX_DEPTH} levels deep")
            stack.extend((item, depth + 1, (path, index)) for index, item in enumerate(value))
        elif isinstance(value, str):
            if value == TOO_DEEP_MARK:
                raise _Invalid(f"too_deep: {_path_text(path)} is nested more than {MAX_DEPTH} levels deep")
            _check_text(value, path, "a value")
        elif isinstance(value, float) and not math.isfinite(value):
            raise _Invalid(f"invalid_number: {_path_text(path)} is not a finite number")
    return nested_write_key


def _check_text(text: str, path: tuple[Any, ...], what: str) -> None:
    if "\x00" in text:
        raise _Invalid(
            f"invalid_text: {what} at {_path_text(path)} contains a NUL character (\\u0000), "
            "which cannot be stored"
        )
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid(
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
    size = _encoded_size(raw) if encoded_size is None else encoded_size
    if size is None:  # too deep to encode; `_check_values` refuses it first
        raise _Invalid(f"too_deep: the event is nested more than {MAX_DEPTH} levels deep")
    if size > MAX_EVENT_BYTES:
        raise _Invalid(f"event_too_large: {size} bytes > {MAX_EVENT_BYTES}")


def _event_type(raw: Mapping[str, Any]) -> str:
    kind = raw.get("type")
    if kind is None:
        raise _Invalid("missing_type: event has no type")
    if not isinstance(kind, str) or kind not in SEGMENT_TYPES:
        known = ", ".join(sorted(SEGMENT_TYPES))
        raise _Invalid(f"unknown_type: {kind!r} is not one of {known}")
    return kind


def _object_field(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A JSON object field; null counts as absent, as Segment's libraries send it."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"wrong_type: {name} must be an object, got {_json_type(value)}")
    return value


def _identifier(raw: Mapping[str, Any], name: str, code: str) -> str | None:
    value = raw.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Invalid(f"{code}: {name} must be a string, got {_json_type(value)}")
    text = str(value) if isinstance(value, str) or abs(value) < 10**MAX_NAME_LENGTH else ""
    if not text or len(text) > MAX_NAME_LENGTH:
        raise _Invalid(f"{code}: {name} is longer than {MAX_NAME_LENGTH} characters")
    return text


def _check_user_id(user_id: str | None) -> None:
    if user_id is None:
        return
    if user_id != user_id.strip():
        raise _Invalid("invalid_user_id: userId has leading or trailing spaces")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise _Invalid(f"invalid_user_id: userId is longer than {MAX_USER_ID_LENGTH} characters")


def _check_type_specific(raw: Mapping[str, Any], kind: str) -> None:
    """Fields Segment's spec requires for one call type."""
    if kind == "track":
        name = raw.get("event")
        if name is not None and not isinstance(name, str):
            raise _Invalid(f"wrong_type: event must be a string, got {_json_type(name)}")
        if not name:
            raise _Invalid("missing_event: track without event name")
    elif kind == "group" and _identifier(raw, "groupId", "wrong_type") is None:
        raise _Invalid("missing_group_id: group without groupId")
    elif kind == "alias" and _identifier(raw, "previousId", "wrong_type") is None:
        raise _Invalid("missing_previous_id: alias without previousId")


def _optional_string(raw: Mapping[str, Any], name: str) -> str | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, str):
        raise _Invalid(f"wrong_type: {name} must be a string, got {_json_type(value)}")
    return value


def _name(raw: Mapping[str, Any], name: str) -> str | None:
    value = _optional_string(raw, name)
    if value is not None and len(value) > MAX_NAME_LENGTH:
        raise _Invalid(f"wrong_type: {name} is longer than {MAX_NAME_LENGTH} characters")
    return value


def _message_id(raw: Mapping[str, Any]) -> str:
    """The sender's messageId, or one derived from the content so an identical replay dedupes."""
    given = raw.get("messageId")
    if given is not None and not isinstance(given, str):
        raise _Invalid(f"invalid_message_id: messageId must be a string, got {_json_type(given)}")
    if given and len(given) > MAX_NAME_LENGTH:
        raise _Invalid(f"invalid_message_id: messageId is longer than {MAX_NAME_LENGTH} characters")
    if given:
        return given
    hashed = {k: v for k, v in raw.items() if k not in _UNHASHED_FIELDS}
    digest = hashlib.sha256(_canonical(hashed).encode("utf-8")).hexdigest()
    return f"ls-{digest[:32]}"


def _timestamp(raw: Mapping[str, Any], received_at: datetime) -> datetime:
    for name in ("timestamp", "originalTimestamp"):
        value = raw.get(name)
        if value is not None:
            return _parse_time(name, value)
    return received_at


def _parse_time(name: str, value: Any) -> datetime:
    if not isinstance(value, str):
        raise _Invalid(f"invalid_timestamp: {name} must be an ISO-8601 string, got {_json_type(value)}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise _Invalid(f"invalid_timestamp: {name} {value[:40]!r} is not ISO-8601") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-14:00 is past the last representable instant
        raise _Invalid(f"invalid_timestamp: {name} {value[:40]!r} is out of range in UTC") from None


def _email(objects: Mapping[str, Mapping[str, Any]]) -> tuple[str | None, str | None]:
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
        if not isinstance(value, str):
            return None, f"{where} must be a string, got {_json_type(value)}"
        email = value.strip().lower()
        if len(email) > MAX_EMAIL_LENGTH or not _EMAIL_RE.fullmatch(email):
            return None, f"{where} {value[:60]!r} is not an email address"
        return email, None
    return None, None


def _check_audience(event: InboundEvent, email_problem: str | None) -> None:
    if not is_audience_event(event):
        return
    key = _audience_key(event)
    if key is None:
        raise _Invalid("missing_audience_key: audience event without a computation or audience key")
    if len(key) > MAX_NAME_LENGTH:
        raise _Invalid(f"missing_audience_key: the audience key is longer than {MAX_NAME_LENGTH} characters")
    audience_settings(_personas(event).get("audience_settings"))
    if event.user_id is None and event.email is None:
        if email_problem:
            raise _Invalid(f"invalid_email: {email_problem}")
        raise _Invalid("missing_identifier: audience event has neither userId nor email")


def _rules_fingerprint() -> str:
    """A digest of this module's source: it changes whenever the validation rules may have. An
    unreadable source gives a fresh value per process, so every stored event is validated again."""
    try:
        source = Path(__file__).read_bytes()
    except OSError:
        return os.urandom(8).hex()
    return hashlib.sha256(source).hexdigest()[:16]


RULES = _rules_fingerprint()


def stored_event(
    payload: Mapping[str, Any],
    *,
    type: str,
    message_id: str,
    timestamp: datetime,
    event: str | None,
    user_id: str | None,
    anonymous_id: str | None,
    email: str | None,
) -> InboundEvent:
    """An event these rules (`RULES`) accepted, read back from the inbox without validating it
    again: the normalised fields are what `validate_event` made of it, as stored beside the
    payload, and the objects are the stored payload's, as validating that payload gives them
    (they were objects or null). Only the derived messageId of an event without one that hid a
    write key below the top level differs: the stored one is the inbox's own dedupe key."""
    objects = {name: payload.get(name) or {} for name in _OBJECT_FIELDS}
    return InboundEvent(
        type=type,
        message_id=message_id,
        timestamp=timestamp,
        user_id=user_id,
        anonymous_id=anonymous_id,
        email=email,
        event=event,
        name=payload.get("name"),
        traits=objects["traits"],
        properties=objects["properties"],
        context=objects["context"],
        raw=payload,
    )


# ---------------------------------------------------------------------------------------------
# Meaning


def is_audience_event(event: InboundEvent) -> bool:
    """An Engage audience enter/exit: an identify computed as an audience, or the two tracks.

    Ordinary boolean traits (`newsletter: true`) never make an identify an audience event.
    """
    if event.type == "identify":
        return _personas(event).get("computation_class") == "audience"
    return event.type == "track" and event.event in (AUDIENCE_ENTERED, AUDIENCE_EXITED)


def extract_deltas(event: InboundEvent) -> list[MembershipDelta]:
    """The membership the event states, as at most one delta; [] for non-audience events.

    The flag (traits[K] or properties[K]) decides when it is a boolean or "true"/"false". Any
    other flag value is UNKNOWN rather than Segment's "truthy subscribes": an identify with a
    missing or odd flag records that the member was seen and keeps the stored membership. A
    track without a usable flag falls back to its name (Entered -> IN, Exited -> OUT); when the
    flag and the name disagree the flag wins, as Segment's destination reads only the flag.
    """
    key = _audience_key(event) if is_audience_event(event) else None
    if key is None:
        return []
    source = event.traits if event.type == "identify" else event.properties
    return [
        MembershipDelta(
            audience_key=key,
            user_id=event.user_id,
            email=event.email,
            desired=_desired(event, source.get(key)),
            timestamp=event.timestamp,
            message_id=event.message_id,
            traits=_member_traits(event, source, key),
            audience_settings=_audience_settings(event),
        )
    ]


def extract_email_change(event: InboundEvent) -> EmailChange | None:
    """A plain identify naming both a userId and a valid email; the store decides if it changed."""
    if event.type != "identify" or is_audience_event(event):
        return None
    if event.user_id is None or event.email is None:
        return None
    return EmailChange(event.user_id, event.email, event.timestamp, event.message_id)


def _personas(event: InboundEvent) -> Mapping[str, Any]:
    personas = event.context.get("personas")
    return personas if isinstance(personas, dict) else {}


def _audience_key(event: InboundEvent) -> str | None:
    candidates = [_personas(event).get("computation_key")]
    if event.type == "track":
        candidates.insert(0, event.properties.get("audience_key"))
    return next((c for c in candidates if isinstance(c, str) and c), None)


def _desired(event: InboundEvent, flag: Any) -> Desired:
    if isinstance(flag, str):
        flag = _FLAG_STRINGS.get(flag.strip().lower(), flag)
    if isinstance(flag, bool):
        return Desired.IN if flag else Desired.OUT
    if event.type == "track":
        return Desired.IN if event.event == AUDIENCE_ENTERED else Desired.OUT
    return Desired.UNKNOWN


def _member_traits(event: InboundEvent, source: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Fields for the subscriber's dataFields: the event's own over context.traits, flag removed."""
    base = event.context.get("traits")
    traits = dict(base) if isinstance(base, dict) else {}
    traits.update(source)
    traits.pop(key, None)
    if event.type == "track":
        traits.pop("audience_key", None)
    return traits


def _audience_settings(event: InboundEvent) -> Mapping[str, Any] | None:
    return audience_settings(_personas(event).get("audience_settings")) or None


def audience_settings(sent: Any) -> dict[str, Any]:
    """Engage's per-audience settings in listsync's names and types, unknown names ignored.

    Engage sends some as strings (`"campaignId": "777"`, `"channelUnsubscribe": "false"`); those
    are coerced. A value that cannot be coerced refuses the event, naming the setting, rather than
    reaching Iterable as a string.
    """
    if not isinstance(sent, dict):
        return {}
    settings: dict[str, Any] = {}
    for name, value in sent.items():
        ours = _ENGAGE_SETTING_NAMES.get(name)
        if ours is not None and value is not None:
            settings[ours] = _setting_value(name, ours, value)
    return settings


def _setting_value(name: str, ours: str, value: Any) -> bool | int:
    if ours in _BOOLEAN_SETTINGS:
        flag = _FLAG_STRINGS.get(value.strip().lower()) if isinstance(value, str) else value
        if isinstance(flag, bool):
            return flag
        raise _Invalid(f"invalid_audience_setting: {name} must be true or false, got {str(value)[:40]!r}")
    number: Any = value.strip() if isinstance(value, str) else value
    if isinstance(number, str) and number.isdigit() and len(number) < 19:
        number = int(number)
    if isinstance(number, int) and not isinstance(number, bool) and 0 <= number < 2**63:
        return number
    raise _Invalid(f"invalid_audience_setting: {name} must be a whole number, got {str(value)[:40]!r}")


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
    return key[:1] in "wW" and len(key) < 24 and _NOT_ALNUM.sub("", key.lower()) == "writekey"


# ---------------------------------------------------------------------------------------------
# JSON helpers


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages a sender can act on."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    names: dict[type, str] = {str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _encoded_size(value: Any) -> int | None:
    """UTF-8 bytes of `value` as JSON; None when it is nested too deep to encode (refused later)."""
    try:
        return len(_dump(value).encode("utf-8", "surrogatepass"))
    except RecursionError:
        return None
