"""The README's quick start as a new user runs it: `listsync daemon --config config.dev.toml`, one
event with curl's Basic auth (the documented write key), then `status` and `plan` show the audience.
Also the emulator's overview page for the local-development loop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.emulator import EmulatorServer, IterableEmulator
from tests.integration.test_daemon_e2e import _free_port, _healthy, _wait

ROOT = Path(__file__).resolve().parents[2]
EVENT = {
    "userId": "u1",
    "traits": {"email": "ada@example.com", "newsletter_vip": True},
    "context": {"personas": {"computation_class": "audience", "computation_key": "newsletter_vip"}},
}


def _listsync(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "listsync", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_quick_start_gets_a_first_event_into_status_and_plan(tmp_path: Path) -> None:
    shutil.copy(ROOT / "config.dev.toml", tmp_path)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LISTSYNC_")}
    env.update(PYTHONPATH=str(ROOT), LISTSYNC_RECEIVER__PORT=str(port))
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "listsync", "daemon", "--config", "config.dev.toml"],
        cwd=tmp_path, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert _wait(lambda: _healthy(url)), log.read_text()
        answer = httpx.post(f"{url}/v1/identify", json=EVENT, auth=("dev-write-key", ""))
        assert answer.status_code == 200 and answer.json()["success"] is True

        def listed() -> bool:
            done = _listsync(tmp_path, "status", "--json", "--config", "config.dev.toml", env=env)
            return done.returncode == 0 and any(r["members"] == 1 for r in json.loads(done.stdout))

        assert _wait(listed), log.read_text()
        plan = _listsync(tmp_path, "plan", "--config", "config.dev.toml", env=env)
        assert plan.returncode == 0, plan.stderr
        row = next(line for line in plan.stdout.splitlines() if line.startswith("newsletter_vip"))
        assert row.split()[1:3] == ["1", "0"]  # one to subscribe, none to unsubscribe (dry run)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    text = log.read_text()
    assert code == 0, text
    assert "DEVELOPMENT MODE" in text and "listsync daemon: config " in text


def test_emulator_overview_shows_lists_and_members() -> None:
    emu = IterableEmulator(project_type="hybrid", api_keys="dev")
    list_id = emu.create_list("newsletter_vip")
    emu.add_list_member(list_id, email="ada@example.com", user_id="u1")
    with EmulatorServer(emu) as server:
        overview = httpx.get(f"{server.url}/_emulator").json()
    assert overview["lists"] == [
        {"id": list_id, "name": "newsletter_vip", "members": [{"email": "ada@example.com", "userId": "u1"}]}
    ]
    assert overview["users"] == 1
