"""listsync benchmarks: `python -m bench.run` (add `--quick` for a smaller, faster pass).

Each measurement runs in its own child process so its peak memory (ru_maxrss) is its own, and
prints one JSON line; this parent collects them into a table with the machine it ran on. Ratios
are taken within one run (requests sent vs the fewest possible), not against a stored baseline.

PostgreSQL figures use a throwaway local cluster (tests/pg.py) with fsync off, as the tests do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from listsync import context, sync  # noqa: E402
from listsync.config import Settings  # noqa: E402
from listsync.db import models as m  # noqa: E402
from listsync.db import session as dbs  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def settings_for(url: str, base_url: str = "", api_key: str = "") -> Settings:
    return Settings(database_url=url, iterable={"api_key": api_key, "base_url": base_url,
                                                "rate_limits": {"POST /api/lists/subscribe": 100000.0}},
                    receiver={"write_keys": ["bench-key"], "port": 0})


def populate(url: str, members: int, audience: str = "bench") -> None:
    """`members` pending subscribes in one audience, written straight into the tables."""
    dbs.upgrade(url)
    engine = dbs.make_engine(url)
    table = m.Membership.__table__
    with engine.begin() as conn:
        conn.execute(m.Audience.__table__.insert(), [{"audience_key": audience, "list_state": "pending",
                                                       "settings": {}, "created_at": T0, "updated_at": T0}])
        audience_id = conn.execute(m.Audience.__table__.select()).first()[0]  # type: ignore[index]
    chunk = 50_000
    for start in range(0, members, chunk):
        rows = [{"audience_id": audience_id, "user_id": f"user-{i}", "email": f"user{i}@example.com",
                 "desired": "in", "desired_at": T0 + timedelta(seconds=i), "desired_message_id": f"m{i}",
                 "data_fields": None, "synced": None, "synced_email": None, "synced_user_id": None,
                 "state": "pending", "attempts": 0, "created_at": T0, "updated_at": T0}
                for i in range(start, min(members, start + chunk))]
        with engine.begin() as conn:
            conn.execute(table.insert(), rows)
    engine.dispose()


# --- measurements (each runs in a child) -------------------------------------------------------


def measure_ingest(url: str, events: int) -> dict[str, Any]:
    """Durable ingest through the HTTP receiver: 4 senders, batches of 100, gzip off."""
    import httpx

    from listsync.ingest.receiver import ReceiverServer

    dbs.upgrade(url)
    engine = dbs.make_engine(url)
    server = ReceiverServer.for_settings(settings_for(url), dbs.session_factory(engine))
    server.start()
    batches = [[{"type": "track", "event": "Audience Entered", "userId": f"u{i}", "messageId": f"b-{i}",
                 "properties": {"audience_key": "bench", "bench": True}} for i in range(s, s + 100)]
               for s in range(0, events, 100)]

    def send(part: list[list[dict[str, Any]]]) -> None:
        with httpx.Client(base_url=server.url, auth=("bench-key", "")) as client:
            for batch in part:
                client.post("/v1/batch", json={"batch": batch}).raise_for_status()

    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(batches[k::4],)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    server.stop()
    engine.dispose()
    return {"events": events, "seconds": round(elapsed, 2), "events_per_s": round(events / elapsed)}


def measure_plan(url: str, members: int) -> dict[str, Any]:
    """Read every pending member page by page and plan its batches (dry run: nothing sent)."""
    settings = settings_for(url)
    engine = dbs.make_engine(url)
    from listsync.iterable.client import client_from_settings

    with client_from_settings(settings.iterable) as client:
        ctx = context.SyncContext(settings=settings, factory=dbs.session_factory(engine), client=client)
        started = time.perf_counter()
        rows = sync.preview(ctx)
        elapsed = time.perf_counter() - started
    engine.dispose()
    planned = sum(int(r["subscribe"]) for r in rows)
    return {"members": members, "planned": planned, "requests": sum(int(r["requests"]) for r in rows),
            "seconds": round(elapsed, 2), "members_per_s": round(planned / elapsed), "peak_mb": round(peak_mb())}


def measure_sync(url: str, members: int) -> dict[str, Any]:
    """Plan, send and record every member against the emulator at zero latency. The emulator runs
    in its own process, so the peak memory is listsync's alone."""
    import httpx

    from listsync.iterable.client import client_from_settings

    with emulator_process() as base_url:
        settings = settings_for(url, base_url, "bench")
        engine = dbs.make_engine(url)
        with client_from_settings(settings.iterable) as client:
            ctx = context.SyncContext(settings=settings, factory=dbs.session_factory(engine), client=client)
            started = time.perf_counter()
            report = sync.run_once(ctx)
            elapsed = time.perf_counter() - started
            list_id = next(lst.id for lst in client.get_lists() if lst.name == "bench")
        engine.dispose()
        users = httpx.get(f"{base_url}/api/lists/getUsers", params={"listId": list_id},
                          headers={"Api-Key": "bench"}, timeout=120).text.split()
    minimum = math.ceil(members / 1000)
    sent = report.requests  # subscribe and unsubscribe calls (list lookups are not counted)
    return {"members": members, "subscribe_requests": sent, "minimum": minimum, "ratio": round(sent / minimum, 3),
            "exact": len(users) == members, "seconds": round(elapsed, 2),
            "changes_per_s": round(report.subscribed / elapsed), "peak_mb": round(peak_mb())}


@contextmanager
def emulator_process():  # type: ignore[no-untyped-def]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.emulator", "--port", str(port), "--api-key", "bench",
                             "--no-rate-limits"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "listening on ..."
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure_sql_mirror(url: str, rows: int) -> dict[str, Any]:
    """The SQL source: a warehouse table mirrored once (every row an enter delta), folded, then
    polled again with 1% of the rows changed (0.5% gone, 0.5% new): the steady state a
    reverse-ETL user runs every few minutes."""
    import sqlite3

    from listsync.ingest import sql_source

    source_path = Path(tempfile.mkdtemp(prefix="bench-src-")) / "warehouse.db"
    with sqlite3.connect(source_path) as conn:
        conn.execute("CREATE TABLE audience_members (audience_key TEXT, user_id TEXT, email TEXT, plan TEXT)")
        conn.executemany("INSERT INTO audience_members VALUES ('warehouse', ?, ?, 'gold')",
                         ((f"user-{i}", f"user{i}@example.com") for i in range(rows)))
    dbs.upgrade(url)
    settings = settings_for(url)
    engine = dbs.make_engine(url)
    factory = dbs.session_factory(engine)
    query = "SELECT audience_key, user_id, email, plan FROM audience_members"
    source = f"sqlite:///{source_path}"

    def poll() -> tuple[float, Any]:
        started = time.perf_counter()
        counts = sql_source.poll_sql(factory, source, query, settings, lambda: datetime.now(UTC))
        return time.perf_counter() - started, counts

    first, counts = poll()
    started = time.perf_counter()
    sql_source.poll_sql(factory, source, "SELECT audience_key, user_id, email, plan FROM audience_members WHERE 0",
                     settings, lambda: datetime.now(UTC))  # drains (folds) the first poll's events
    fold = time.perf_counter() - started
    changed = max(1, rows // 200)
    with sqlite3.connect(source_path) as conn:
        conn.execute(f"DELETE FROM audience_members WHERE rowid <= {changed}")
        conn.executemany("INSERT INTO audience_members VALUES ('warehouse', ?, ?, 'gold')",
                         ((f"new-{i}", f"new{i}@example.com") for i in range(changed)))
    again, recounts = poll()
    engine.dispose()
    return {"rows": rows, "entered": counts.entered, "seconds": round(first, 2),
            "rows_per_s": round(rows / first), "fold_seconds": round(fold, 2),
            "repoll_seconds": round(again, 2), "repoll_entered": recounts.entered,
            "repoll_exited": recounts.exited, "peak_mb": round(peak_mb())}


MEASUREMENTS: dict[str, Callable[[str, int], dict[str, Any]]] = {
    "ingest": measure_ingest, "plan": measure_plan, "sync": measure_sync, "sql_mirror": measure_sql_mirror,
}


# --- the parent: databases, children, the table ---------------------------------------------


@contextmanager
def database(kind: str, tmp: Path, name: str):  # type: ignore[no-untyped-def]
    if kind == "sqlite":
        yield f"sqlite:///{tmp / (name + '.db')}"
        return
    from sqlalchemy import create_engine, text

    server = os.environ["BENCH_PG_URL"]
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    yield server.rsplit("/", 1)[0] + "/" + name


def child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "bench.run", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_all(quick: bool) -> list[tuple[str, str, dict[str, Any]]]:
    sizes = {"ingest": 20_000 if quick else 50_000, "plan": [100_000] if quick else [1_000_000, 10_000_000],
             "sync": 100_000 if quick else 1_000_000, "sql_mirror": 100_000 if quick else 1_000_000}
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="listsync-bench-"))
    for kind in ("sqlite", "postgresql"):
        with database(kind, tmp, "ingest") as url:
            results.append(("ingest", kind, child(["--one", "ingest", url, str(sizes["ingest"])])))
    for size in sizes["plan"]:  # type: ignore[union-attr]
        with database("sqlite", tmp, f"plan{size}") as url:
            populate(url, size)
            results.append(("plan", "sqlite", child(["--one", "plan", url, str(size)])))
    with database("sqlite", tmp, "sync") as url:
        populate(url, sizes["sync"])  # type: ignore[arg-type]
        results.append(("sync", "sqlite", child(["--one", "sync", url, str(sizes["sync"])])))
    with database("sqlite", tmp, "mirror") as url:
        results.append(("sql_mirror", "sqlite", child(["--one", "sql_mirror", url, str(sizes["sql_mirror"])])))
    return results


def machine() -> str:
    cpus = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {cpus} cores, {memory:.0f} GiB, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("NAME", "URL", "SIZE"))
    args = parser.parse_args()
    if args.one:
        name, url, size = args.one
        print(json.dumps(MEASUREMENTS[name](url, int(size))))
        return 0
    from tests import pg

    with pg.local_cluster() as pg_url:
        os.environ["BENCH_PG_URL"] = pg_url
        results = run_all(args.quick)
    print(f"listsync benchmarks on {machine()}, {datetime.now(UTC):%Y-%m-%d}")
    print(f"{'measure':<11} {'db':<11} figures")
    for name, kind, figures in results:
        print(f"{name:<11} {kind:<11} " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
