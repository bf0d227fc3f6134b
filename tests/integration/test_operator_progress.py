"""The progress display of `listsync sync`: rich bars per stage in a pseudo-terminal, with the log
lines drawn above them and the summary printed once; plain lines when stderr is not a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from listsync.config import Settings
from tests.emulator import EmulatorServer, IterableEmulator
from tests.helpers import API_KEY, audience_event, ingest, sync_context
from tests.integration.test_cli import config_data, write_config

ROOT = Path(__file__).resolve().parents[2]
PER_AUDIENCE = 1500


@pytest.fixture
def prepared(tmp_path: Path) -> Iterator[tuple[Path, IterableEmulator]]:
    """A SQLite database with two audiences' worth of inbox events and some profile events."""
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server:
        data = config_data(f"sqlite:///{tmp_path / 'p.db'}", server.url, logging={"level": "INFO"})
        config = write_config(tmp_path / "listsync.toml", data)
        from listsync.db import session as dbs

        dbs.upgrade(data["database_url"])
        events = [
            audience_event(key, inside=True, user_id=f"{key}{i}", email=f"{key}{i}@x.com", at=1)
            for key in ("vip", "churn")
            for i in range(PER_AUDIENCE)
        ]
        events += [
            {"type": "identify", "messageId": f"p{i}", "userId": f"p{i}", "traits": {"email": f"p{i}@x.com"},
             "timestamp": "2026-01-01T00:00:00Z"}
            for i in range(40)
        ]
        with sync_context(Settings(**data)) as ctx:
            ingest(ctx, events)
        yield config, emu


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LISTSYNC_")}
    return {**env, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "COLUMNS": "120"}


def _run_in_pty(*args: str) -> tuple[int, str]:
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "listsync", *args], stdin=follower, stdout=follower, stderr=follower, env=_env()
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


def test_bars_per_stage_in_a_terminal(prepared: tuple[Path, IterableEmulator]) -> None:
    config, emu = prepared
    code, screen = _run_in_pty("sync", "--config", str(config))
    assert code == 0, screen
    for stage in ("fold inbox", "vip", "churn", "event deliveries"):
        assert stage in screen, screen
    assert f"{PER_AUDIENCE}/{PER_AUDIENCE}" in screen and "━" in screen
    assert f"{2 * PER_AUDIENCE + 40}/{2 * PER_AUDIENCE + 40}" in screen  # the fold
    assert screen.count("finished in") == 1  # the summary, once
    assert "listsync sync: config " in screen  # log lines are drawn, above the bars
    startup = screen.index("listsync sync: config ")
    assert startup < screen.rindex(f"{PER_AUDIENCE}/{PER_AUDIENCE}")
    assert len(emu.list_member_emails(emu.lists_named("vip")[0])) == PER_AUDIENCE


def test_plain_lines_when_not_a_terminal(prepared: tuple[Path, IterableEmulator]) -> None:
    config, _emu = prepared
    done = subprocess.run(
        [sys.executable, "-m", "listsync", "sync", "--config", str(config)],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert f"progress: fold inbox: {2 * PER_AUDIENCE + 40}/{2 * PER_AUDIENCE + 40} done" in lines
    assert f"progress: vip: {PER_AUDIENCE}/{PER_AUDIENCE} done" in lines
    assert "progress: event deliveries: 40/40 done" in lines
    assert "\x1b[" not in done.stderr and "━" not in done.stderr
    assert done.stdout.count("finished in") == 1
    json.dumps(done.stdout)  # plain text
