"""PURE: where an action's fields come from. Field values are literals or directives, as in Segment's mapping kit:

    {"@path": "$.properties.total"}                            JSONPath-style lookup
    {"@if": {"exists": <value>, "then": <value>, "else": <value>}}
    {"@template": "{{properties.first}} {{traits.last}}"}      missing parts become ""

Objects and arrays are resolved member by member, and keys that resolve to nothing are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Event = Mapping[str, Any]

def path(expr: str) -> dict[str, str]:
    return {"@path": expr}


def if_exists(expr: str, then: Any, otherwise: Any) -> dict[str, Any]:
    return {"@if": {"exists": path(expr), "then": then, "else": otherwise}}


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
        if type(current) is dict and type(step) is str:  # the common case, without ABC checks
            current = current.get(step)
        elif isinstance(step, int) and isinstance(current, list) and -len(current) <= step < len(current):
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
