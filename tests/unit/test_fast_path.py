"""The fast path agrees with `validate_event`: whatever it accepts, full validation accepts with the
same inbox row; whatever else it meets, it leaves to full validation (None)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from listsync.domain import InboundEvent
from listsync.ingest import accept, extract, fast_path, validate

NOW = datetime(2026, 6, 1, tzinfo=UTC)

texts = st.sampled_from(["", " ", "u1", " u1", "u1 ", "a" * 52, "a" * 53, "x" * 256, "wr\u0130teKey", "\x00", "é"])
ids = texts | st.none() | st.integers(-5, 5) | st.booleans() | st.just(10**30) | st.lists(st.integers(), max_size=1)
timestamps = st.sampled_from(
    ["2026-01-01T00:00:00.000Z", "2026-01-01T00:00:00", "2026-01-01 10:00:00+02:00", "not a time", "",
     "9999-12-31T23:59:59-14:00", " 2026-01-01T00:00:00Z "]
) | st.none() | st.integers()
emails = st.sampled_from(["Ada@Example.com", " bo@x.io ", "nope", "", "a@b"]) | st.none() | st.integers()
keys = st.sampled_from(["aud", "", "k" * 256]) | st.none() | st.integers()
flags = st.sampled_from([True, False, "true", "maybe", None, 1])
settings_values = st.none() | st.just({}) | st.fixed_dictionaries(
    {}, optional={"campaignId": st.sampled_from(["777", "x", 5, -1]), "channelUnsubscribe": flags}
) | st.just("odd")
secret_keys = st.sampled_from(["writeKey", "write_key", "w-r-i-t-e-k-e-y", "write\u212aey", "website", "apiKey"])
leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _sometimes(draw: st.DrawFn, usual: Any, odd: st.SearchStrategy[Any]) -> Any:
    """Mostly the usual value, one time in five an odd one (so most events are accepted)."""
    return draw(odd) if draw(st.integers(0, 4)) == 0 else usual


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    kind = _sometimes(draw, draw(st.sampled_from(["identify", "track"])),
                      st.sampled_from(["page", "screen", "group", "alias", "Identify", None, 3]))
    key = _sometimes(draw, "aud", keys)
    personas = {"computation_class": _sometimes(draw, "audience", st.sampled_from(["trait", None, 1])),
                "computation_key": key}
    if draw(st.integers(0, 3)) == 0:
        personas["audience_settings"] = draw(settings_values)
    if draw(st.integers(0, 5)) == 0:
        del personas["computation_key"]
    traits = {"email": _sometimes(draw, "Ada@Example.com", emails), "name": _sometimes(draw, "Ada", leaves)}
    if isinstance(key, str):
        traits[key] = _sometimes(draw, True, flags)
    nested = draw(st.dictionaries(secret_keys, leaves, max_size=2)) if draw(st.integers(0, 3)) == 0 else {}
    context: Any = {"personas": personas, "library": {"name": "x", "extra": nested}}
    event: dict[str, Any] = {
        "type": kind,
        "messageId": _sometimes(draw, "m-1", ids),
        "userId": _sometimes(draw, "u1", ids),
        "timestamp": _sometimes(draw, "2026-01-01T00:00:00.000Z", timestamps),
        "traits": _sometimes(draw, traits, st.sampled_from([None, [], "x"])),
        "context": _sometimes(draw, context, st.sampled_from([None, 7, {"personas": "x"}])),
    }
    if kind == "track":
        event["event"] = _sometimes(draw, "Audience Entered", st.sampled_from(["Audience Exited", "Bought"])
                                    | texts | st.none() | st.integers())
        event["properties"] = _sometimes(draw, {"audience_key": key, "email": "p@x.io"},
                                         st.sampled_from([{}, None, "p", {"audience_key": 3}]))
    optional = {
        "anonymousId": ids, "originalTimestamp": timestamps, "name": texts | st.none() | st.integers(),
        "writeKey": st.just("secret-key"), "deep": st.just(_nested(70)), "wide": st.just([{}] * 70),
    }  # fmt: skip
    for name, strategy in optional.items():
        if draw(st.integers(0, 5)) == 0:
            event[name] = draw(strategy)
    for name in ("messageId", "userId", "timestamp"):
        if draw(st.integers(0, 7)) == 0:
            del event[name]
    return event


def _full(raw: dict[str, Any], size: int | None) -> fast_path.InboxRow | None:
    checked = validate.validate_event(raw, received_at=NOW, encoded_size=size)
    return fast_path.row_of(checked) if isinstance(checked, InboundEvent) else None


def _agrees(item: extract.BodyItem) -> bool:
    """Whether the fast path took the item (and then that it agrees with full validation)."""
    assert isinstance(item, extract.RawEvent)
    fast = fast_path.accepted_row(item.raw, item.size, item.text, NOW)
    if fast is not None:
        assert fast == _full(item.raw, item.size)
    return fast is not None


@settings(max_examples=600, deadline=None)
@given(events(), st.sampled_from(["orjson", "stdlib", "ascii"]))
def test_lines_agree_with_full_validation(raw: dict[str, Any], encoder: str) -> None:
    try:
        line = {"orjson": orjson.dumps, "stdlib": lambda v: json.dumps(v, ensure_ascii=False).encode(),
                "ascii": lambda v: json.dumps(v).encode()}[encoder](raw)  # fmt: skip
    except (TypeError, UnicodeEncodeError):
        return
    item = extract.parse_line(line)
    if isinstance(item, extract.RawEvent):
        _agrees(item)


@settings(max_examples=300, deadline=None)
@given(st.lists(events(), min_size=1, max_size=4), st.sampled_from([{}, {"context": {"personas": {}}}]))
def test_batch_items_agree_with_full_validation(items: list[dict[str, Any]], shared: dict[str, Any]) -> None:
    body = json.dumps({"batch": items, **shared}, ensure_ascii=False).encode()
    parsed = extract.parse_body(body, path_type=None)
    assert isinstance(parsed, list)
    for item in parsed:
        if isinstance(item, extract.RawEvent):
            _agrees(item)


def test_usual_engage_events_take_the_fast_path() -> None:
    identify = {"type": "identify", "messageId": "m1", "userId": "u1", "timestamp": "2026-01-01T00:00:00Z",
                "traits": {"email": "Ada@Example.com", "vip": True},
                "context": {"personas": {"computation_class": "audience", "computation_key": "vip"}}}  # fmt: skip
    track = {"type": "track", "event": "Audience Exited", "messageId": "m2", "anonymousId": "a1",
             "properties": {"audience_key": "vip", "vip": False, "email": "bo@x.io"}}  # fmt: skip
    for raw in (identify, track):
        line = extract.parse_line(json.dumps(raw).encode())
        body = extract.parse_body(json.dumps({"batch": [raw]}).encode(), path_type=None)
        assert isinstance(body, list)
        assert _agrees(line) and _agrees(body[0])


def test_nested_write_keys_spelled_with_folding_letters_are_never_stored() -> None:
    """lower() folds U+0130 to 'i' and the Kelvin sign to 'k': such a key is a write key too."""
    for key in ("wr\u0130teKey", "write\u212aey"):
        raw = {"type": "identify", "messageId": "m", "userId": "u", "context": {"library": {key: "secret"}}}
        checked = accept.check_items([extract.parse_line(orjson.dumps(raw))], now=NOW)
        assert [row.payload for row in checked.events] == [{**raw, "context": {"library": {}}}]
