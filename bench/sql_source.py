"""The SQL source (`[sources.sql]`): a warehouse table of N members mirrored by `listsync sync`
(every row an enter), then, with 1% of the rows changed (0.5% gone, 0.5% new), polled again: the
steady state a reverse-ETL user runs every few minutes.

Each `listsync sync` polls the source once and then folds and sends; the poll's own time is read
from the JSON log lines the command writes (`source_poll` when it starts, `sql_source_polled`
when its deltas are stored), the rest from the process's wall time. The warehouse is a SQLite
file whatever the database under test.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import (
    Result,
    Row,
    Run,
    Step,
    audience_status,
    emulator,
    listsync,
    num,
    rate,
    secs,
    settings,
)

AUDIENCE = "bench_sql"
QUERY = f"SELECT '{AUDIENCE}' AS audience_key, user_id, email, plan FROM members"
FIRST_TARGET_S = 20.0
REPOLL_TARGET_S = 15.0
TARGET_ROWS = 1_000_000


def warehouse(path: Path, rows: int) -> None:
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE members (user_id TEXT, email TEXT, plan TEXT)")
        conn.executemany("INSERT INTO members VALUES (?, ?, 'gold')",
                         ((f"user-{i}", f"user{i}@example.com") for i in range(rows)))
    conn.close()


def change_one_percent(path: Path, rows: int) -> int:
    """Delete the first 0.5% of the rows and add as many new ones; returns how many of each."""
    changed = max(1, rows // 200)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM members WHERE rowid <= ?", (changed,))
        conn.executemany("INSERT INTO members VALUES (?, ?, 'gold')",
                         ((f"new-{i}", f"new{i}@example.com") for i in range(changed)))
    conn.close()
    return changed


def poll_of(step: Step) -> dict[str, Any]:
    """The poll's seconds and counts, from the JSON log lines of one `listsync sync`."""
    started = polled = None
    counts: dict[str, Any] = {}
    for line in step.stderr.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event") == "source_poll" and entry.get("source") == "sql":
            started = datetime.fromisoformat(entry["time"])
        elif entry.get("event") == "sql_source_polled":
            polled = datetime.fromisoformat(entry["time"])
            counts = {k: entry.get(k) for k in ("rows", "entered", "exited", "held")}
    if started is None or polled is None:
        raise RuntimeError("no source_poll / sql_source_polled log lines: the SQL source did not run")
    return {"poll_s": (polled - started).total_seconds(), **counts, "sync_s": step.seconds,
            "peak_mb": step.peak_mb}


def measure(run: Run) -> Result:
    n = run.members
    source = run.dbs.tmp / "warehouse.db"
    warehouse(source, n)
    db = run.dbs.fresh("sql_source")
    with emulator() as base_url:
        config = run.config("sql_source", settings(
            db, base_url, sources={"sql": {"url": f"sqlite:///{source}", "query": QUERY}},
            logging={"level": "INFO"}))
        first = poll_of(listsync("sync", "--no-progress", config=config, timeout=run.timeout))
        _check(db, n)
        changed = change_one_percent(source, n)
        again = poll_of(listsync("sync", "--no-progress", config=config, timeout=run.timeout))
        _check(db, n)
    if (again["entered"], again["exited"]) != (changed, changed):
        raise RuntimeError(f"re-poll: expected {changed} enters and exits, the log says {again}")
    raw = {"rows": n, "first": first, "changed_each_way": changed, "repoll": again}
    return Result(_rows(raw), raw)


def _check(db: str, n: int) -> None:
    status = audience_status(db, AUDIENCE)
    if status.get("members") != n or status.get("synced_members") != n:
        raise RuntimeError(f"expected {n} members synced, the audience_status view says {status}")


def _rows(raw: dict[str, Any]) -> list[Row]:
    n, first, again = raw["rows"], raw["first"], raw["repoll"]
    scale = TARGET_ROWS / n
    first_at = first["poll_s"] * scale
    again_at = again["poll_s"] * scale
    note = "" if scale == 1 else " (extrapolated linearly)"
    return [
        Row(f"SQL source, first mirror of {num(n)} rows: the poll", f"{secs(first['poll_s'])} "
            f"({num(rate(n, first['poll_s']))} rows/s)", f"{secs(first_at)} at 1,000,000 rows{note}",
            f"< {FIRST_TARGET_S:.0f} s at 1,000,000 rows", first_at < FIRST_TARGET_S),
        Row("SQL source, first mirror: the whole `listsync sync` (poll, fold, send)", secs(first["sync_s"]),
            f"peak {first['peak_mb']:.0f} MB"),
        Row(f"SQL source, re-poll of {num(n)} rows with 1% changed: the poll", secs(again["poll_s"]),
            f"{secs(again_at)} at 1,000,000 rows{note}", f"< {REPOLL_TARGET_S:.0f} s at 1,000,000 rows",
            again_at < REPOLL_TARGET_S),
        Row("SQL source, re-poll: the whole `listsync sync`", secs(again["sync_s"]), f"peak {again['peak_mb']:.0f} MB"),
    ]
