"""listsync benchmarks: every target of issue 13, as ratios taken within one run.

    python -m bench.run [--quick] [--huge] [--db sqlite|postgresql|both] [--only NAME ...] [--json FILE]

Families (`--only`): lists (bare wire, first sync, ingest + sync, 10,000 changes, peak memory, 50 ms
latency), sql (SQL source mirror and re-poll), ingest (`listsync ingest` from a file, the receiver
fed by a separate process), actions (per-event actions against the rate limits).

Every listsync step is the `listsync` command in a child process (its wall time around the process,
its peak memory its own ru_maxrss); the Iterable emulator runs in another. The full sizes
(1,000,000 members and rows) are the defaults; `--quick` uses 100,000; `--huge` adds the first sync
of 10,000,000 members for its peak memory (never by default). PostgreSQL uses a throwaway local
cluster (tests/pg.py) with fsync off, as the tests do. Results: one JSON document on stdout (or in
`--json FILE`), then a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import actions, ingest, lists, sql_source  # noqa: E402
from bench.harness import BenchError, Databases, Result, Row, Run  # noqa: E402

FAMILIES: dict[str, Callable[[Run], Result]] = {
    "lists": lists.measure,
    "sql": sql_source.measure,
    "ingest": ingest.measure,
    "actions": actions.measure,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 members and rows instead of 1,000,000")
    parser.add_argument("--huge", action="store_true", help="also the first sync of 10,000,000 members (hours)")
    parser.add_argument("--members", type=int, help="N for every family (overrides --quick)")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--only", action="append", choices=sorted(FAMILIES), help="repeatable; default all")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per listsync step (killed after)")
    parser.add_argument("--json", type=Path, help="also write the JSON results to this file")
    return parser.parse_args(argv)


@contextlib.contextmanager
def databases(kind: str, tmp: Path) -> Iterator[Databases]:
    if kind == "sqlite":
        yield Databases("sqlite", tmp)
        return
    from tests import pg

    with pg.local_cluster() as server_url:
        yield Databases("postgresql", tmp, server_url)


def run_family(name: str, run: Run) -> Result:
    """One family; a failure becomes one row naming it, and the other families still run."""
    started = time.perf_counter()
    try:
        result = FAMILIES[name](run)
    except Exception as exc:  # reported as the family's row; the others still run
        if not isinstance(exc, BenchError):
            traceback.print_exc(file=sys.stderr)
        return Result([Row(f"{name}: failed", str(exc))], {"error": str(exc)})
    result.raw["family_seconds"] = round(time.perf_counter() - started, 1)
    return result


def machine() -> dict[str, Any]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import sqlite3

    return {"machine": platform.machine(), "cores": os.cpu_count(), "memory_gib": round(memory),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "load_average": [round(x, 2) for x in os.getloadavg()], "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M}Z"}


def table(results: list[tuple[str, str, Result]]) -> str:
    lines = ["| measure | db | figure | ratio | target | met |", "| --- | --- | --- | --- | --- | --- |"]
    for _family, kind, result in results:
        for row in result.rows:
            met = "" if row.met is None else ("met" if row.met else "**not met**")
            lines.append(f"| {row.measure} | {kind} | {row.figure} | {row.ratio} | {row.target} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    members = args.members or (100_000 if args.quick else 1_000_000)
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    names = args.only or list(FAMILIES)
    tmp = Path(tempfile.mkdtemp(prefix="listsync-bench-"))
    files = tmp / "files"
    files.mkdir()
    before = machine()
    results: list[tuple[str, str, Result]] = []
    for kind in kinds:
        (tmp / kind).mkdir()
        with databases(kind, tmp / kind) as dbs:
            run = Run(dbs=dbs, files=files, members=members, huge=args.huge, timeout=args.timeout)
            for name in names:
                print(f"bench: {name} on {kind} ({members:,} members)...", file=sys.stderr, flush=True)
                results.append((name, kind, run_family(name, run)))
    document = {"machine": before, "load_average_after": machine()["load_average"], "members": members,
                "results": [{"family": f, "db": k, "rows": [r.as_json() for r in res.rows], "raw": res.raw}
                            for f, k, res in results]}
    text = json.dumps(document, indent=2, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    print()
    info = before
    print(f"listsync benchmarks, {info['date']}: {info['machine']}, {info['cores']} cores, {info['memory_gib']} GiB, "
          f"Python {info['python']}, SQLite {info['sqlite']}; load average {info['load_average']} before, "
          f"{document['load_average_after']} after; N = {members:,}")
    print()
    print(table(results))
    return 0 if all("error" not in res.raw for _f, _k, res in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
