"""Receive -> **extract** -> store: turn Segment-format request bodies into domain values.

The receiver (and `listsync ingest`) hands raw bytes to `parse_body` (or `parse_line`,
`parse_webhook_body`), checks each item with `validate.validate_event`, and asks
`audience.extract_deltas` / `audience.extract_email_change` what the event means for Iterable
lists and profiles. Rejected items are stored through `scrub.redact`.

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

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from listsync import json_text
from listsync.domain import Rejection
from listsync.ingest.scrub import redact, redact_value
from listsync.json_text import json_type

SEGMENT_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
# Deeper events are refused: nothing Iterable takes is nested this far, and walking them recursively
# (to redact, to build request bodies) must stay far from Python's recursion limit.
MAX_DEPTH = 64
# What `_loads` puts in place of a subtree too deep for Python's parser (batch and item levels
# above MAX_DEPTH are allowed for), refused by `_check_values` as too_deep.
TOO_DEEP_MARK = "[listsync: nested too deep to parse]"
_CUT_DEPTH = MAX_DEPTH + 4
_STRUCTURE = re.compile(r'"(?:[^"\\]++|\\.)*+"|\\.|[\[\]{}]', re.DOTALL)


@dataclass(frozen=True)
class RawEvent:
    """One event object out of a request body, not yet validated.

    Attributes:
        raw: the event, with its path type and the batch's context/integrations applied.
        size: bytes of the item as sent (before merging), checked against MAX_EVENT_BYTES.
        text: JSON text of `raw` for the fast path (`fast_path.accepted_row`): orjson's encoding
            of it, or the line orjson parsed it from when that has no backslash; None when the
            stdlib parsed it (non-finite numbers may hide) or merging changed it.
    """

    raw: dict[str, Any]
    size: int | None
    text: bytes | None = None


@dataclass(frozen=True)
class RejectedItem:
    """One item of a body that was rejected before validation.

    `payload` is the item's JSON text with secrets removed, ready for `rejected_events`.
    """

    rejection: Rejection
    payload: str


BodyItem = RawEvent | RejectedItem


class InvalidEvent(Exception):
    """Carries a rejection reason out of the field checks."""

# ---------------------------------------------------------------------------------------------
# Bodies


def _decoded(body: bytes) -> tuple[Any, bool]:
    """The JSON value of a request body, or the Rejection of a body too large or not JSON; and
    whether orjson parsed it."""
    if len(body) > MAX_BATCH_BYTES:
        return Rejection(f"body_too_large: {len(body)} bytes > {MAX_BATCH_BYTES}"), False
    try:
        return _loads_with(body)
    except ValueError as exc:
        return Rejection(f"malformed_json: {exc}"), False


def parse_body(body: bytes, *, path_type: str | None) -> Rejection | list[BodyItem]:
    """Split a request body for `/v1/<path_type>` (or `/v1/batch` when None) into items.

    Returns a `Rejection` when the whole body is unusable; otherwise one item per event, each
    either a `RawEvent` to validate or a `RejectedItem`. One bad item never sinks its batch.
    """
    if path_type is not None and path_type not in SEGMENT_TYPES:
        raise ValueError(f"not a Segment endpoint type: {path_type!r}")
    decoded, by_orjson = _decoded(body)
    if isinstance(decoded, Rejection):
        return decoded
    if not isinstance(decoded, dict):
        return Rejection(f"not_an_object: body must be a JSON object, got {json_type(decoded)}")
    if path_type is None:
        return _split_batch(decoded, by_orjson)
    return [_single_item(decoded, len(body), path_type)]


def parse_lines(lines: Sequence[bytes]) -> list[BodyItem]:
    """`parse_line` for each of `lines`, with one look for long digit runs for all of them."""
    checked = not json_text.has_long_digits(b"\n".join(lines))
    return [parse_line(line, digits_checked=checked) for line in lines]


def parse_line(line: bytes | str, *, digits_checked: bool = False) -> BodyItem:
    """Parse one line of a JSON-lines file (`listsync ingest`); the type comes from the event."""
    if isinstance(line, bytes) and digits_checked:
        # The usual line: orjson reads the bytes (checking UTF-8 itself); anything it refuses
        # takes the path below, which names the problem.
        try:
            decoded = json_text.fast_loads(line, digits_checked=True)
        except ValueError:
            pass
        else:
            if isinstance(decoded, dict):
                return RawEvent(decoded, len(line), None if b"\\" in line else line)
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
        decoded, by_orjson = _loads_with(text, digits_checked=digits_checked)
    except ValueError as exc:
        return RejectedItem(Rejection(f"malformed_json: {exc}"), text)
    if not isinstance(decoded, dict):
        reason = f"not_an_object: event must be a JSON object, got {json_type(decoded)}"
        return RejectedItem(Rejection(reason), json_text.stdlib_dump(redact_value(decoded)))
    if isinstance(line, bytes):
        return RawEvent(decoded, len(line), line if by_orjson and b"\\" not in line else None)
    return RawEvent(decoded, len(text.encode("utf-8", "replace")))


def parse_webhook_body(body: bytes) -> Rejection | list[BodyItem]:
    """Split a `/v1/webhook` body, as Segment's Webhooks destinations send it, into items.

    One event object (its own `type` says which call it is), or a JSON array of them (Webhooks
    (Actions) with batching on). Array items are checked one by one, as in a batch; there is no
    shared context to merge. An empty array is an empty list.
    """
    decoded, by_orjson = _decoded(body)
    if isinstance(decoded, Rejection):
        return decoded
    if isinstance(decoded, dict):
        return [RawEvent(decoded, len(body))]
    if isinstance(decoded, list):
        return [_batch_item(item, {}, by_orjson) for item in decoded]
    got = json_type(decoded)
    return Rejection(f"not_an_object: body must be a JSON object or an array of objects, got {got}")


def _loads_with(body: bytes | str, *, digits_checked: bool = False) -> tuple[Any, bool]:
    """`_loads`, and whether orjson parsed the text (the stdlib did otherwise)."""
    try:
        return json_text.fast_loads(body, digits_checked=digits_checked), True
    except ValueError:
        return _loads(body, fast=False), False


def _loads(body: bytes | str, *, digits_checked: bool = False, fast: bool = True) -> Any:
    """json.loads, but NaN/Infinity count as malformed, and runaway nesting is cut, not fatal.

    orjson parses what it can parse exactly as the stdlib would (`json_text.fast_loads`); the
    rest (lone surrogates, NaN, huge numbers, deep nesting, malformed text) takes the stdlib's
    path, so its result and error messages are the stdlib's.

    Python's parser gives up (RecursionError) somewhere below 1000 levels, and where exactly
    depends on the caller's stack. Rather than refusing a whole batch for one deep event, the
    text is parsed again with every subtree deeper than `_CUT_DEPTH` replaced by a marker that
    `_check_values` refuses: the deep event is rejected alone, the others are kept.
    """
    if fast:
        try:
            return json_text.fast_loads(body, digits_checked=digits_checked)
        except ValueError:
            pass
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
        return RejectedItem(Rejection(reason), json_text.stdlib_dump(redact(event)))
    return RawEvent({**event, "type": path_type}, size)


def _split_batch(body: dict[str, Any], by_orjson: bool) -> Rejection | list[BodyItem]:
    batch = body.get("batch")
    if not isinstance(batch, list):
        got = "nothing" if batch is None else json_type(batch)
        return Rejection(f"invalid_batch: batch must be a list, got {got}")
    shared: dict[str, dict[str, Any]] = {}
    for key in ("context", "integrations"):
        value = body.get(key)
        if value is not None and not isinstance(value, dict):
            return Rejection(f"wrong_type: batch {key} must be an object, got {json_type(value)}")
        shared[key] = value or {}
    return [_batch_item(item, shared, by_orjson) for item in batch]


def _batch_item(item: Any, shared: Mapping[str, Mapping[str, Any]], by_orjson: bool) -> BodyItem:
    if not isinstance(item, dict):
        reason = f"not_an_object: batch item must be an object, got {json_type(item)}"
        return RejectedItem(Rejection(reason), json_text.stdlib_dump(redact_value(item)))
    encoded = json_text.dumps_bytes(item)
    if encoded is None or len(encoded) > MAX_EVENT_BYTES // 2:  # near the limit: the stdlib's size
        return RawEvent(_merge_shared(item, shared), json_text.encoded_size(item, exact_above=MAX_EVENT_BYTES // 2))
    merged = _merge_shared(item, shared)
    return RawEvent(merged, len(encoded), encoded if by_orjson and merged is item else None)


def _merge_shared(item: dict[str, Any], shared: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Apply the batch's context/integrations as defaults, as Segment does: the item's keys win.

    An item whose own context is not an object is left alone for `validate_event` to reject.
    """
    if not any(shared.values()):  # nothing to merge (the usual batch): the item as decoded
        return item
    merged = dict(item)
    for key, defaults in shared.items():
        own = item.get(key)
        if defaults and (own is None or isinstance(own, dict)):
            merged[key] = {**defaults, **(own or {})}
    return merged

