"""Send + record against the bare wire: N pending members (rows written straight into memberships)
synced by `sync.run_once` to an Iterable emulator in its own process, then the minimum subscribe
calls for the same members posted back to back on one keep-alive httpx connection to the same
emulator. Prints both times and their ratios, on SQLite and PostgreSQL, at zero latency and with
`--latency-ms` added to every answer (the emulator's delay fault on every request).

    python -m bench.bench_send [--members N] [--latency-ms 0 50] [--db sqlite postgresql]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from listsync import sync
from listsync.db import models as m
from listsync.db import session as dbs
from tests.helpers import API_KEY, make_settings, sync_context

AUDIENCE = "bench_send"
BATCH = 1000
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# --- the emulator, in its own process so it does not share our interpreter's lock ------------------


def _serve(conn: Connection, latency_s: float) -> None:
    from tests.emulator import EmulatorServer, FaultRule, IterableEmulator

    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    if latency_s > 0:
        emu.add_fault(FaultRule("*", "delay", delay_seconds=latency_s))
    with EmulatorServer(emu) as server:
        conn.send(server.url)
        while True:
            name = conn.recv()
            if name is None:
                return
            (list_id,) = emu.lists_named(name)
            conn.send(sorted(emu.list_member_emails(list_id)))


@contextlib.contextmanager
def emulator(latency_s: float) -> Iterator[tuple[str, Connection]]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_serve, args=(child, latency_s), daemon=True)
    proc.start()
    try:
        yield parent.recv(), parent
    finally:
        parent.send(None)
        proc.join(10)


# --- the two measurements -----------------------------------------------------------------------


def populate(url: str, members: int) -> None:
    """`members` pending subscribes in one audience, written straight into the tables."""
    dbs.upgrade(url)
    engine = dbs.make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            m.Audience.__table__.insert(),
            [
                {
                    "audience_key": AUDIENCE,
                    "list_state": "pending",
                    "settings": {},
                    "created_at": T0,
                    "updated_at": T0,
                }
            ],
        )
        audience_id = conn.execute(m.Audience.__table__.select()).first()[0]  # type: ignore[index]
    for start in range(0, members, 50_000):
        rows = [
            {
                "audience_id": audience_id,
                "user_id": f"user-{i}",
                "email": f"user{i}@example.com",
                "desired": "in",
                "desired_at": T0 + timedelta(seconds=i),
                "desired_message_id": f"m{i}",
                "data_fields": None,
                "synced": None,
                "synced_email": None,
                "synced_user_id": None,
                "state": "pending",
                "attempts": 0,
                "created_at": T0,
                "updated_at": T0,
            }
            for i in range(start, min(members, start + 50_000))
        ]
        with engine.begin() as conn:
            conn.execute(m.Membership.__table__.insert(), rows)
    engine.dispose()


def measure_sync(url: str, base_url: str, max_in_flight: int | None) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of this process (all its threads) and members subscribed."""
    extra = {"max_in_flight": max_in_flight} if max_in_flight else {}
    settings = make_settings(url, base_url, sync={"batch_size": BATCH, **extra})
    with sync_context(settings) as ctx:
        started, cpu = time.perf_counter(), time.process_time()
        report = sync.run_once(ctx)
        return time.perf_counter() - started, time.process_time() - cpu, report.subscribed


def measure_bare(base_url: str, members: int) -> tuple[float, int]:
    """The minimum subscribe calls, bodies built beforehand, back to back on one connection."""
    with httpx.Client(base_url=base_url, headers={"Api-Key": API_KEY}, timeout=60) as client:
        list_id = client.post("/api/lists", json={"name": "bare"}).json()["listId"]
        bodies = [
            json.dumps(
                {
                    "listId": list_id,
                    "updateExistingUsersOnly": False,
                    "subscribers": [
                        {"email": f"user{i}@example.com", "userId": f"user-{i}"}
                        for i in range(start, min(members, start + BATCH))
                    ],
                }
            ).encode()
            for start in range(0, members, BATCH)
        ]
        headers = {"Content-Type": "application/json"}
        started = time.perf_counter()
        for body in bodies:
            client.post("/api/lists/subscribe", content=body, headers=headers).raise_for_status()
        return time.perf_counter() - started, len(bodies)


@contextlib.contextmanager
def database(kind: str, pg_server: str | None, tag: str) -> Iterator[str]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.db'}"
        return
    assert pg_server is not None
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {tag}"))
        conn.execute(text(f"CREATE DATABASE {tag}"))
    try:
        yield pg_server.rsplit("/", 1)[0] + f"/{tag}"
    finally:
        admin.dispose()


def one(
    kind: str, pg_server: str | None, members: int, latency_ms: float, in_flight: int | None
) -> dict[str, Any]:
    tag = f"bench_send_{int(latency_ms)}_{in_flight or 0}"
    with database(kind, pg_server, tag) as url, emulator(latency_ms / 1000) as (base_url, conn):
        populate(url, members)
        sync_s, sync_cpu_s, subscribed = measure_sync(url, base_url, in_flight)
        conn.send(AUDIENCE)
        exact = conn.recv() == sorted(f"user{i}@example.com" for i in range(members))
        bare_s, calls = measure_bare(base_url, members)
    row: dict[str, Any] = {
        "db": kind,
        "members": members,
        "latency_ms": latency_ms,
        "max_in_flight": in_flight or "default",
        "sync_s": round(sync_s, 2),
        "bare_wire_s": round(bare_s, 2),
        "sync/bare": round(sync_s / bare_s, 2),
        # On a shared machine the wall times move with the load; the CPU of our process less so.
        "sync_cpu_s": round(sync_cpu_s, 2),
        "sync_cpu/bare": round(sync_cpu_s / bare_s, 2),
        "exact": exact and subscribed == members,
    }
    if latency_ms:
        row["sync/(calls x latency)"] = round(sync_s / (calls * latency_ms / 1000), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--max-in-flight", type=int, default=None, help="default: the setting's default")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    pg = None
    with contextlib.ExitStack() as stack:
        if "postgresql" in args.db:
            from tests.pg import postgres_url

            pg = stack.enter_context(postgres_url())
        for kind in args.db:
            for latency in args.latency_ms:
                print(json.dumps(one(kind, pg, args.members, latency, args.max_in_flight)), flush=True)


if __name__ == "__main__":
    main()
