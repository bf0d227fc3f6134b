"""The pure parts of sending: per-member verdicts of an answer, halving, the in-flight setting."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from listsync.config import SyncSettings
from listsync.domain import Direction
from listsync.iterable.payloads import BulkResult, ItemOutcome, Subscriber, json_size
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


@pytest.mark.parametrize("subscribing", [True, False])
@pytest.mark.parametrize("prefer_user_id", [True, False])
@pytest.mark.parametrize("email", [None, "a@b.co", 'q"uote@x.com', "back\\slash@x.com", "ümlaut@x.com", "tab\t@x.com"])
@pytest.mark.parametrize("user_id", [None, "u-1", "ユーザー", "x\ny"])
def test_plain_size_is_the_wire_size_or_none(
    email: str | None, user_id: str | None, prefer_user_id: bool, subscribing: bool
) -> None:
    if not email and not user_id:
        return
    subscriber = Subscriber(email=email, user_id=user_id, prefer_user_id=prefer_user_id)
    form = subscriber.to_json() if subscribing else subscriber.identity_json()
    plain = planner.plain_size(subscriber, subscribing)
    assert plain is None or plain == json_size(form)
    verbatim = all(v is None or (v.isascii() and v.isprintable() and '"' not in v and "\\" not in v)
                   for v in (email, user_id))
    assert (plain is not None) == verbatim
    assert planner.plain_size(Subscriber(email="a@b.co", data_fields={"k": 1}), subscribing) is None
