"""The store end of ingestion on both databases: accept -> inbox -> apply_inbox -> memberships,
as the receiver and the pollers use it (ordering, replays, crashes between the steps, races)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from listsync.config import Settings
from listsync.db import fold_stage
from listsync.db import models as m
from listsync.db.session import make_engine, session_factory, transaction
from listsync.ingest import accept
from listsync.lists.apply import apply_inbox

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SETTINGS = Settings()


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


def track(user: str, entered: bool, at: str, message_id: str, audience: str = "vip") -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Audience Entered" if entered else "Audience Exited",
        "userId": user,
        "messageId": message_id,
        "timestamp": at,
        "properties": {"audience_key": audience, audience: entered},
    }


def post(factory: sessionmaker[Session], *events: dict[str, Any]) -> accept.IngestCounts:
    body = json.dumps({"batch": list(events)}).encode()
    with transaction(factory) as session:
        return accept.accept_body(session, body, path_type=None, source="receiver", now=NOW)


def apply_all(factory: sessionmaker[Session]) -> int:
    applied = 0
    while True:
        with transaction(factory) as session:
            n = apply_inbox(session, SETTINGS, NOW, limit=50)
        if n == 0:
            return applied
        applied += n


def desired(factory: sessionmaker[Session], user: str) -> str:
    with factory() as session:
        row = session.scalars(select(m.Membership.desired).where(m.Membership.user_id == user)).one()
    return str(row)


def test_latest_event_wins_whatever_the_arrival_order(factory: sessionmaker[Session]) -> None:
    post(factory, track("u1", True, "2024-05-01T10:00:03Z", "late-enter"))
    post(factory, track("u1", False, "2024-05-01T10:00:01Z", "early-exit"))
    post(
        factory,
        track("u2", False, "2024-05-01T10:00:05Z", "u2-exit"),
        track("u2", True, "2024-05-01T10:00:04Z", "u2-enter"),
    )
    assert apply_all(factory) == 4
    assert (desired(factory, "u1"), desired(factory, "u2")) == ("in", "out")


def test_a_replayed_message_id_changes_nothing(factory: sessionmaker[Session]) -> None:
    post(factory, track("u1", True, "2024-05-01T10:00:00Z", "m1"))
    apply_all(factory)
    # Same messageId, different content: a replay is recognised by its id alone.
    replay = post(factory, track("u1", False, "2024-05-01T11:00:00Z", "m1"))
    assert (replay.accepted, replay.duplicates) == (0, 1)
    assert apply_all(factory) == 0
    assert desired(factory, "u1") == "in"


def test_a_crash_during_apply_leaves_the_inbox_to_apply_again(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    post(factory, *(track(f"u{i}", True, "2024-05-01T10:00:00Z", f"m{i}") for i in range(120)))

    def crash(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("simulated crash before mark_applied commits")

    monkeypatch.setattr(fold_stage, "mark_applied", crash)  # the batch is marked from its staging table
    with pytest.raises(RuntimeError), transaction(factory) as session:
        apply_inbox(session, SETTINGS, NOW)
    monkeypatch.undo()

    with factory() as session:
        assert session.scalar(select(func.count()).select_from(m.Membership)) == 0
        assert session.scalar(select(func.count()).where(m.InboxEvent.applied_at.is_(None))) == 120
    assert apply_all(factory) == 120
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(m.Membership)) == 120


def test_rejected_events_are_visible_without_secrets(factory: sessionmaker[Session]) -> None:
    bad = {
        "type": "track",
        "event": "Audience Entered",
        "writeKey": "s3cret",
        "properties": {"password": "pw"},
    }
    counts = post(factory, bad, track("u1", True, "2024-05-01T10:00:00Z", "ok"))
    assert (counts.accepted, counts.rejected) == (1, 1)
    with transaction(factory) as session:
        body = b'{"writeKey": "s3cret", "batch": [ oops'
        accept.accept_body(session, body, path_type=None, source="receiver", now=NOW)
    with factory() as session:
        rows = session.execute(text("SELECT reason, payload FROM rejected_events ORDER BY received_at")).all()
    assert [r.reason.split(":")[0] for r in rows] == ["missing_identifier", "malformed_json"]
    assert all("s3cret" not in r.payload and '"pw"' not in r.payload for r in rows)


def _race(factory: sessionmaker[Session], senders: int = 4) -> list[accept.IngestCounts]:
    """`senders` threads posting the same 300 events in batches of 50 at the same time."""
    events = [track(f"u{i}", True, "2024-05-01T10:00:00Z", f"race-{i}") for i in range(300)]
    results: list[accept.IngestCounts] = []
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for start in range(0, len(events), 50):
                results.append(post(factory, *events[start : start + 50]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return results


def test_concurrent_senders_of_the_same_events_store_each_once(factory: sessionmaker[Session]) -> None:
    results = _race(factory)
    assert sum(r.accepted + r.duplicates for r in results) == 1_200
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(m.InboxEvent)) == 300


def test_concurrent_senders_are_told_exactly_what_was_new(
    factory: sessionmaker[Session], database_url: str, request: pytest.FixtureRequest
) -> None:
    assert sum(r.accepted for r in _race(factory)) == 300


def test_inbox_event_refused_at_apply_is_recorded_not_dropped(factory: sessionmaker[Session]) -> None:
    """An event stored by an earlier, laxer release and refused when applied goes to rejected_events."""
    now = datetime.now(UTC)
    with transaction(factory) as session:
        session.execute(
            insert(m.InboxEvent),
            [
                {
                    "message_id": "old-1",
                    "type": "track",
                    "event": None,
                    "user_id": "u 1 ",
                    "anonymous_id": None,
                    "email": None,
                    "timestamp": now,
                    "received_at": now,
                    "source": "receiver",
                    "payload": {"type": "track", "event": "E", "userId": " u1 ", "messageId": "old-1"},
                    "is_audience": False,
                }
            ],
        )
    with transaction(factory) as session:
        assert apply_inbox(session, Settings(), now) == 1
    with factory() as session:
        reasons = session.scalars(text("SELECT reason FROM rejected_events")).all()
    assert (
        len(reasons) == 1
        and reasons[0].startswith("invalid_user_id")
        and "refused when applied" in reasons[0]
    )
