"""Run history a person can read: `listsync runs` and the run_history view, the end summary of
`listsync sync` printed once as small tables, `--retry-failed`, an idle daemon that stays quiet and
leaves no rows, and run_finished / iterable request log lines that carry their counts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from sqlalchemy import text

from listsync import context, sync
from listsync.config import Settings
from tests.emulator import IterableEmulator
from tests.helpers import audience_event, ingest, sync_context
from tests.integration.test_cli import (
    _restore_logging,  # noqa: F401  (autouse fixture)
    config_data,
    member_rows,
    run_cli,
    write_config,
)


def _enters(key: str, users: range) -> list[dict[str, object]]:
    return [audience_event(key, inside=True, user_id=f"u{i}", email=f"u{i}@x.com", at=1) for i in users]


def test_sync_summary_runs_history_and_retry_failed(
    database_url: str,
    emulator: tuple[IterableEmulator, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    emu, url = emulator
    emu.invalid_emails.add("u1@x.com")
    data = config_data(database_url, url, logging={"level": "INFO"})
    config = write_config(tmp_path / "listsync.toml", data)
    with sync_context(Settings(**data)) as ctx:
        ingest(ctx, _enters("vip", range(3)) + _enters("churn", range(5, 7)))
        code, out, err = run_cli(capsys, config, "sync")
        assert code == 1, out
        headline = out.splitlines()[0]
        assert headline.startswith("run ") and " finished in " in headline and "4 subscribed; 0 unsubscribed; 1 failed" in headline
        # Printed once: the log line of a one-shot sync is DEBUG (another test in the same worker may
        # have left a logger at DEBUG, so what matters is that it is not an INFO line).
        assert "INFO listsync.sync: sync run" not in err
        rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:5]}
        # audience, requests, subscribed, unsubscribed, not_confirmed
        assert rows == {"audience": ["requests", "subscribed", "unsubscribed", "not_confirmed"],
                        "churn": ["1", "2", "0", "0"], "vip": ["1", "2", "0", "1"]}
        assert "iterable request POST /api/lists/subscribe: HTTP 200, 3 items" in err

        emu.invalid_emails.clear()
        code, out, _ = run_cli(capsys, config, "sync")
        assert code == 0 and "0 requests" in out  # a failure is final until asked
        code, out, _ = run_cli(capsys, config, "sync", "--retry-failed")
        assert code == 0 and "1 subscribed" in out, out
        assert member_rows(ctx, "vip")["u1"]["state"] == "synced"
        assert "u1@x.com" in emu.list_member_emails(emu.lists_named("vip")[0])

        code, out, _ = run_cli(capsys, config, "runs", "--json")
        assert code == 0
        history = json.loads(out)
        assert [r["trigger"] for r in history] == ["sync", "sync", "sync"]
        newest, _, first = history
        assert (first["requests"], first["members_changed"], first["failures"]) == (2, 4, 1)
        assert (newest["requests"], newest["members_changed"], newest["failures"]) == (1, 1, 0)
        assert first["duration_seconds"] >= 0 and first["started_at"].endswith("+00:00")
        code, out, _ = run_cli(capsys, config, "runs", "--limit", "1")
        assert out.splitlines()[0].split()[:4] == ["run_id", "started_at", "duration_seconds", "trigger"]
        assert len(out.splitlines()) == 2


def test_idle_daemon_ticks_leave_no_rows_and_no_info_lines(
    database_url: str, emulator: tuple[IterableEmulator, str], caplog: pytest.LogCaptureFixture
) -> None:
    _emu, url = emulator
    settings = Settings(**config_data(database_url, url))
    daemon = context.RunOptions(trigger="daemon")
    with sync_context(settings) as ctx:
        caplog.set_level(logging.INFO)
        for _ in range(3):
            assert sync.run_once(ctx, daemon).exit_code == 0
        assert _run_rows(ctx) == 0
        assert not [r for r in caplog.records if getattr(r, "event", None) == "run_finished" and r.levelno >= logging.INFO]

        ingest(ctx, _enters("vip", range(2)))
        sync.run_once(ctx, daemon)
        sync.run_once(ctx, daemon)
        assert _run_rows(ctx) == 1
        (finished,) = [r for r in caplog.records if getattr(r, "event", None) == "run_finished" and r.levelno >= logging.INFO]
        assert (finished.requests, finished.subscribed, finished.failed, finished.trigger) == (1, 2, 0, "daemon")  # type: ignore[attr-defined]
        assert finished.duration_s is not None and "1 requests; 2 subscribed" in finished.getMessage()  # type: ignore[attr-defined]
        with ctx.factory() as session:
            row = session.execute(text("SELECT * FROM run_history")).mappings().one()
        assert (row["requests"], row["members_changed"], row["trigger"]) == (1, 2, "daemon")


def _run_rows(ctx: context.SyncContext) -> int:
    with ctx.factory() as session:
        return int(session.scalar(text("SELECT count(*) FROM sync_runs")) or 0)
