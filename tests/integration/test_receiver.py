"""The HTTP receiver on both databases, in-process (TestClient) and over a real socket
(ReceiverServer), then with Segment's own Python library, then killed with SIGKILL mid-stream."""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from listsync.config import Settings
from listsync.db import models as m
from listsync.db.session import make_engine, session_factory, transaction
from listsync.ingest.http_body import gunzip_capped
from listsync.ingest.receiver import ReceiverServer, build_app
from listsync.lists.apply import apply_inbox

KEY = "test-write-key"
AUTH = (KEY, "")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


def make_settings(database_url: str = "sqlite://", keys: tuple[str, ...] = (KEY,)) -> Settings:
    return Settings(database_url=database_url, receiver={"write_keys": list(keys)})


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(params=["testclient", "server"])
def client(request: pytest.FixtureRequest, factory: sessionmaker[Session]) -> Iterator[httpx.Client]:
    """The same app in-process and behind uvicorn on a free port."""
    app = build_app(make_settings(), factory)
    if request.param == "testclient":
        with TestClient(app) as test_client:
            yield test_client
        return
    server = ReceiverServer(app, port=0)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            yield http
    finally:
        server.stop()


def track(user: str, audience: str = "vip", entered: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Audience Entered" if entered else "Audience Exited",
        "userId": user,
        "messageId": f"msg-{user}-{audience}-{entered}",
        "properties": {"audience_key": audience, audience: entered},
        "timestamp": "2024-05-01T10:00:00Z",
        **extra,
    }


def count(factory: sessionmaker[Session], table: Any, *where: Any) -> int:
    with factory() as session:
        return session.scalar(select(func.count()).select_from(table).where(*where)) or 0


def dead_letters(factory: sessionmaker[Session]) -> list[m.DeadLetter]:
    with factory() as session:
        return list(session.scalars(select(m.DeadLetter).order_by(m.DeadLetter.id)))


def batch(*events: dict[str, Any]) -> bytes:
    return json.dumps({"batch": list(events)}).encode()


# --- authentication ---------------------------------------------------------------------------


def test_write_key_is_required(client: httpx.Client, factory: sessionmaker[Session]) -> None:
    body = batch(track("u1"))
    refused = [
        client.post("/v1/batch", content=body),
        client.post("/v1/batch", content=body, auth=("wrong-key", "")),
        client.post("/v1/batch", content=body, headers={"Authorization": "Bearer wrong-key"}),
        client.post("/v1/batch", content=body, headers={"Authorization": "Basic !!notbase64"}),
        client.post("/v1/batch", content=json.dumps({"batch": [track("u1")], "writeKey": "nope"})),
    ]
    for response in refused:
        assert response.status_code == 401
        assert response.json() == {"success": False, "error": "invalid write key"}
    # An unauthenticated sender leaves no trace in the store, not even a rejected row.
    assert count(factory, m.InboxEvent) == 0 and dead_letters(factory) == []

    assert client.post("/v1/batch", content=body, auth=(KEY, "any password")).status_code == 200
    assert client.post("/v1/batch", content=body, headers={"Authorization": "Bearer " + KEY}).status_code == 200


def test_write_key_in_the_body_is_accepted_and_not_stored(
    client: httpx.Client, factory: sessionmaker[Session]
) -> None:
    single = {**track("u1"), "writeKey": KEY}
    assert client.post("/v1/track", content=json.dumps(single)).status_code == 200
    with_key = {"batch": [{**track("u2"), "writeKey": KEY}], "writeKey": KEY}
    assert client.post("/v1/batch", content=json.dumps(with_key)).status_code == 200
    with factory() as session:
        payloads = list(session.scalars(select(m.InboxEvent.payload)))
    assert len(payloads) == 2
    assert all("writeKey" not in json.dumps(p) for p in payloads)


def test_no_configured_keys_refuses_everything(
    factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="listsync.ingest.receiver"):
        app = build_app(make_settings(keys=()), factory)
    assert [r.event for r in caplog.records] == ["receiver_no_write_keys"]  # type: ignore[attr-defined]
    with TestClient(app) as test_client:
        response = test_client.post("/v1/batch", content=batch(track("u1")), auth=("", ""))
        assert response.status_code == 401
        body = json.dumps({"batch": [track("u1")], "writeKey": ""})
        assert test_client.post("/v1/batch", content=body).status_code == 401


def test_secrets_are_never_logged(
    client: httpx.Client, factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        client.post("/v1/batch", content=batch(track("u1")), auth=AUTH)
        client.post("/v1/batch", content=b"{broken", auth=AUTH)
        client.post("/v1/batch", content=batch(track("u1")), auth=("guess-" + KEY, ""))
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert KEY not in logged and "Basic " not in logged


# --- bodies and events ------------------------------------------------------------------------


def test_batch_and_single_endpoints_store_events(
    client: httpx.Client, factory: sessionmaker[Session]
) -> None:
    response = client.post("/v1/batch", content=batch(track("u1"), track("u2")), auth=AUTH)
    assert response.status_code == 200
    assert response.json() == {"success": True, "accepted": 2, "duplicates": 0, "rejected": 0}
    identify = {
        "userId": "u3",
        "traits": {"vip": True, "email": "U3@Example.com"},
        "context": {"personas": {"computation_class": "audience", "computation_key": "vip"}},
    }
    assert client.post("/v1/identify", json=identify, auth=AUTH).status_code == 200
    assert client.post("/v1/t", json=track("u4"), auth=AUTH).status_code == 200
    assert client.post("/v1/b", content=batch(track("u5")), auth=AUTH).status_code == 200
    assert count(factory, m.InboxEvent) == 5
    with factory() as session:
        stored = session.scalars(select(m.InboxEvent).where(m.InboxEvent.user_id == "u3")).one()
    assert (stored.type, stored.email, stored.is_audience, stored.source) == (
        "identify",
        "u3@example.com",
        True,
        "receiver",
    )


def test_gzip_bodies(client: httpx.Client, factory: sessionmaker[Session]) -> None:
    zipped = gzip.compress(batch(*(track(f"u{i}") for i in range(50))))
    response = client.post("/v1/batch", content=zipped, headers={"Content-Encoding": "gzip"}, auth=AUTH)
    assert response.status_code == 200 and response.json()["accepted"] == 50
    assert count(factory, m.InboxEvent) == 50

    broken = client.post("/v1/batch", content=zipped[:-20], headers={"Content-Encoding": "gzip"}, auth=AUTH)
    assert broken.status_code == 400 and broken.json()["error"].startswith("invalid_encoding")
    brotli = client.post("/v1/batch", content=b"xx", headers={"Content-Encoding": "br"}, auth=AUTH)
    assert brotli.status_code == 400 and brotli.json()["error"].startswith("invalid_encoding")
    assert [d.reason.split(":")[0] for d in dead_letters(factory)] == ["invalid_encoding"] * 2


def test_gzip_bomb_stops_at_the_limit(client: httpx.Client, factory: sessionmaker[Session]) -> None:
    # 50 MB of zeros compress to ~50 KB; only 500 KB + 1 may ever be inflated.
    bomb = gzip.compress(b'{"batch": [' + b" " * 50_000_000)
    assert len(bomb) < 500_000
    response = client.post("/v1/batch", content=bomb, headers={"Content-Encoding": "gzip"}, auth=AUTH)
    assert response.status_code == 400
    assert response.json()["error"].startswith("body_too_large")
    [letter] = dead_letters(factory)
    assert letter.reason.startswith("body_too_large") and len(letter.payload) <= 64 * 1024


def test_gunzip_capped_joins_members_and_caps_output() -> None:
    data = gzip.compress(b"abc") + gzip.compress(b"def")
    assert gunzip_capped(data, 100) == b"abcdef"
    assert gunzip_capped(gzip.compress(b"x" * 1000), 10) == b"x" * 10
    with pytest.raises(EOFError):
        gunzip_capped(gzip.compress(b"abc" * 100)[:-12], 1000)


def test_body_over_500kb_is_refused_and_dead_lettered(
    client: httpx.Client, factory: sessionmaker[Session]
) -> None:
    events = [track(f"user-{i}", padding="p" * 1_000) for i in range(600)]
    body = batch(*events)
    assert len(body) > 500 * 1024
    response = client.post("/v1/batch", content=body, auth=AUTH)
    assert response.status_code == 400
    assert response.json()["error"].startswith("body_too_large")
    assert count(factory, m.InboxEvent) == 0
    [letter] = dead_letters(factory)
    assert letter.reason.startswith(f"body_too_large: {len(body)} bytes")
    assert letter.source == "receiver" and len(letter.payload) <= 64 * 1024


def test_oversized_event_is_rejected_alone(client: httpx.Client, factory: sessionmaker[Session]) -> None:
    big = track("big", padding="x" * 33 * 1024)
    response = client.post("/v1/batch", content=batch(track("u1"), big, track("u2")), auth=AUTH)
    assert response.status_code == 200
    assert response.json() == {"success": True, "accepted": 2, "duplicates": 0, "rejected": 1}
    with factory() as session:
        users = set(session.scalars(select(m.InboxEvent.user_id)))
    assert users == {"u1", "u2"}
    [letter] = dead_letters(factory)
    assert letter.reason.startswith("event_too_large")


def test_malformed_json_is_a_400_with_a_rejected_row(
    client: httpx.Client, factory: sessionmaker[Session]
) -> None:
    response = client.post("/v1/batch", content=b'{"batch": [{"type": "track",', auth=AUTH)
    assert response.status_code == 400
    assert response.json()["success"] is False
    assert response.json()["error"].startswith("malformed_json")
    [letter] = dead_letters(factory)
    assert letter.reason.startswith("malformed_json") and letter.payload.startswith('{"batch"')


def test_a_body_whose_every_event_is_rejected_is_a_400(
    client: httpx.Client, factory: sessionmaker[Session]
) -> None:
    anonymous = {"type": "track", "event": "Clicked"}
    response = client.post("/v1/track", json=anonymous, auth=AUTH)
    assert response.status_code == 400
    assert response.json()["error"].startswith("missing_identifier")
    mismatch = client.post("/v1/identify", json=track("u1"), auth=AUTH)
    assert mismatch.status_code == 400 and mismatch.json()["error"].startswith("type_mismatch")
    assert client.post("/v1/batch", content=batch(anonymous, anonymous), auth=AUTH).status_code == 400
    empty = client.post("/v1/batch", content=batch(), auth=AUTH)
    assert empty.status_code == 200 and empty.json()["accepted"] == 0
    assert len(dead_letters(factory)) == 4


def test_duplicates_are_stored_once(client: httpx.Client, factory: sessionmaker[Session]) -> None:
    event = track("u1")
    first = client.post("/v1/batch", content=batch(event, event), auth=AUTH)
    again = client.post("/v1/track", json=event, auth=AUTH)
    assert first.json() == {"success": True, "accepted": 1, "duplicates": 1, "rejected": 0}
    assert again.status_code == 200 and again.json()["duplicates"] == 1
    assert count(factory, m.InboxEvent) == 1


def test_health(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_database_down_answers_503(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "listsync.db"  # SQLite cannot create it: every query fails
    engine = make_engine(f"sqlite:///{missing}")
    app = build_app(make_settings(), session_factory(engine))
    with TestClient(app) as test_client:
        assert test_client.get("/health").status_code == 503
        response = test_client.post("/v1/batch", content=batch(track("u1")), auth=AUTH)
        assert response.status_code == 503 and response.json()["success"] is False
    engine.dispose()


def test_on_accepted_runs_after_the_commit(factory: sessionmaker[Session]) -> None:
    seen: list[int] = []
    app = build_app(make_settings(), factory, on_accepted=lambda: seen.append(count(factory, m.InboxEvent)))
    with TestClient(app) as test_client:
        test_client.post("/v1/batch", content=batch(track("u1"), track("u2")), auth=AUTH)
        test_client.post("/v1/batch", content=batch(track("u1")), auth=AUTH)  # only a duplicate
        test_client.post("/v1/batch", content=b"nope", auth=AUTH)  # rejected
    assert seen == [2]  # visible from another session when called; not called without new events


def test_server_stop_is_graceful_and_port_is_reported(factory: sessionmaker[Session]) -> None:
    server = ReceiverServer(build_app(make_settings(), factory), port=0)
    server.start()
    assert server.port > 0
    assert httpx.get(server.url + "/health").status_code == 200
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)


# --- Segment's own client ---------------------------------------------------------------------


def _segment_events(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """n audience events over 1,000 (audience, user) pairs, sent in an order unrelated to time."""
    rng = random.Random(seed)
    audiences = [f"aud_{i}" for i in range(5)]
    users = [f"user-{i}" for i in range(200)]
    stamps = list(range(n))
    rng.shuffle(stamps)  # distinct timestamps, so "latest wins" has one answer
    events = []
    for i in range(n):
        audience, user, flag = rng.choice(audiences), rng.choice(users), rng.random() < 0.6
        events.append(
            {
                "kind": rng.choice(["identify", "track"]),
                "audience": audience,
                "user": user,
                "flag": flag,
                "timestamp": T0 + timedelta(seconds=stamps[i]),
                "message_id": str(uuid.UUID(int=rng.getrandbits(128))),
            }
        )
    return events


def _send_with_segment(url: str, events: list[dict[str, Any]]) -> list[Any]:
    from segment.analytics import Client

    errors: list[Any] = []
    segment = Client(
        write_key=KEY,
        host=url,
        gzip=True,
        max_retries=2,
        upload_size=100,
        thread=4,  # four uploads in flight, as a busy sender would have
        max_queue_size=len(events) + 1,
        on_error=lambda error, items: errors.append((error, len(items))),
    )
    for e in events:
        email = f"{e['user']}@example.com"
        if e["kind"] == "identify":
            segment.identify(
                user_id=e["user"],
                traits={e["audience"]: e["flag"], "email": email},
                context={"personas": {"computation_class": "audience", "computation_key": e["audience"]}},
                timestamp=e["timestamp"],
                message_id=e["message_id"],
            )
        else:
            segment.track(
                user_id=e["user"],
                event="Audience Entered" if e["flag"] else "Audience Exited",
                properties={"audience_key": e["audience"], e["audience"]: e["flag"], "email": email},
                timestamp=e["timestamp"],
                message_id=e["message_id"],
            )
    segment.shutdown()
    return errors


def test_segment_python_library_end_to_end(factory: sessionmaker[Session], database_url: str) -> None:
    n = 10_000
    events = _segment_events(n)
    server = ReceiverServer(build_app(make_settings(database_url), factory), port=0)
    server.start()
    try:
        started = time.perf_counter()
        errors = _send_with_segment(server.url, events)
        elapsed = time.perf_counter() - started
    finally:
        server.stop()
    print(f"\nsegment client -> receiver ({database_url.split(':')[0]}): {n / elapsed:,.0f} events/s")
    assert errors == []

    with factory() as session:
        stored = set(session.scalars(select(m.InboxEvent.message_id)))
    assert stored == {e["message_id"] for e in events}

    settings = make_settings(database_url)
    while True:
        with transaction(factory) as session:
            if apply_inbox(session, settings, T0) == 0:
                break

    expected: dict[tuple[str, str], tuple[datetime, bool]] = {}
    for e in events:
        key = (e["audience"], e["user"])
        if key not in expected or e["timestamp"] > expected[key][0]:
            expected[key] = (e["timestamp"], e["flag"])
    with factory() as session:
        rows = session.execute(
            select(
                m.Audience.audience_key, m.Membership.user_id, m.Membership.email, m.Membership.desired
            ).join(m.Audience, m.Audience.id == m.Membership.audience_id)
        ).all()
    actual = {(a, u): (email, str(d)) for a, u, email, d in rows}
    assert actual == {
        key: (f"{key[1]}@example.com", "in" if flag else "out") for key, (_, flag) in expected.items()
    }


# --- SIGKILL mid-stream -----------------------------------------------------------------------


def _start_receiver_process(database_url: str, workdir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {
        **os.environ,
        "LISTSYNC_DATABASE_URL": database_url,
        "LISTSYNC_RECEIVER__PORT": "0",
        "LISTSYNC_RECEIVER__WRITE_KEYS": json.dumps([KEY]),
        "PYTHONPATH": str(REPO),
    }
    env.pop("LISTSYNC_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "integration" / "receiver_proc.py")],
        cwd=workdir,  # no listsync.toml here
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = proc.stdout.readline().strip()
    if not port:
        proc.kill()
        pytest.fail("the receiver process did not start")
    return proc, f"http://127.0.0.1:{port}"


def _stream_until_refused(url: str, acked: list[str], sender: int, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=10, auth=AUTH) as http:
        for n in range(1_000_000):
            if stop.is_set():
                return
            events = [track(f"s{sender}-{n}-{i}", messageId=f"kill-{sender}-{n}-{i}") for i in range(20)]
            try:
                response = http.post("/v1/batch", content=batch(*events))
            except httpx.TransportError:
                return  # the process is gone
            if response.status_code == 200:
                acked.extend(e["messageId"] for e in events)


def test_sigkill_mid_stream_loses_no_acknowledged_event(
    factory: sessionmaker[Session], database_url: str, tmp_path: Path
) -> None:
    proc, url = _start_receiver_process(database_url, tmp_path)
    acked: list[str] = []
    stop = threading.Event()
    senders = [
        threading.Thread(target=_stream_until_refused, args=(url, acked, i, stop), daemon=True)
        for i in range(4)
    ]
    try:
        for thread in senders:
            thread.start()
        deadline = time.monotonic() + 20
        while len(acked) < 2_000 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
        for thread in senders:
            thread.join(15)
        if proc.stdout is not None:
            proc.stdout.close()

    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 2_000
    with factory() as session:
        stored = set(session.scalars(select(m.InboxEvent.message_id)))
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:3]}"
