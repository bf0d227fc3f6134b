"""List syncs against the bare wire, in one run and one emulator:

* the first sync of N members: `listsync ingest` of N Engage `Audience Entered` tracks, then
  `listsync sync` (fold, plan, send, record), each divided by the bare wire of N members;
* an idle `listsync sync` right after (nothing due: the fixed cost of a run, startup included);
* 10,000 changes (5,000 exits, 5,000 enters) in the synced N-member audience, sent and recorded;
* the peak memory of that first sync (the child's own ru_maxrss);
* the same first sync with 50 ms added to every emulator answer, against calls x 50 ms (what one
  request at a time cannot beat), on a copy of the database taken after the ingest.

`--huge` adds the first sync of 10,000,000 members for its peak memory alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bench.harness import (
    Result,
    Row,
    Run,
    audience_event,
    audience_status,
    emulator,
    listsync,
    num,
    rate,
    secs,
    settings,
)
from bench.wire import bare_wire

AUDIENCE = "bench_list"
BATCH = 1000
CHANGES = 10_000
LATENCY_MS = 50.0
IN_FLIGHT = 8
HUGE = 10_000_000


def entered(n: int) -> Iterator[dict[str, Any]]:
    return (audience_event(AUDIENCE, i) for i in range(n))


def changes(n: int) -> Iterator[dict[str, Any]]:
    """Half of CHANGES members leave, as many new ones enter, all after the first sync's events."""
    later = n / 1000 + 3600
    half = change_count(n) // 2
    yield from (audience_event(AUDIENCE, i, inside=False, at=later + i / 1000, tag="x") for i in range(half))
    yield from (audience_event(AUDIENCE, n + i, at=later + i / 1000, tag="x") for i in range(half))


def change_count(n: int) -> int:
    """CHANGES, or a fifth of a small audience (so the mass-unsubscribe guard stays out of it)."""
    return min(CHANGES, n // 5 // 2 * 2)


def measure(run: Run) -> Result:
    n = run.members
    raw: dict[str, Any] = {"members": n}
    events = run.events_file(f"entered-{n}", lambda: entered(n))
    db = run.dbs.fresh("lists")
    with emulator() as base_url:
        raw["wire"] = bare_wire(base_url, n, batch=BATCH)
        raw["wire_in_flight"] = bare_wire(base_url, n, batch=BATCH, in_flight=IN_FLIGHT, tag="f")
        config = run.config("lists", settings(db, base_url))
        ingest = listsync("ingest", str(events), "--no-progress", config=config, timeout=run.timeout)
        ingested = run.dbs.clone(db, "lists_ingested")
        first = listsync("sync", "--no-progress", config=config, timeout=run.timeout)
        raw["first_sync_status"] = _synced(db, n)
        idle = listsync("sync", "--no-progress", config=config, timeout=run.timeout)
        start = listsync("--version", config=config, timeout=run.timeout)
        change_file = run.events_file(f"changes-{n}", lambda: changes(n))
        listsync("ingest", str(change_file), "--no-progress", config=config, timeout=run.timeout)
        changed = listsync("sync", "--no-progress", config=config, timeout=run.timeout)
        raw["changes_status"] = _synced(db, n)
    raw.update(ingest_s=ingest.seconds, sync_s=first.seconds, sync_peak_mb=first.peak_mb, idle_sync_s=idle.seconds,
               start_s=start.seconds, changes_sync_s=changed.seconds)
    raw["latency"] = _with_latency(run, ingested, n)
    if run.huge:
        raw["huge"] = _huge(run)
    return Result(_rows(raw), raw)


def _synced(url: str, members: int) -> dict[str, Any]:
    status = audience_status(url, AUDIENCE)
    if status.get("synced_members") != members or status.get("members") != members:
        raise RuntimeError(f"expected {members} members synced, the audience_status view says {status}")
    return {k: status.get(k) for k in ("members", "synced_members", "pending_subscribe", "failed")}


def _with_latency(run: Run, db: str, n: int) -> dict[str, Any]:
    with emulator(latency_ms=LATENCY_MS) as base_url:
        wire = bare_wire(base_url, n, batch=BATCH)
        wire_in_flight = bare_wire(base_url, n, batch=BATCH, in_flight=IN_FLIGHT, tag="f")
        config = run.config("lists_latency", settings(db, base_url))
        first = listsync("sync", "--no-progress", config=config, timeout=run.timeout)
        _synced(db, n)
    return {"latency_ms": LATENCY_MS, "calls": wire["calls"], "wire": wire, "wire_in_flight": wire_in_flight,
            "sync_s": first.seconds, "sync_peak_mb": first.peak_mb}


def _huge(run: Run) -> dict[str, Any]:
    events = run.events_file(f"entered-{HUGE}", lambda: entered(HUGE))
    db = run.dbs.fresh("lists_huge")
    with emulator() as base_url:
        config = run.config("lists_huge", settings(db, base_url))
        listsync("ingest", str(events), "--no-progress", config=config, timeout=run.timeout)
        first = listsync("sync", "--no-progress", config=config, timeout=run.timeout)
        _synced(db, HUGE)
    return {"members": HUGE, "sync_s": first.seconds, "sync_peak_mb": first.peak_mb}


def _rows(raw: dict[str, Any]) -> list[Row]:
    n, wire, flight = raw["members"], raw["wire"], raw["wire_in_flight"]
    floor = wire["seconds"]
    sync_ratio = raw["sync_s"] / floor
    both_ratio = (raw["ingest_s"] + raw["sync_s"]) / floor
    lat = raw["latency"]
    sequential = lat["calls"] * lat["latency_ms"] / 1000
    lat_ratio = lat["sync_s"] / sequential
    net = raw["sync_s"] - raw["idle_sync_s"]
    rows = [
        Row(f"bare wire: {num(n)} members in {wire['calls']} subscribe calls, 1 connection",
            f"{secs(floor)} ({num(wire['members_per_s'])} members/s)", "1 (the reference)"),
        Row(f"bare wire, {flight['in_flight']} requests in flight", secs(flight["seconds"]),
            f"{flight['seconds'] / floor:.2f}"),
        Row(f"`listsync ingest` of {num(n)} Audience Entered tracks", f"{secs(raw['ingest_s'])} "
            f"({num(rate(n, raw['ingest_s']))} events/s)", f"{raw['ingest_s'] / floor:.1f} x wire"),
        Row(f"first sync of {num(n)} members: `listsync sync` / bare wire", secs(raw["sync_s"]),
            f"{sync_ratio:.1f} (net of the idle run: {net / floor:.1f})", "<= 1.5", sync_ratio <= 1.5),
        Row("first sync: (ingest + sync) / bare wire", secs(raw["ingest_s"] + raw["sync_s"]),
            f"{both_ratio:.1f}", "<= 3", both_ratio <= 3),
        Row("idle `listsync sync` (nothing due: process start, migrations check, run record)",
            secs(raw["idle_sync_s"]), f"of which process start (`listsync --version`): {secs(raw['start_s'])}"),
        Row(f"{num(change_count(n))} changes in the synced {num(n)}-member audience: `listsync sync`",
            secs(raw["changes_sync_s"]), f"net of the idle run: {secs(raw['changes_sync_s'] - raw['idle_sync_s'])}",
            "< 1.5 s", raw["changes_sync_s"] < 1.5),
        Row(f"peak memory of the first sync, {num(n)} members", f"{raw['sync_peak_mb']:.0f} MB", "",
            "< 200 MB", raw["sync_peak_mb"] < 200),
        Row(f"bare wire at {lat['latency_ms']:.0f} ms per answer, 1 connection", secs(lat["wire"]["seconds"]),
            f"{lat['wire']['seconds'] / sequential:.2f} x calls x {lat['latency_ms']:.0f} ms"),
        Row(f"bare wire at {lat['latency_ms']:.0f} ms, {lat['wire_in_flight']['in_flight']} in flight",
            secs(lat["wire_in_flight"]["seconds"]), f"{lat['wire_in_flight']['seconds'] / sequential:.2f}"),
        Row(f"first sync at {lat['latency_ms']:.0f} ms: `listsync sync` / ({lat['calls']} calls x "
            f"{lat['latency_ms']:.0f} ms)", secs(lat["sync_s"]), f"{lat_ratio:.2f}", "<= 0.35", lat_ratio <= 0.35),
    ]
    if "huge" in raw:
        huge = raw["huge"]
        rows.append(Row(f"peak memory of the first sync, {num(huge['members'])} members",
                        f"{huge['sync_peak_mb']:.0f} MB ({secs(huge['sync_s'])})", "", "< 200 MB, flat",
                        huge["sync_peak_mb"] < 200))
    return rows
