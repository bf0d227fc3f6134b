"""The pure rules of listsync: member state transitions, identity by project type, batch planning."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from listsync.domain import Desired, Direction, MembershipDelta, PendingMember, ProjectType, Synced
from listsync.lists import identity, membership, planner

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EMAIL, HYBRID, USER_ID = ProjectType.EMAIL, ProjectType.HYBRID, ProjectType.USER_ID


def delta(desired: Desired, at: int, message_id: str = "m", user_id: str | None = "u1",
          email: str | None = "a@x.com") -> MembershipDelta:
    return MembershipDelta("aud", user_id, email, desired, T0 + timedelta(seconds=at), message_id)


def test_latest_event_wins_whatever_the_arrival_order() -> None:
    member = membership.new_member(delta(Desired.OUT, 10, "exit"), None, HYBRID)
    assert membership.apply_delta(member, delta(Desired.IN, 5, "old-enter"), None, HYBRID) is None
    assert member.state == membership.SYNCED  # never subscribed, wanted out: nothing to send


def test_replayed_message_changes_nothing() -> None:
    member = membership.new_member(delta(Desired.IN, 1, "m1"), None, HYBRID)
    assert membership.apply_delta(member, delta(Desired.IN, 1, "m1"), None, HYBRID) is None


def test_missing_flag_keeps_the_membership() -> None:
    member = membership.new_member(delta(Desired.IN, 1, "m1"), None, HYBRID)
    assert membership.apply_delta(member, delta(Desired.UNKNOWN, 9, "m2"), None, HYBRID) is None


def test_enter_and_exit_in_one_window_cancel_out() -> None:
    member = membership.new_member(delta(Desired.IN, 1, "m1"), None, HYBRID)
    assert member.state == membership.PENDING
    left = membership.apply_delta(member, delta(Desired.OUT, 2, "m2"), None, HYBRID)
    assert left is not None and left.state == membership.SYNCED and left.synced is None


def test_exit_of_subscribed_member_is_pending_and_confirm_settles() -> None:
    member = membership.new_member(delta(Desired.IN, 1, "m1"), None, HYBRID)
    member = membership.confirm(member, Synced.IN, "a@x.com", "u1", HYBRID)
    assert member.state == membership.SYNCED
    leaving = membership.apply_delta(member, delta(Desired.OUT, 2, "m2"), None, HYBRID)
    assert leaving is not None and leaving.state == membership.PENDING


def test_confirm_after_desired_moved_on_keeps_it_pending() -> None:
    member = membership.new_member(delta(Desired.IN, 1, "m1"), None, HYBRID)
    member = membership.apply_delta(member, delta(Desired.OUT, 2, "m2"), None, HYBRID)
    assert member is not None
    confirmed = membership.confirm(member, Synced.IN, "a@x.com", "u1", HYBRID)
    assert confirmed.state == membership.PENDING  # the subscribe landed, the exit must follow


def test_failure_sticks_until_desired_changes() -> None:
    member = membership.new_member(delta(Desired.IN, 1, "m1"), None, HYBRID)
    failed = membership.fail(member, "invalid: bad email", subscribing=True, project_type=HYBRID)
    assert failed.state == membership.FAILED and failed.attempts == 1
    same = membership.apply_delta(failed, delta(Desired.IN, 3, "m3"), None, HYBRID)
    assert same is not None and same.state == membership.FAILED
    out = membership.apply_delta(failed, delta(Desired.OUT, 4, "m4"), None, HYBRID)
    assert out is not None and out.state == membership.SYNCED and out.last_error is None


def test_email_change_resubscribes_in_hybrid_only() -> None:
    member = membership.confirm(membership.new_member(delta(Desired.IN, 1), None, HYBRID), Synced.IN,
                                "a@x.com", "u1", HYBRID)
    moved = membership.change_email(member, "new@x.com", HYBRID)
    assert moved.state == membership.PENDING and moved.email == "new@x.com"
    assert membership.change_email(member, "new@x.com", USER_ID).state == membership.SYNCED


@pytest.mark.parametrize(
    ("project", "user_id", "email", "subscribe", "unsubscribe"),
    [
        (HYBRID, "u1", "a@x.com", {"email": "a@x.com", "userId": "u1"}, {"userId": "u1"}),
        (EMAIL, "u1", "a@x.com", {"email": "a@x.com", "userId": "u1"}, {"email": "a@x.com"}),
        (EMAIL, "u1", None, {"userId": "u1"}, {"userId": "u1"}),
        (HYBRID, None, "a@x.com", {"email": "a@x.com"}, {"email": "a@x.com"}),
        (HYBRID, "u1", None, {"userId": "u1"}, {"userId": "u1"}),
        (USER_ID, "u1", None, {"userId": "u1", "preferUserId": True}, {"userId": "u1"}),
        (USER_ID, "u1", "a@x.com", {"userId": "u1", "email": "a@x.com", "preferUserId": True}, {"userId": "u1"}),
    ],
)
def test_subscriber_shapes(project: ProjectType, user_id: str | None, email: str | None,
                           subscribe: dict[str, object], unsubscribe: dict[str, object]) -> None:
    who = identity.identity(user_id, email)
    assert planner.to_subscriber(identity.for_subscribe(project, who), None).to_json() == subscribe
    assert planner.to_subscriber(identity.for_unsubscribe(project, who, who), None).to_json() == unsubscribe


def test_missing_identifier_by_project_type() -> None:
    assert identity.missing_identifier(USER_ID, identity.identity("", "a@x.com")) == identity.MISSING_USER_ID
    assert identity.missing_identifier(HYBRID, identity.identity("", "")) == identity.MISSING_ANY_ID
    assert identity.missing_identifier(HYBRID, identity.identity("", "a@x.com")) is None


def pending(i: int, desired: Desired, synced: Synced | None = None, user_id: str = "", email: str = "",
            fields: dict[str, object] | None = None) -> PendingMember:
    return PendingMember(i, user_id or f"u{i}", email, desired, synced, email or None,
                                 user_id or f"u{i}", fields)


def test_plan_routes_and_reports_unsendable_members() -> None:
    members = [pending(1, Desired.IN, email="a@x.com", fields={"plan": "gold", "secret": 1}),
               pending(2, Desired.OUT, Synced.IN, email="b@x.com"),
               PendingMember(3, "", "c@x.com", Desired.IN, None, None, None, None)]
    plan = planner.plan_audience(members, project_type=USER_ID, batch_size=1000, data_field_names=["plan"])
    assert [(b.direction, b.member_ids) for b in plan.batches] == [(Direction.SUBSCRIBE, (1,)),
                                                                    (Direction.UNSUBSCRIBE, (2,))]
    assert plan.batches[0].subscribers[0].to_json()["dataFields"] == {"plan": "gold"}
    assert plan.unsendable == [(3, identity.MISSING_USER_ID)]


def test_unsubscribe_uses_the_identity_iterable_was_given() -> None:
    member = PendingMember(1, "u1", "new@x.com", Desired.OUT, Synced.IN, "old@x.com", "u1", None)
    plan = planner.plan_audience([member], project_type=HYBRID, batch_size=10)
    assert plan.batches[0].subscribers[0].identity_json() == {"userId": "u1"}  # the profile, whatever its email
    plan = planner.plan_audience([member], project_type=EMAIL, batch_size=10)
    assert plan.batches[0].subscribers[0].identity_json() == {"email": "old@x.com"}  # the old address's profile


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=400), st.integers(1, 50))
def test_plan_covers_every_member_once_in_the_fewest_requests(flags: list[tuple[bool, bool]], size: int) -> None:
    members = [pending(i, Desired.IN if want else Desired.OUT, Synced.IN if was else None, email=f"p{i}@x.com")
               for i, (want, was) in enumerate(flags) if want or was]
    plan = planner.plan_audience(members, project_type=HYBRID, batch_size=size)
    sent = [i for b in plan.batches for i in b.member_ids]
    assert sorted(sent) == sorted(m.id for m in members) and len(set(sent)) == len(sent)
    for direction in Direction:
        count = plan.count(direction)
        assert sum(1 for b in plan.batches if b.direction is direction) == math.ceil(count / size)
    assert all(len(b.member_ids) <= size for b in plan.batches)


def test_guard_holds_large_share_of_unsubscribes_only() -> None:
    limits = planner.GuardLimits(0.5, 10)
    assert planner.guard_hold_reason(6, 10, limits) is not None
    assert planner.guard_hold_reason(5, 10, limits) is None
    assert planner.guard_hold_reason(1, 1, limits) is None  # tiny lists are exempt


@settings(max_examples=300, deadline=None)
@given(
    unsubscribes=st.integers(0, 100_000),
    synced=st.integers(0, 300_000),
    fraction=st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 1.0]),
    min_size=st.integers(0, 50),
)
def test_guard_enough_is_where_the_guard_stops_holding(
    unsubscribes: int, synced: int, fraction: float, min_size: int
) -> None:
    """From `guard_enough` synced members up the guard holds nothing, so counting can stop there."""
    limits = planner.GuardLimits(fraction, min_size)
    enough = planner.guard_enough(unsubscribes, limits)
    if enough is None:
        assert fraction == 0
    elif synced >= enough:
        assert planner.guard_hold_reason(unsubscribes, synced, limits) is None


def test_guard_enough_with_a_tiny_fraction_asks_for_the_exact_count() -> None:
    """A fraction so small that the bound would not fit a bigint LIMIT: count exactly instead."""
    assert planner.guard_enough(5, planner.GuardLimits(1e-300, 0)) is None
    assert planner.guard_enough(5, planner.GuardLimits(5e-300, 0)) is None
