"""`listsync daemon` end to end, as a user runs it: a TOML file with a custom mapping, Segment's own
Python client sending to the receiver, the emulator over HTTP, /metrics, and a clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from segment.analytics import Client

from tests.emulator import EmulatorServer, IterableEmulator
from tests.helpers import API_KEY

WRITE_KEY = "wk-daemon-e2e"
CONFIG = """
database_url = {database_url}
[iterable]
api_key = "{api_key}"
base_url = "{base_url}"
[receiver]
port = {port}
write_keys = ["{write_key}"]
[sync]
interval_seconds = 0.3
[logging]
json_format = true
[[actions.mappings]]
name = "Signed Up to profile"
trigger = 'type = "track" and event = "Signed Up"'
action = "upsert_user"
[actions.mappings.fields]
email = {{ "@path" = "$.properties.email" }}
[actions.mappings.fields.dataFields]
plan = {{ "@path" = "$.properties.plan" }}
greeting = {{ "@template" = "Hello {{{{properties.first_name}}}}" }}
source = "signup-form"
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(condition: Callable[[], bool], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_daemon_with_segment_client_custom_mapping_metrics_and_sigterm(database_url: str, tmp_path: Path) -> None:
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    port = _free_port()
    with EmulatorServer(emu) as server:
        config = tmp_path / "listsync.toml"
        config.write_text(CONFIG.format(database_url=json.dumps(database_url), api_key=API_KEY, base_url=server.url,
                                        port=port, write_key=WRITE_KEY))
        log = tmp_path / "daemon.log"
        proc = subprocess.Popen([sys.executable, "-m", "listsync", "--config", str(config), "daemon"],
                                stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ})
        try:
            url = f"http://127.0.0.1:{port}"
            assert _wait(lambda: _healthy(url)), log.read_text()
            segment = Client(write_key=WRITE_KEY, host=url, sync_mode=True, max_retries=1)
            segment.track(user_id="u7", event="Signed Up",
                          properties={"email": "ada@example.com", "plan": "pro", "first_name": "Ada"})
            for i in range(3):
                segment.identify(user_id=f"m{i}", traits={"email": f"m{i}@example.com", "vip_buyers": True},
                                 context={"personas": {"computation_class": "audience", "computation_key": "vip_buyers"}})
            segment.flush()

            def synced() -> bool:
                user = emu.user_by_email("ada@example.com")
                lists = emu.lists_named("vip_buyers")
                return bool(user and user.data_fields and lists and len(emu.list_member_emails(lists[0])) == 3)

            assert _wait(synced), log.read_text()[-3000:]
            user = emu.user_by_email("ada@example.com")
            assert user is not None and user.user_id == "u7"
            assert user.data_fields == {"plan": "pro", "greeting": "Hello Ada", "source": "signup-form"}
            assert emu.list_member_emails(emu.lists_named("vip_buyers")[0]) == {f"m{i}@example.com" for i in range(3)}

            metrics = httpx.get(f"{url}/metrics").text
            assert 'listsync_events_received_total{outcome="accepted",source="receiver"} 4.0' in metrics
            assert 'listsync_pending_members{audience="vip_buyers",direction="subscribe"} 0.0' in metrics
            assert 'endpoint="POST /api/lists/subscribe",status="200"' in metrics
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert {"daemon_started", "daemon_stopped"} <= {line.get("event") for line in lines}
    assert API_KEY not in log.read_text() and WRITE_KEY not in log.read_text()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
