"""`listsync plan` changes nothing (inbox folded and routed only inside a rolled-back transaction),
shows pending event deliveries beside list changes, and samples members; `listsync status` shows
the inbox and event-delivery backlog. Both databases, the emulator over HTTP for the sync after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from listsync.config import Settings
from tests.emulator import IterableEmulator
from tests.helpers import audience_event, ingest, sync_context
from tests.integration.test_cli import (
    _restore_logging,  # noqa: F401  (autouse fixture)
    config_data,
    run_cli,
    write_config,
)

TABLES = ("inbox", "memberships", "audiences", "event_deliveries", "sync_runs", "api_requests", "leases")


def _snapshot(settings: Settings) -> dict[str, Any]:
    """Every row of the tables a run writes, so any change shows."""
    with sync_context(settings) as ctx, ctx.factory() as session:
        return {t: [tuple(r) for r in session.execute(text(f"SELECT * FROM {t} ORDER BY 1"))] for t in TABLES}


def _events() -> list[dict[str, Any]]:
    enters = [audience_event("vip", inside=True, user_id=f"u{i}", email=f"u{i}@x.com", at=1) for i in range(4)]
    profile = {"type": "identify", "messageId": "id-1", "userId": "p1", "traits": {"email": "p1@x.com"},
               "timestamp": "2026-01-01T00:00:00Z"}
    signup = {"type": "track", "event": "Signed Up", "messageId": "ev-1", "userId": "p1",
              "properties": {"email": "p1@x.com", "plan": "pro"}, "timestamp": "2026-01-01T00:00:01Z"}
    return [*enters, profile, signup]


def test_plan_changes_nothing_and_shows_deliveries_and_samples(
    database_url: str, emulator: tuple[IterableEmulator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emu, url = emulator
    data = config_data(database_url, url)
    config = write_config(tmp_path / "listsync.toml", data)
    settings = Settings(**data)
    with sync_context(settings) as ctx:
        ingest(ctx, _events())
    before = _snapshot(settings)

    code, out, _ = run_cli(capsys, config, "plan", "--json", "--sample", "2")
    assert code == 0
    plan = json.loads(out)
    assert _snapshot(settings) == before
    assert emu.requests == []
    (vip,) = plan["audiences"]
    assert (vip["audience_key"], vip["subscribe"], vip["requests"]) == ("vip", 4, 1)
    assert vip["sample"] == [
        {"direction": "subscribe", "user_id": "u0", "email": "u0@x.com"},
        {"direction": "subscribe", "user_id": "u1", "email": "u1@x.com"},
    ]
    pending = {row["action"]: row["pending"] for row in plan["event_deliveries"]}
    assert pending == {"upsert_user": 1, "custom_event": 1}
    assert [e["event"] for e in plan["event_sample"]] == ["id-1", "ev-1"]
    assert plan["folded"] == 6

    code, out, _ = run_cli(capsys, config, "plan", "--sample", "1")
    assert code == 0 and "sample members:" in out and "u0@x.com" in out
    assert "custom_event" in out and "nothing was written" in out
    assert _snapshot(settings) == before

    # what the plan promised is what the sync does
    assert run_cli(capsys, config, "sync")[0] == 0
    assert len(emu.list_member_emails(emu.lists_named("vip")[0])) == 4
    assert len(emu.events) == 1


def test_status_shows_inbox_and_delivery_backlog(
    database_url: str, emulator: tuple[IterableEmulator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _emu, url = emulator
    data = config_data(database_url, url)
    config = write_config(tmp_path / "listsync.toml", data)
    with sync_context(Settings(**data)) as ctx:
        ingest(ctx, _events())
    code, out, _ = run_cli(capsys, config, "status")
    assert code == 0
    assert "inbox: 6 events waiting to be applied (oldest received " in out
    assert "6 events not routed to actions yet" in out
    assert run_cli(capsys, config, "sync")[0] == 0
    code, out, _ = run_cli(capsys, config, "status")
    assert "inbox: 0 events waiting to be applied; event deliveries: 0 pending (0 waiting to retry), 0 failed" in out
    with sync_context(Settings(**data)) as ctx, ctx.factory() as session:
        row = session.execute(text("SELECT * FROM sync_backlog")).mappings().one()
    assert (row["inbox_unapplied"], row["deliveries_pending"], row["deliveries_failed"]) == (0, 0, 0)
