"""GET /health/live and GET /health: liveness apart from readiness, and each degraded state with its
reason (API key refused, database unwritable, sync lag); the operator gauges of /metrics."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from starlette.testclient import TestClient

from listsync import context, health, sync
from listsync.config import Settings
from listsync.ingest.receiver import build_app
from listsync.lists.apply import apply_all
from tests.emulator import IterableEmulator
from tests.helpers import audience_event, ingest, sync_context
from tests.integration.test_cli import config_data


def _enters(count: int) -> list[dict[str, object]]:
    return [audience_event("vip", inside=True, user_id=f"u{i}", email=f"u{i}@x.com", at=1) for i in range(count)]


@pytest.fixture
def ready_ctx(database_url: str, emulator: tuple[IterableEmulator, str]) -> Iterator[context.SyncContext]:
    _emu, url = emulator
    with sync_context(Settings(**config_data(database_url, url))) as ctx:
        yield ctx


def _client(ctx: context.SyncContext) -> TestClient:
    return TestClient(build_app(ctx.settings, ctx.factory))


def test_ok_then_api_key_refused_with_its_reason(ready_ctx: context.SyncContext) -> None:
    with _client(ready_ctx) as client:
        assert client.get("/health/live").json() == {"status": "ok"}
        answer = client.get("/health")
        assert answer.status_code == 200 and answer.json() == {"status": "ok", "degraded": [], "reasons": {}}

    wrong = ready_ctx.settings.model_copy(deep=True)
    wrong.iterable.api_key = type(wrong.iterable.api_key)("not-the-key")
    ingest(ready_ctx, _enters(2))
    with sync_context(wrong) as refused:
        assert sync.run_once(refused).exit_code == 2
    with _client(ready_ctx) as client:
        answer = client.get("/health")
    body = answer.json()
    assert answer.status_code == 200  # events are still stored: the receiver stays in rotation
    assert body["status"] == "api_key_refused" and "refused" in body["reasons"]["api_key_refused"]
    assert "not-the-key" not in answer.text
    assert sync.run_once(ready_ctx).exit_code == 0  # the right key again: healthy again
    with _client(ready_ctx) as client:
        assert client.get("/health").json()["status"] == "ok"


def test_sync_lag_beyond_the_threshold(ready_ctx: context.SyncContext) -> None:
    ingest(ready_ctx, _enters(3))
    now = datetime.now(UTC)
    assert health.check(ready_ctx.factory, ready_ctx.settings, now).status == "ok"
    later = health.check(ready_ctx.factory, ready_ctx.settings, now + timedelta(hours=1))
    assert later.status == "sync_lag" and later.ready and "max_sync_lag_seconds = 900" in later.reasons["sync_lag"]
    apply_all(ready_ctx)  # folded but not sent: the members wait now
    assert health.check(ready_ctx.factory, ready_ctx.settings, now + timedelta(hours=1)).status == "sync_lag"
    assert sync.run_once(ready_ctx).exit_code == 0
    assert health.check(ready_ctx.factory, ready_ctx.settings, now + timedelta(hours=1)).status == "ok"


def test_deleted_sqlite_file_is_not_ready(ready_ctx: context.SyncContext) -> None:
    url = make_url(ready_ctx.settings.database_url)
    if url.get_backend_name() != "sqlite":
        pytest.skip("a file to delete is SQLite's")
    with _client(ready_ctx) as client:
        assert client.get("/health").status_code == 200
        os.remove(str(url.database))
        answer = client.get("/health")
        assert client.get("/health/live").status_code == 200
    assert answer.status_code == 503
    assert answer.json()["status"] == "database_unwritable" and "no longer exists" in answer.text


def test_metrics_report_last_success_delivery_backlog_and_failures(ready_ctx: context.SyncContext) -> None:
    ingest(ready_ctx, _enters(2))
    ingest(ready_ctx, [{"type": "identify", "messageId": "p1", "userId": "p1", "traits": {"email": "p1@x.com"},
                        "timestamp": "2026-01-01T00:00:00Z"}])
    with _client(ready_ctx) as client:
        before = client.get("/metrics").text
        assert "listsync_last_successful_run_timestamp_seconds 0.0" in before
        assert sync.run_once(ready_ctx).exit_code == 0
        after = client.get("/metrics").text
    stamp = next(line for line in after.splitlines() if line.startswith("listsync_last_successful_run_timestamp"))
    assert abs(float(stamp.split()[1]) - datetime.now(UTC).timestamp()) < 600
    assert 'listsync_event_deliveries{state="pending"} 0.0' in after
    assert 'listsync_event_deliveries{state="failed"} 0.0' in after
    assert "listsync_last_run_failed 0.0" in after


def test_example_alerts_and_dashboard_use_only_metrics_that_exist(ready_ctx: context.SyncContext) -> None:
    docs = Path(__file__).resolve().parents[2] / "docs"
    used = set()
    for name in ("prometheus-alerts.yml", "grafana-dashboard.json", "deploy.md"):
        used |= set(re.findall(r"listsync_[a-z_]+", (docs / name).read_text()))
    with _client(ready_ctx) as client:
        exposed = client.get("/metrics").text
    assert used and {name for name in used if name not in exposed} == set()
