"""Ingest throughput, each side in its own process, on SQLite (a temp dir) and PostgreSQL (a
throwaway cluster from tests/pg.py):

1. `listsync ingest FILE` of N Engage events (NDJSON) as a subprocess: events/s.
2. The receiver (tests/integration/receiver_proc.py) as its own process and a sender process
   posting Segment-style /v1/batch bodies (100 events each) from several threads on keep-alive
   connections with Basic auth: events/s, counted from the answers and checked in the inbox.

    python -m bench.bench_ingest [--events 200000] [--receiver-events 100000] [--db sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import func, select

from listsync.db import models as m
from listsync.db import session as dbs

REPO = Path(__file__).resolve().parent.parent
WRITE_KEY = "bench-write-key"
BATCH_EVENTS = 100
TARGET_FILE = 100_000
TARGET_RECEIVER = 30_000


def engage_event(n: int, prefix: str) -> dict[str, object]:
    """An Engage identify as Segment's Iterable Lists destination receives it (~450 bytes)."""
    audience = f"bench_audience_{n % 5}"
    return {
        "type": "identify",
        "messageId": f"{prefix}-{n}",
        "userId": f"user-{n}",
        "timestamp": "2026-01-01T00:00:00.000Z",
        "traits": {"email": f"user{n}@example.com", audience: n % 7 != 0, "first_name": "Ada"},
        "context": {
            "personas": {
                "computation_class": "audience",
                "computation_key": audience,
                "computation_id": f"aud_{audience}",
                "space_id": "spa_bench",
            },
            "library": {"name": "analytics-python", "version": "2.3.3"},
        },
    }


def env_for(database_url: str) -> dict[str, str]:
    env = {
        **os.environ,
        "LISTSYNC_DATABASE_URL": database_url,
        "LISTSYNC_RECEIVER__PORT": "0",
        "LISTSYNC_RECEIVER__WRITE_KEYS": json.dumps([WRITE_KEY]),
        "PYTHONPATH": str(REPO),
    }
    env.pop("LISTSYNC_CONFIG", None)
    return env


def inbox_count(database_url: str) -> int:
    engine = dbs.make_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(m.InboxEvent)).scalar_one())
    finally:
        engine.dispose()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """User + system seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_file(database_url: str, events: int, workdir: Path) -> tuple[float, float]:
    """(events/s by the wall clock, events per CPU second of the `listsync ingest` process)."""
    path = workdir / "events.ndjson"
    with path.open("w") as out:
        for n in range(events):
            out.write(json.dumps(engage_event(n, "file")) + "\n")
    dbs.upgrade(database_url)
    cpu_before = _children_cpu()
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "listsync", "ingest", str(path), "--no-progress"],
        cwd=workdir,
        env=env_for(database_url),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - started
    cpu = _children_cpu() - cpu_before
    stored = inbox_count(database_url)
    if stored != events:
        raise SystemExit(f"ingest stored {stored} of {events} events")
    return events / elapsed, events / cpu


@contextlib.contextmanager
def receiver_process(database_url: str, workdir: Path) -> Iterator[tuple[int, int]]:
    dbs.upgrade(database_url)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "integration" / "receiver_proc.py")],
        cwd=workdir,
        env=env_for(database_url),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().strip()
        if not port:
            raise SystemExit("the receiver process did not start")
        yield int(port), proc.pid
    finally:
        proc.kill()
        proc.wait()


def send_all(port: int, events: int, threads: int) -> None:
    """The sender process's work: `events` events in /v1/batch bodies over `threads` connections."""
    auth = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    headers = {"Authorization": auth, "Content-Type": "application/json"}
    bodies = [
        json.dumps({"batch": [engage_event(b * BATCH_EVENTS + i, "recv") for i in range(BATCH_EVENTS)]}).encode()
        for b in range(events // BATCH_EVENTS)
    ]
    failures: list[str] = []

    def worker(share: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for body in share:
            conn.request("POST", "/v1/batch", body=body, headers=headers)
            answer = conn.getresponse()
            reply = answer.read()
            if answer.status != 200:
                failures.append(f"{answer.status}: {reply[:200]!r}")
        conn.close()

    workers = [threading.Thread(target=worker, args=(bodies[i::threads],)) for i in range(threads)]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, first: {failures[0]}")


def bench_receiver(database_url: str, events: int, threads: int, workdir: Path) -> tuple[float, float]:
    """(events/s by the wall clock, events per CPU second of the receiver process)."""
    with receiver_process(database_url, workdir) as (port, pid):
        sender = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_ingest", "--send", str(port), "--receiver-events", str(events),
             "--threads", str(threads)],
            cwd=REPO,
            env=env_for(database_url),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sender.stdin is not None and sender.stdout is not None
        if sender.stdout.readline().strip() != "ready":
            raise SystemExit("the sender did not start")
        cpu_before = _process_cpu(pid)
        started = time.perf_counter()
        sender.stdin.write("go\n")
        sender.stdin.flush()
        if sender.wait() != 0:
            raise SystemExit("the sender failed")
        elapsed = time.perf_counter() - started
        cpu = _process_cpu(pid) - cpu_before
    stored = inbox_count(database_url)
    if stored != events // BATCH_EVENTS * BATCH_EVENTS:
        raise SystemExit(f"the receiver stored {stored} of {events} events")
    return stored / elapsed, stored / cpu


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    from tests.pg import local_cluster

    with local_cluster() as url:
        yield url


def report(kind: str, what: str, events: int, rate: float, per_cpu: float, target: int) -> None:
    print(
        f"{kind:10} {what:16} {events:>8} events  {rate:>9,.0f} events/s (wall)  {per_cpu:>9,.0f} per CPU-s"
        f"  target {target:,}: wall ratio {rate / target:.2f}, CPU ratio {per_cpu / target:.2f}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000, help="events in the NDJSON file")
    parser.add_argument("--receiver-events", type=int, default=100_000, help="events posted to the receiver")
    parser.add_argument("--threads", type=int, default=8, help="sender connections")
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--only", choices=["file", "receiver"], default=None)
    parser.add_argument("--send", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send is not None:
        send_all(args.send, args.receiver_events, args.threads)
        return 0
    for kind in args.db.split(","):
        if args.only in (None, "file"):
            with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp)) as url:
                rate, per_cpu = bench_file(url, args.events, Path(tmp))
            report(kind, "listsync ingest", args.events, rate, per_cpu, TARGET_FILE)
        if args.only in (None, "receiver"):
            with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp)) as url:
                rate, per_cpu = bench_receiver(url, args.receiver_events, args.threads, Path(tmp))
            report(kind, "receiver", args.receiver_events, rate, per_cpu, TARGET_RECEIVER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
