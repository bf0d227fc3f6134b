"""Issue 10's defects end to end, one regression test each, on SQLite and PostgreSQL: the receiver
over a real socket, the drop folder, apply and a sync against the emulator."""

from __future__ import annotations

import gzip
import json
import os
import socket
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from listsync import sync
from listsync.db import models as m
from listsync.db.session import make_engine, session_factory, transaction
from listsync.ingest import extract, files, http_server, validate
from listsync.ingest.receiver import ReceiverServer, build_app
from listsync.lists.apply import apply_inbox
from tests.emulator import EmulatorServer, IterableEmulator
from tests.helpers import API_KEY, audience_event, ingest, sync_context
from tests.integration.test_cli import config_data
from tests.integration.test_receiver import AUTH, KEY, batch, make_settings, track

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def server(factory: sessionmaker[Session]) -> Iterator[ReceiverServer]:
    running = ReceiverServer(build_app(make_settings(), factory), port=0)
    running.start()
    yield running
    running.stop()


def rejected(factory: sessionmaker[Session]) -> list[dict[str, Any]]:
    with factory() as session:
        return [dict(r) for r in session.execute(text("SELECT * FROM rejected_events ORDER BY received_at")).mappings()]


def inbox_ids(factory: sessionmaker[Session]) -> set[str]:
    with factory() as session:
        return set(session.scalars(select(m.InboxEvent.message_id)))


# --- 1. regex denial of service -------------------------------------------------------------------


def test_a_long_rejected_string_is_answered_at_once(server: ReceiverServer, factory: sessionmaker[Session]) -> None:
    body = json.dumps({"event": "E", "properties": {"n": "a" * 16000}, "type": "identify"})
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.post("/v1/track", content=body, auth=AUTH)
        health = http.get("/health")
    assert response.status_code == 400 and health.status_code == 200
    assert time.monotonic() - started < 5  # took ~22 s with the old pattern
    assert [r["reason"].split(":")[0] for r in rejected(factory)] == ["type_mismatch"]


# --- 2 and 3. poison events and batches -------------------------------------------------------------


HOSTILE_ITEMS = [
    '{"type":"track","event":"E","userId":"u","properties":{"n":"\\ud800"}}',
    '{"type":"track","event":"E","userId":"u\\udfff"}',
    '{"type":"track","event":"E","userId":"u","properties":' + '{"x":' * 487 + "{}" + "}" * 487 + "}",
    '{"type":"track","event":"E","userId":"u","properties":' + '[' * 990 + "]" * 990 + "}",
    '{"type":"track","event":"E","userId":"u","timestamp":"9999-12-31T23:59:59-14:00"}',
    '{"type":"track","event":"E","userId":"u","properties":{"n":1e999}}',
    '{"type":"track","event":"E","userId":"u","messageId":"' + "m" * 300 + '"}',
    '{"type":"track","event":"' + "E" * 300 + '","userId":"u"}',
    '{"type":"track","event":"Audience Entered","userId":"u","properties":{"audience_key":"'
    + "k" * 300
    + '"}}',
]


def test_bad_items_in_a_batch_are_recorded_alone_and_the_good_ones_stored(
    server: ReceiverServer, factory: sessionmaker[Session]
) -> None:
    good = [json.dumps(track(f"good{i}")) for i in range(3)]
    body = '{"batch":[' + ",".join([good[0], *HOSTILE_ITEMS, good[1], good[2]]) + "]}"
    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.post("/v1/batch", content=body.encode(), auth=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 3 and response.json()["rejected"] == len(HOSTILE_ITEMS)
    assert inbox_ids(factory) == {"msg-good0-vip-True", "msg-good1-vip-True", "msg-good2-vip-True"}
    reasons = [r["reason"] for r in rejected(factory)]
    assert len(reasons) == len(HOSTILE_ITEMS) and all(":" in r for r in reasons)


def test_single_hostile_events_get_a_400_never_a_5xx(server: ReceiverServer, factory: sessionmaker[Session]) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        statuses = [http.post("/v1/track", content=item.encode(), auth=AUTH).status_code for item in HOSTILE_ITEMS]
    assert statuses == [400] * len(HOSTILE_ITEMS)
    assert len(rejected(factory)) == len(HOSTILE_ITEMS) and inbox_ids(factory) == set()


def test_an_event_that_fails_when_applied_is_dead_lettered_and_the_rest_apply(
    database_url: str, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An older release accepted audience keys of any length; PostgreSQL refuses one of 300
    # characters when apply creates its audience. SQLite stores it: there it simply applies.
    long_key = "k" * 300
    monkeypatch.setattr(validate, "MAX_NAME_LENGTH", 10_000)
    events = [
        audience_event("vip", inside=True, user_id="before", message_id="m-before"),
        audience_event(long_key, inside=True, user_id="poison", message_id="m-poison"),
        audience_event("vip", inside=True, user_id="after", message_id="m-after"),
    ]
    items = [extract.RawEvent(raw=e, size=None) for e in events]
    with transaction(factory) as session:
        from listsync.ingest.accept import accept_items

        assert accept_items(session, items, source="test", now=NOW).accepted == 3
    settings = make_settings(database_url)
    with transaction(factory) as session:
        assert apply_inbox(session, settings, NOW) == 3
    with transaction(factory) as session:  # nothing is left to block a later run
        assert apply_inbox(session, settings, NOW) == 0
    with factory() as session:
        users = set(session.scalars(select(m.Membership.user_id)))
    assert {"before", "after"} <= users
    if database_url.startswith("postgresql"):
        assert "poison" not in users
        (row,) = rejected(factory)
        assert row["reason"].startswith("apply_failed: StringDataRightTruncation")
        assert "m-poison" in row["payload"]


def test_a_poison_event_never_stops_the_sync_of_the_others(database_url: str) -> None:
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server, sync_context(_settings(database_url, server.url)) as ctx:
        engage = {"campaignId": "777", "channelUnsubscribe": "true"}
        personas = {"audience_settings": engage}
        good = audience_event("vip", inside=True, user_id="u1", email="u1@x.com")
        good["context"]["personas"].update(personas)
        poison = audience_event("vip", inside=True, user_id="u2", traits={"n": [1e999]})
        counts = ingest(ctx, [good, poison])
        assert (counts.accepted, counts.rejected) == (1, 1)
        assert sync.run_once(ctx).exit_code == 0
        ingest(ctx, [audience_event("vip", inside=False, user_id="u1", email="u1@x.com", at=5)])
        assert sync.run_once(ctx).exit_code == 0
        (list_id,) = emu.lists_named("vip")
        assert emu.list_members(list_id) == set()
        (unsubscribe,) = [r.body for r in emu.requests if r.endpoint == "lists/unsubscribe"]
        # Engage's string settings reach Iterable as the types its API documents.
        assert unsubscribe["campaignId"] == 777 and unsubscribe["channelUnsubscribe"] is True


def _settings(database_url: str, url: str) -> Any:
    from listsync.config import Settings

    return Settings(**config_data(database_url, url))


# --- 4 and 7. the drop folder ---------------------------------------------------------------------


def line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


def poll(factory: sessionmaker[Session], folder: Path) -> Any:
    return files.poll_folder(factory, folder, lambda: NOW, min_age_seconds=0)


def test_a_corrupt_file_is_quarantined_and_the_next_files_are_read(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    (tmp_path / "a.ndjson.gz").write_bytes(gzip.compress(line(track("a")))[:-12] + b"garbage!" * 3)
    deep = b'{"type":"track","event":"E","userId":"u","properties":' + b'{"x":' * 990 + b"{}" + b"}" * 991
    (tmp_path / "b.ndjson").write_bytes(line(track("b")) + deep + b"\n" + b"\xff\xfe\n")
    first = poll(factory, tmp_path)
    again = poll(factory, tmp_path)
    assert (first.accepted, first.rejected) == (1, 2)
    assert (again.accepted, again.rejected) == (0, 0)
    assert inbox_ids(factory) == {"msg-b-vip-True"}
    with factory() as session:
        files = {Path(f.path).name: f for f in session.scalars(select(m.SourceFile))}
    assert files["a.ndjson.gz"].error is not None and files["b.ndjson"].error is None
    reasons = sorted(r["reason"].split(":")[0] for r in rejected(factory))
    assert reasons == ["bad_file", "malformed_json", "too_deep"]


def test_links_out_of_the_folder_and_fifos_are_never_opened(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    secret = tmp_path / "listsync.toml"
    secret.write_text('database_url = "postgresql://listsync:hunter2-secret@db/listsync"\n')
    (folder / "config.ndjson").symlink_to(secret)
    inside = folder / "real.data"
    inside.write_bytes(line(track("linked")))
    (folder / "alias.ndjson").symlink_to(inside)
    os.mkfifo(folder / "pipe.ndjson")
    counts = poll(factory, folder)
    assert counts.accepted == 1 and inbox_ids(factory) == {"msg-linked-vip-True"}
    kept = json.dumps(rejected(factory), default=str)
    assert "hunter2" not in kept
    assert "link_outside_folder" in kept and "not_a_file" in kept
    poll(factory, folder)
    assert len(rejected(factory)) == 2  # a quarantine is recorded once


def test_a_file_rewritten_under_a_name_already_read_is_read_again(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    path = tmp_path / "daily.ndjson"
    path.write_bytes(line(track("day1")))
    os.utime(path, ns=(time.time_ns() - 100 * 10**9,) * 2)
    assert poll(factory, tmp_path).accepted == 1
    path.write_bytes(line(track("day1")) + line(track("day2")))
    os.utime(path, ns=(time.time_ns() - 50 * 10**9,) * 2)
    again = poll(factory, tmp_path)
    assert (again.accepted, again.duplicates) == (1, 1)
    assert inbox_ids(factory) == {"msg-day1-vip-True", "msg-day2-vip-True"}


def test_a_huge_line_is_refused_without_being_held(factory: sessionmaker[Session], tmp_path: Path) -> None:
    huge = b'{"type":"track","event":"E","userId":"u","properties":{"n":"' + b"a" * 5_000_000 + b'"}}\n'
    (tmp_path / "big.ndjson").write_bytes(huge + line(track("after")))
    counts = poll(factory, tmp_path)
    assert (counts.accepted, counts.rejected) == (1, 1)
    (row,) = rejected(factory)
    assert row["reason"].startswith("event_too_large: a line of 5000064 bytes")
    assert len(row["payload"]) <= 1024


# --- 5 and 6. oversized bodies, keep-alive, slow clients --------------------------------------------


def test_a_client_that_writes_its_whole_body_first_receives_the_answer(server: ReceiverServer) -> None:
    body = b'{"batch":[' + b'"x",' * 200_000 + b'"x"]}'  # 800 KB
    request = urllib.request.Request(
        f"{server.url}/v1/batch",
        data=body,
        headers={"Authorization": "Basic " + b64encode(f"{KEY}:".encode()).decode()},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert "body_too_large" in refused.value.read().decode()


def test_accepted_connections_have_nagle_off(server: ReceiverServer) -> None:
    listener = server._socket
    assert listener is not None and listener.proto == socket.IPPROTO_TCP
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_client_trickling_its_headers_is_disconnected(
    factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_server, "HEADER_TIMEOUT_SECONDS", 0.5)
    running = ReceiverServer(build_app(make_settings(), factory), port=0)
    running.start()
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=20) as slow:
            slow.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\n")
            deadline = time.monotonic() + 20
            closed = False
            while time.monotonic() < deadline and not closed:
                time.sleep(0.2)
                try:
                    slow.sendall(b"X")  # one header byte at a time, as a slowloris does
                except OSError:
                    closed = True
                    break
                slow.settimeout(0.01)
                try:
                    closed = slow.recv(1) == b""
                except TimeoutError:
                    pass
                except OSError:
                    closed = True
        assert closed
        with httpx.Client(base_url=running.url, timeout=30) as http:  # others are still served
            assert http.post("/v1/batch", content=batch(track("u1")), auth=AUTH).status_code == 200
    finally:
        running.stop()
