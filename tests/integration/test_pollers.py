"""Pulled sources on both databases: JSON-lines streams, the drop folder (with a crash in the
middle of a file), and the SQL source's snapshot diff."""

from __future__ import annotations

import gzip
import itertools
import json
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from listsync.config import Settings
from listsync.db import models as m
from listsync.db import snapshot
from listsync.db.session import make_engine, session_factory, transaction, upgrade
from listsync.ingest import accept, files, sql_rows, sql_source, stored
from listsync.lists.apply import apply_inbox

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


def clock(start: datetime = T0) -> Callable[[], datetime]:
    """A clock that moves one second per reading, so every poll gets its own snapshot id."""
    ticks = itertools.count()
    return lambda: start + timedelta(seconds=next(ticks))


def track(user: str, audience: str = "vip", entered: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Audience Entered" if entered else "Audience Exited",
        "userId": user,
        "properties": {"audience_key": audience, audience: entered},
        "timestamp": "2024-05-01T10:00:00Z",
        **extra,
    }


def line(event: Any) -> bytes:
    return json.dumps(event).encode() + b"\n"


def count(factory: sessionmaker[Session], table: Any, *where: Any) -> int:
    with factory() as session:
        return session.scalar(select(func.count()).select_from(table).where(*where)) or 0


def apply_all(factory: sessionmaker[Session], settings: Settings) -> None:
    while True:
        with transaction(factory) as session:
            if apply_inbox(session, settings, T0) == 0:
                return


# --- ingest_stream / open_ndjson ---------------------------------------------------------------


def test_ingest_stream_good_bad_blank_and_duplicate_lines(factory: sessionmaker[Session]) -> None:
    lines = [
        line(track("u1", messageId="m1")),
        b"\n",
        line(track("u2", messageId="m2")),
        b"{not json\n",
        line({"type": "track", "event": "Audience Entered", "properties": {"audience_key": "vip"}}),
        line(track("u1", messageId="m1")),
        b"   \r\n",
        line(track("u3", messageId="m3")),
    ]
    counts = files.ingest_stream(factory, lines, source="file:test", now_fn=clock(), chunk=2)
    assert (counts.accepted, counts.duplicates, counts.rejected) == (3, 1, 2)
    assert count(factory, m.InboxEvent) == 3
    with factory() as session:
        reasons = sorted(r.split(":")[0] for r in session.scalars(select(m.DeadLetter.reason)))
    assert reasons == ["malformed_json", "missing_identifier"]


def test_open_ndjson_reads_gzip(factory: sessionmaker[Session], tmp_path: Path) -> None:
    path = tmp_path / "events.ndjson.gz"
    with gzip.open(path, "wb") as handle:
        handle.writelines(line(track(f"u{i}", messageId=f"g{i}")) for i in range(250))
    with files.open_ndjson(str(path)) as stream:
        counts = files.ingest_stream(factory, stream, source="file:gz", now_fn=clock(), chunk=100)
    assert (counts.accepted, counts.rejected) == (250, 0)
    assert count(factory, m.InboxEvent, m.InboxEvent.source == "file:gz") == 250


# --- drop folder ------------------------------------------------------------------------------


def test_poll_folder_reads_each_file_once(factory: sessionmaker[Session], tmp_path: Path) -> None:
    (tmp_path / "a.ndjson").write_bytes(b"".join(line(track(f"a{i}")) for i in range(30)))
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as handle:
        handle.writelines(line(track(f"b{i}")) for i in range(20))
    (tmp_path / "c.ndjson.tmp").write_bytes(line(track("still-being-written")))

    first = files.poll_folder(factory, tmp_path, clock(), chunk=7, min_age_seconds=0)
    again = files.poll_folder(factory, tmp_path, clock(), chunk=7, min_age_seconds=0)

    assert (first.accepted, first.rejected) == (50, 0)
    assert (again.accepted, again.duplicates, again.rejected) == (0, 0, 0)
    with factory() as session:
        recorded = {Path(f.path).name: f for f in session.scalars(select(m.SourceFile))}
    assert set(recorded) == {"a.ndjson", "b.jsonl.gz"}
    assert recorded["a.ndjson"].lines_read == 30 and recorded["a.ndjson"].completed_at is not None


def test_poll_folder_skips_files_modified_just_now(factory: sessionmaker[Session], tmp_path: Path) -> None:
    (tmp_path / "fresh.ndjson").write_bytes(line(track("u1")))
    assert files.poll_folder(factory, tmp_path, clock(), min_age_seconds=60).accepted == 0
    assert count(factory, m.SourceFile) == 0


def test_poll_folder_resumes_after_a_crash_without_loss_or_doubles(
    factory: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No messageIds and every line distinct: the inbox's dedupe cannot hide a line read twice.
    total_lines = 2_345
    body = [
        line(track(f"user{i}", originalTimestamp=f"2024-05-01T10:00:{i % 60:02d}Z"))
        for i in range(total_lines)
    ]
    body.insert(100, b"\n")  # blank lines count as read lines too
    (tmp_path / "big.ndjson").write_bytes(b"".join(body))

    real_accept = accept.accept_items
    calls = itertools.count(1)

    def crash_on_third_chunk(*args: Any, **kwargs: Any) -> Any:
        result = real_accept(*args, **kwargs)
        if next(calls) == 3:
            raise RuntimeError("simulated crash after the 3rd chunk was written, before commit")
        return result

    monkeypatch.setattr(files, "accept_items", crash_on_third_chunk)
    with pytest.raises(RuntimeError, match="simulated crash"):
        files.poll_folder(factory, tmp_path, clock(), chunk=500, min_age_seconds=0)
    with factory() as session:
        progress = session.scalars(select(m.SourceFile)).one()
    assert progress.lines_read == 1_000 and progress.completed_at is None
    assert count(factory, m.InboxEvent) == 999  # two committed chunks, one of the lines blank

    monkeypatch.setattr(files, "accept_items", real_accept)
    resumed = files.poll_folder(factory, tmp_path, clock(), chunk=500, min_age_seconds=0)

    assert (resumed.accepted, resumed.duplicates, resumed.rejected) == (total_lines - 999, 0, 0)
    assert count(factory, m.InboxEvent) == total_lines
    with factory() as session:
        users = set(session.scalars(select(m.InboxEvent.user_id)))
    assert users == {f"user{i}" for i in range(total_lines)}


# --- SQL source -------------------------------------------------------------------------------


class Warehouse:
    """A separate SQLite database playing the customer's warehouse."""

    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path}"
        self._db = sqlite3.connect(path)
        self._db.execute("CREATE TABLE members (audience_key TEXT, user_id TEXT, email TEXT, plan TEXT)")

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        self._db.executemany("INSERT INTO members VALUES (?, ?, ?, ?)", rows)
        self._db.commit()

    def delete(self, where: str, *params: Any) -> None:
        self._db.execute(f"DELETE FROM members WHERE {where}", params)
        self._db.commit()

    def close(self) -> None:
        self._db.close()


QUERY = "SELECT audience_key, user_id, email, plan FROM members"


def members(factory: sessionmaker[Session], audience: str, desired: str) -> int:
    with factory() as session:
        return (
            session.scalar(
                text(
                    "SELECT count(*) FROM memberships m JOIN audiences a ON a.id = m.audience_id "
                    "WHERE a.audience_key = :a AND m.desired = :d"
                ),
                {"a": audience, "d": desired},
            )
            or 0
        )


def test_poll_sql_enters_exits_holds_and_replays(factory: sessionmaker[Session], tmp_path: Path) -> None:
    settings = Settings()
    now = clock()
    warehouse = Warehouse(tmp_path / "warehouse.db")
    sizes = {"gold": 2_500, "silver": 2_000, "bronze": 500}
    warehouse.add(
        [(aud, f"{aud}-{i}", f"{aud}-{i}@example.com", "pro") for aud, n in sizes.items() for i in range(n)]
    )

    def poll() -> sql_source.SqlSyncCounts:
        result = sql_source.poll_sql(factory, warehouse.url, QUERY, settings, now, chunk=700)
        apply_all(factory, settings)
        return result

    first = poll()
    assert (first.rows, first.entered, first.exited, first.held) == (5_000, 5_000, 0, [])
    assert first.events.accepted == 5_000
    assert {aud: members(factory, aud, "in") for aud in sizes} == sizes
    with factory() as session:
        payload = session.scalars(select(m.InboxEvent.payload).where(m.InboxEvent.user_id == "gold-7")).one()
    assert payload["properties"]["plan"] == "pro" and payload["properties"]["gold"] is True
    assert payload["messageId"] == f"sql:gold:gold-7:gold-7@example.com:{first.snapshot_id}"

    replay = poll()
    assert (replay.rows, replay.entered, replay.exited, replay.events.accepted) == (5_000, 0, 0, 0)

    warehouse.delete("audience_key = 'gold' AND CAST(substr(user_id, 6) AS INTEGER) < 100")
    removed = poll()
    assert (removed.entered, removed.exited) == (0, 100)
    assert (members(factory, "gold", "in"), members(factory, "gold", "out")) == (2_400, 100)

    warehouse.delete("audience_key = 'bronze'")
    emptied = poll()
    assert (emptied.entered, emptied.exited, emptied.held) == (0, 0, ["bronze"])
    assert members(factory, "bronze", "in") == 500  # held, not emptied

    warehouse.add([("gold", f"gold-{i}", f"gold-{i}@example.com", "pro") for i in range(50)])
    back = poll()
    assert (back.entered, back.exited) == (50, 0)
    assert members(factory, "gold", "in") == 2_450
    warehouse.close()


def test_poll_sql_normalises_like_the_receiver_and_skips_bad_rows(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = Settings()
    now = clock()
    warehouse = Warehouse(tmp_path / "warehouse.db")
    warehouse.add(
        [
            ("news", None, "  Mixed.Case@Example.COM ", "free"),  # email only, untidy
            ("news", "u-1", None, "free"),  # userId only
            (None, "u-2", "u2@example.com", "free"),  # no audience
            ("news", None, None, "free"),  # nobody
            ("news", None, "not-an-email", "free"),  # no usable identity
        ]
    )
    first = sql_source.poll_sql(factory, warehouse.url, QUERY, settings, now)
    assert (first.rows, first.invalid, first.entered) == (5, 3, 2)
    apply_all(factory, settings)
    with factory() as session:
        keys = {tuple(r) for r in session.execute(select(m.Membership.user_id, m.Membership.email))}
    assert keys == {("", "mixed.case@example.com"), ("u-1", "")}

    # The stored key matches the normalised snapshot key, so nothing is re-entered or exited.
    again = sql_source.poll_sql(factory, warehouse.url, QUERY, settings, now)
    assert (again.entered, again.exited, again.events.accepted) == (0, 0, 0)
    warehouse.close()


def test_poll_sql_refuses_a_query_without_identity_columns(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    warehouse = Warehouse(tmp_path / "warehouse.db")
    with pytest.raises(ValueError, match="audience_key"):
        sql_source.poll_sql(factory, warehouse.url, "SELECT plan FROM members", Settings(), clock())
    warehouse.close()


@pytest.mark.parametrize("project_type", ["hybrid", "userId", "email"])
def test_poll_sql_new_email_for_a_user_id_per_project_type(
    factory: sessionmaker[Session], tmp_path: Path, project_type: str
) -> None:
    """A userId names one profile in hybrid and userId projects: a row with a new email for it is
    the same member, never an exit racing an enter. In email projects it is another profile."""
    settings = Settings(iterable={"project_type": project_type})
    now = clock()
    warehouse = Warehouse(tmp_path / "warehouse.db")
    warehouse.add([("vip", "u1", "old@example.com", "pro")])
    sql_source.poll_sql(factory, warehouse.url, QUERY, settings, now)
    apply_all(factory, settings)
    warehouse.delete("user_id = 'u1'")
    warehouse.add([("vip", "u1", "new@example.com", "pro")])
    moved = sql_source.poll_sql(factory, warehouse.url, QUERY, settings, now)
    apply_all(factory, settings)
    if project_type == "email":
        assert (moved.entered, moved.exited) == (1, 1)
        assert (members(factory, "vip", "in"), members(factory, "vip", "out")) == (1, 1)
    else:
        assert (moved.entered, moved.exited) == (0, 0)
        assert (members(factory, "vip", "in"), members(factory, "vip", "out")) == (1, 0)
    warehouse.close()


def test_poll_sql_checks_each_row_once_and_stores_events_in_bulk(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """Rows are refused where they enter the snapshot by the receiver's rules (on PostgreSQL a NUL
    would otherwise break the COPY); write keys never reach the inbox; a repeated row is one event,
    counted as a duplicate; the stored events are the documented ones and fold like any other."""
    settings = Settings()
    now = clock()
    path = tmp_path / "warehouse.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE members (audience_key TEXT, user_id TEXT, email TEXT, writeKey TEXT, score REAL)"
    )
    db.executemany(
        "INSERT INTO members VALUES (?, ?, ?, ?, ?)",
        [
            ("vip", "u1", "U1@Example.com", "s3cret", 1.5),
            ("vip", "u1", "U1@Example.com", "s3cret", 1.5),  # the same member twice
            ("vip", "u\x002", None, "s3cret", 1.0),  # NUL in the userId
            ("vip", "u3", None, "s3cret", float("inf")),  # not a JSON number
            ("vip", "u4", None, "s3cret", "x" * 40_000),  # an event over 32 KiB
            ("vip\x00", "u5", None, "s3cret", 1.0),  # NUL in the audience key
            ("vip", "u6", "u6@example.com", None, None),
        ],
    )
    db.commit()
    query = "SELECT audience_key, user_id, email, writeKey, score FROM members"
    first = sql_source.poll_sql(factory, f"sqlite:///{path}", query, settings, now, chunk=3)
    assert (first.rows, first.invalid, first.entered) == (7, 4, 3)
    assert (first.events.accepted, first.events.duplicates, first.events.rejected) == (2, 1, 0)
    with factory() as session:
        stored = {r.user_id: r for r in session.scalars(select(m.InboxEvent))}
    assert set(stored) == {"u1", "u6"}
    u1 = stored["u1"]
    assert (u1.email, u1.anonymous_id, u1.source, u1.is_audience, u1.event) == (
        "u1@example.com",
        None,
        "sql",
        True,
        "Audience Entered",
    )
    assert u1.payload["properties"] == {
        "score": 1.5,
        "audience_key": "vip",
        "vip": True,
        "email": "u1@example.com",
    }
    assert u1.payload["messageId"] == f"sql:vip:u1:u1@example.com:{first.snapshot_id}"
    assert all("s3cret" not in json.dumps(r.payload) for r in stored.values())
    apply_all(factory, settings)
    assert members(factory, "vip", "in") == 2
    assert count(factory, m.DeadLetter) == 0  # refused rows are logged, not dead-lettered

    db.execute("DELETE FROM members WHERE user_id = 'u6'")
    db.commit()
    again = sql_source.poll_sql(factory, f"sqlite:///{path}", query, settings, now, chunk=3)
    apply_all(factory, settings)
    assert (again.entered, again.exited, again.invalid) == (0, 1, 4)
    assert (members(factory, "vip", "in"), members(factory, "vip", "out")) == (1, 1)
    db.close()


def test_poll_sql_builds_in_sql_the_events_the_python_builder_builds(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """The enters are built in SQL from the snapshot (JSON quoting by the database), the exits in
    Python: both give the same events, stored with the rules that accepted them, and a long
    messageId is the digest the Python builder makes."""
    settings = Settings()
    now = clock()
    warehouse = Warehouse(tmp_path / "warehouse.db")
    rows = [
        ('q"uo\\te', "u1", "a@example.com", 'pl"a\\n\tZoë 🎉\x01'),
        ("vip", None, "  Only.Email@Example.COM ", None),
        ("vip", "u2", None, ""),
        ("vip", "u3", "x" * 250 + "@example.com", "long"),  # the readable messageId does not fit
        ("vip", "u3", "x" * 250 + "@example.com", "long"),  # twice: one event, one duplicate
    ]
    warehouse.add(rows)
    first = sql_source.poll_sql(factory, warehouse.url, QUERY, settings, now, chunk=2)
    assert (first.entered, first.events.accepted, first.events.duplicates) == (5, 4, 1)
    taken = datetime.strptime(first.snapshot_id, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
    events = sql_rows.Events(taken, first.snapshot_id)
    reader = sql_rows.RowReader(["audience_key", "user_id", "email", "plan"], events)
    expected = {}
    for row in rows:
        audience, user_id, email, properties, _ = reader.member(row)
        built = events.entered(audience, user_id or None, email or None, properties)
        expected[built[0]] = (*built[1:4], json.loads(built[-1]))
    with factory() as session:
        stored_rows = session.execute(select(m.InboxEvent)).scalars().all()
        got = {e.message_id: (e.user_id, e.anonymous_id, e.email, e.payload) for e in stored_rows}
        assert {e.rules for e in stored_rows} == {stored.RULES}
    assert got == expected
    assert any(len(key) == 4 + 64 for key in got)
    apply_all(factory, settings)
    assert members(factory, "vip", "in") == 3

    warehouse.delete("user_id = 'u2'")
    again = sql_source.poll_sql(factory, warehouse.url, QUERY, settings, now)
    assert (again.entered, again.exited) == (0, 1)
    exit_id = f"sql:vip:u2::{again.snapshot_id}"
    with factory() as session:
        exit_event = session.scalars(select(m.InboxEvent).where(m.InboxEvent.message_id == exit_id)).one()
    assert exit_event.rules == stored.RULES
    assert exit_event.payload["properties"] == {"audience_key": "vip", "vip": False}
    warehouse.close()


def test_poll_sql_an_audience_created_during_the_load_gets_its_id(
    factory: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An audience another writer creates while the rows load: its rows enter (nothing was known
    of it), and its members that have no row exit, as for an audience known from the start."""
    settings = Settings()
    now = clock()
    warehouse = Warehouse(tmp_path / "warehouse.db")
    warehouse.add([("vip", "u1", None, "pro")])
    sql_source.poll_sql(factory, warehouse.url, QUERY, settings, now)
    apply_all(factory, settings)
    with transaction(factory) as session:  # the audience is gone, to be created again mid-poll
        session.execute(text("DELETE FROM audiences"))
    reading = sql_source._Chunks.read

    def read_and_create(self: Any, *args: Any) -> Any:
        chunk = reading(self, *args)
        with transaction(factory) as session:
            session.add(m.Audience(audience_key="vip"))
            session.flush()
            audience_id = session.scalar(select(m.Audience.id))
            session.add(
                m.Membership(
                    audience_id=audience_id,
                    user_id="gone",
                    desired="in",
                    desired_at=T0,
                    desired_message_id="sql:vip:gone::x",
                )
            )
        return chunk

    monkeypatch.setattr(sql_source._Chunks, "read", read_and_create)
    again = sql_source.poll_sql(factory, warehouse.url, QUERY, settings, now)
    assert (again.entered, again.exited) == (1, 1)
    warehouse.close()


@pytest.mark.parametrize("by_user_id", [True, False])
def test_the_re_poll_checks_members_through_their_identity_indexes(tmp_path: Path, by_user_id: bool) -> None:
    """SQLite's plan of the re-poll's member checks: each probes memberships by its identifiers,
    never by (audience, desired) alone, which would read the whole audience for every changed row
    (a 1,000,000-row re-poll then did not finish)."""
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        snapshot.create(conn)
        page = snapshot.entering_rows(0, check_members=True, by_user_id=by_user_id)
        sql = str(page.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
    engine.dispose()
    probes = [step for step in plan if "memberships" in step]
    assert probes and all("user_id=?" in step or "email=?" in step for step in probes), plan
