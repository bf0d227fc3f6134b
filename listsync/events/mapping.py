"""Route -> **map**: which events an action takes (triggers) and where its fields come from.

Pure: no database, no HTTP, no clock. `compile_mapping` turns one configured mapping (or a preset)
into a `Mapping` that answers `matches(event)` and `resolve(event)`; anything wrong is a
`MappingError` naming the mapping and the field, raised at start by the configuration.

Triggers use Segment's condition syntax, a small language:

    condition := or ;  or := and ("or" and)* ;  and := not ("and" not)* ;
    not := "not" not | "(" or ")" | field ("=" | "!=") literal
    field := type | event | name | category | userId | anonymousId | messageId
             | properties.<key>... | traits.<key>... | context.<key>... | integrations.<key>...
    literal := "text" | 'text' | number | true | false | null

A field the event lacks compares as null, so `event != "Cart Updated"` holds for an identify.

Field values are literals or directives, as in Segment's mapping kit:

    {"@path": "$.properties.total"}                            JSONPath-style lookup
    {"@if": {"exists": <value>, "then": <value>, "else": <value>}}
    {"@template": "{{properties.first}} {{traits.last}}"}      missing parts become ""

Objects and arrays are resolved member by member, and keys that resolve to nothing are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from listsync.domain import ActionKind

MAX_MAPPINGS = 50
Event = Mapping[str, Any]


class MappingError(ValueError):
    """A trigger or field value that cannot be used; the message names the mapping and field."""


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


def path(expr: str) -> dict[str, str]:
    return {"@path": expr}


def if_exists(expr: str, then: Any, otherwise: Any) -> dict[str, Any]:
    return {"@if": {"exists": path(expr), "then": then, "else": otherwise}}


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


class Value:
    """A compiled field value; `resolve` returns None for "nothing there"."""

    def resolve(self, event: Event) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Literal(Value):
    value: Any

    def resolve(self, event: Event) -> Any:
        return self.value


@dataclass(frozen=True)
class Path(Value):
    steps: tuple[str | int, ...]

    def resolve(self, event: Event) -> Any:
        return lookup(event, self.steps)

    def holds_null(self, event: Event) -> bool:
        """The event has the key this path names, with the value null (not merely no key)."""
        parent = lookup(event, self.steps[:-1]) if len(self.steps) > 1 else event
        last = self.steps[-1]
        return isinstance(parent, Mapping) and isinstance(last, str) and last in parent and parent[last] is None


@dataclass(frozen=True)
class If(Value):
    exists: Value
    then: Value
    otherwise: Value

    def resolve(self, event: Event) -> Any:
        chosen = self.then if self.exists.resolve(event) is not None else self.otherwise
        return chosen.resolve(event)


@dataclass(frozen=True)
class Template(Value):
    parts: tuple[str | tuple[str | int, ...], ...]

    def resolve(self, event: Event) -> Any:
        return "".join(part if isinstance(part, str) else _text(lookup(event, part)) for part in self.parts)


@dataclass(frozen=True)
class Obj(Value):
    members: tuple[tuple[str, Value], ...]

    def resolve(self, event: Event) -> Any:
        resolved = ((key, value.resolve(event)) for key, value in self.members)
        return {key: value for key, value in resolved if value is not None}


@dataclass(frozen=True)
class Arr(Value):
    items: tuple[Value, ...]

    def resolve(self, event: Event) -> Any:
        return [item.resolve(event) for item in self.items]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def lookup(event: Any, steps: Sequence[str | int]) -> Any:
    """The value at `steps` inside nested objects and arrays; None when any step is missing."""
    current = event
    for step in steps:
        if isinstance(step, int) and isinstance(current, list) and -len(current) <= step < len(current):
            current = current[step]
        elif isinstance(step, str) and isinstance(current, Mapping):
            current = current.get(step)
        else:
            return None
        if current is None:
            return None
    return current


_PATH_STEP = re.compile(r"\.([A-Za-z0-9_$@-]+)|\[(-?\d+)\]|\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]")


def parse_path(expr: str) -> tuple[str | int, ...]:
    """`$.a.b[0]['c d']` -> ("a", "b", 0, "c d"); ValueError when it is not that shape."""
    text = expr.strip()
    if not text.startswith("$"):
        raise ValueError(f"path {expr!r} must start with '$.'")
    steps: list[str | int] = []
    position = 1
    while position < len(text):
        found = _PATH_STEP.match(text, position)
        if found is None:
            raise ValueError(f"path {expr!r} is not understood at {text[position:]!r}")
        name, index, single, double = found.groups()
        steps.append(int(index) if index is not None else next(s for s in (name, single, double) if s is not None))
        position = found.end()
    if not steps:
        raise ValueError(f"path {expr!r} names no field")
    return tuple(steps)


_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


def _template(text: Any) -> Template:
    if not isinstance(text, str):
        raise ValueError("@template takes a string")
    parts: list[str | tuple[str | int, ...]] = []
    position = 0
    for found in _PLACEHOLDER.finditer(text):
        parts.append(text[position : found.start()])
        inner = found.group(1)
        parts.append(parse_path(inner if inner.startswith("$") else f"$.{inner}"))
        position = found.end()
    parts.append(text[position:])
    return Template(tuple(part for part in parts if part != ""))


def _if(body: Any) -> If:
    if not isinstance(body, Mapping) or "exists" not in body:
        raise ValueError('@if takes {"exists": ..., "then": ..., "else": ...}')
    unknown = set(body) - {"exists", "then", "else"}
    if unknown:
        raise ValueError(f"@if does not take {sorted(unknown)}")
    return If(compile_value(body["exists"]), compile_value(body.get("then")), compile_value(body.get("else")))


def _path_value(expr: Any) -> Path:
    if not isinstance(expr, str):
        raise ValueError("@path takes a string like '$.properties.total'")
    return Path(parse_path(expr))


_DIRECTIVES: dict[str, Callable[[Any], Value]] = {"@path": _path_value, "@if": _if, "@template": _template}


def compile_value(raw: Any) -> Value:
    """Compile a literal or directive; ValueError says what is wrong (the caller adds where)."""
    if isinstance(raw, Mapping):
        directives = [key for key in raw if isinstance(key, str) and key.startswith("@")]
        if not directives:
            return Obj(tuple((str(key), compile_value(value)) for key, value in raw.items()))
        if len(raw) != 1 or directives[0] not in _DIRECTIVES:
            known = ", ".join(_DIRECTIVES)
            raise ValueError(f"a directive object holds exactly one of {known}, got {sorted(raw)}")
        return _DIRECTIVES[directives[0]](raw[directives[0]])
    if isinstance(raw, list):
        return Arr(tuple(compile_value(item) for item in raw))
    return Literal(raw)


# --- conditions -------------------------------------------------------------------------------------


class Condition:
    """A compiled trigger."""

    def matches(self, event: Event) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Compare(Condition):
    steps: tuple[str, ...]
    literal: Any
    equal: bool

    def matches(self, event: Event) -> bool:
        value = lookup(event, self.steps)
        same = value == self.literal and type(value) is type(self.literal) or _same_number(value, self.literal)
        return same if self.equal else not same


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return (
        isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool)
        and a == b
    )


@dataclass(frozen=True)
class And(Condition):
    parts: tuple[Condition, ...]

    def matches(self, event: Event) -> bool:
        return all(part.matches(event) for part in self.parts)


@dataclass(frozen=True)
class Or(Condition):
    parts: tuple[Condition, ...]

    def matches(self, event: Event) -> bool:
        return any(part.matches(event) for part in self.parts)


@dataclass(frozen=True)
class Not(Condition):
    part: Condition

    def matches(self, event: Event) -> bool:
        return not self.part.matches(event)


TOP_FIELDS = frozenset({"type", "event", "name", "category", "userId", "anonymousId", "messageId"})
OBJECT_FIELDS = frozenset({"properties", "traits", "context", "integrations"})
_TOKEN = re.compile(
    r"\s*(?:(?P<op>!=|=)|(?P<paren>[()])|(?P<string>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')"
    r"|(?P<number>-?\d+(?:\.\d+)?)|(?P<word>[A-Za-z_$][\w$]*(?:\.[\w$-]+)*))"
)


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    position: int


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        found = _TOKEN.match(text, position)
        if found is None or found.lastgroup is None:
            raise ValueError(f"unexpected {text[position:].strip()[:20]!r} at position {position}")
        tokens.append(_Token(found.lastgroup, found.group(found.lastgroup), found.start(found.lastgroup)))
        position = found.end()
    return tokens


class _Parser:
    """Recursive descent over the grammar in the module docstring."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.index = 0

    def parse(self) -> Condition:
        if not self.tokens:
            raise ValueError("the trigger is empty")
        condition = self._or()
        if self.index < len(self.tokens):
            token = self.tokens[self.index]
            raise ValueError(f"unexpected {token.text!r} at position {token.position}")
        return condition

    def _peek_word(self, *words: str) -> bool:
        token = self.tokens[self.index] if self.index < len(self.tokens) else None
        return token is not None and token.kind == "word" and token.text.lower() in words

    def _next(self, what: str) -> _Token:
        if self.index >= len(self.tokens):
            raise ValueError(f"the trigger ends where {what} was expected")
        self.index += 1
        return self.tokens[self.index - 1]

    def _or(self) -> Condition:
        parts = [self._and()]
        while self._peek_word("or"):
            self.index += 1
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def _and(self) -> Condition:
        parts = [self._not()]
        while self._peek_word("and"):
            self.index += 1
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def _not(self) -> Condition:
        if self._peek_word("not"):
            self.index += 1
            return Not(self._not())
        token = self._next("a field or '('")
        if token.kind == "paren" and token.text == "(":
            inner = self._or()
            closing = self._next("')'")
            if closing.text != ")":
                raise ValueError(f"expected ')' at position {closing.position}")
            return inner
        return self._compare(token)

    def _compare(self, token: _Token) -> Condition:
        steps = _field(token)
        operator = self._next("'=' or '!='")
        if operator.kind != "op":
            raise ValueError(f"expected '=' or '!=' at position {operator.position}, got {operator.text!r}")
        return Compare(steps, _literal(self._next("a value")), operator.text == "=")


def _field(token: _Token) -> tuple[str, ...]:
    steps = tuple(token.text.split(".")) if token.kind == "word" else ()
    if steps and (
        (len(steps) == 1 and steps[0] in TOP_FIELDS) or (len(steps) > 1 and steps[0] in OBJECT_FIELDS)
    ):
        return steps
    allowed = ", ".join(sorted(TOP_FIELDS)) + ", properties.<key>, traits.<key>, context.<key>"
    raise ValueError(f"unknown field {token.text!r} at position {token.position} (use {allowed})")


_LITERAL_WORDS = {"true": True, "false": False, "null": None}


def _literal(token: _Token) -> Any:
    if token.kind == "string":
        body = token.text[1:-1]
        return re.sub(r"\\(.)", r"\1", body)
    if token.kind == "number":
        return float(token.text) if "." in token.text else int(token.text)
    if token.kind == "word" and token.text.lower() in _LITERAL_WORDS:
        return _LITERAL_WORDS[token.text.lower()]
    raise ValueError(f"expected a quoted value, number, true, false or null at position {token.position}")


def parse_condition(text: str) -> Condition:
    """Compile a trigger; ValueError names the position of the problem."""
    return _Parser(text).parse()


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

    def matches(self, event: Event, *, is_audience: bool) -> bool:
        if is_audience and not self.audiences:
            return False
        return self.condition.matches(event)

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
