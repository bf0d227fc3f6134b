"""Issue 12: identity exactly as Iterable defines it, per project type, on SQLite and PostgreSQL.

After every sync the emulator's list must equal the desired membership as Iterable identifies
profiles in that project type (by userId in hybrid and userId projects, by email in email
projects), and `member_status` must agree with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from listsync import sync
from listsync.config import Settings
from tests.emulator import EmulatorServer, IterableEmulator
from tests.helpers import API_KEY, audience_event, ingest, sync_context
from tests.integration.test_cli import (
    _restore_logging,  # noqa: F401  (autouse fixture)
    config_data,
    view_rows,
)


@pytest.fixture
def hybrid() -> Iterator[tuple[IterableEmulator, str]]:
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server:
        yield emu, server.url


def settings(database_url: str, url: str, project_type: str, **sections: Any) -> Settings:
    iterable = {"project_type": project_type, **sections.pop("iterable", {})}
    return Settings(**config_data(database_url, url, iterable=iterable, **sections))


def run(ctx: sync.SyncContext) -> sync.RunReport:
    report = sync.run_once(ctx)
    assert report.exit_code == 0, report.summary()
    return report


def listed_user_ids(emu: IterableEmulator, key: str) -> set[str | None]:
    (list_id,) = emu.lists_named(key)
    return {user_id for _, user_id in emu.list_members(list_id)}


def members(ctx: sync.SyncContext, key: str) -> list[dict[str, Any]]:
    rows = view_rows(ctx, "SELECT * FROM member_status ORDER BY user_id, email")
    return [r for r in rows if r["audience_key"] == key]


def test_leaver_after_email_change_leaves_the_list_hybrid(
    database_url: str, hybrid: tuple[IterableEmulator, str]
) -> None:
    """The headline bug: enter with one email, identify with a new one, exit: l5 must be gone."""
    emu, url = hybrid
    with sync_context(settings(database_url, url, "hybrid")) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id="l5", email="l5@example.com", at=1)])
        run(ctx)
        ingest(ctx, [audience_event("vip", inside=True, user_id="l5", email="l5-new@example.com", at=2)])
        run(ctx)
        ingest(ctx, [audience_event("vip", inside=False, user_id="l5", email="l5-new@example.com", at=3)])
        run(ctx)
        assert listed_user_ids(emu, "vip") == set()
        rows = members(ctx, "vip")
        assert [(r["user_id"], r["desired"], r["synced"]) for r in rows] == [("l5", "out", "out")], rows
