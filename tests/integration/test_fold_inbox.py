"""The set-based fold of inbox events (deltas read by the database out of the stored payloads) and
the rules' fold of the same events read in Python give the same memberships and audience settings,
on SQLite and PostgreSQL.

Random streams of Engage identifies and tracks (flags as booleans, strings in any case, odd values
or none; data fields in the event's own traits or in context.traits; Engage audience settings),
plain identifies that move a user's email, and events with nothing for lists are accepted into the
inbox and folded in random batches: once by `apply_inbox`, once by `rules_fold.fold_events`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from listsync.config import Settings
from listsync.db import fold_stage, inbox
from listsync.db import models as m
from listsync.db.session import is_postgres, make_engine, session_factory, transaction
from listsync.domain import InboundEvent, ProjectType
from listsync.ingest import accept, audience, extract, stored
from listsync.lists import apply, fast_fold, rules_fold

T0 = datetime(2026, 3, 1, tzinfo=UTC)
NOW = T0 + timedelta(days=1)
USERS = [None, "u0", "u1", "u2"]
EMAILS = [None, "a@x.io", "b@x.io", "c@x.io"]
KEYS = ["vip", "gold", "vip-list.2", "Gold (é) [1]'s", 'say "hi"']  # the last one Python reads
FLAGS = [True, False, "true", "FALSE", " True ", "yes", 1, None, "missing"]
SETTINGS = [None, {"campaignId": "7"}, {"globalUnsubscribe": True, "campaignId": 3}, {"other": 1}]
MEMBER_COLUMNS = ("audience_id", "user_id", "email", "desired", "desired_at", "desired_message_id", "data_fields",
                  "synced", "state", "attempts")
_serial = count()


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    user_id, email = draw(st.sampled_from(USERS)), draw(st.sampled_from(EMAILS))
    if user_id is None and email is None:
        user_id = "u0"
    stamp = (T0 + timedelta(seconds=draw(st.integers(0, 3)))).isoformat()
    event: dict[str, Any] = {"messageId": f"m{draw(st.integers(0, 9))}-{next(_serial)}", "timestamp": stamp}
    event["userId" if user_id else "anonymousId"] = user_id or "anon"
    kind = draw(st.sampled_from(["identify", "track", "track", "plain", "page"]))
    if kind in ("plain", "page"):
        event.update(type="identify", traits={"email": email} if email else {}) if kind == "plain" else event.update(
            type="page", name="Home", properties={"email": email} if email else {})
        return event
    key = draw(st.sampled_from(KEYS))
    own: dict[str, Any] = {"email": email} if email else {}
    flag = draw(st.sampled_from(FLAGS))
    if flag != "missing":
        own[key] = flag
    if draw(st.booleans()):
        own["plan"] = draw(st.sampled_from(["free", "pro", None, {"tier": [1, 2.5]}]))
    personas: dict[str, Any] = {"computation_class": "audience", "computation_key": key}
    audience_settings = draw(st.sampled_from(SETTINGS))
    if audience_settings is not None:
        personas["audience_settings"] = audience_settings
    event["context"] = {"personas": personas}
    if draw(st.booleans()):
        event["context"]["traits"] = {"plan": "ctx", "score": 3}
    if kind == "identify":
        event.update(type="identify", traits=own)
    else:
        name = draw(st.sampled_from(["Audience Entered", "Audience Exited"]))
        event.update(type="track", event=name, properties={**own, "audience_key": key})
    return event


def _settings(project_type: ProjectType) -> Settings:
    return Settings.model_validate({
        "iterable": {"project_type": project_type.value},
        "audiences": {"vip": {"data_fields": ["plan", "score", "vip"]}, "vip-list.2": {"data_fields": ["plan"]},
                      "Gold (é) [1]'s": {"data_fields": ["score", "Gold (é) [1]'s"]}},
    })


def _state(session: Session) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    table, aud = m.table(m.Membership), m.table(m.Audience)
    keys = dict(session.execute(select(aud.c.id, aud.c.audience_key)).all())
    rows = session.execute(select(*(table.c[c] for c in MEMBER_COLUMNS)).order_by(table.c.id)).all()
    members = [(keys[row[0]], *row[1:]) for row in rows]
    audiences = session.execute(select(aud.c.audience_key, aud.c.settings).order_by(aud.c.audience_key)).all()
    return members, [tuple(a) for a in audiences]


def _reset(session: Session) -> None:
    session.execute(delete(m.table(m.Membership)))
    session.execute(delete(m.table(m.Audience)))
    session.execute(update(m.table(m.InboxEvent)).values(applied_at=None))


def _fold_by_rules(session: Session, config: Settings, limit: int) -> None:
    rows = inbox.unapplied_events(session, limit)
    rules_fold.fold_events(session, config, rows, NOW)
    inbox.mark_applied(session, [row.id for row in rows], NOW)


def test_inbox_fold_equals_the_rules(factory: sessionmaker[Session]) -> None:
    taken: dict[str, int] = {"set": 0, "python": 0}

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        project_type=st.sampled_from(list(ProjectType)),
        stream=st.lists(events(), min_size=1, max_size=14),
        limits=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    )
    def check(project_type: ProjectType, stream: list[dict[str, Any]], limits: list[int]) -> None:
        config = _settings(project_type)
        with transaction(factory) as session:
            session.execute(delete(m.table(m.InboxEvent)))
            _reset(session)
            accepted = accept.accept_items(session, [extract.RawEvent(e, None) for e in stream], source="t", now=T0)
        folded, batches = 0, iter(limits * len(stream))
        while folded < accepted.accepted:
            with transaction(factory) as session:
                applied = apply.apply_inbox(session, config, NOW, limit=next(batches))
                taken["set"] += session.scalar(select(fold_stage.STAGE.c.pos).where(
                    fold_stage.STAGE.c.cls == "set").limit(1)) is not None
            folded += applied
        with factory() as session:
            by_sql = _state(session)
        with transaction(factory) as session:
            _reset(session)
        batches = iter(limits * len(stream))
        with factory() as session:
            pending = session.scalar(select(m.table(m.InboxEvent).c.id).limit(1)) is not None
        while pending:
            with transaction(factory) as session:
                _fold_by_rules(session, config, next(batches))
                pending = bool(inbox.unapplied_events(session, 1))
        with factory() as session:
            assert _state(session) == by_sql

    check()
    assert taken["set"] > 10  # batches where the database folded deltas itself


def test_the_database_reads_deltas_as_python_does(factory: sessionmaker[Session]) -> None:
    """Each staged row's kind, key, identifiers and desired state against `audience.extract_deltas`."""
    kinds: Counter[str] = Counter()

    @settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(stream=st.lists(events(), min_size=60, max_size=60))
    def check(stream: list[dict[str, Any]]) -> None:
        with transaction(factory) as session:
            session.execute(delete(m.table(m.InboxEvent)))
            accept.accept_items(session, [extract.RawEvent(e, None) for e in stream], source="t", now=T0)
        with transaction(factory) as session:
            fold_stage.stage_inbox(session, 1000, stored.RULES)
            staged = {row.pos: row for row in session.execute(select(fold_stage.STAGE))}
            rows = inbox.events_by_id(session, list(staged))
            postgres = is_postgres(session)
        for pos, row in rows.items():
            got, event = staged[pos], rules_fold.event_of(row)
            assert isinstance(event, InboundEvent)
            deltas, change = audience.extract_deltas(event), audience.extract_email_change(event)
            if not postgres and deltas and not fast_fold.path_safe(deltas[0].audience_key):
                continue  # a key no JSON path can quote: the fold hands it to Python (`to_python`)
            if got.kind == "delta":
                (delta,) = deltas
                assert (got.audience_key, got.user_id, got.email, got.desired, got.ts, got.msg) == (
                    delta.audience_key, delta.user_id, delta.email, delta.desired.value, delta.timestamp,
                    delta.message_id)
                assert bool(got.has_settings) == bool(delta.audience_settings)
            elif got.kind == "event":  # a flag spelled as a string other than true/false
                source = row.payload["traits" if row.type == "identify" else "properties"]
                assert len(deltas) == 1 and isinstance(source.get(deltas[0].audience_key), str)
            else:
                assert not deltas and (got.kind == "change") == (change is not None)
            kinds[got.kind] += 1

    check()
    assert kinds["delta"] > 50 and kinds["event"] > 0 and kinds["change"] > 0 and kinds["none"] > 0
