"""`listsync ingest` on two processes (ingest/stream_worker.py): a worker that fails or dies stops the
ingest with an error and keeps every chunk committed before; stdin is read by the worker too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from listsync.db import models as m
from listsync.db.session import is_postgres, make_engine, session_factory
from listsync.ingest import files, stream_worker

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not stream_worker.can_fork(), reason="the worker needs fork")


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


def line(n: int) -> bytes:
    event = {"type": "track", "event": "Clicked", "userId": f"u{n}", "messageId": f"m{n}"}
    return json.dumps(event).encode() + b"\n"


def stored(factory: sessionmaker[Session]) -> set[str]:
    with factory() as session:
        return set(session.scalars(select(m.InboxEvent.message_id)))


def chunks(count: int, size: int) -> list[list[bytes]]:
    return [[line(c * size + i) for i in range(size)] for c in range(count)]


def failing_on(chunk: int, *, die: bool) -> stream_worker.ChunkParser:
    """`files._parse_lines` that fails (or ends the process) on the `chunk`-th chunk."""
    seen = [0]

    def parse(batch: list[Any]) -> list[Any]:
        seen[0] += 1
        if seen[0] == chunk:
            if die:
                os._exit(3)
            raise ValueError("unexpected")
        return files._parse_lines(batch)

    return parse


def ingest(factory: sessionmaker[Session], parse: stream_worker.ChunkParser) -> Any:
    with factory() as session:
        postgres = is_postgres(session)
    return stream_worker.ingest_forked(
        factory, chunks(4, 3), parse, source="file:test", now_fn=lambda: NOW, postgres=postgres
    )


def test_all_chunks_are_stored_in_order(factory: sessionmaker[Session]) -> None:
    counts = ingest(factory, files._parse_lines)
    assert (counts.accepted, counts.duplicates, counts.rejected) == (12, 0, 0)
    with factory() as session:
        ids = list(session.scalars(select(m.InboxEvent.message_id).order_by(m.InboxEvent.id)))
    assert ids == [f"m{n}" for n in range(12)]


@pytest.mark.parametrize("die", [False, True], ids=["fails", "dies"])
def test_a_worker_that_stops_keeps_what_was_committed(factory: sessionmaker[Session], die: bool) -> None:
    with pytest.raises(stream_worker.WorkerFailed, match="died" if die else "ValueError: unexpected"):
        ingest(factory, failing_on(3, die=die))
    assert stored(factory) == {f"m{n}" for n in range(6)}
    counts = ingest(factory, files._parse_lines)  # a rerun stores the rest, nothing twice
    assert (counts.accepted, counts.duplicates) == (6, 6)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(m.InboxEvent)) == 12


def test_listsync_ingest_reads_stdin(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'listsync.db'}"
    env = {**os.environ, "LISTSYNC_DATABASE_URL": url, "PYTHONPATH": str(REPO)}
    env.pop("LISTSYNC_CONFIG", None)
    body = b"".join(line(n) for n in range(250)) + b"not json\n"
    subprocess.run(
        [sys.executable, "-m", "listsync", "ingest", "-", "--no-progress"],
        input=body, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(m.InboxEvent)) == 250
            assert conn.scalar(select(func.count()).select_from(m.DeadLetter)) == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("forked", [True, False], ids=["worker", "in-process"])
def test_both_ways_of_reading_a_stream_store_the_same(
    factory: sessionmaker[Session], forked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream_worker, "can_fork", lambda: forked)
    body = [line(n) for n in range(7)] + [b"\n", b"[1]\n", line(3)]
    counts = files.ingest_stream(factory, body, source="file:test", now_fn=lambda: NOW, chunk=4)
    assert (counts.accepted, counts.duplicates, counts.rejected) == (7, 1, 1)
    assert stored(factory) == {f"m{n}" for n in range(7)}
