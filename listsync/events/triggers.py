"""PURE: which events an action takes. Triggers use Segment's condition syntax, a small language:

    condition := or ;  or := and ("or" and)* ;  and := not ("and" not)* ;
    not := "not" not | "(" or ")" | field ("=" | "!=") literal
    field := type | event | name | category | userId | anonymousId | messageId
             | properties.<key>... | traits.<key>... | context.<key>... | integrations.<key>...
    literal := "text" | 'text' | number | true | false | null

A field the event lacks compares as null, so `event != "Cart Updated"` holds for an identify.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from listsync.events.fields import Event, lookup


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


Test = Callable[[Event], bool]


def compile_test(condition: Condition) -> Test:
    """The condition as one closure, evaluated the way `matches` is, without walking the tree's
    objects per event (routing evaluates every trigger on every event)."""
    if isinstance(condition, Compare):
        return _compare_test(condition)
    if isinstance(condition, Not):
        inner = compile_test(condition.part)
        return lambda event: not inner(event)
    if isinstance(condition, And | Or):
        parts = tuple(compile_test(part) for part in condition.parts)
        if len(parts) == 2:
            first, second = parts
            if isinstance(condition, And):
                return lambda event: first(event) and second(event)
            return lambda event: first(event) or second(event)
        if isinstance(condition, And):
            return lambda event: all(part(event) for part in parts)
        return lambda event: any(part(event) for part in parts)
    return condition.matches


def _compare_test(compare: Compare) -> Test:
    steps, literal, equal = compare.steps, compare.literal, compare.equal
    if len(steps) == 1:
        key = steps[0]

        def value_of(event: Event) -> Any:
            return event.get(key) if type(event) is dict else lookup(event, steps)
    else:

        def value_of(event: Event) -> Any:
            return lookup(event, steps)

    if isinstance(literal, str | bool) or literal is None:
        kind = type(literal)  # no number equals a text, a boolean or null: the type decides

        def same(event: Event) -> bool:
            value = value_of(event)
            return type(value) is kind and value == literal
    else:

        def same(event: Event) -> bool:
            value = value_of(event)
            return value == literal and type(value) is type(literal) or _same_number(value, literal)

    if equal:
        return same
    return lambda event: not same(event)
