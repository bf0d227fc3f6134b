"""10,000 changes (5,000 exits, 5,000 enters) in a synced N-member audience, `listsync sync` timed
against an idle run of the same code on the same database, for one or more code trees in one sitting.

The synced audience is made once per sitting, as `bench.lists` makes it: `listsync ingest` of N
Engage `Audience Entered` tracks and a first `listsync sync` against one emulator (its own
process). Then, per round and per code tree (`--code DIR`, default this worktree; e.g. an export
of main: `git archive main | tar -x -C /tmp/base`): a copy of the synced database is upgraded by
that tree (`listsync db upgrade`, untimed), synced idle (nothing due), the change file ingested,
and synced (timed: wall, and the child's own CPU seconds). The emulator's list is put back as the
first sync left it after each change run, so each round starts from the same state.
`--keep DIR` saves the synced database; `--reuse DIR` starts from it instead (the emulator's
list made again by direct subscribe calls, the database pointed at it).
`--profile DIR` records the change sync of the last tree under py-spy (collapsed stacks, and a
summary of the leaf and inclusive shares of listsync's own functions).

    python -m bench.bench_changes [--members N] [--rounds 2] [--code DIR ...] [--profile DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.harness import API_KEY, ROOT, emulator, settings, write_config, write_ndjson
from bench.lists import AUDIENCE, change_count, changes, entered


@dataclass
class Child:
    seconds: float
    cpu_s: float
    stderr: str


def run_child(args: list[str], code: Path, *, profile: Path | None = None) -> Child:
    """`python -m listsync ARGS` run from `code` (its own package first on sys.path)."""
    argv = [sys.executable, "-m", "listsync", *args]
    if profile is not None:
        py_spy = Path(sys.executable).with_name("py-spy")
        argv = [str(py_spy), "record", "--rate", "250", "--format", "raw", "-o", str(profile), "--", *argv]
    env = {**os.environ, "PYTHONPATH": str(code)}
    with tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=code, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        err.seek(0)
        text = err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"listsync {' '.join(args)} ({code}): {text.strip().splitlines()[-1:]}")
    return Child(seconds, usage.ru_utime + usage.ru_stime, text)


def sqlite_copy(source: Path, target: Path) -> None:
    for suffix in ("", "-wal"):
        target.with_name(target.name + suffix).unlink(missing_ok=True)
        if Path(str(source) + suffix).exists():
            shutil.copyfile(str(source) + suffix, str(target) + suffix)


def list_id(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT list_id FROM audiences WHERE audience_key = ?", (AUDIENCE,)).fetchone()[0])


def restore_list(base_url: str, list_id: int, n: int) -> None:
    """Undo a change run in the emulator: the leavers back in, the newcomers out."""
    half = change_count(n) // 2
    with httpx.Client(base_url=base_url, headers={"Api-Key": API_KEY}, timeout=60) as client:
        for lo in range(0, half, 1000):
            back = [{"email": f"user{i}@example.com", "userId": f"user-{i}"} for i in range(lo, min(half, lo + 1000))]
            out = [{"email": f"user{i}@example.com", "userId": f"user-{i}"} for i in range(n + lo, n + min(half, lo + 1000))]
            client.post("/api/lists/subscribe", json={"listId": list_id, "subscribers": back}).raise_for_status()
            client.post("/api/lists/unsubscribe", json={"listId": list_id, "subscribers": out}).raise_for_status()


def _frame(frame: str) -> str:
    """`name (path/file.py:line)` as `name (file.py)`."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})"


def seed_emulator(base_url: str, db: Path, n: int) -> None:
    """A fresh emulator's list for a saved synced database: its N members subscribed directly."""
    import sqlite3

    with httpx.Client(base_url=base_url, headers={"Api-Key": API_KEY}, timeout=120) as client:
        answer = client.post("/api/lists", json={"name": AUDIENCE})
        answer.raise_for_status()
        new_id = int(answer.json()["listId"])
        for lo in range(0, n, 1000):
            members = [{"email": f"user{i}@example.com", "userId": f"user-{i}"} for i in range(lo, min(n, lo + 1000))]
            client.post("/api/lists/subscribe", json={"listId": new_id, "subscribers": members}).raise_for_status()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audiences SET list_id = ? WHERE audience_key = ?", (new_id, AUDIENCE))


def summarize(raw: Path, top: int = 25) -> dict[str, Any]:
    """Leaf and inclusive sample shares per function from py-spy's collapsed stacks."""
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [_frame(frame) for frame in stack.split(";")]
        total += n
        leaf[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    share = lambda c: {k: round(100 * v / total, 1) for k, v in c.most_common(top)}  # noqa: E731
    return {"samples": total, "leaf_pct": share(leaf), "inclusive_pct": share(inclusive)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--code", type=Path, action="append", help="code trees to compare (default: this one)")
    parser.add_argument("--keep", type=Path, help="save the synced database in this directory")
    parser.add_argument("--reuse", type=Path, help="start from the synced database saved here")
    parser.add_argument("--profile", type=Path, help="py-spy the last tree's change sync into this directory")
    args = parser.parse_args()
    codes: list[Path] = [c.resolve() for c in args.code] if args.code else [ROOT]
    n = args.members
    with tempfile.TemporaryDirectory() as tmp_dir, emulator() as base_url:
        tmp = Path(tmp_dir)
        synced, work = tmp / "synced.db", tmp / "work.db"
        first = write_config(tmp / "first.toml", settings(f"sqlite:///{synced}", base_url))
        config = write_config(tmp / "work.toml", settings(f"sqlite:///{work}", base_url))
        entered_file, change_file = tmp / "entered.ndjson", tmp / "changes.ndjson"
        if not args.reuse:
            write_ndjson(entered_file, entered(n))
        write_ndjson(change_file, changes(n))
        started = time.perf_counter()
        if args.reuse:
            sqlite_copy(args.reuse / f"synced-{n}.db", synced)
            seed_emulator(base_url, synced, n)
        else:
            run_child(["ingest", str(entered_file), "--no-progress", "--config", str(first)], codes[0])
            run_child(["sync", "--no-progress", "--config", str(first)], codes[0])
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            sqlite_copy(synced, args.keep / f"synced-{n}.db")
        print(f"synced {n} members in {time.perf_counter() - started:.0f} s (code {codes[0]})", flush=True)
        target = list_id(synced)
        results: dict[str, list[dict[str, float]]] = {str(code): [] for code in codes}
        for round_ in range(args.rounds):
            for code in codes:
                sqlite_copy(synced, work)
                run_child(["db", "upgrade", "--config", str(config)], code)
                idle = run_child(["sync", "--no-progress", "--config", str(config)], code)
                run_child(["ingest", str(change_file), "--no-progress", "--config", str(config)], code)
                last = round_ == args.rounds - 1 and code == codes[-1]
                profile = args.profile / "changes.raw" if args.profile and last else None
                if profile is not None:
                    args.profile.mkdir(parents=True, exist_ok=True)
                changed = run_child(["sync", "--no-progress", "--config", str(config)], code, profile=profile)
                restore_list(base_url, target, n)
                figures = {"idle_s": round(idle.seconds, 2), "idle_cpu_s": round(idle.cpu_s, 2),
                           "changes_s": round(changed.seconds, 2), "changes_cpu_s": round(changed.cpu_s, 2),
                           "net_s": round(changed.seconds - idle.seconds, 2),
                           "net_cpu_s": round(changed.cpu_s - idle.cpu_s, 2)}
                results[str(code)].append(figures)
                print(f"round {round_} {code}: {json.dumps(figures)}", flush=True)
        if args.profile:
            print(json.dumps(summarize(args.profile / "changes.raw"), indent=1))
    for code, rounds in results.items():
        best = {key: min(r[key] for r in rounds) for key in rounds[0]}
        print(f"{code}: best of {len(rounds)}: {json.dumps(best)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
