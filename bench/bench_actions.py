"""Per-event actions, phase by phase and in-process: N events (bench.actions' Upsert User + Custom
Event halves) stored once in the inbox, then on copies of that database (1) routing alone
(`route.route_all`: CPU and wall time, microseconds per event) and (2) `delivery.deliver_pending`
(route + send + record) against the Iterable emulator in its own process with Iterable's rate
limits, beside the time those limits allow (bench.actions.allowed_seconds). The lists' fold of the
same inbox is timed too with `--fold` (it runs before delivery in `listsync sync`).

    python -m bench.bench_actions [--events N] [--db sqlite postgresql] [--fold]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench import actions as family
from bench.harness import API_KEY, emulator
from listsync.db import session as dbs
from listsync.events import delivery, route
from listsync.ingest import accept, extract
from listsync.lists.apply import apply_all
from tests.helpers import make_settings, sync_context


def populate(url: str, n: int) -> None:
    dbs.upgrade(url)
    settings = make_settings(url)
    with sync_context(settings) as ctx:
        batch: list[extract.RawEvent] = []
        for event in family.events(n):
            batch.append(extract.RawEvent(raw=event, size=len(json.dumps(event))))
            if len(batch) == 5000:
                _accept(ctx.factory, batch)
                batch = []
        _accept(ctx.factory, batch)


def _accept(factory: Any, batch: list[extract.RawEvent]) -> None:
    with dbs.transaction(factory) as session:
        accept.accept_items(session, batch, source="bench", now=datetime.now(UTC))


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure(url: str, base_url: str, n: int, *, send: bool, fold: bool) -> dict[str, Any]:
    settings = make_settings(url, base_url, api_key=API_KEY, sync={"retry_base_seconds": 0.05})
    out: dict[str, Any] = {}
    with sync_context(settings) as ctx:
        if fold:
            _, out["fold_s"], out["fold_cpu_s"] = timed(lambda: apply_all(ctx))
        if not send:
            counts, wall, cpu = timed(lambda: route.route_all(ctx, settings.actions.compiled(), ctx.clock))
            out.update(routed=counts.routed, route_s=round(wall, 2), route_cpu_s=round(cpu, 2),
                       route_us_per_event=round(1e6 * cpu / max(1, counts.routed), 1))
            return out
        report, wall, cpu = timed(lambda: delivery.deliver_pending(ctx))
    half = n // 2
    allowed = max(family.allowed_seconds({"identify": half, "track": half}).values())
    out.update(delivered=report.delivered, failed=report.failed, requests=report.requests,
               deliver_s=round(wall, 2), deliver_cpu_s=round(cpu, 2), allowed_s=allowed,
               share_of_allowed=round(allowed / wall, 2))
    return out


@contextlib.contextmanager
def template(kind: str, pg_server: str | None, n: int) -> Iterator[Callable[[str], str]]:
    """Populate once; yields `copy(name) -> url` of a fresh copy of the populated database."""
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "sqlite":
            source = Path(tmp) / "template.db"
            populate(f"sqlite:///{source}", n)

            def copy_sqlite(name: str) -> str:
                target = Path(tmp) / f"{name}.db"
                shutil.copyfile(source, target)
                return f"sqlite:///{target}"

            yield copy_sqlite
            return
        assert pg_server is not None
        admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
        base = pg_server.rsplit("/", 1)[0]
        with admin.connect() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS bench_actions_template"))
            conn.execute(text("CREATE DATABASE bench_actions_template"))
        populate(f"{base}/bench_actions_template", n)

        def copy_pg(name: str) -> str:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
                conn.execute(text(f"CREATE DATABASE {name} TEMPLATE bench_actions_template"))
            return f"{base}/{name}"

        try:
            yield copy_pg
        finally:
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--db", nargs="+", default=["sqlite"])
    parser.add_argument("--fold", action="store_true", help="also time the lists' fold of the inbox first")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    with contextlib.ExitStack() as stack:
        pg = None
        if "postgresql" in args.db:
            from tests.pg import postgres_url

            pg = stack.enter_context(postgres_url())
        for kind in args.db:
            with template(kind, pg, args.events) as copy, emulator(rate_limits=True) as base_url:
                routed = measure(copy("bench_actions_route"), base_url, args.events, send=False, fold=args.fold)
                sent = measure(copy("bench_actions_send"), base_url, args.events, send=True, fold=args.fold)
                print(json.dumps({"db": kind, "events": args.events, **routed, **sent}), flush=True)


if __name__ == "__main__":
    main()
