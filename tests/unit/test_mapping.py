"""Triggers, field directives, presets and mapping validation (pure, table-driven)."""

from __future__ import annotations

from typing import Any

import pytest

from listsync.config import Settings
from listsync.domain import ActionKind
from listsync.errors import MappingError
from listsync.events import fields, mapping, triggers
from listsync.events.mapping import MappingSpec

IDENTIFY = {"type": "identify", "userId": "u1", "traits": {"email": "a@x.com", "plan": "pro", "n": 3}}
TRACK = {
    "type": "track",
    "event": "Signed Up",
    "userId": "u1",
    "properties": {"plan": "pro", "total": 20, "vip": True, "nested": {"a": [1, {"b": "deep"}]}},
    "context": {"personas": {"computation_class": "audience"}, "traits": {"email": "c@x.com"}},
}
ORDER = {"type": "track", "event": "Order Completed", "properties": {}}
CART = {"type": "track", "event": "Cart Updated"}
PAGE = {"type": "page", "name": "Home"}


@pytest.mark.parametrize(
    ("trigger", "event", "expected"),
    [
        ('type = "track"', TRACK, True),
        ('type = "track"', IDENTIFY, False),
        ('type = "track" and event = "Signed Up"', TRACK, True),
        ('type = "track" and event != "Signed Up"', TRACK, False),
        ("type = 'identify' or event = 'Signed Up'", IDENTIFY, True),
        ('event != "Order Completed"', IDENTIFY, True),  # a missing field compares as null
        ('not type = "track"', IDENTIFY, True),
        ('not (type = "track" or type = "identify")', PAGE, True),
        ('type = "track" and (event = "X" or event = "Signed Up")', TRACK, True),
        ('type = "track" and event = "X" or event = "Signed Up"', TRACK, True),  # and binds tighter
        ('type = "identify" or type = "track" and event = "X"', TRACK, False),
        ('properties.plan = "pro"', TRACK, True),
        ("properties.total = 20", TRACK, True),
        ("properties.total = 20.0", TRACK, True),
        ('properties.total = "20"', TRACK, False),  # types must agree
        ("properties.vip = true", TRACK, True),
        ("properties.missing = null", TRACK, True),
        ('traits.email = "a@x.com"', IDENTIFY, True),
        ('context.personas.computation_class = "audience"', TRACK, True),
        ('userId = "u1"', TRACK, True),
        ('name = "Home"', PAGE, True),
        ('event = "say \\"hi\\""', {"event": 'say "hi"'}, True),
        ("type = \"track\" AND userId != 'u2'", TRACK, True),
    ],
)
def test_condition(trigger: str, event: dict[str, Any], expected: bool) -> None:
    assert triggers.parse_condition(trigger).matches(event) is expected


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        ("", "empty"),
        ('typ = "track"', "unknown field 'typ' at position 0"),
        ('properties = "x"', "unknown field 'properties'"),
        ('type == "track"', "expected a quoted value"),
        ('type = "track" and', "ends where"),
        ('(type = "track"', "ends where"),
        ('type = "track")', "unexpected ')'"),
        ('type "track"', "expected '=' or '!='"),
        ('type = "track" & event = "x"', "unexpected '&"),
        ("type = track", "expected a quoted value"),
    ],
)
def test_condition_errors(trigger: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        triggers.parse_condition(trigger)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("literal", "literal"),
        (42, 42),
        ({"@path": "$.properties.plan"}, "pro"),
        ({"@path": "$.properties.nested.a[1].b"}, "deep"),
        ({"@path": "$.properties['plan']"}, "pro"),
        ({"@path": "$.properties.nested.a[-2]"}, 1),
        ({"@path": "$.properties.absent"}, None),
        ({"@path": "$.properties.plan.deeper"}, None),
        ({"@if": {"exists": {"@path": "$.properties.plan"}, "then": "yes", "else": "no"}}, "yes"),
        ({"@if": {"exists": {"@path": "$.properties.nope"}, "then": "yes", "else": "no"}}, "no"),
        ({"@if": {"exists": {"@path": "$.properties.nope"}, "then": "yes"}}, None),
        ({"@template": "{{properties.plan}}/{{ userId }}/{{properties.none}}!"}, "pro/u1/!"),
        ({"@template": "{{$.properties.vip}}"}, "true"),
        ({"a": {"@path": "$.properties.plan"}, "b": {"@path": "$.missing"}, "c": 1}, {"a": "pro", "c": 1}),
        ([{"@path": "$.properties.total"}, "x"], [20, "x"]),
    ],
)
def test_field_values(raw: Any, expected: Any) -> None:
    assert fields.compile_value(raw).resolve(TRACK) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"@path": "properties.x"}, "must start with"),
        ({"@path": "$."}, "not understood"),
        ({"@path": 3}, "takes a string"),
        ({"@if": {"then": 1}}, "exists"),
        ({"@if": {"exists": 1, "otherwise": 2}}, "does not take"),
        ({"@template": ["x"]}, "takes a string"),
        ({"@nope": "x"}, "exactly one of"),
        ({"@path": "$.a", "extra": 1}, "exactly one of"),
    ],
)
def test_field_value_errors(raw: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fields.compile_value(raw)


def _compiled(specs: list[MappingSpec] | None = None, **options: Any) -> dict[str, mapping.ActionMapping]:
    chosen = mapping.effective_specs(specs or [], presets=options.get("presets", True), pages=options.get("pages", False))
    return {m.name: m for m in mapping.compile_all(chosen)}


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (IDENTIFY, ["Identify Calls"]),
        (TRACK, ["Track Calls"]),
        (ORDER, ["Order Completed Calls"]),
        (CART, ["Update Cart Calls"]),
        (PAGE, []),
    ],
)
def test_presets_route_each_kind_of_event_to_one_action(event: dict[str, Any], expected: list[str]) -> None:
    matched = [m.name for m in _compiled().values() if m.matches(event, is_audience=False)]
    assert matched == expected


def test_preset_actions_and_the_page_preset() -> None:
    kinds = {name: m.action for name, m in _compiled(pages=True).items()}
    assert kinds == {
        "Order Completed Calls": ActionKind.TRACK_PURCHASE,
        "Update Cart Calls": ActionKind.CART_UPDATES,
        "Track Calls": ActionKind.CUSTOM_EVENT,
        "Identify Calls": ActionKind.UPSERT_USER,
        "Page and Screen Calls": ActionKind.CUSTOM_EVENT,
    }


def test_presets_never_take_audience_events_but_configured_mappings_may() -> None:
    audience = {"type": "identify", "userId": "u1", "traits": {"vip": True},
                "context": {"personas": {"computation_class": "audience"}}}
    custom = MappingSpec("Audiences", 'context.personas.computation_class = "audience"', "upsert_user")
    compiled = _compiled([custom])
    assert not compiled["Identify Calls"].matches(audience, is_audience=True)
    assert compiled["Audiences"].matches(audience, is_audience=True)


def test_configured_mapping_replaces_a_preset_by_name_and_adds_new_ones() -> None:
    replaced = MappingSpec("Track Calls", 'type = "track" and event = "Only This"', "custom_event")
    added = MappingSpec("Signed Up", 'event = "Signed Up"', "Upsert User", {"dataFields": {"@path": "$.properties"}})
    names = list(_compiled([replaced, added]))
    assert names == ["Order Completed Calls", "Update Cart Calls", "Track Calls", "Identify Calls", "Signed Up"]
    assert not _compiled([replaced])["Track Calls"].matches(TRACK, is_audience=False)
    assert list(_compiled([added], presets=False)) == ["Signed Up"]
    assert _compiled([added])["Signed Up"].resolve(TRACK)["dataFields"]["plan"] == "pro"


def test_fields_merge_over_the_action_defaults_and_empty_values_drop_out() -> None:
    spec = MappingSpec("M", 'type = "track"', "custom_event", {"eventName": "Renamed", "campaignId": ""})
    fields = mapping.compile_mapping(spec).resolve(TRACK)
    assert fields["eventName"] == "Renamed"
    assert "campaignId" not in fields
    assert fields["userId"] == "u1" and fields["dataFields"] == TRACK["properties"]
    assert fields["email"] == "c@x.com"  # properties.email absent: context.traits.email


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (MappingSpec("Bad", "type = ", "custom_event"), "mapping 'Bad': trigger: the trigger ends"),
        (MappingSpec("Bad", 'type = "track"', "sendEmail"), "mapping 'Bad': action: unknown action 'sendEmail'"),
        (MappingSpec("Bad", 'type = "track"', "custom_event", {"total": 1}), "mapping 'Bad': fields.total: custom_event has no"),
        (MappingSpec("Bad", 'type = "track"', "upsert_user", {"dataFields": {"@path": "x"}}),
         "mapping 'Bad': fields.dataFields: path 'x' must start"),
        (MappingSpec("Bad", 'type = "track"', "track_purchase", batch=True), "mapping 'Bad': batch: only"),
    ],
)
def test_compile_errors_name_the_mapping_and_field(spec: MappingSpec, message: str) -> None:
    with pytest.raises(MappingError, match=message.replace("(", r"\(")):
        mapping.compile_mapping(spec)


def test_at_most_fifty_mappings_and_unique_names() -> None:
    many = [MappingSpec(f"m{i}", 'type = "track"', "custom_event") for i in range(51)]
    with pytest.raises(MappingError, match="at most 50"):
        mapping.compile_all(many)
    with pytest.raises(MappingError, match="mapping 'm0': name"):
        mapping.compile_all([many[0], many[0]])


def test_settings_turn_configured_mappings_into_specs() -> None:
    settings = Settings(actions={
        "batching": True,
        "track_named_pages": True,
        "mappings": [
            {"name": "Identify Calls", "fields": {"phoneNumber": ""}},  # keeps the preset's trigger
            {"name": "Update Cart Calls", "enabled": False},
            {"name": "Signed Up", "trigger": 'event = "Signed Up"', "action": "upsert_user"},
        ],
    })
    compiled = {m.name: m for m in settings.actions.compiled()}
    assert list(compiled) == ["Order Completed Calls", "Track Calls", "Identify Calls", "Page and Screen Calls",
                              "Signed Up"]
    assert compiled["Identify Calls"].audiences is False and compiled["Identify Calls"].batch is True
    assert compiled["Signed Up"].audiences is True and compiled["Order Completed Calls"].batch is False


@pytest.mark.parametrize(
    ("mappings", "message"),
    [
        ([{"name": "New"}], "mapping 'New': action: required"),
        ([{"name": "New", "action": "custom_event"}], "mapping 'New': trigger: required"),
        ([{"name": "N", "action": "custom_event", "trigger": "x = 1"}], "mapping 'N': trigger: unknown field 'x'"),
        ([{"name": f"m{i}", "action": "custom_event", "trigger": 'type = "track"'} for i in range(51)], "mappings"),
    ],
)
def test_settings_reject_bad_mappings(mappings: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(actions={"mappings": mappings})
