"""kill -9 at random moments while `listsync daemon` syncs: the lists still end exact, and no
member is subscribed twice for one change (the emulator counts subscribes of existing members)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.emulator import EmulatorServer, FaultRule, IterableEmulator
from tests.helpers import API_KEY, audience_event, ingest, make_settings, sync_context

AUDIENCES = ["alpha", "beta", "gamma"]
LEASE_SECONDS = 1.5


def _write_config(path: Path, database_url: str, base_url: str) -> None:
    path.write_text(
        f"database_url = {json.dumps(database_url)}\n"
        f'[iterable]\napi_key = "{API_KEY}"\nbase_url = "{base_url}"\n'
        'rate_limits = { "GET /api/lists/getUsers" = 1000.0 }\n'
        f"[sync]\ninterval_seconds = 0.2\nbatch_size = 20\nlease_seconds = {LEASE_SECONDS}\n"
        "retry_base_seconds = 0\nretry_max_seconds = 0\n"
        # How far the daemon gets between kills depends on the machine's load; the mass-unsubscribe
        # guard is tested elsewhere and must not turn a slow machine into a held audience here.
        "max_unsubscribe_fraction = 1.0\n"
        '[receiver]\nenabled = false\n[logging]\nlevel = "WARNING"\n'
    )


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "listsync", "--config", str(config), "daemon"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )


def _phase_events(rng: random.Random, step: int, users: int, want: dict[tuple[str, str], bool]) -> list[dict]:
    events = []
    for audience in AUDIENCES:
        for i in rng.sample(range(users), users // 4 if step else users):
            inside = rng.random() < (0.7 if step == 0 else 0.5)
            want[(audience, f"u{i}")] = inside
            events.append(
                audience_event(
                    audience,
                    inside=inside,
                    user_id=f"u{i}",
                    email=f"u{i}@example.com",
                    at=step * 100 + rng.random(),
                )
            )
    return events


@pytest.mark.parametrize(
    "trials", [pytest.param(20, id="20kills"), pytest.param(100, id="100kills", marks=pytest.mark.slow)]
)
def test_daemon_killed_at_random_still_ends_exact(database_url: str, tmp_path: Path, trials: int) -> None:
    rng = random.Random(trials)
    users = 1000
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY, seed=3)
    emu.disable_rate_limits()
    # Iterable applies a change before it answers; a slow answer widens the window in which a kill
    # leaves a request applied but not recorded, the case the in-doubt recovery exists for.
    for endpoint in ("lists/subscribe", "lists/unsubscribe"):
        emu.add_fault(FaultRule(endpoint, "delay", delay_seconds=0.05))
    want: dict[tuple[str, str], bool] = {}
    with EmulatorServer(emu) as server:
        config = tmp_path / "listsync.toml"
        _write_config(config, database_url, server.url)
        settings = make_settings(database_url, server.url)
        log = tmp_path / "daemon.log"
        with sync_context(settings) as ctx:
            ingest(ctx, _phase_events(rng, 0, users, want))
            for trial in range(trials):
                proc = _start(config, log)
                time.sleep(rng.uniform(0.8, 2.2))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                if trial % 2 == 1:
                    ingest(ctx, _phase_events(rng, trial // 2 + 1, users, want))
            time.sleep(LEASE_SECONDS + 0.5)
            done = subprocess.run(
                [sys.executable, "-m", "listsync", "--config", str(config), "sync"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout + done.stderr + log.read_text()[-3000:]
            with ctx.factory() as session:
                status = {
                    r["audience_key"]: dict(r)
                    for r in session.execute(text("SELECT * FROM audience_status")).mappings()
                }
                in_doubt = session.scalar(text("SELECT count(*) FROM api_requests WHERE status = 'resolved'"))
    for audience in AUDIENCES:
        lists = emu.lists_named(audience)
        assert len(lists) == 1, f"{audience}: {len(lists)} lists"
        expected = {
            f"u{i}@example.com"
            for (a, u), inside in want.items()
            if a == audience and inside
            for i in [int(u[1:])]
        }
        assert emu.list_member_emails(lists[0]) == expected
        assert status[audience]["members"] == status[audience]["synced_members"] == len(expected)
    assert sum(emu.redundant_subscribes.values()) == 0, "a subscribe was sent twice for one change"
    print(f"{trials} kills, {len(emu.requests)} requests, {in_doubt} in-doubt requests settled from getUsers")
