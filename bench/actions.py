"""Per-event actions against the rate limits: N/2 identifies (the Upsert User preset, batched into
`users/bulkUpdate`) and N/2 tracks (the Custom Event preset, `events/trackBulk`) of the same users,
`listsync ingest`ed, then delivered by one `listsync sync` to an emulator that enforces Iterable's
published per-project limits (tests/emulator/ratelimit.py; listsync paces itself by the same
figures, listsync/iterable/ratelimit.py) at zero latency.

What the limits allow: each endpoint's calls at its rate after the bucket's initial burst, the
endpoints in parallel (each has its own limit). The figure is that time over the measured one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from bench.harness import Result, Row, Run, emulator, listsync, num, secs, settings, stamp
from tests.emulator.ratelimit import DEFAULT_RATE_LIMITS

BULK = 1000  # items per bulk call (Iterable's maximum; listsync's batching fills it)
ENDPOINTS = {"identify": "users/bulkUpdate", "track": "events/trackBulk"}
TARGET = 0.90


def events(n: int) -> Iterator[dict[str, Any]]:
    half = n // 2
    for i in range(half):
        yield {"type": "identify", "userId": f"actor-{i}", "messageId": f"id-{i}", "timestamp": stamp(i / 1000),
               "traits": {"email": f"actor{i}@example.com", "plan": "gold", "first_name": f"A{i}"}}
    for i in range(half):
        yield {"type": "track", "event": "Bench Viewed", "userId": f"actor-{i}", "messageId": f"tr-{i}",
               "timestamp": stamp(3600 + i / 1000), "properties": {"page": f"/p/{i % 100}", "value": i}}


def allowed_seconds(counts: dict[str, int]) -> dict[str, float]:
    """Per endpoint: the least time its calls take under the emulator's (rate, burst) limit."""
    out = {}
    for kind, items in counts.items():
        limit = DEFAULT_RATE_LIMITS[ENDPOINTS[kind]]
        assert limit is not None
        per_second, burst = limit
        out[ENDPOINTS[kind]] = max(0.0, (math.ceil(items / BULK) - burst) / per_second)
    return out


def measure(run: Run) -> Result:
    n = run.members
    path = run.events_file(f"actions-{n}", lambda: events(n))
    db = run.dbs.fresh("actions")
    with emulator(rate_limits=True) as base_url:
        config = run.config("actions", settings(db, base_url))
        ingest = listsync("ingest", str(path), "--no-progress", config=config, timeout=run.timeout)
        sync = listsync("sync", "--no-progress", config=config, timeout=run.timeout)
    delivered = _delivered(db)
    half = n // 2
    if delivered != {"upsert_user": half, "custom_event": half}:
        raise RuntimeError(f"expected {half} deliveries per action, the event_status view says {delivered}")
    floor = allowed_seconds({"identify": half, "track": half})
    raw = {"events": 2 * half, "ingest_s": ingest.seconds, "sync_s": sync.seconds, "sync_peak_mb": sync.peak_mb,
           "allowed_s": floor, "delivered": delivered}
    return Result(_rows(raw), raw)


def _delivered(url: str) -> dict[str, int]:
    from sqlalchemy import text

    from listsync.db import session as dbs

    engine = dbs.make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT action, count(*) FROM event_status WHERE state = 'delivered' "
                                     "GROUP BY action")).all()
    finally:
        engine.dispose()
    return {str(action): int(count) for action, count in rows}


def _rows(raw: dict[str, Any]) -> list[Row]:
    floor = max(raw["allowed_s"].values())
    share = floor / raw["sync_s"]
    half = raw["events"] // 2
    limits = ", ".join(f"{endpoint} {secs(s)}" for endpoint, s in raw["allowed_s"].items())
    return [
        Row(f"per-event actions: {num(raw['events'])} events ({num(half)} Upsert User + {num(half)} Custom Event, "
            "batched), `listsync sync`",
            f"{secs(raw['sync_s'])} (the limits allow {secs(floor)}: {limits})",
            f"{share:.2f} of the allowed throughput", f">= {TARGET:.0%}", share >= TARGET),
    ]
