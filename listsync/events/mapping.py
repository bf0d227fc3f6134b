"""Route -> **map**: the configured mappings of the per-event actions (a trigger, an action, its
fields), their defaults and the presets. Pure: no database, no HTTP, no clock. `compile_mapping`
turns one configured mapping (or a preset) into an `ActionMapping` that answers `matches(event)` and
`resolve(event)`; anything wrong is a `MappingError` naming the mapping and the field, raised at
start by the configuration. The trigger language is in `triggers`, the field directives in `fields`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from listsync.domain import ActionKind
from listsync.errors import MappingError
from listsync.events.fields import Event, Path, Value, compile_value, if_exists, path
from listsync.events.triggers import Condition, Test, compile_test, parse_condition

MAX_MAPPINGS = 50


# Segment's own names for the actions are accepted too, so a mapping copied from Segment works.
ACTION_NAMES: dict[str, ActionKind] = {
    **{kind.value: kind for kind in ActionKind},
    "updateUser": ActionKind.UPSERT_USER,
    "Upsert User": ActionKind.UPSERT_USER,
    "trackEvent": ActionKind.CUSTOM_EVENT,
    "Custom Event": ActionKind.CUSTOM_EVENT,
    "trackPurchase": ActionKind.TRACK_PURCHASE,
    "Track Purchase": ActionKind.TRACK_PURCHASE,
    "updateCart": ActionKind.CART_UPDATES,
    "Cart Updates": ActionKind.CART_UPDATES,
}
BATCHABLE = frozenset({ActionKind.UPSERT_USER, ActionKind.CUSTOM_EVENT})
# Segment's schemas allow null only for phoneNumber: a `phone: null` trait clears the SMS number.
NULLABLE_FIELDS = frozenset({"phoneNumber"})


# Segment's shared field defaults (reference §2.3). mergeNestedObjects defaults to the classic
# integrations.Iterable.mergeNestedObjects switch, else false (what Segment sends).
EMAIL_DEFAULT = if_exists("$.properties.email", path("$.properties.email"), path("$.context.traits.email"))
MERGE_DEFAULT = if_exists(
    "$.integrations.Iterable.mergeNestedObjects", path("$.integrations.Iterable.mergeNestedObjects"), False
)
USER_DEFAULT = {
    "email": EMAIL_DEFAULT,
    "userId": path("$.userId"),
    "dataFields": path("$.context.traits"),
    "phoneNumber": path("$.context.traits.phone"),
    "mergeNestedObjects": MERGE_DEFAULT,
}
_EVENT_COMMON = {
    "createdAt": path("$.timestamp"),
    "campaignId": path("$.properties.campaignId"),
    "templateId": path("$.properties.templateId"),
}
DEFAULT_FIELDS: dict[ActionKind, dict[str, Any]] = {
    ActionKind.UPSERT_USER: {
        "email": path("$.traits.email"),
        "userId": path("$.userId"),
        "dataFields": path("$.traits"),
        "phoneNumber": path("$.traits.phone"),
        "mergeNestedObjects": MERGE_DEFAULT,
    },
    ActionKind.CUSTOM_EVENT: {
        "email": EMAIL_DEFAULT,
        "userId": path("$.userId"),
        "eventName": path("$.event"),
        "dataFields": path("$.properties"),
        "id": path("$.messageId"),
        **_EVENT_COMMON,
    },
    ActionKind.TRACK_PURCHASE: {
        "id": path("$.properties.order_id"),
        "user": USER_DEFAULT,
        "dataFields": path("$.properties"),
        "items": path("$.properties.products"),
        "total": path("$.properties.total"),
        **_EVENT_COMMON,
    },
    ActionKind.CART_UPDATES: {"user": USER_DEFAULT, "items": path("$.properties.products")},
}
# Fields an action takes without a default mapping (updateOnly: sent on users/bulkUpdate only).
EXTRA_FIELDS: dict[ActionKind, frozenset[str]] = {
    ActionKind.UPSERT_USER: frozenset({"newEmail", "updateOnly"}),
    ActionKind.CUSTOM_EVENT: frozenset(),
    ActionKind.TRACK_PURCHASE: frozenset(),
    ActionKind.CART_UPDATES: frozenset(),
}


@dataclass(frozen=True)
class MappingSpec:
    """A mapping as configured: fields are merged over the action's defaults."""

    name: str
    trigger: str
    action: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    batch: bool = False
    audiences: bool = True  # False: Engage audience events never match (the presets)
    classic_pages: bool = False  # page/screen events named and filtered by the classic settings


PAGE_PRESET_NAME = "Page and Screen Calls"
PRESETS: tuple[MappingSpec, ...] = (
    MappingSpec(
        "Order Completed Calls", 'type = "track" and event = "Order Completed"', "track_purchase", audiences=False
    ),
    MappingSpec("Update Cart Calls", 'type = "track" and event = "Cart Updated"', "cart_updates", audiences=False),
    MappingSpec(
        "Track Calls",
        'type = "track" and event != "Order Completed" and event != "Cart Updated"',
        "custom_event",
        audiences=False,
    ),
    MappingSpec("Identify Calls", 'type = "identify"', "upsert_user", audiences=False),
)
# Not a Segment Actions preset: the classic destination's page/screen calls, on when a page setting is.
PAGE_PRESET = MappingSpec(
    PAGE_PRESET_NAME, 'type = "page" or type = "screen"', "custom_event", audiences=False, classic_pages=True
)


# --- values ---------------------------------------------------------------------------------------


# --- conditions -------------------------------------------------------------------------------------


# --- mappings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionMapping:
    """A compiled mapping: which events it takes and how its action's fields are resolved."""

    name: str
    action: ActionKind
    condition: Condition
    fields: tuple[tuple[str, Value], ...]
    batch: bool = False
    audiences: bool = True
    classic_pages: bool = False
    test: Test = field(init=False, repr=False, compare=False)  # the condition, compiled once

    def __post_init__(self) -> None:
        object.__setattr__(self, "test", compile_test(self.condition))

    def matches(self, event: Event, *, is_audience: bool) -> bool:
        if is_audience and not self.audiences:
            return False
        return self.test(event)

    def resolve(self, event: Event) -> dict[str, Any]:
        """The action's fields for this event; fields that resolve to nothing (or "") are left out,
        as Segment drops empty top-level values before calling the action, except an explicit null
        in a field that allows it (NULLABLE_FIELDS)."""
        out: dict[str, Any] = {}
        for name, value in self.fields:
            resolved = value.resolve(event)
            if resolved is not None and resolved != "":
                out[name] = resolved
            elif name in NULLABLE_FIELDS and isinstance(value, Path) and value.holds_null(event):
                out[name] = None
        return out


def action_kind(raw: str) -> ActionKind:
    try:
        return ACTION_NAMES[raw.strip()]
    except KeyError:
        known = ", ".join(kind.value for kind in ActionKind)
        raise ValueError(f"unknown action {raw!r} (use {known})") from None


def compile_mapping(spec: MappingSpec) -> ActionMapping:
    """Compile one mapping, or raise MappingError naming it and the field at fault."""
    where = f"mapping {spec.name!r}"
    try:
        kind = action_kind(spec.action)
    except ValueError as exc:
        raise MappingError(f"{where}: action: {exc}") from None
    try:
        condition = parse_condition(spec.trigger)
    except ValueError as exc:
        raise MappingError(f"{where}: trigger: {exc}") from None
    if spec.batch and kind not in BATCHABLE:
        raise MappingError(f"{where}: batch: only upsert_user and custom_event can be batched")
    return ActionMapping(
        name=spec.name,
        action=kind,
        condition=condition,
        fields=_compile_fields(kind, spec.fields, where),
        batch=spec.batch,
        audiences=spec.audiences,
        classic_pages=spec.classic_pages,
    )


def _compile_fields(kind: ActionKind, given: Mapping[str, Any], where: str) -> tuple[tuple[str, Value], ...]:
    allowed = set(DEFAULT_FIELDS[kind]) | EXTRA_FIELDS[kind]
    compiled: list[tuple[str, Value]] = []
    for name, raw in {**DEFAULT_FIELDS[kind], **given}.items():
        if name not in allowed:
            raise MappingError(f"{where}: fields.{name}: {kind.value} has no such field (use {', '.join(sorted(allowed))})")
        try:
            compiled.append((name, compile_value(raw)))
        except ValueError as exc:
            raise MappingError(f"{where}: fields.{name}: {exc}") from None
    return tuple(compiled)


def effective_specs(
    configured: Sequence[MappingSpec], *, presets: bool, pages: bool, disabled: Sequence[str] = ()
) -> list[MappingSpec]:
    """Presets (the page preset only when a page setting is on), then the configured mappings.

    A configured mapping named like a preset replaces it in place; `disabled` names are dropped.
    """
    builtin = [*PRESETS, PAGE_PRESET] if pages else list(PRESETS)
    specs = builtin if presets else []
    by_name = {spec.name: spec for spec in configured}
    merged = [by_name.pop(spec.name, spec) for spec in specs]
    merged += [spec for spec in configured if spec.name in by_name]
    return [spec for spec in merged if spec.name not in set(disabled)]


def preset(name: str) -> MappingSpec | None:
    return next((spec for spec in (*PRESETS, PAGE_PRESET) if spec.name == name), None)


def compile_all(specs: Sequence[MappingSpec]) -> list[ActionMapping]:
    """Compile every mapping; names must be unique and there may be at most MAX_MAPPINGS."""
    if len(specs) > MAX_MAPPINGS:
        raise MappingError(f"{len(specs)} mappings; at most {MAX_MAPPINGS} are allowed")
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise MappingError(f"mapping {spec.name!r}: name: used by more than one mapping")
        seen.add(spec.name)
    return [compile_mapping(spec) for spec in specs]
