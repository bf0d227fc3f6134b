"""Fuzz the receiver with malformed bodies: nothing crashes (no 5xx), and every rejection is
recorded in rejected_events. Seeded, so a failure reproduces."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from listsync.config import Settings
from listsync.db.session import make_engine, session_factory
from listsync.ingest.receiver import build_app

KEY = "wk-fuzz"
PATHS = ["/v1/batch", "/v1/identify", "/v1/track", "/v1/page", "/v1/screen", "/v1/group", "/v1/alias"]


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


def _mutations(rng: random.Random) -> Iterator[tuple[bytes, dict[str, str]]]:
    good = json.dumps({"batch": [{"type": "track", "event": "E", "userId": "u1", "messageId": "m"}]}).encode()
    values: list[object] = [None, True, 1, -1.5, "", "x" * 60, [], {}, [1, {}], {"a": [None]}]
    for _ in range(150):
        kind = rng.randrange(7)
        if kind == 0:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))), {}
        elif kind == 1:
            cut = rng.randrange(1, len(good))
            yield good[:cut], {}
        elif kind == 2:
            event = {k: rng.choice(values) for k in rng.sample(["type", "userId", "anonymousId", "event",
                                                                 "traits", "properties", "context",
                                                                 "timestamp", "messageId"], rng.randrange(1, 9))}
            yield json.dumps({"batch": [event]}).encode(), {}
        elif kind == 3:
            yield json.dumps(rng.choice(values)).encode(), {}
        elif kind == 4:
            yield gzip.compress(bytes(rng.randrange(256) for _ in range(50)))[: rng.randrange(5, 40)], {
                "Content-Encoding": "gzip"}
        elif kind == 5:
            yield json.dumps({"batch": rng.choice(values)}).encode(), {}
        else:
            yield b"{" * rng.randrange(1, 5000), {}


def test_malformed_bodies_never_crash_and_are_all_recorded(factory: sessionmaker[Session]) -> None:
    app = build_app(Settings(receiver={"write_keys": [KEY]}), factory)
    rng = random.Random(2026)
    refused = 0
    with TestClient(app) as client:
        for body, headers in _mutations(rng):
            response = client.post(rng.choice(PATHS), content=body, auth=(KEY, ""),
                                   headers={"Content-Type": "application/json", **headers})
            assert response.status_code in (200, 400), (response.status_code, body[:80])
            if response.status_code == 400:
                refused += 1
                assert response.json()["success"] is False
    with factory() as session:
        recorded = session.scalar(text("SELECT count(*) FROM rejected_events")) or 0
        reasons = session.scalars(text("SELECT reason FROM rejected_events")).all()
    assert refused > 100
    assert recorded >= refused
    assert all(":" in reason for reason in reasons)
