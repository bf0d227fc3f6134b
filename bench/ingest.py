"""Ingest throughput: `listsync ingest` of an NDJSON file of N Engage `Audience Entered` tracks
(wall time of the command), and the receiver of `listsync daemon` (its own process) taking
Segment-style `/v1/batch` bodies from a separate sender process (bench/senders.py). The daemon
runs as a dry run with its scheduler idle (a one-hour interval), so only the receiver works.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bench.harness import (
    BenchError,
    Result,
    Row,
    Run,
    daemon,
    free_port,
    listsync,
    num,
    rate,
    run_measured,
    secs,
    settings,
)
from bench.lists import entered

FILE_TARGET = 100_000
RECEIVER_TARGET = 30_000
SENDER_THREADS = 4


def measure(run: Run) -> Result:
    n = run.members
    events = run.events_file(f"entered-{n}", lambda: entered(n))
    db = run.dbs.fresh("ingest_file")
    config = run.config("ingest_file", settings(db))
    step = listsync("ingest", str(events), "--no-progress", config=config, timeout=run.timeout)
    accepted = _accepted(step.stdout)
    if accepted != n:
        raise RuntimeError(f"listsync ingest accepted {accepted} of {n} events: {step.stdout.strip()}")
    raw: dict[str, Any] = {"file": {"events": n, "seconds": step.seconds, "peak_mb": step.peak_mb}}
    raw["receiver"] = _receiver(run, n)
    return Result(_rows(raw), raw)


def _accepted(stdout: str) -> int:
    """The count from `accepted N, duplicates D, rejected R`."""
    for line in stdout.splitlines():
        if line.startswith("accepted "):
            return int(line.split(",")[0].split()[1])
    return -1


def _receiver(run: Run, n: int) -> dict[str, Any]:
    events = run.events_file(f"entered-{n}", lambda: entered(n))
    db = run.dbs.fresh("ingest_receiver")
    port = free_port()
    config = run.config("ingest_receiver", settings(db, receiver={"port": port}))
    listsync("db", "upgrade", config=config, timeout=run.timeout)
    with daemon(config, port):
        sent = run_measured([sys.executable, "-m", "bench.senders", f"http://127.0.0.1:{port}", str(events),
                             "--threads", str(SENDER_THREADS)], timeout=run.timeout)
    if sent.returncode != 0:
        raise BenchError(f"bench.senders: {sent.last_error()}")
    figures: dict[str, Any] = json.loads(sent.stdout.strip().splitlines()[-1])
    stored = _inbox_rows(db)
    if stored != n:
        raise RuntimeError(f"the receiver answered 200 for {n} events but the inbox holds {stored}")
    return figures


def _inbox_rows(url: str) -> int:
    from sqlalchemy import func, select

    from listsync.db import models as m
    from listsync.db import session as dbs

    engine = dbs.make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(m.InboxEvent.__table__)).scalar_one())
    finally:
        engine.dispose()


def _rows(raw: dict[str, Any]) -> list[Row]:
    file, receiver = raw["file"], raw["receiver"]
    file_rate = rate(file["events"], file["seconds"])
    return [
        Row(f"`listsync ingest` of a file of {num(file['events'])} Audience Entered tracks",
            f"{num(file_rate)} events/s ({secs(file['seconds'])}, peak {file['peak_mb']:.0f} MB)",
            f"{file_rate / FILE_TARGET:.2f} of the target", f">= {num(FILE_TARGET)} events/s",
            file_rate >= FILE_TARGET),
        Row(f"receiver (`listsync daemon`), {num(receiver['events'])} events in /v1/batch bodies of 100 from "
            f"{receiver['threads']} connections of another process",
            f"{num(receiver['events_per_s'])} events/s ({secs(receiver['seconds'])})",
            f"{receiver['events_per_s'] / RECEIVER_TARGET:.2f} of the target", f">= {num(RECEIVER_TARGET)} events/s",
            receiver["events_per_s"] >= RECEIVER_TARGET),
    ]
