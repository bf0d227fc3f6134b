"""Retention keeps the database flat: repeated ingest -> sync -> prune cycles leave the same rows
(and, on SQLite, the same pages in use); pending work is never pruned; `listsync db prune` and the
daemon's job apply the [retention] settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from listsync import context, sync
from listsync.config import RetentionSettings, Settings
from listsync.db import retention
from listsync.db import session as dbs
from listsync.ingest import accept, extract
from listsync.lists.apply import apply_all
from tests.emulator import IterableEmulator
from tests.helpers import audience_event, ingest, sync_context
from tests.integration.test_cli import (
    _restore_logging,  # noqa: F401  (autouse fixture)
    config_data,
    run_cli,
    write_config,
)

GROWING = ("inbox", "event_deliveries", "api_requests", "api_request_items", "sync_runs", "dead_letters")
USERS = 20


def _cycle_events(cycle: int) -> list[dict[str, Any]]:
    inside = cycle % 2 == 0
    flips = [
        audience_event("vip", inside=inside, user_id=f"u{i}", email=f"u{i}@x.com", at=cycle)
        for i in range(USERS)
    ]
    profiles = [
        {"type": "identify", "messageId": f"p{cycle}-{i}", "userId": f"u{i}",
         "traits": {"email": f"u{i}@x.com", "visits": cycle}, "timestamp": "2026-01-01T00:00:00Z"}
        for i in range(USERS)
    ]
    return flips + profiles


def _reject(ctx: context.SyncContext, count: int) -> None:
    items = [extract.RawEvent(raw={"type": "identify", "messageId": f"bad-{i}"}, size=40) for i in range(count)]
    with dbs.transaction(ctx.factory) as session:
        accept.accept_items(session, items, source="test", now=datetime.now(UTC))


def _counts(ctx: context.SyncContext) -> dict[str, int]:
    with ctx.factory() as session:
        return {t: int(session.scalar(text(f"SELECT count(*) FROM {t}")) or 0) for t in (*GROWING, "memberships")}


def _pages_in_use(ctx: context.SyncContext) -> int | None:
    with ctx.factory() as session:
        if session.get_bind().dialect.name != "sqlite":
            return None
        pages = session.scalar(text("PRAGMA page_count")) or 0
        free = session.scalar(text("PRAGMA freelist_count")) or 0
        return int(pages) - int(free)


def test_database_stays_flat_over_repeated_runs(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    settings = Settings(**config_data(database_url, url))
    pages: list[int | None] = []
    with sync_context(settings) as ctx:
        for cycle in range(8):
            ingest(ctx, _cycle_events(cycle))
            _reject(ctx, 3)
            assert sync.run_once(ctx, context.RunOptions(allow_mass_unsubscribe=True)).exit_code == 0
            later = datetime.now(UTC) + timedelta(days=100)
            pruned = retention.prune(ctx.factory, settings.retention, later, actions_enabled=True)
            assert pruned.inbox == 2 * USERS and pruned.rejected == 3 and pruned.runs == 1
            assert _counts(ctx) == {**dict.fromkeys(GROWING, 0), "memberships": USERS}
            pages.append(_pages_in_use(ctx))
        assert len(emu.list_member_emails(emu.lists_named("vip")[0])) == 0  # the last cycle was an exit
    if pages[0] is not None:
        assert pages[-1] <= pages[2] + 2, pages  # type: ignore[operator]


def test_pending_work_is_never_pruned(database_url: str, emulator: tuple[IterableEmulator, str]) -> None:
    _emu, url = emulator
    settings = Settings(**config_data(database_url, url))
    later = datetime.now(UTC) + timedelta(days=100)
    with sync_context(settings) as ctx:
        ingest(ctx, _cycle_events(0))
        assert retention.prune(ctx.factory, settings.retention, later, actions_enabled=True).inbox == 0
        apply_all(ctx)  # applied, but not routed to actions yet
        assert retention.prune(ctx.factory, settings.retention, later, actions_enabled=True).inbox == 0
        assert _counts(ctx)["inbox"] == 2 * USERS
        keep_all = RetentionSettings(inbox_days=0, request_items_days=0, runs_days=0, rejected_days=0)
        assert sync.run_once(ctx).exit_code == 0
        assert retention.prune(ctx.factory, keep_all, later, actions_enabled=True).total == 0
        recent = retention.prune(ctx.factory, settings.retention, datetime.now(UTC), actions_enabled=True)
        assert recent.total == 0  # everything is younger than the defaults keep


def test_db_prune_command(
    database_url: str, emulator: tuple[IterableEmulator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _emu, url = emulator
    data = config_data(database_url, url, retention={"inbox_days": 0.000001, "runs_days": 0.000001})
    config = write_config(tmp_path / "listsync.toml", data)
    with sync_context(Settings(**data)) as ctx:
        ingest(ctx, _cycle_events(0))
        assert run_cli(capsys, config, "sync")[0] == 0
        code, out, _ = run_cli(capsys, config, "db", "prune")
        assert code == 0 and out.startswith(f"pruned {2 * USERS} inbox events"), out
        assert _counts(ctx)["inbox"] == 0 and _counts(ctx)["memberships"] == USERS
