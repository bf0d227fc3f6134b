"""The SQL source's snapshot: a query result loaded into a temporary table of the listsync
database, diffed against the memberships there, and the synthetic events of the difference
appended to the inbox. Set-based on purpose: neither the snapshot nor the members are ever held in
Python memory, a poll costs a few index probes per row whatever the state holds, and the events
of the rows that enter are built in SQL (`store_entering`), so a row costs Python nothing after
it was read.

Every function takes the one `Connection` the temporary tables live on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql import ColumnElement, Select

from listsync.db import models as m
from listsync.db import sql_events
from listsync.db.session import insert_for, is_postgres, rows_affected
from listsync.domain import Desired
from listsync.ingest import sql_rows

# Temporary, so they exist only on the connection of one poll and never in a migration.
_metadata = MetaData()

SNAPSHOT = Table(
    "listsync_sql_snapshot",
    _metadata,
    Column("seq", m.BigId, primary_key=True),  # numbered by the database, in load order
    # The audience's id; an audience that did not exist when the poll began has a negative
    # stand-in that no membership has (see `resolve_audiences`), and its key is in AUDIENCES.
    Column("audience_id", m.BigId, nullable=False),
    Column("user_id", String(255), nullable=False),
    Column("email", String(320), nullable=False),
    # The traits as the leading members of the event's properties (see sql_rows.SnapshotRow).
    Column("properties", Text, nullable=False),
    prefixes=["TEMPORARY"],
)

# The snapshot's audiences: few rows, so the snapshot's many carry only the id.
AUDIENCES = Table(
    "listsync_sql_audiences",
    _metadata,
    Column("audience_id", m.BigId, primary_key=True, autoincrement=False),
    Column("audience_key", String(255), nullable=False),
    prefixes=["TEMPORARY"],
)

# The messageIds of the members whose readable one would not fit (rare: long keys and emails).
LONG_IDS = Table(
    "listsync_sql_long_ids",
    _metadata,
    Column("audience_id", m.BigId, primary_key=True, autoincrement=False),
    Column("user_id", String(255), primary_key=True),
    Column("email", String(320), primary_key=True),
    Column("message_id", String(255), nullable=False),
    prefixes=["TEMPORARY"],
)

# The rows of one page of the snapshot that enter, so that their count and the events' are known.
ENTERING = Table(
    "listsync_sql_entering",
    _metadata,
    Column("seq", m.BigId, primary_key=True, autoincrement=False),
    prefixes=["TEMPORARY"],
)

# The members that exit, found in one pass (`find_exits`) and then turned into events page by page.
EXITING = Table(
    "listsync_sql_exiting",
    _metadata,
    Column("id", m.BigId, primary_key=True, autoincrement=False),
    Column("audience_key", String(255), nullable=False),
    Column("user_id", String(255), nullable=False),
    Column("email", String(320), nullable=False),
    prefixes=["TEMPORARY"],
)

# The events of one page of the exits, staged so that one INSERT ... SELECT stores them all and
# says how many were new.
STAGED = Table(
    "listsync_sql_events",
    _metadata,
    Column("message_id", String(255), nullable=False),
    Column("user_id", String(255)),
    Column("anonymous_id", String(255)),
    Column("email", String(320)),
    Column("payload", Text, nullable=False),
    prefixes=["TEMPORARY"],
)

# Built after the load (one sort each, cheaper than keeping them up to date row by row); the
# exits probe one per identity rule. Plain DDL: an Index object would join CREATE TABLE.
_SNAPSHOT_INDEXES = (
    f"CREATE INDEX ix_listsync_sql_snapshot_key ON {SNAPSHOT.name} (audience_id, user_id, email)",
    f"CREATE INDEX ix_listsync_sql_snapshot_email ON {SNAPSHOT.name} (audience_id, email)",
)

# An INSERT's rowcount is kept only when asked for (psycopg's would be dropped).
_COUNTED = {"preserve_rowcount": True}

_INBOX_COLUMNS = [
    "message_id",
    "type",
    "event",
    "user_id",
    "anonymous_id",
    "email",
    "timestamp",
    "received_at",
    "source",
    "payload",
    "is_audience",
    "rules",
]


def create(conn: Connection) -> None:
    """Fresh, empty temporary tables (a previous poll's are dropped first)."""
    with conn.begin():
        drop_tables(conn)
        _metadata.create_all(conn)


def drop_tables(conn: Connection) -> None:
    _metadata.drop_all(conn, checkfirst=True)


def audience_ids(conn: Connection) -> dict[str, int]:
    audience = m.table(m.Audience)
    with conn.begin():
        return {
            key: audience_id
            for key, audience_id in conn.execute(select(audience.c.audience_key, audience.c.id))
        }


def load(
    conn: Connection, table: Table, rows: Sequence[tuple[Any, ...]], columns: Sequence[str] | None = None
) -> None:
    """Append rows (tuples of `columns`, by default all the table's in order) the fastest way the
    driver has: COPY on PostgreSQL, one prepared executemany on SQLite. The caller holds the
    transaction."""
    if not rows:
        return
    names = ", ".join(columns or [c.name for c in table.columns])
    if is_postgres(conn):
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor, cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    marks = ", ".join("?" for _ in rows[0])
    conn.exec_driver_sql(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", list(rows))


def last_seq(conn: Connection) -> int:
    """The snapshot's last seq (0: empty). The caller holds the transaction."""
    return int(conn.scalar(select(func.max(SNAPSHOT.c.seq))) or 0)


def index_snapshot(conn: Connection, *, for_exits: bool) -> None:
    """Statistics for the planner, and the indexes the exits probe when there are exits to find
    (`for_exits`; the enters probe the memberships' own indexes)."""
    with conn.begin():
        for ddl in _SNAPSHOT_INDEXES if for_exits else ():
            conn.execute(text(ddl))
        if is_postgres(conn):  # autovacuum never analyzes temporary tables: the planner would guess
            conn.execute(text(f"ANALYZE {SNAPSHOT.name}"))


def _same_member_rules(t: Any, member: Any, by_user_id: bool) -> list[Any]:
    """The ways a snapshot row and a membership of the same audience are the same subscriber,
    by the rules `identity.resolve` folds deltas with: the same userId (whatever the emails when
    a userId names the profile, as in hybrid and userId projects; else an email missing on either
    side does not matter), or the same email where either side has no userId. Matching on the
    exact pair only would make a query without an email column exit and re-enter members every
    poll.

    The exact pair comes first: it is what nearly every row of a re-poll has, one probe of the
    unique index, and callers AND the NOT EXISTS of each rule in this order, so the other rules
    are probed only for the rows it misses. Each rule is an equality an index serves
    (memberships by (audience, userId, email) and (audience, email); the snapshot likewise).
    """
    same_user = and_(t.user_id != "", member.c.user_id == t.user_id)
    if not by_user_id:
        same_user = and_(same_user, or_(t.email == "", member.c.email == "", member.c.email == t.email))
    return [
        and_(member.c.user_id == t.user_id, member.c.email == t.email),
        same_user,
        and_(t.email != "", member.c.email == t.email, or_(t.user_id == "", member.c.user_id == "")),
    ]


def resolve_audiences(conn: Connection, created: Mapping[int, int]) -> None:
    """Give the rows of the audiences another writer created during the load the ids they have
    now: `created` maps stand-ins to ids. The caller holds the transaction."""
    for table in (SNAPSHOT, LONG_IDS, AUDIENCES) if created else ():
        stmt = (
            update(table).where(table.c.audience_id == bindparam("old")).values(audience_id=bindparam("new"))
        )
        conn.execute(stmt, [{"old": old, "new": new} for old, new in created.items()])


def store_audiences(conn: Connection, ids: Mapping[str, int]) -> None:
    """The snapshot's audiences, key -> id (or stand-in). The caller holds the transaction."""
    load(conn, AUDIENCES, [(audience_id, key) for key, audience_id in ids.items()])


def entering_rows(after: int, *, check_members: bool, by_user_id: bool) -> Select[tuple[int]]:
    """The seqs of the snapshot rows after `after` whose member is not desired-in."""
    t = SNAPSHOT.c
    page = select(t.seq).where(t.seq > after)
    if check_members:
        member = m.table(m.Membership)
        # `desired` is tested as an expression, which no index serves: as a plain equality, SQLite
        # (without statistics) would probe ix_memberships_desired (audience, desired) and read the
        # whole audience for every row the exact pair misses, instead of the identity indexes.
        wanted_in = case((member.c.desired == Desired.IN, 1), else_=0) == 1
        page = page.where(
            *(
                ~exists().where(member.c.audience_id == t.audience_id, wanted_in, rule)
                for rule in _same_member_rules(t, member, by_user_id)
            )
        )
    return page


def store_entering(
    conn: Connection,
    after: int,
    parts: Sequence[str],
    *,
    check_members: bool,
    loaded: int,
    by_user_id: bool,
    snapshot_id: str,
    event: str,
    source: str,
    now: datetime,
    rules: str,
) -> tuple[int, int]:
    """Append to the inbox the `event` of each snapshot row after seq `after` whose member is
    not desired-in, built in SQL from `parts` (sql_rows.event_parts); a
    messageId already there is skipped. Returns (rows that enter, events that were new).
    `check_members` False: no row's audience has members (every one of the `loaded` rows
    enters). The caller holds the transaction."""
    t = SNAPSHOT.c
    if check_members:
        page = entering_rows(after, check_members=True, by_user_id=by_user_id)
        entered = rows_affected(
            conn.execute(ENTERING.insert().from_select(["seq"], page), execution_options=_COUNTED)
        )
        rows: Any = ENTERING.join(SNAPSHOT, t.seq == ENTERING.c.seq)
        where: ColumnElement[bool] = true()
        order = ENTERING.c.seq
    else:  # every row after `after` enters: read straight from the snapshot
        entered, rows, where, order = loaded, SNAPSHOT, t.seq > after, t.seq
    if not entered:
        return 0, 0
    key, long_id = AUDIENCES.c.audience_key, LONG_IDS.c
    message_id = func.coalesce(
        long_id.message_id,
        literal(sql_rows.SQL_MESSAGE_PREFIX, Text)
        + key
        + ":"
        + t.user_id
        + ":"
        + t.email
        + literal(f":{snapshot_id}", Text),
    )
    payload = sql_events.filled(conn, parts, t, message_id, key)
    stamp = literal(now, m.UTCDateTime())
    events = (
        select(
            message_id,
            literal("track"),
            literal(event),
            func.nullif(t.user_id, ""),
            case((t.user_id == "", literal(sql_rows.ANONYMOUS_PREFIX, Text) + t.email), else_=null()),
            func.nullif(t.email, ""),
            stamp,
            stamp,
            literal(source),
            cast(payload, JSONB) if is_postgres(conn) else payload,
            literal(True),
            literal(rules),
        )
        .select_from(
            rows.join(AUDIENCES, AUDIENCES.c.audience_id == t.audience_id)
            .outerjoin(
                LONG_IDS,
                and_(
                    long_id.audience_id == t.audience_id,
                    long_id.user_id == t.user_id,
                    long_id.email == t.email,
                ),
            )
        )
        .where(where)  # SQLite: INSERT ... SELECT ... ON CONFLICT needs a WHERE to parse
        .order_by(order)
    )
    inbox = m.table(m.InboxEvent)
    stmt = (
        insert_for(conn, inbox)
        .from_select(_INBOX_COLUMNS, events)
        .on_conflict_do_nothing(index_elements=["message_id"])
    )
    new = rows_affected(conn.execute(stmt, execution_options=_COUNTED))
    if check_members:
        conn.execute(delete(ENTERING))
    return entered, new


def find_exits(conn: Connection, audiences: Sequence[int], by_user_id: bool) -> int:
    """Record in EXITING, in one pass over the members, the desired-in members of `audiences`
    that have no snapshot row; returns how many. The caller holds the transaction."""
    if not audiences:
        return 0
    member = m.table(m.Membership)
    audience = m.table(m.Audience)
    t = SNAPSHOT.c
    not_in = [
        ~exists().where(t.audience_id == member.c.audience_id, rule)
        for rule in _same_member_rules(t, member, by_user_id)
    ]
    found = (
        select(member.c.id, audience.c.audience_key, member.c.user_id, member.c.email)
        .select_from(member.join(audience, audience.c.id == member.c.audience_id))
        .where(member.c.desired == Desired.IN, member.c.audience_id.in_(audiences), *not_in)
    )
    stmt = EXITING.insert().from_select(["id", "audience_key", "user_id", "email"], found)
    return rows_affected(conn.execute(stmt, execution_options=_COUNTED))


def exiting_page(conn: Connection, after: int, limit: int) -> list[Any]:
    """The members `find_exits` recorded (id > `after`, in id order)."""
    x = EXITING.c
    page = select(x.id, x.audience_key, x.user_id, x.email).where(x.id > after).order_by(x.id).limit(limit)
    return list(conn.execute(page).all())


def store_events(
    conn: Connection, rows: Sequence[tuple[Any, ...]], *, event: str, source: str, now: datetime, rules: str
) -> int:
    """Append built track events (tuples in STAGED's column order, the payload as JSON text) to
    the inbox; a messageId already there is skipped. Returns how many were new. `rules`: the
    fingerprint of the validation rules that accepted them. The caller holds the transaction."""
    if not rows:
        return 0
    load(conn, STAGED, rows)
    inbox = m.table(m.InboxEvent)
    s = STAGED.c
    stamp = literal(now, m.UTCDateTime())
    staged = select(
        s.message_id,
        literal("track"),
        bindparam("event", event),
        s.user_id,
        s.anonymous_id,
        s.email,
        stamp,
        stamp,
        literal(source),
        cast(s.payload, JSONB) if is_postgres(conn) else s.payload,
        literal(True),
        literal(rules),
    ).where(true())  # SQLite: INSERT ... SELECT ... ON CONFLICT needs a WHERE to parse
    stmt = (
        insert_for(conn, inbox)
        .from_select(_INBOX_COLUMNS, staged)
        .on_conflict_do_nothing(index_elements=["message_id"])
    )
    # RETURNING counts what was inserted on both databases (psycopg reports no rowcount here).
    new = len(conn.execute(stmt.returning(inbox.c.id)).all())
    conn.execute(delete(STAGED))
    return new


def held_audiences(conn: Connection, present: Sequence[str], message_prefix: str) -> list[str]:
    """Audiences with a desired-in member set by one of this source's events (messageId
    `message_prefix`...) that are not among `present`."""
    member = m.table(m.Membership)
    audience = m.table(m.Audience)
    query = (
        select(audience.c.audience_key)
        .where(
            audience.c.audience_key.not_in(present),
            exists().where(
                member.c.audience_id == audience.c.id,
                member.c.desired == Desired.IN,
                member.c.desired_message_id.like(f"{message_prefix}%"),
            ),
        )
        .order_by(audience.c.audience_key)
    )
    with conn.begin():
        return list(conn.scalars(query))
