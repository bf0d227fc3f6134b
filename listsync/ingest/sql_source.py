"""**Receive** -> store for a SQL query (reverse ETL): each poll turns the query's current result
into Engage-style audience events, by a diff against the stored memberships that runs inside the
listsync database against a temporary table (`listsync.db.snapshot`), so neither the snapshot nor
the stored members are ever held in Python memory. See `poll_sql`.

Each row is read and validated once, where it enters the snapshot (`sql_rows.RowReader`); the
events of the rows that enter are built in SQL from the snapshot, those of the members that exit
in Python (`sql_rows.Events`), and both are stored with the rules that accepted them, so the fold
does not validate them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, CursorResult, Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from listsync import metrics
from listsync.config import Settings
from listsync.db import snapshot
from listsync.db.session import transaction
from listsync.domain import ProjectType, Rejection
from listsync.ingest import stored
from listsync.ingest.accept import IngestCounts
from listsync.ingest.audience import AUDIENCE_ENTERED, AUDIENCE_EXITED
from listsync.ingest.sql_rows import SQL_MESSAGE_PREFIX, Events, RowReader, event_parts
from listsync.lists.apply import apply_inbox

logger = logging.getLogger(__name__)

NowFn = Callable[[], datetime]


SQL_SOURCE = "sql"


@dataclass
class SqlSyncCounts:
    """What one poll of the SQL source found and produced.

    Attributes:
        snapshot_id: the poll's id, the last part of every messageId it produced.
        rows: rows the query returned. invalid: rows skipped (no audience key, no usable
            identity, ...); they are logged, not dead-lettered, since they would come back on
            every poll.
        entered / exited: deltas produced. held: audiences that were left alone because the
            query returned no row for them while they still have members.
        events: how the produced events fared when stored (accepted, or duplicates of a
            messageId already stored).
    """

    snapshot_id: str
    rows: int = 0
    invalid: int = 0
    entered: int = 0
    exited: int = 0
    held: list[str] = field(default_factory=list)
    events: IngestCounts = field(default_factory=IngestCounts)


def poll_sql(
    factory: sessionmaker[Session],
    source_url: str,
    query: str,
    settings: Settings,
    now_fn: NowFn,
    *,
    chunk: int = 20_000,
) -> SqlSyncCounts:
    """Turn the current result of `query` into audience deltas against the stored memberships.

    The query returns one row per member: `audience_key`, `user_id` and/or `email`, and any other
    columns, which travel as traits in the event properties. Rules:

    * a row whose member is not desired-in yet becomes an `Audience Entered` track;
    * a desired-in member of an audience that is in the result but not its row becomes an
      `Audience Exited` track;
    * an audience that was fed by this source and has no row at all is held, not emptied: an
      empty result is more often a broken query or an unfinished load than a real mass exit.
      It is logged and returned in `held`; remove its members explicitly if that is meant.

    Events carry timestamp = now and messageId `sql:<audience>:<user>:<email>:<snapshot>` and are
    appended to the inbox like the receiver's (a messageId already there is skipped), to be
    folded by `apply_inbox`. The inbox is applied first, so the diff sees the effect of earlier
    polls and a replayed snapshot yields nothing.

    The query runs as SQLAlchemy `text()` on its own engine, streamed in chunks of `chunk` rows
    (also the size of each page of the diff); a literal `:name` in it would be read as a bind
    parameter and must be written `\\:name`.
    """
    now = now_fn().astimezone(UTC)
    counts = SqlSyncCounts(snapshot_id=now.strftime("%Y%m%dT%H%M%S%fZ"))
    _drain_inbox(factory, settings, now_fn)
    source = create_engine(source_url)
    by_user_id = settings.iterable.project_type is not ProjectType.EMAIL
    try:
        with _bind_of(factory).connect() as conn:
            try:
                snapshot.create(conn)
                events = Events(now, counts.snapshot_id)
                present = _load_snapshot(
                    conn, source, query, _Writer(conn, events, by_user_id), chunk, counts
                )
                ids = _audiences(conn, present)
                snapshot.index_snapshot(conn, for_exits=bool(ids))
                _emit_exits(conn, sorted(ids.values()), events, chunk, counts, by_user_id)
                counts.held = snapshot.held_audiences(conn, sorted(present), SQL_MESSAGE_PREFIX)
            finally:
                with conn.begin():
                    snapshot.drop_tables(conn)
    finally:
        source.dispose()
    metrics.count_events(SQL_SOURCE, counts.events.accepted, counts.events.duplicates, 0)
    _log_sql_poll(counts)
    return counts


def _drain_inbox(factory: sessionmaker[Session], settings: Settings, now_fn: NowFn) -> None:
    while True:
        with transaction(factory) as session:
            if apply_inbox(session, settings, now_fn()) == 0:
                return


def _bind_of(factory: sessionmaker[Session]) -> Engine:
    with factory() as session:
        bind = session.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine


def _load_snapshot(
    conn: Connection, source: Engine, query: str, writer: _Writer, chunk: int, counts: SqlSyncCounts
) -> dict[str, int]:
    """Stream the query's rows, validated and normalised, into the snapshot table, and the
    events of those that enter into the inbox; returns the audience keys they name, with the ids
    they had when the load began (a negative stand-in for an audience that did not exist).

    The rows are read and checked here while `writer` stores the previous chunk on a thread of
    its own: the database's work runs outside the GIL, so the two overlap."""
    chunks = _Chunks(snapshot.audience_ids(conn))
    with source.connect() as src, ThreadPoolExecutor(1, thread_name_prefix="sql-snapshot") as pool:
        result = src.execution_options(stream_results=True, yield_per=chunk).execute(text(query))
        reader = RowReader(list(result.keys()), writer.events)
        pending: Future[tuple[int, int]] | None = None
        for partition in _partitions(result, chunk):
            ready = chunks.read(reader, partition, counts)
            if pending is not None:
                _add_enters(counts, *pending.result())
            pending = pool.submit(writer.store, ready)
        if pending is not None:
            _add_enters(counts, *pending.result())
    return chunks.present


@dataclass
class _Chunk:
    """A chunk of valid rows as the snapshot takes them, with what first appeared in it: the
    messageIds that are not the readable ones, the audiences (key -> id or stand-in); and
    whether any of its rows is of an audience that has members."""

    rows: list[tuple[str | int, ...]]
    long_ids: list[tuple[str | int, ...]]
    audiences: dict[str, int]
    check_members: bool


class _Chunks:
    """Source rows -> _Chunk, over one poll."""

    def __init__(self, known: Mapping[str, int]) -> None:
        self.present: dict[str, int] = {}
        self._known = known
        self._long_ids: set[tuple[int, str, str]] = set()

    def _first_seen(self, chunk: _Chunk, audience: str) -> int:
        audience_id = self._known.get(audience) or -len(self.present) - 1
        self.present[audience] = chunk.audiences[audience] = audience_id
        return audience_id

    def read(self, reader: RowReader, partition: Sequence[Any], counts: SqlSyncCounts) -> _Chunk:
        chunk = _Chunk([], [], {}, check_members=False)
        present, member_of, append = self.present, reader.member, chunk.rows.append
        for row in partition:  # the per-row loop of a poll: names bound locally
            member = member_of(row)
            if isinstance(member, Rejection):
                _invalid(counts, member.reason)
                continue
            audience, user_id, email, properties, message_id = member
            audience_id = present.get(audience)
            if audience_id is None:
                audience_id = self._first_seen(chunk, audience)
            append((audience_id, user_id, email, properties))
            if message_id is not None and (audience_id, user_id, email) not in self._long_ids:
                self._long_ids.add((audience_id, user_id, email))
                chunk.long_ids.append((audience_id, user_id, email, message_id))
        chunk.check_members = max(map(itemgetter(0), chunk.rows), default=0) > 0
        counts.rows += len(partition)
        return chunk


class _Writer:
    """Stores each _Chunk in the snapshot, and the events of its rows that enter in the inbox,
    built in SQL (`snapshot.store_entering`), in one transaction."""

    def __init__(self, conn: Connection, events: Events, by_user_id: bool) -> None:
        self.events = events
        self._conn = conn
        self._by_user_id = by_user_id
        self._parts = event_parts(AUDIENCE_ENTERED, events.now)

    def store(self, chunk: _Chunk) -> tuple[int, int]:
        """Returns (rows that enter, events that were new)."""
        conn = self._conn
        with conn.begin():
            snapshot.store_audiences(conn, chunk.audiences)
            snapshot.load(conn, snapshot.LONG_IDS, chunk.long_ids)
            after = snapshot.last_seq(conn)
            snapshot.load(conn, snapshot.SNAPSHOT, chunk.rows, _SNAPSHOT_COLUMNS)
            return snapshot.store_entering(
                conn,
                after,
                self._parts,
                check_members=chunk.check_members,
                loaded=len(chunk.rows),
                by_user_id=self._by_user_id,
                snapshot_id=self.events.snapshot_id,
                event=AUDIENCE_ENTERED,
                source=SQL_SOURCE,
                now=self.events.now,
                rules=stored.RULES,
            )


_SNAPSHOT_COLUMNS = ("audience_id", "user_id", "email", "properties")


def _add_enters(counts: SqlSyncCounts, entered: int, new: int) -> None:
    counts.entered += entered
    counts.events.add(IngestCounts(accepted=new, duplicates=entered - new))


def _audiences(conn: Connection, present: Mapping[str, int]) -> dict[str, int]:
    """The ids of the present audiences that exist now. Those another writer created during the
    load give their ids to their snapshot rows (loaded with a stand-in; they all entered)."""
    created: dict[int, int] = {}
    if any(audience_id < 0 for audience_id in present.values()):
        now_known = snapshot.audience_ids(conn)
        created = {present[key]: now_known[key] for key in present if present[key] < 0 and key in now_known}
        with conn.begin():
            snapshot.resolve_audiences(conn, created)
    ids = {key: created.get(audience_id, audience_id) for key, audience_id in present.items()}
    return {key: audience_id for key, audience_id in ids.items() if audience_id > 0}


def _partitions(result: CursorResult[Any], size: int) -> Iterator[Sequence[Any]]:
    """The result's rows in lists of `size`, straight from the driver's cursor: a text() query's
    columns carry no SQLAlchemy type, so its rows are the driver's tuples either way, and
    building Row objects for them was a third of the cost of reading a row."""
    cursor = result.cursor
    while rows := cursor.fetchmany(size):
        yield rows


def _invalid(counts: SqlSyncCounts, reason: str) -> None:
    counts.invalid += 1
    if counts.invalid <= 5:  # enough to diagnose; a bad column would otherwise log every row
        logger.warning(
            "SQL source row skipped: %s",
            reason[:200],
            extra={"event": "sql_source_row_invalid", "reason": reason.split(":", 1)[0]},
        )


def _emit_exits(
    conn: Connection,
    audiences: Sequence[int],
    events: Events,
    chunk: int,
    counts: SqlSyncCounts,
    by_user_id: bool,
) -> None:
    """Desired-in members of audiences in the result that have no row in it: found in one pass,
    then their events built and stored a page at a time (keyset on id)."""
    with conn.begin():
        if not snapshot.find_exits(conn, audiences, by_user_id):
            return
    after = 0
    while True:
        with conn.begin():
            rows = snapshot.exiting_page(conn, after, chunk)
            built = [events.exited(r.audience_key, r.user_id or None, r.email or None) for r in rows]
            new = snapshot.store_events(
                conn, built, event=AUDIENCE_EXITED, source=SQL_SOURCE, now=events.now, rules=stored.RULES
            )
        if not rows:
            return
        counts.exited += len(rows)
        counts.events.add(IngestCounts(accepted=new, duplicates=len(rows) - new))
        after = rows[-1].id


def _log_sql_poll(counts: SqlSyncCounts) -> None:
    for key in counts.held:
        logger.warning(
            "SQL source returned no rows for audience %s; its members are kept, not removed",
            key,
            extra={"event": "sql_source_audience_held", "audience_key": key},
        )
    logger.info(
        "SQL source: %d rows, %d invalid, %d entered, %d exited",
        counts.rows,
        counts.invalid,
        counts.entered,
        counts.exited,
        extra={
            "event": "sql_source_polled",
            "snapshot_id": counts.snapshot_id,
            "rows": counts.rows,
            "entered": counts.entered,
            "exited": counts.exited,
            "held": len(counts.held),
        },
    )
