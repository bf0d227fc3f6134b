"""Property-based checks of the pure ingest code: arbitrary input never crashes it, and the
membership fold is independent of arrival order."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from listsync.domain import Desired, InboundEvent, MembershipDelta, ProjectType, Rejection
from listsync.ingest import audience, extract, scrub, validate
from listsync.lists import membership

NOW = datetime(2026, 6, 1, tzinfo=UTC)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
event_keys = st.sampled_from(["type", "userId", "anonymousId", "messageId", "timestamp", "event", "traits",
                              "properties", "context", "email", "name"])
events = st.dictionaries(event_keys, json_values, max_size=10)


@settings(max_examples=300, deadline=None)
@given(events)
def test_validate_never_raises_and_always_decides(raw: dict[str, Any]) -> None:
    result = validate.validate_event(raw, received_at=NOW)
    assert isinstance(result, InboundEvent | Rejection)
    if isinstance(result, Rejection):
        assert ":" in result.reason
    else:
        audience.extract_deltas(result)
        audience.extract_email_change(result)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600) | st.text(max_size=600).map(str.encode), st.sampled_from([None, "identify", "track"]))
def test_parse_body_never_raises_on_arbitrary_bytes(body: bytes, path_type: str | None) -> None:
    parsed = extract.parse_body(body, path_type=path_type)
    assert isinstance(parsed, Rejection | list)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.sampled_from([Desired.IN, Desired.OUT, Desired.UNKNOWN])),
                min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_fold_is_independent_of_arrival_order(steps: list[tuple[int, Desired]], rnd: random.Random) -> None:
    deltas = [MembershipDelta("aud", "u1", "a@x.com", desired, NOW + timedelta(seconds=at), f"m{i}")
              for i, (at, desired) in enumerate(steps)]

    def fold(order: list[MembershipDelta]) -> tuple[Desired, datetime] | None:
        member = None
        for delta in order:
            if member is None:
                member = None if delta.desired is Desired.UNKNOWN else membership.new_member(
                    delta, None, ProjectType.HYBRID)
            else:
                member = membership.apply_delta(member, delta, None, ProjectType.HYBRID) or member
        return None if member is None else (member.desired, member.desired_at)

    shuffled = list(deltas)
    rnd.shuffle(shuffled)
    assert fold(deltas) == fold(shuffled)


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_redact_removes_secret_keys_at_any_depth(value: Any) -> None:
    wrapped = {"writeKey": "wk", "context": {"apiKey": "k", "nested": [{"password": "p", "v": value}]}}
    assert not {"writeKey", "apiKey", "password"} & set(_keys(scrub.redact(wrapped)))


def _keys(value: Any) -> list[str]:
    """Every key of every object inside `value` (a generated value may say "password" as data)."""
    if isinstance(value, dict):
        return [*value, *(key for item in value.values() for key in _keys(item))]
    if isinstance(value, list):
        return [key for item in value for key in _keys(item)]
    return []
