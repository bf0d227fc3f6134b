"""Folding the inbox into memberships (`lists.apply.apply_all`), against the bare wire.

For each database: N Engage "Audience Entered" tracks are accepted into the inbox (the real
`accept.accept_items`, timed as "ingest"), then folded (the first fold: every member is new). The
members are then marked as synced (as a finished first sync leaves them), 10% of them exit, and the
exits are folded (the re-fold). The bare wire is the fewest `lists/subscribe` calls for N members
posted back to back on one keep-alive connection to the emulator (its own process), in the same run.
Wall times are printed with this process's CPU time beside them (`*_cpu_s`): on a shared machine
the wall time also measures the neighbours. PostgreSQL's own CPU is not in `*_cpu_s`.

    python -m bench.bench_fold [--members N] [--changes 0.1] [--db sqlite|postgresql|both]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text, update

from bench import wire
from bench.harness import emulator
from listsync.db import models as m
from listsync.db import session as dbs
from listsync.ingest import accept, extract
from listsync.lists.apply import apply_all
from tests.helpers import make_settings, sync_context

AUDIENCE = "bench_fold"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
INGEST_CHUNK = 5000


def events(start: int, stop: int, *, entered: bool, at: int) -> list[extract.BodyItem]:
    stamp = (T0 + timedelta(seconds=at)).isoformat().replace("+00:00", "Z")
    name = "Audience Entered" if entered else "Audience Exited"
    items: list[extract.BodyItem] = []
    for i in range(start, stop):
        raw = {
            "type": "track",
            "event": name,
            "messageId": f"{name[9]}-{at}-{i}",
            "timestamp": stamp,
            "userId": f"user-{i}",
            "properties": {"audience_key": AUDIENCE, AUDIENCE: entered, "email": f"user{i}@example.com"},
            "context": {"personas": {"computation_class": "audience", "computation_key": AUDIENCE}},
        }
        items.append(extract.RawEvent(raw, None))
    return items


def ingest(factory: Any, ids: range, *, entered: bool, at: int) -> float:
    started = time.perf_counter()
    for lo in range(ids.start, ids.stop, INGEST_CHUNK):
        batch = events(lo, min(ids.stop, lo + INGEST_CHUNK), entered=entered, at=at)
        with dbs.transaction(factory) as session:
            accept.accept_items(session, batch, source="bench", now=datetime.now(UTC))
    return time.perf_counter() - started


def mark_synced(factory: Any) -> None:
    table = m.table(m.Membership)
    with dbs.transaction(factory) as session:
        session.execute(
            update(table).values(
                synced="in", synced_email=table.c.email, synced_user_id=table.c.user_id, state="synced"
            )
        )


def counts(factory: Any) -> dict[str, int]:
    table = m.table(m.Membership)
    with dbs.transaction(factory) as session:
        rows = session.execute(select(table.c.desired, table.c.state, func.count()).group_by(table.c.desired, table.c.state)).all()
    return {f"{d}/{s}": n for d, s, n in rows}


def measure(url: str, members: int, changes: float) -> dict[str, Any]:
    dbs.upgrade(url)
    settings = make_settings(url, "http://127.0.0.1:9")
    with sync_context(settings) as ctx:
        ingest_s = ingest(ctx.factory, range(members), entered=True, at=0)
        started, cpu = time.perf_counter(), time.process_time()
        apply_all(ctx)
        first_s, first_cpu = time.perf_counter() - started, time.process_time() - cpu
        first = counts(ctx.factory)
        mark_synced(ctx.factory)
        exits = int(members * changes)
        ingest(ctx.factory, range(exits), entered=False, at=60)
        started, cpu = time.perf_counter(), time.process_time()
        apply_all(ctx)
        refold_s, refold_cpu = time.perf_counter() - started, time.process_time() - cpu
        second = counts(ctx.factory)
    return {
        "ingest_s": round(ingest_s, 2),
        "first_fold_s": round(first_s, 2),
        "first_fold_us_per_member": round(first_s / members * 1e6, 1),
        "first_fold_cpu_s": round(first_cpu, 2),
        "first_fold_members_per_s": round(members / first_s),
        "refold_changes": exits,
        "refold_s": round(refold_s, 3),
        "refold_us_per_change": round(refold_s / max(exits, 1) * 1e6, 1),
        "refold_cpu_s": round(refold_cpu, 3),
        "after_first": first,
        "after_refold": second,
    }


def bare_wire(members: int) -> float:
    """Seconds to post the fewest subscribe calls for `members` back to back on one connection."""
    with emulator() as base:
        return float(wire.bare_wire(base, members)["seconds"])


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'fold.db'}"
        return
    from sqlalchemy import create_engine

    from tests import pg

    with pg.postgres_url() as server:
        admin = create_engine(server, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS bench_fold"))
            conn.execute(text("CREATE DATABASE bench_fold"))
        admin.dispose()
        yield server.rsplit("/", 1)[0] + "/bench_fold"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--changes", type=float, default=0.1)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args()
    wire = bare_wire(args.members)
    print(f"bare wire: {args.members} members in {wire:.2f} s ({wire / args.members * 1e6:.1f} us/member)")
    for kind in ["sqlite", "postgresql"] if args.db == "both" else [args.db]:
        with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp)) as url:
            result = measure(url, args.members, args.changes)
        result["first_fold_per_wire"] = round(result["first_fold_s"] / wire, 2)
        result["ingest_plus_fold_per_wire"] = round((result["ingest_s"] + result["first_fold_s"]) / wire, 2)
        print(kind, json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
