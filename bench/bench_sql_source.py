"""The SQL source (reverse ETL) at volume: a warehouse SQLite file of N rows (audience_key, user_id,
email, one trait) mirrored into a fresh listsync database, then polled again with 1% of the rows
changed (half gone, half new), the steady state a reverse-ETL user runs every few minutes.

    python -m bench.bench_sql_source [--rows N] [--db sqlite|postgresql] [--audiences K]

Prints, per phase, seconds and rows/s: the first poll (snapshot, diff, events stored), the fold of
its events into memberships (`apply_inbox`, the lists pipeline's first step), the first mirror as
their sum, the re-poll, and the fold of the re-poll's events. PostgreSQL runs on a throwaway
cluster (tests/pg.py: fsync off, as the tests do).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from listsync.config import Settings
from listsync.db import session as dbs
from listsync.ingest import sql_source
from listsync.lists.apply import apply_inbox

QUERY = "SELECT audience_key, user_id, email, plan FROM members"


def make_warehouse(path: Path, rows: int, audiences: int) -> str:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE members (audience_key TEXT, user_id TEXT, email TEXT, plan TEXT)")
        conn.executemany(
            "INSERT INTO members VALUES (?, ?, ?, 'gold')",
            ((f"aud_{i % audiences}", f"user-{i}", f"user{i}@example.com") for i in range(rows)),
        )
    return f"sqlite:///{path}"


def change_one_percent(path: Path, rows: int, audiences: int) -> int:
    """Half a percent of the rows leave, as many new ones arrive; returns how many of each."""
    changed = max(1, rows // 200)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM members WHERE rowid <= ?", (changed,))
        conn.executemany(
            "INSERT INTO members VALUES (?, ?, ?, 'gold')",
            ((f"aud_{i % audiences}", f"new-{i}", f"new{i}@example.com") for i in range(changed)),
        )
    return changed


@contextlib.contextmanager
def listsync_database(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'listsync.db'}"
        return
    from tests import pg

    with pg.postgres_url() as server:
        admin = create_engine(server, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS bench_sql_source"))
            conn.execute(text("CREATE DATABASE bench_sql_source"))
        admin.dispose()
        yield server.rsplit("/", 1)[0] + "/bench_sql_source"


CPU: dict[str, float] = {}


def timed(fn: Callable[[], Any], name: str) -> tuple[float, Any]:
    """Wall seconds and result of fn(); its CPU seconds in this process (all its threads; on
    PostgreSQL the server's are not counted) go to CPU[name] (on a shared machine the wall time
    depends on the neighbours, the CPU time much less). Printed as soon as measured, so a long
    run that is stopped still says what it measured."""
    started, cpu = time.perf_counter(), time.process_time()
    result = fn()
    CPU[name] = round(time.process_time() - cpu, 2)
    wall = time.perf_counter() - started
    print(f"  {name.removesuffix('_cpu_s')}: {wall:.2f} s wall, {CPU[name]} s CPU", file=sys.stderr, flush=True)
    return wall, result


def fold(factory: Any, settings: Settings) -> int:
    """Fold every inbox event into memberships, as the lists pipeline's first step does."""
    total = 0
    while True:
        with dbs.transaction(factory) as session:
            applied = apply_inbox(session, settings, datetime.now(UTC))
        if applied == 0:
            return total
        total += applied


def run(kind: str, rows: int, audiences: int, first_only: bool = False) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-sql-source-"))
    warehouse = make_warehouse(tmp / "warehouse.db", rows, audiences)
    with listsync_database(kind, tmp) as url:
        dbs.upgrade(url)
        settings = Settings(database_url=url)
        engine = dbs.make_engine(url)
        factory = dbs.session_factory(engine)

        def poll() -> sql_source.SqlSyncCounts:
            return sql_source.poll_sql(factory, warehouse, QUERY, settings, lambda: datetime.now(UTC))

        first_s, first = timed(poll, "first_poll_cpu_s")
        if first_only:
            engine.dispose()
            assert (first.entered, first.exited, first.invalid) == (rows, 0, 0), first
            return {
                "db": kind,
                "rows": rows,
                "first_poll_s": round(first_s, 2),
                "first_poll_rows_per_s": round(rows / first_s),
                **CPU,
            }
        fold_s, _ = timed(lambda: fold(factory, settings), "first_fold_cpu_s")
        changed = change_one_percent(tmp / "warehouse.db", rows, audiences)
        again_s, again = timed(poll, "repoll_cpu_s")
        refold_s, _ = timed(lambda: fold(factory, settings), "repoll_fold_cpu_s")
        engine.dispose()
    assert (first.entered, first.exited, first.invalid) == (rows, 0, 0), first
    assert (again.entered, again.exited) == (changed, changed), again
    return {
        "db": kind,
        "rows": rows,
        "first_poll_s": round(first_s, 2),
        "first_fold_s": round(fold_s, 2),
        "first_mirror_s": round(first_s + fold_s, 2),
        "first_mirror_rows_per_s": round(rows / (first_s + fold_s)),
        "first_poll_rows_per_s": round(rows / first_s),
        "repoll_s": round(again_s, 2),
        "repoll_rows_per_s": round(rows / again_s),
        "repoll_fold_s": round(refold_s, 2),
        "repoll_changes": 2 * changed,
        **CPU,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--audiences", type=int, default=1)
    parser.add_argument(
        "--first-only", action="store_true", help="the first poll alone (no fold, no re-poll)"
    )
    args = parser.parse_args()
    figures = run(args.db, args.rows, args.audiences, args.first_only)
    if args.first_only:
        print(json.dumps(figures))
        return
    print(
        f"{figures['db']} {figures['rows']:,} rows: first poll {figures['first_poll_s']} s "
        f"({figures['first_poll_rows_per_s']:,} rows/s) + fold {figures['first_fold_s']} s = first mirror "
        f"{figures['first_mirror_s']} s ({figures['first_mirror_rows_per_s']:,} rows/s); re-poll with 1% "
        f"changed {figures['repoll_s']} s ({figures['repoll_rows_per_s']:,} rows/s) + fold "
        f"{figures['repoll_fold_s']} s; CPU s: first poll {figures['first_poll_cpu_s']}, re-poll "
        f"{figures['repoll_cpu_s']}",
        file=sys.stderr,
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
