"""10,000 members subscribed by `listsync ingest` + `listsync sync` (SQLite in a temp dir) to the
Iterable emulator over HTTP, while it injects 20% 5xx, 10% 429 and 10% dropped connections (half of
them after applying the change). Prints requests sent against the minimum and the throughput.

    python -m bench.bench_faulted_subscribe [--members N] [--seed S]

The emulator runs in this process (its fault rules and request log are read directly); listsync
runs as the `listsync` command, re-run until it reports everything delivered (at most MAX_RUNS).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from bench.harness import (
    API_KEY,
    audience_event,
    listsync,
    run_measured,
    settings,
    write_config,
    write_ndjson,
)
from tests.emulator import EmulatorServer, FaultRule, IterableEmulator

AUDIENCE = "bench_faulted"
BATCH = 1000
MAX_RUNS = 10
# (kind, share of all requests to an endpoint); rules fire in order, so each gets share / what is left.
FAULT_MIX: list[tuple[str, float]] = [
    ("status", 0.20),
    ("rate_limit", 0.10),
    ("drop_before", 0.05),
    ("drop_after", 0.05),
]


def add_faults(emu: IterableEmulator) -> None:
    for endpoint in ("lists/subscribe", "GET lists", "POST lists"):
        left = 1.0
        for kind, share in FAULT_MIX:
            if endpoint == "POST lists" and kind == "drop_after":
                continue  # a retried list creation would make a duplicate list (a known client bug)
            emu.add_fault(FaultRule(endpoint, kind, probability=share / left, status=503))  # type: ignore[arg-type]
            left -= share


def run(members: int, seed: int) -> dict[str, object]:
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY, seed=seed)
    add_faults(emu)
    with tempfile.TemporaryDirectory() as tmp, EmulatorServer(emu) as server:
        events = Path(tmp) / "events.ndjson"
        write_ndjson(events, (audience_event(AUDIENCE, i) for i in range(members)))
        config = write_config(Path(tmp) / "bench.toml", settings(
            f"sqlite:///{Path(tmp) / 'bench.db'}", server.url, sync={"batch_size": BATCH},
            iterable={"max_attempts": 10}, logging={"level": "ERROR"}))
        ingested = listsync("ingest", str(events), "--no-progress", config=config, timeout=3600)
        runs, wall = 0, 0.0
        while runs < MAX_RUNS:
            runs += 1
            step = run_measured([sys.executable, "-m", "listsync", "sync", "--no-progress", "--config", str(config)],
                                timeout=3600)
            wall += step.seconds
            if step.returncode == 0:
                break
    (list_id,) = emu.lists_named(AUDIENCE)
    exact = emu.list_member_emails(list_id) == {f"user{i}@example.com" for i in range(members)}
    subscribes = len(emu.requests_to("lists/subscribe"))
    minimum = math.ceil(members / BATCH)
    injected = emu.faults_injected
    return {
        "members": members,
        "subscribe requests sent": subscribes,
        "all requests sent": len(emu.requests),
        "minimum possible requests": minimum,
        "ratio (subscribe / minimum)": f"{subscribes / minimum:.2f}",
        **{f"faults: {kind}": injected[kind] for kind, _ in FAULT_MIX},
        "sync runs": runs,
        "list exact": exact,
        "ingest time (s)": f"{ingested.seconds:.2f}",
        "sync wall time (s)": f"{wall:.2f}",
        "members/s": f"{members / wall:,.0f}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args(argv)
    row = run(args.members, args.seed)
    width = max(len(name) for name in row)
    lines = [f"{name:<{width}}  {value}" for name, value in row.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if row["list exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
