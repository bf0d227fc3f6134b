"""Reliability suite: three `listsync daemon` replicas on one PostgreSQL database, the emulator
injecting faults, events streaming in through the replicas' receivers, and replicas killed with
SIGKILL at random. At the end every list equals the desired membership and no accepted event is
lost. Run it alone with `pytest -m reliability`; the long configuration is `-m slow`."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.emulator import EmulatorServer, FaultRule, IterableEmulator
from tests.helpers import API_KEY, audience_event

pytestmark = pytest.mark.reliability
WRITE_KEY = "wk-reliability"
AUDIENCES = ["north", "south", "east"]
LEASE = 2.0


@pytest.fixture
def pg_database_url(pg_server_url: str) -> str:
    from tests.conftest import _fresh_pg_database

    return _fresh_pg_database(pg_server_url, None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Replica:
    def __init__(self, index: int, database_url: str, base_url: str, folder: Path) -> None:
        self.port = _free_port()
        self.config = folder / f"replica{index}.toml"
        self.log = folder / f"replica{index}.log"
        self.config.write_text(
            f"database_url = {json.dumps(database_url)}\n"
            f'[iterable]\napi_key = "{API_KEY}"\nbase_url = "{base_url}"\nmax_attempts = 3\n'
            "retry_base_seconds = 0.01\nretry_max_seconds = 0.05\n"
            'rate_limits = { "GET /api/lists/getUsers" = 1000.0 }\n'
            f"[sync]\ninterval_seconds = 0.3\nbatch_size = 50\nlease_seconds = {LEASE}\n"
            "retry_base_seconds = 0.2\nretry_max_seconds = 1\n"
            "max_unsubscribe_fraction = 1.0\n"  # progress between kills depends on load (see test_lists_kill)
            f'[receiver]\nport = {self.port}\nwrite_keys = ["{WRITE_KEY}"]\n[logging]\nlevel = "WARNING"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "listsync", "--config", str(self.config), "daemon"],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ},
        )

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def _events(rng: random.Random, users: int, rounds: int) -> list[dict[str, object]]:
    events = []
    for round_ in range(rounds):
        for audience in AUDIENCES:
            for i in rng.sample(range(users), users // 2):
                events.append(
                    audience_event(
                        audience,
                        inside=rng.random() < 0.6,
                        user_id=f"u{i}",
                        email=f"u{i}@example.com",
                        at=round_ * 1000 + rng.random() * 1000,
                    )
                )
    for seq in range(users):  # ordinary tracks: the Custom Event action, delivered once in effect
        events.append(
            {
                "type": "track",
                "event": "Page Liked",
                "userId": f"u{seq % 50}",
                "messageId": f"like-{seq}",
                "properties": {"seq": seq, "email": f"u{seq % 50}@example.com"},
            }
        )
    rng.shuffle(events)
    return events


def _feed(
    replicas: list[Replica], events: list[dict[str, object]], acked: set[str], stop: threading.Event
) -> None:
    """Post every event until some replica acknowledges it (at-least-once, as Segment's clients do)."""
    rng = random.Random(1)
    batches = [events[i : i + 40] for i in range(0, len(events), 40)]
    with httpx.Client(auth=(WRITE_KEY, ""), timeout=10) as client:
        for batch in batches:
            while not stop.is_set():
                target = rng.choice(replicas)
                try:
                    response = client.post(f"{target.url}/v1/batch", json={"batch": batch})
                except httpx.HTTPError:
                    time.sleep(0.05)
                    continue
                if response.status_code == 200:
                    acked.update(str(e["messageId"]) for e in batch)
                    break
                time.sleep(0.05)
            time.sleep(0.02)


def _settled(database_url: str) -> bool:
    engine = create_engine(database_url)
    with engine.connect() as conn:
        busy = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM inbox WHERE applied_at IS NULL)"
                " + (SELECT count(*) FROM memberships WHERE state = 'pending')"
                " + (SELECT count(*) FROM api_requests WHERE status = 'in_flight')"
                " + (SELECT count(*) FROM event_deliveries WHERE state = 'pending')"
                " + (SELECT count(*) FROM inbox WHERE routed_at IS NULL)"
            )
        ).scalar()
    engine.dispose()
    return busy == 0


def _expected(events: list[dict[str, object]]) -> dict[str, set[str]]:
    latest: dict[tuple[str, str], tuple[str, bool]] = {}
    for event in events:
        if "context" not in event:
            continue
        audience = event["context"]["personas"]["computation_key"]  # type: ignore[index]
        flag = event["traits"][audience]  # type: ignore[index]
        key = (audience, event["traits"]["email"])  # type: ignore[index]
        if key not in latest or str(event["timestamp"]) > latest[key][0]:
            latest[key] = (str(event["timestamp"]), bool(flag))
    return {
        a: {email for (aud, email), (_, inside) in latest.items() if aud == a and inside} for a in AUDIENCES
    }


@pytest.mark.parametrize(
    "kills", [pytest.param(20, id="20kills"), pytest.param(100, id="100kills", marks=pytest.mark.slow)]
)
def test_three_replicas_killed_at_random_end_exact(pg_database_url: str, tmp_path: Path, kills: int) -> None:
    rng = random.Random(kills)
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY, seed=11)
    emu.disable_rate_limits()
    for rule in (
        FaultRule("lists/subscribe", "status", probability=0.1, status=503),
        FaultRule("lists/unsubscribe", "status", probability=0.1, status=500),
        FaultRule("*", "rate_limit", probability=0.05),
        FaultRule("lists/subscribe", "drop_after", probability=0.03),
        FaultRule("lists/subscribe", "delay", delay_seconds=0.03),
        FaultRule("lists/unsubscribe", "delay", delay_seconds=0.03),
    ):
        emu.add_fault(rule)
    events = _events(rng, users=400, rounds=max(3, kills // 7))
    acked: set[str] = set()
    stop = threading.Event()
    with EmulatorServer(emu) as server:
        replicas = [Replica(i, pg_database_url, server.url, tmp_path) for i in range(3)]
        for replica in replicas:
            replica.start()
        time.sleep(1.5)
        feeder = threading.Thread(target=_feed, args=(replicas, events, acked, stop))
        feeder.start()
        try:
            for _ in range(kills):
                time.sleep(rng.uniform(0.2, 0.9))
                victim = rng.choice(replicas)
                victim.kill()
                time.sleep(rng.uniform(0.1, 0.5))
                victim.start()
            feeder.join(timeout=300)
            time.sleep(LEASE + 1)  # the last restarted replica is up; killed replicas' leases expired
            deadline = time.monotonic() + 180
            while not _settled(pg_database_url) and time.monotonic() < deadline:
                time.sleep(0.5)
            codes = [replica.stop() for replica in replicas]
        finally:
            stop.set()
            for replica in replicas:
                replica.kill()
    assert not feeder.is_alive()
    assert codes == [0, 0, 0], [r.log.read_text()[-2000:] for r in replicas]
    engine = create_engine(pg_database_url)
    with engine.connect() as conn:
        stored = {row[0] for row in conn.execute(text("SELECT message_id FROM inbox"))}
        status = {
            r["audience_key"]: dict(r) for r in conn.execute(text("SELECT * FROM audience_status")).mappings()
        }
    engine.dispose()
    assert acked - stored == set(), "an acknowledged event was lost"
    assert len(acked) == len(events)
    expected = _expected(events)
    for audience in AUDIENCES:
        lists = emu.lists_named(audience)
        assert len(lists) == 1
        assert emu.list_member_emails(lists[0]) == expected[audience]
        assert status[audience]["members"] == status[audience]["synced_members"] == len(expected[audience])
    tracked = [e for e in events if e.get("event") == "Page Liked"]
    delivered = sorted(
        body["dataFields"]["seq"] for body in emu.events.values() if "seq" in body.get("dataFields", {})
    )
    assert delivered == sorted(e["properties"]["seq"] for e in tracked), "an event action was lost or doubled"
    print(
        f"{kills} kills, {len(events)} events, {len(emu.requests)} Iterable requests, "
        f"faults {dict(emu.faults_injected)}"
    )
