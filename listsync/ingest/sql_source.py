"""**Receive** -> store for a SQL query (reverse ETL): each poll turns the query's current result
into Engage-style audience events, by a diff against the stored memberships that runs inside the
listsync database against a temporary table (`listsync.db.snapshot`), so neither the snapshot nor
the stored members are ever held in Python memory. See `poll_sql`.

Each row is validated once, where it enters the snapshot (`validate.validate_member`: the rules
`validate_event` applies, field by field); the events built from validated rows are stored in
bulk without being validated again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, CursorResult, Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from listsync import metrics
from listsync.config import Settings
from listsync.db import snapshot
from listsync.db.session import transaction
from listsync.domain import ProjectType, Rejection
from listsync.ingest import extract, validate
from listsync.ingest.accept import IngestCounts
from listsync.ingest.audience import AUDIENCE_ENTERED, AUDIENCE_EXITED
from listsync.lists.apply import apply_inbox

logger = logging.getLogger(__name__)

NowFn = Callable[[], datetime]


SQL_SOURCE = "sql"


SQL_MESSAGE_PREFIX = "sql:"


SQL_IDENTITY_COLUMNS = ("audience_key", "user_id", "email")


_MAX_MESSAGE_ID = 255  # inbox.message_id is VARCHAR(255)

# What an event adds to its traits' JSON, beyond 6 bytes (the longest JSON escape) per character
# of the audience key (4 times in it), the email (twice), the userId and the messageId: the fixed
# keys and names, the timestamp. A row whose bound exceeds MAX_EVENT_BYTES is checked exactly.
_EVENT_OVERHEAD = 512

_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})

# Traits as the snapshot keeps them and events carry them (`validate_member`'s traits_json).
_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_STRING = json.encoder.encode_basestring  # a str as JSON text, at C speed


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
                known = snapshot.audience_ids(conn)
                events = _Events(now, counts.snapshot_id)
                present = _load_snapshot(conn, source, query, events, chunk, counts, known)
                snapshot.index_snapshot(conn)
                _emit_enters(conn, events, chunk, counts, by_user_id)
                ids = sorted(known[key] for key in present if key in known)
                _emit_exits(conn, ids, events, chunk, counts, by_user_id)
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
    conn: Connection,
    source: Engine,
    query: str,
    events: _Events,
    chunk: int,
    counts: SqlSyncCounts,
    known: Mapping[str, int],
) -> set[str]:
    """Stream the query's rows, validated and normalised, into the snapshot table; returns the
    audience keys they name."""
    present: set[str] = set()
    seq = 0
    with source.connect() as src:
        result = src.execution_options(stream_results=True, yield_per=chunk).execute(text(query))
        reader = _RowReader(list(result.keys()), events)
        for partition in _partitions(result, chunk):
            rows = []
            for row in partition:
                member = reader.member(row)
                if isinstance(member, Rejection):
                    _invalid(counts, member.reason)
                    continue
                seq += 1
                rows.append((seq, known.get(member[0], 0), *member))
                present.add(member[0])
            counts.rows += len(partition)
            with conn.begin():
                snapshot.load(conn, snapshot.SNAPSHOT, rows)
    return present


def _partitions(result: CursorResult[Any], size: int) -> Iterator[Sequence[Any]]:
    """The result's rows in lists of `size`, straight from the driver's cursor: a text() query's
    columns carry no SQLAlchemy type, so its rows are the driver's tuples either way, and
    building Row objects for them was a third of the cost of reading a row."""
    cursor = result.cursor
    while rows := cursor.fetchmany(size):
        yield rows


def _check_columns(columns: Sequence[str]) -> None:
    if "audience_key" not in columns or not {"user_id", "email"} & set(columns):
        raise ValueError(
            "the SQL source query must return an audience_key column and a user_id and/or email "
            f"column; it returned {', '.join(columns) or 'no columns'}"
        )


class _RowReader:
    """Source rows -> (audience_key, user_id, email, traits JSON) snapshot values, normalised as
    the receiver would normalise the event, or the Rejection the receiver would give it; so a
    member's key here is the key its membership row gets when the event is applied, and the diff
    compares like with like."""

    def __init__(self, columns: Sequence[str], events: _Events) -> None:
        _check_columns(columns)
        where = {name: i for i, name in enumerate(columns)}  # a repeated name: the last one counts
        self._audience = where["audience_key"]
        self._user_id = where.get("user_id")
        self._email = where.get("email")
        self._traits = [(name, i) for name, i in where.items() if name not in SQL_IDENTITY_COLUMNS]
        self._events = events

    def member(self, row: Sequence[Any]) -> tuple[str, str, str, str] | Rejection:
        audience = row[self._audience]
        user_id = None if self._user_id is None else _text(row[self._user_id])
        email = None if self._email is None else _text(row[self._email])
        traits = {name: _json_value(row[i]) for name, i in self._traits}
        if isinstance(audience, str):
            traits.pop(audience, None)  # the event's own flag of that name overrides it
        encoded = _encode_traits(traits)
        checked = validate.validate_member(audience, user_id, email, traits, traits_json=encoded)
        if isinstance(checked, Rejection):
            return checked
        if encoded is None or checked.traits is not traits:  # write keys were dropped
            encoded = _ENCODE(checked.traits)
        if _size_bound(audience, checked, encoded) > extract.MAX_EVENT_BYTES:
            event = json.loads(self._events.entered(audience, checked.user_id, checked.email, encoded)[-1])
            exact = validate.validate_event(event, received_at=self._events.now)
            if isinstance(exact, Rejection):
                return exact
        return audience, checked.user_id or "", checked.email or "", encoded


def _text(value: Any) -> Any:
    """An identifier column as text: integer and UUID columns are common keys and read as their
    text; anything else (a boolean, a float) is passed on as it is, for validation to refuse as
    the receiver refuses it."""
    if value is None or value == "":
        return None
    if isinstance(value, int | uuid.UUID) and not isinstance(value, bool):
        return str(value)
    return value


def _json_value(value: Any) -> Any:
    """A column's value as JSON carries it (Decimal, dates and the like become strings)."""
    if type(value) in _JSON_SCALARS:
        return value
    return json.loads(json.dumps(value, default=str))


def _encode_traits(traits: Mapping[str, Any]) -> str | None:
    try:
        return _ENCODE(traits)
    except ValueError:  # a non-finite number: validate_member says where
        return None


def _size_bound(audience: str, member: validate.CheckedMember, traits_json: str) -> int:
    """More bytes than the largest event built for this member can take (see _EVENT_OVERHEAD)."""
    chars = 4 * len(audience) + 2 * len(member.email or "") + len(member.user_id or "") + _MAX_MESSAGE_ID
    return len(traits_json.encode("utf-8")) + 6 * chars + _EVENT_OVERHEAD


def _invalid(counts: SqlSyncCounts, reason: str) -> None:
    counts.invalid += 1
    if counts.invalid <= 5:  # enough to diagnose; a bad column would otherwise log every row
        logger.warning(
            "SQL source row skipped: %s",
            reason[:200],
            extra={"event": "sql_source_row_invalid", "reason": reason.split(":", 1)[0]},
        )


def _emit_enters(
    conn: Connection, events: _Events, chunk: int, counts: SqlSyncCounts, by_user_id: bool
) -> None:
    """Snapshot rows whose member is not desired-in, page by page (keyset on seq)."""
    after = 0
    while True:
        with conn.begin():
            rows = snapshot.entering_page(conn, after, chunk, by_user_id)
            built = [
                events.entered(r.audience_key, r.user_id or None, r.email or None, r.traits) for r in rows
            ]
            _store(conn, built, AUDIENCE_ENTERED, events.now, counts)
        if not rows:
            return
        counts.entered += len(rows)
        after = rows[-1].seq


def _emit_exits(
    conn: Connection,
    audiences: Sequence[int],
    events: _Events,
    chunk: int,
    counts: SqlSyncCounts,
    by_user_id: bool,
) -> None:
    """Desired-in members of audiences in the result that have no row in it (keyset on id)."""
    after = 0
    while True:
        with conn.begin():
            rows = snapshot.exiting_page(conn, audiences, after, chunk, by_user_id)
            built = [events.exited(r.audience_key, r.user_id or None, r.email or None) for r in rows]
            _store(conn, built, AUDIENCE_EXITED, events.now, counts)
        if not rows:
            return
        counts.exited += len(rows)
        after = rows[-1].id


def _store(
    conn: Connection, built: Sequence[tuple[Any, ...]], name: str, now: datetime, counts: SqlSyncCounts
) -> None:
    new = snapshot.store_events(conn, built, event=name, source=SQL_SOURCE, now=now)
    counts.events.add(IngestCounts(accepted=new, duplicates=len(built) - new))


class _Events:
    """The synthetic events of one poll (one timestamp, one snapshot id), each built as a row of
    `snapshot.STAGED`: (messageId, userId, anonymousId, email, the event as JSON text).

    An event is an Engage-style track: `Audience Entered` / `Audience Exited` with properties
    {**traits, audience_key, <audience>: true/false, email} and the audience as the computation
    key; userId, or for an email-only member the stable stand-in anonymousId `email:<email>`
    (Segment requires one of the two). Built as text: the parts are JSON already (the traits as
    the snapshot keeps them), and a member's traits never hold the audience's own name.
    """

    def __init__(self, now: datetime, snapshot_id: str) -> None:
        self.now = now
        self.snapshot_id = snapshot_id
        self._timestamp = _STRING(now.isoformat())

    def entered(
        self, audience: str, user_id: str | None, email: str | None, traits_json: str
    ) -> tuple[Any, ...]:
        return self._event(AUDIENCE_ENTERED, "true", audience, user_id, email, traits_json[1:-1])

    def exited(self, audience: str, user_id: str | None, email: str | None) -> tuple[Any, ...]:
        return self._event(AUDIENCE_EXITED, "false", audience, user_id, email, "")

    def _event(
        self, name: str, flag: str, audience: str, user_id: str | None, email: str | None, traits: str
    ) -> tuple[Any, ...]:
        message_id = _message_id(audience, user_id, email, self.snapshot_id)
        key = _STRING(audience)
        properties = f'{traits},"audience_key":{key}' if traits else f'"audience_key":{key}'
        properties += f",{key}:{flag}" + (f',"email":{_STRING(email)}' if email else "")
        anonymous_id = None if user_id else f"email:{email}"
        who = f'"userId":{_STRING(user_id)}' if user_id else f'"anonymousId":{_STRING(f"email:{email}")}'
        payload = (
            f'{{"type":"track","event":{_STRING(name)},"messageId":{_STRING(message_id)},'
            f'"timestamp":{self._timestamp},"properties":{{{properties}}},"context":{{"personas":'
            f'{{"computation_class":"audience","computation_key":{key}}},"library":{{"name":"listsync-sql"}}}},'
            f"{who}}}"
        )
        return message_id, user_id, anonymous_id, email, payload


def _message_id(audience: str, user_id: str | None, email: str | None, snapshot_id: str) -> str:
    readable = f"{SQL_MESSAGE_PREFIX}{audience}:{user_id or ''}:{email or ''}:{snapshot_id}"
    if len(readable) <= _MAX_MESSAGE_ID:
        return readable
    # Long audience keys and emails do not fit the column; a digest keeps it deterministic.
    return SQL_MESSAGE_PREFIX + hashlib.sha256(readable.encode("utf-8")).hexdigest()


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
