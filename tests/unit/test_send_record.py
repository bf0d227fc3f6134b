"""The pure parts of sending: per-member verdicts of an answer, halving, the in-flight setting."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from listsync.config import SyncSettings
from listsync.domain import Direction
from listsync.iterable.payloads import BulkResult, ItemOutcome, Subscriber
from listsync.lists import planner, record
from listsync.lists.wire import halves


def _batch(direction: Direction, n: int) -> planner.Batch:
    subscribers = tuple(Subscriber(email=f"u{i}@example.com", user_id=f"u{i}") for i in range(n))
    return planner.Batch(direction, tuple(range(100, 100 + n)), subscribers)


def test_an_answer_without_failures_names_no_member() -> None:
    answer = record.judge(_batch(Direction.SUBSCRIBE, 1000), BulkResult(1000, 0), update_only=False)
    assert answer.refused == {}


def test_refused_members_are_named_with_their_reason() -> None:
    failed = {"invalidEmails": frozenset({"U3@example.com"}), "notFoundUserIds": frozenset({"u5"})}
    subscribe = record.judge(_batch(Direction.SUBSCRIBE, 10), BulkResult(8, 2, failed), update_only=True)
    assert subscribe.refused == {
        103: ("invalid", "invalid: Iterable refused the email or userId as invalid"),
        105: ("not_found", "not_found: no such user in Iterable (update_existing_users_only is set)"),
    }
    unsubscribe = record.judge(_batch(Direction.UNSUBSCRIBE, 10), BulkResult(8, 2, failed), update_only=False)
    # Not found on an unsubscribe is confirmed (it is out either way), but its outcome is kept.
    assert unsubscribe.refused[105] == ("not_found", None)
    assert record.item_verdict(Direction.UNSUBSCRIBE, ItemOutcome.NOT_FOUND, False) == (True, None)


def test_halves_split_members_and_subscribers_together() -> None:
    first, second = halves(_batch(Direction.SUBSCRIBE, 5))
    assert first.member_ids == (100, 101) and second.member_ids == (102, 103, 104)
    assert [s.user_id for s in second.subscribers] == ["u2", "u3", "u4"]


def test_max_in_flight_default_and_bounds() -> None:
    assert SyncSettings().max_in_flight == 8
    for bad in (0, 65):
        with pytest.raises(ValidationError):
            SyncSettings(max_in_flight=bad)
