"""The lists engine end to end: real database (SQLite and PostgreSQL), real HTTP to the emulator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from listsync import sync
from tests.emulator import EmulatorServer, FaultRule, IterableEmulator
from tests.helpers import API_KEY, audience_event, ingest, make_settings, sync_context


@pytest.fixture
def emulator() -> Iterator[tuple[IterableEmulator, str]]:
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server:
        yield emu, server.url


def _rows(ctx: sync.SyncContext, sql: str) -> list[dict[str, object]]:
    with ctx.factory() as session:
        return [dict(r) for r in session.execute(text(sql)).mappings()]


def test_enter_exit_and_replays_end_with_exact_list(database_url: str, emulator: tuple[IterableEmulator, str]) -> None:
    emu, url = emulator
    settings = make_settings(database_url, url)
    with sync_context(settings) as ctx:
        events = [
            audience_event("vip", inside=True, user_id="u1", email="A@X.com", at=1),
            audience_event("vip", inside=True, user_id="u2", email="b@x.com", at=1),
            audience_event("vip", inside=True, user_id="u3", email="c@x.com", at=1, kind="track"),
            # u2 leaves later; the older enter replayed after it must not bring u2 back
            audience_event("vip", inside=False, user_id="u2", email="b@x.com", at=5),
            audience_event("vip", inside=True, user_id="u2", email="b@x.com", at=3),
            audience_event("vip", inside=None, user_id="u3", email="c@x.com", at=9),
        ]
        ingest(ctx, events)
        ingest(ctx, events[:2])  # duplicate messageIds change nothing
        report = sync.run_once(ctx)
        assert report.exit_code == 0, report.summary()
        list_id = emu.lists_named("vip")
        assert len(list_id) == 1
        assert emu.list_member_emails(list_id[0]) == {"a@x.com", "c@x.com"}
        assert len(emu.requests_to("lists/subscribe")) == 1
        assert emu.requests_to("lists/unsubscribe") == []
        status = _rows(ctx, "SELECT * FROM audience_status")
        assert status[0]["members"] == 2 and status[0]["synced_members"] == 2
        assert status[0]["pending_subscribe"] == 0 and status[0]["list_id"] == list_id[0]

        ingest(ctx, [audience_event("vip", inside=False, user_id="u1", email="a@x.com", at=20)])
        report = sync.run_once(ctx)
        assert emu.list_member_emails(list_id[0]) == {"c@x.com"}
        assert len(emu.requests_to("lists/unsubscribe")) == 1
        again = sync.run_once(ctx)
        assert again.requests == 0
