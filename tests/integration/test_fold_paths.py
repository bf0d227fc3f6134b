"""The set-based fold and the one-by-one rules give the same memberships, on SQLite and PostgreSQL.

Random streams of deltas over a few identities (ties in time and messageId, replays, unknown
flags, data fields) are folded in random batches into two audiences holding the same stored
members (random desired, synced and failed states): one set-based (`db.fold.classify` picks what
the database folds itself), one delta by delta through `identity` and `membership`. Every column
the rules own must match, row for row in insertion order, and the set-based statements must have
folded deltas themselves. A second test checks that an inbox event the running rules
accepted is read back (`stored.stored_event`) as validating it again would give it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from listsync.config import Settings
from listsync.db import audiences, inbox, memberships
from listsync.db import models as m
from listsync.db.session import make_engine, session_factory, transaction
from listsync.domain import Desired, InboundEvent, Member, MembershipDelta, MemberState, ProjectType, Synced
from listsync.ingest import accept, audience, extract, stored, validate
from listsync.lists import apply, rules_fold
from listsync.lists import membership as rules
from listsync.lists.fast_fold import FoldCounts
from tests.helpers import audience_event

T0 = datetime(2026, 3, 1, tzinfo=UTC)
USERS = [None, "u0", "u1", "u2"]
EMAILS = [None, "a@x.io", "b@x.io", "c@x.io"]
COMPARED = (*memberships.STATE_COLUMNS, "next_attempt_at", "updated_at")


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


PEOPLE = [(f"u{i}", f"{letter}@x.io") for i, letter in enumerate("abcdef")]
# Mostly one person's own identifiers (the common case), else any mix (merges, renames, splits).
identities = st.sampled_from(PEOPLE) | st.sampled_from(PEOPLE) | st.tuples(st.sampled_from(USERS), st.sampled_from(EMAILS)).filter(
    lambda who: who != (None, None)
)
times = st.integers(0, 4).map(lambda s: T0 + timedelta(seconds=s))
message_ids = st.sampled_from(["m0", "m1", "m2"])
fields = st.none() | st.fixed_dictionaries({"plan": st.sampled_from(["free", "pro"])})


@st.composite
def deltas(draw: st.DrawFn) -> tuple[MembershipDelta, dict[str, Any] | None]:
    user_id, email = draw(identities)
    desired = draw(st.sampled_from([Desired.IN, Desired.OUT, Desired.UNKNOWN]))
    return MembershipDelta("k", user_id, email, desired, draw(times), draw(message_ids)), draw(fields)


@st.composite
def stored_members(draw: st.DrawFn) -> tuple[Member, bool]:
    """A stored member in any state the rules can leave it in, and whether it waits for a retry."""
    user_id, email = draw(identities)
    synced = draw(st.sampled_from([None, Synced.IN, Synced.OUT]))
    member = Member(
        user_id=user_id or "",
        email=email or "",
        desired=draw(st.sampled_from([Desired.IN, Desired.OUT])),
        desired_at=draw(times),
        desired_message_id=draw(message_ids),
        data_fields=draw(fields),
        synced=synced,
        synced_email=draw(st.sampled_from(EMAILS)) if synced else None,
        synced_user_id=draw(st.sampled_from(USERS)) if synced else None,
        state=MemberState.PENDING,
    )
    attempts = draw(st.integers(0, 2))
    member = replace(rules.settle(member, ProjectType.HYBRID), attempts=attempts)
    if draw(st.booleans()):
        member = replace(member, state=MemberState.FAILED, last_error="refused")
    return member, attempts > 0 and draw(st.booleans())


def _store(session: Session, audience_id: int, stored: list[tuple[Member, bool]]) -> None:
    memberships.insert_members(session, [(audience_id, member) for member, _ in stored], T0)
    table = m.table(m.Membership)
    waiting = [(member.user_id, member.email) for member, wait in stored if wait]
    for user_id, email in waiting:
        session.execute(
            update(table)
            .where(table.c.audience_id == audience_id, table.c.user_id == user_id, table.c.email == email)
            .values(next_attempt_at=T0 + timedelta(hours=1), updated_at=T0)
        )


def _rows(session: Session, audience_id: int) -> list[tuple[Any, ...]]:
    table = m.table(m.Membership)
    stmt = select(*(table.c[name] for name in COMPARED)).where(table.c.audience_id == audience_id)
    return [tuple(row) for row in session.execute(stmt.order_by(table.c.id))]


@pytest.mark.parametrize("set_based", [False, True])
def test_a_member_known_by_email_takes_its_user_id_while_another_enters_by_that_email(
    factory: sessionmaker[Session], set_based: bool
) -> None:
    """userId project: the stored email-only member becomes u2's, and a later email-only delta of
    the batch is a new member; the rename is written before the insert that reuses its old key."""
    def member(user_id: str, email: str) -> Member:
        return Member(user_id=user_id, email=email, desired=Desired.IN, desired_at=T0, desired_message_id="m0",
                      data_fields=None, synced=None, synced_email=None, synced_user_id=None, state=MemberState.PENDING)

    with transaction(factory) as session:
        audience_id = audiences.ensure_audiences(session, ["k"], T0)["k"]
        _store(session, audience_id, [(member("u0", "a@x.io"), False), (member("", "c@x.io"), False)])
    batch = [("u0", "a@x.io"), ("u2", "c@x.io"), (None, "c@x.io")]
    items = [(audience_id, MembershipDelta("k", user, email, Desired.IN, T0, "m1"), None) for user, email in batch]
    with transaction(factory) as session:
        apply.apply_deltas(session, items, ProjectType.USER_ID, T0 + timedelta(days=1), set_based=set_based)
    with factory() as session:
        table = m.table(m.Membership)
        rows = session.execute(select(table.c.user_id, table.c.email).order_by(table.c.id)).all()
    assert [tuple(row) for row in rows] == [("u0", "a@x.io"), ("u2", "c@x.io"), ("", "c@x.io")]


def test_set_based_fold_equals_the_rules(factory: sessionmaker[Session]) -> None:
    taken = FoldCounts()

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        project_type=st.sampled_from(list(ProjectType)),
        stored=st.lists(stored_members(), max_size=8, unique_by=lambda s: (s[0].user_id, s[0].email)),
        batches=st.lists(st.lists(deltas(), max_size=5), min_size=1, max_size=6),
    )
    def check(
        project_type: ProjectType,
        stored: list[tuple[Member, bool]],
        batches: list[list[tuple[MembershipDelta, dict[str, Any] | None]]],
    ) -> None:
        with transaction(factory) as session:
            session.execute(delete(m.table(m.Membership)))
            ids = audiences.ensure_audiences(session, ["fast", "rules"], T0)
            for audience_id in ids.values():
                _store(session, audience_id, stored)
        for number, batch in enumerate(batches, start=1):
            now = T0 + timedelta(days=number)
            for key, set_based in (("fast", True), ("rules", False)):
                items = [(ids[key], delta, data) for delta, data in batch]
                with transaction(factory) as session:
                    counts = apply.apply_deltas(session, items, project_type, now, set_based=set_based)
                if set_based:
                    taken.add(counts)
        with factory() as session:
            assert _rows(session, ids["fast"]) == _rows(session, ids["rules"])

    check()
    # The set-based statements really folded deltas (new members and updates), not the rules alone.
    assert taken.inserted > 50 and taken.updated > 50 and taken.by_rules > 50


def _events() -> list[dict[str, Any]]:
    """Audience events and plain identifies in the shapes the inbox holds."""
    with_traits = audience_event("vip", inside=True, user_id="u1", email=" Ada@X.io ", traits={"plan": "pro"})
    no_id = {k: v for k, v in audience_event("vip", inside=False, email="b@x.io", kind="track").items()
             if k not in ("messageId", "timestamp")}
    nested_key = audience_event("vip", inside=True, user_id="u3", traits={"cfg": {"writeKey": "s3cret"}})
    plain = {"type": "identify", "userId": "u1", "messageId": "p1", "traits": {"email": "new@x.io"},
             "context": {"traits": {"email": "old@x.io"}}, "writeKey": "wk"}
    page = {"type": "page", "userId": "u2", "name": "Home", "properties": None, "timestamp": "2026-01-02T03:04:05+02:00"}
    return [with_traits, no_id, nested_key, plain, page]


def test_an_event_accepted_by_the_running_rules_reads_back_as_validated(factory: sessionmaker[Session]) -> None:
    now = T0 + timedelta(microseconds=123456)
    items = [extract.RawEvent(event, None) for event in _events()]
    with transaction(factory) as session:
        counts = accept.accept_items(session, items, source="test", now=now)
        assert counts.accepted == len(items)
        rows = inbox.unapplied_events(session, 100)
    assert {row.rules for row in rows} == {stored.RULES}
    for row in rows:
        read = rules_fold.event_of(row)
        again = validate.validate_event(row.payload, received_at=row.received_at)
        assert isinstance(read, InboundEvent) and isinstance(again, InboundEvent)
        assert read == again
        assert audience.extract_deltas(read) == audience.extract_deltas(again)
        assert audience.extract_email_change(read) == audience.extract_email_change(again)


def test_an_event_stored_under_other_rules_is_validated_again(factory: sessionmaker[Session]) -> None:
    event = audience_event("vip", inside=True, user_id="u1")
    with transaction(factory) as session:
        accept.accept_items(session, [extract.RawEvent(event, None)], source="test", now=T0)
        table = m.table(m.InboxEvent)
        # As if an older release had accepted an event the running rules refuse.
        session.execute(update(table).values(rules="older", payload={**event, "userId": " u1 "}))
    with transaction(factory) as session:
        assert apply.apply_inbox(session, Settings(), T0) == 1
    with factory() as session:
        assert session.scalar(select(m.table(m.Membership).c.id)) is None
        reasons = session.scalars(select(m.table(m.DeadLetter).c.reason)).all()
    assert [r.split(":")[0] for r in reasons] == ["invalid_user_id"]
