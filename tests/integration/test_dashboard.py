"""The status page's queries (listsync.db.dashboard) on both databases, against a store filled by
real sync runs: they agree with the SQL views and the ledger, page without gaps or repeats, and
on SQLite every one of them is answered through an index."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from listsync import sync
from listsync.config import Settings
from listsync.db import dashboard as q
from listsync.db import models as m
from listsync.db import session as dbs
from listsync.db import views
from tests.emulator import IterableEmulator
from tests.helpers import BASE_TIME, sync_context
from tests.integration.status_seed import INVALID_EMAILS, seed, settings_data


@pytest.fixture
def seeded(database_url: str, emulator: tuple[IterableEmulator, str]) -> Iterator[Settings]:
    emu, url = emulator
    settings = Settings(**settings_data(database_url, url))
    seed(settings, emu)
    with sync_context(settings) as ctx:
        sync.run_once(ctx)  # an idle run: nothing due, nothing sent
    yield settings


@pytest.fixture
def engine(seeded: Settings) -> Iterator[Engine]:
    engine = dbs.make_engine(seeded.database_url, read_only=True)
    yield engine
    engine.dispose()


def test_audience_counts_agree_with_the_status_view_and_page_by_key(engine: Engine) -> None:
    with dbs.session_factory(engine)() as session:
        view = {row["audience_key"]: row for row in views.audience_status(session)}
        page = q.audiences_page(session)
        assert [a.audience_key for a in page.rows] == ["calm", "newsletter", "vip"] and page.next_cursor is None
        for a in page.rows:
            row = view[a.audience_key]
            assert (a.list_id, a.list_state, a.hold_reason) == (row["list_id"], row["list_state"], row["hold_reason"])
            assert (a.members, a.synced_members, a.pending_subscribe, a.pending_unsubscribe, a.failed) == (
                row["members"], row["synced_members"], row["pending_subscribe"], row["pending_unsubscribe"],
                row["failed"])
        first = q.audiences_page(session, limit=2)
        assert [a.audience_key for a in first.rows] == ["calm", "newsletter"] and first.next_cursor == "newsletter"
        rest = q.audiences_page(session, after=first.next_cursor, limit=2)
        assert [a.audience_key for a in rest.rows] == ["vip"] and rest.next_cursor is None

        vip = q.audience(session, "vip")
        assert vip is not None and "15 of 20" in (vip.hold_reason or "")
        assert (vip.pending_unsubscribe, vip.oldest_pending_at, vip.newest_delta_at) == (
            15, BASE_TIME + timedelta(seconds=2), BASE_TIME + timedelta(seconds=2))
        now = datetime.now(UTC)
        assert vip.lag_seconds(now) == pytest.approx((now - vip.oldest_pending_at).total_seconds())
        calm = q.audience(session, "calm")
        assert calm is not None and calm.oldest_pending_at is None and calm.lag_seconds(now) == 0.0
        assert q.audience(session, "no such audience") is None


def test_failed_members_and_requests_page_without_gaps(engine: Engine) -> None:
    with dbs.session_factory(engine)() as session:
        newsletter = q.audience(session, "newsletter")
        assert newsletter is not None and newsletter.failed == 2
        first = q.failed_members_page(session, newsletter.id, limit=1)
        second = q.failed_members_page(session, newsletter.id, after=int(first.next_cursor or 0), limit=1)
        assert second.next_cursor is None
        failed = first.rows + second.rows
        assert [f.email for f in failed] == list(INVALID_EMAILS)
        assert all((f.last_error or "").startswith("invalid") for f in failed)

        vip = q.audience(session, "vip")
        assert vip is not None
        ledger = session.execute(
            text("SELECT id, endpoint FROM api_requests WHERE audience_id = :a ORDER BY id DESC"), {"a": vip.id}
        ).all()
        seen: list[int] = []
        cursor: int | None = None
        while True:
            page = q.requests_page(session, vip.id, before=cursor, limit=1)
            seen += [r.id for r in page.rows]
            if page.next_cursor is None:
                break
            cursor = int(page.next_cursor)
        assert seen == [row.id for row in ledger] and "lists/subscribe" in {row.endpoint for row in ledger}


def test_run_chart_and_history_cover_the_window(seeded: Settings, engine: Engine) -> None:
    factory = dbs.session_factory(engine)
    now = datetime.now(UTC) + timedelta(seconds=1)
    with sync_context(seeded) as ctx, dbs.transaction(ctx.factory) as session:
        session.add(m.SyncRun(trigger="sync", owner="old", status=m.RunStatus.OK, requests=1, subscribed=7,
                              started_at=now - timedelta(days=2), finished_at=now - timedelta(days=2)))
    with factory() as session:
        runs = session.execute(text("SELECT * FROM sync_runs WHERE owner <> 'old'")).mappings().all()
        buckets = q.run_buckets(session, since=now - timedelta(hours=1), until=now)
        assert len(buckets) == 48 and buckets[0].start == now - timedelta(hours=1)
        assert sum(b.runs for b in buckets) == len(runs) == 3
        assert sum(b.changed for b in buckets) == sum(r["subscribed"] + r["unsubscribed"] for r in runs) > 0
        assert sum(b.failed for b in buckets) == sum(r["failed"] for r in runs) == 2
        assert max(b.max_duration_seconds for b in buckets) > 0
        week = q.run_buckets(session, since=now - timedelta(days=7), until=now, buckets=7)
        assert sum(b.runs for b in week) == 4 and sum(b.changed for b in week) == sum(b.changed for b in buckets) + 7

        active = q.runs_page(session, since=now - timedelta(hours=1))
        every = q.runs_page(session, since=now - timedelta(hours=1), active_only=False)
        assert len(active.rows) == 2 and len(every.rows) == 3
        assert [r.id for r in every.rows] == sorted((r.id for r in every.rows), reverse=True)
        hour = now - timedelta(hours=1)
        first = q.runs_page(session, since=hour, limit=2, active_only=False)
        rest = q.runs_page(session, since=hour, before=int(first.next_cursor or 0), limit=2, active_only=False)
        assert [r.id for r in first.rows + rest.rows] == [r.id for r in every.rows] and rest.next_cursor is None
        assert q.runs_page(session, since=now).rows == []


def test_rejected_events_by_reason_and_deliveries_by_action(engine: Engine) -> None:
    with dbs.session_factory(engine)() as session:
        since = datetime.now(UTC) - timedelta(hours=1)
        groups = q.rejected_groups(session, since=since, samples=1)
        assert [(g.code, g.count) for g in groups] == [("missing_identifier", 2), ("unknown_type", 1)]
        assert all(len(g.samples) == 1 and g.samples[0].reason.startswith(g.code + ":") for g in groups)
        assert len(q.rejected_groups(session, since=since)[0].samples) == 2
        assert q.rejected_groups(session, since=datetime.now(UTC) + timedelta(minutes=1)) == []
        counts = [(d.action, d.state, d.count) for d in q.deliveries_by_action_state(session)]
        assert counts == [("custom_event", "delivered", 1), ("upsert_user", "delivered", 1)]


def test_every_query_is_answered_through_an_index(seeded: Settings) -> None:
    """SQLite's plans: no table of the sync state is read in full, whatever the page asks."""
    if not seeded.database_url.startswith("sqlite"):
        pytest.skip("query plans are checked on SQLite; PostgreSQL's planner prefers scans of tiny tables")
    engine = dbs.make_engine(seeded.database_url, read_only=True)
    statements: list[tuple[str, Any]] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, sql, params, _ctx, _many: statements.append((sql, params)))
    now = datetime.now(UTC)
    with dbs.session_factory(engine)() as session:
        audience = q.audiences_page(session).rows[0]
        q.audience(session, audience.audience_key)
        for cursor in (None, 1):
            q.failed_members_page(session, audience.id, after=cursor)
            q.requests_page(session, audience.id, before=cursor)
            q.runs_page(session, since=now - timedelta(days=1), before=cursor)
            q.runs_page(session, since=now - timedelta(days=1), before=cursor, active_only=False)
        q.run_buckets(session, since=now - timedelta(days=1), until=now)
        q.rejected_groups(session, since=now - timedelta(days=1))
        q.deliveries_by_action_state(session)
    full_scans = []
    with engine.connect() as conn:
        for sql, params in statements:
            if not sql.lstrip().upper().startswith("SELECT"):
                continue
            for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params):
                if re.fullmatch(r"SCAN \w+", row[-1]):
                    full_scans.append((sql, row[-1]))
    engine.dispose()
    assert len(statements) >= 10
    assert full_scans == []
