"""What each CLI verb does, in terms of the engine. Kept apart from argument parsing so tests can
call the verbs directly and the parser stays a table."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from listsync import context, display, startup
from listsync.config import Settings
from listsync.db import backlog, runs, views
from listsync.db import session as dbs
from listsync.domain import utcnow
from listsync.iterable.client import client_from_settings
from listsync.sync import run_once


@contextmanager
def _database(settings: Settings, *, migrate: bool = True) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    if migrate:
        dbs.upgrade(settings.database_url)
    db_engine = dbs.make_engine(settings.database_url)
    try:
        yield db_engine, dbs.session_factory(db_engine)
    finally:
        db_engine.dispose()


@contextmanager
def sync_context(settings: Settings) -> Iterator[context.SyncContext]:
    with _database(settings) as (_engine, factory), client_from_settings(settings.iterable, keep_alive=settings.sync.max_in_flight) as client:
        yield context.SyncContext(settings=settings, factory=factory, client=client)


def daemon(settings: Settings, *, config_file: str | None = None) -> int:
    from listsync import daemon as daemon_module

    startup.log_startup("daemon", settings, config_file)
    startup.warn_dev_write_key(settings)
    return daemon_module.run(settings)


def sync(
    settings: Settings,
    *,
    allow_mass_unsubscribe: bool,
    recreate_missing_lists: bool,
    reconcile: bool,
    progress: bool,
    config_file: str | None = None,
    retry_failed: bool = False,
) -> int:
    from listsync.ingest import sources

    startup.log_startup("sync", settings, config_file)
    options = context.RunOptions(
        trigger="sync",
        allow_mass_unsubscribe=allow_mass_unsubscribe,
        recreate_missing_lists=recreate_missing_lists,
        reconcile=reconcile,
        retry_failed=retry_failed,
    )
    with sync_context(settings) as ctx:
        sources.poll_configured_sources(ctx.factory, settings)
        if progress:
            from listsync import progress as progress_display  # rich: only for the verbs that draw

            bars = progress_display.Display(terminal=sys.stderr.isatty())
            with bars.shown(), progress_display.SyncMonitor(ctx.factory, bars) as monitor:
                report = run_once(ctx, options, progress=monitor.advance)
        else:
            report = run_once(ctx, options)
        with ctx.factory() as session:
            breakdown = runs.audience_breakdown(session, report.run_id) if report.run_id else []
            duration = runs.duration_seconds(session, report.run_id) if report.run_id else None
    print(display.run_summary(report, breakdown, duration))
    return report.exit_code


def ingest(settings: Settings, path: str, *, progress: bool = True) -> int:
    from listsync.ingest import sources

    with _database(settings) as (_engine, factory):
        try:
            # The reading worker is forked here, before the progress display opens a connection
            # and starts its threads: a fork copies them.
            with sources.path_reader(factory, path) as store:
                if progress:
                    from listsync import progress as progress_display

                    bars = progress_display.Display(terminal=sys.stderr.isatty())
                    with bars.shown(), progress_display.IngestMonitor(factory, bars):
                        counts = store()
                else:
                    counts = store()
        except OSError as exc:
            print(f"listsync: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    print(f"accepted {counts.accepted}, duplicates {counts.duplicates}, rejected {counts.rejected}")
    return 0


STATUS_COLUMNS = [
    "audience_key",
    "list_id",
    "members",
    "synced_members",
    "pending_subscribe",
    "pending_unsubscribe",
    "failed",
    "last_synced_at",
    "list_state",
    "hold_reason",
]
PLAN_COLUMNS = ["audience_key", "list_id", "subscribe", "unsubscribe", "requests", "unsendable", "note"]


def status(settings: Settings, *, as_json: bool) -> int:
    startup.require_existing_database(settings.database_url)
    with _database(settings) as (_engine, factory), factory() as session:
        rows = views.audience_status(session)
        waiting = backlog.backlog(session)
    _print_rows(rows, STATUS_COLUMNS, as_json)
    if not as_json:
        print(display.backlog_line(waiting, actions_enabled=settings.actions.enabled))
    return 0


def plan(settings: Settings, *, as_json: bool, sample: int = 0) -> int:
    from listsync import preview

    startup.require_existing_database(settings.database_url)
    with sync_context(settings) as ctx:
        result = preview.plan(ctx, sample=sample)
    if as_json:
        print(json.dumps(result.as_json(), indent=2, default=str))
    else:
        print(display.plan_text(result, PLAN_COLUMNS))
    return 0


def run_history(settings: Settings, *, as_json: bool, limit: int, trigger: str | None) -> int:
    startup.require_existing_database(settings.database_url)
    with _database(settings) as (_engine, factory), factory() as session:
        rows = runs.history(session, limit=limit, trigger=trigger)
    print(json.dumps(rows, indent=2, default=str) if as_json else display.runs_table(rows))
    return 0


def _print_rows(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(display.table(rows, columns, "(no audiences yet)"))


def db(settings: Settings, action: str) -> int:
    if action == "upgrade":
        dbs.upgrade(settings.database_url)
        print("database is at the latest schema revision")
        return 0
    if action == "prune":
        return _prune(settings)
    from alembic import command

    command.current(dbs.alembic_config(settings.database_url))
    return 0


def _prune(settings: Settings) -> int:

    from listsync.db import retention

    startup.require_existing_database(settings.database_url)
    with _database(settings) as (_engine, factory):
        pruned = retention.prune(
            factory, settings.retention, utcnow(), actions_enabled=settings.actions.enabled
        )
    print(f"pruned {pruned.text()}")
    return 0


