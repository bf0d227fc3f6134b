"""**Receive** -> store for a SQL query (reverse ETL): each poll turns the query's current result
into Engage-style audience events, by a diff against the stored memberships that runs inside the
listsync database against a temporary table, so neither the snapshot nor the stored members are
ever held in Python memory. See `poll_sql`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Index,
    MetaData,
    Row,
    String,
    Table,
    Text,
    and_,
    create_engine,
    exists,
    or_,
    select,
    text,
)
from sqlalchemy.orm import Session, sessionmaker

from listsync.config import Settings
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.domain import Desired, ProjectType, Rejection
from listsync.ingest import extract, validate
from listsync.ingest.accept import IngestCounts, accept_items
from listsync.ingest.audience import AUDIENCE_ENTERED, AUDIENCE_EXITED
from listsync.lists.apply import apply_inbox

logger = logging.getLogger(__name__)

NowFn = Callable[[], datetime]


SQL_SOURCE = "sql"


SQL_MESSAGE_PREFIX = "sql:"


SQL_IDENTITY_COLUMNS = ("audience_key", "user_id", "email")


_MAX_MESSAGE_ID = 255  # inbox.message_id is VARCHAR(255)


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
        events: how the produced events fared in `accept_items`.
    """

    snapshot_id: str
    rows: int = 0
    invalid: int = 0
    entered: int = 0
    exited: int = 0
    held: list[str] = field(default_factory=list)
    events: IngestCounts = field(default_factory=IngestCounts)


# Temporary, so it exists only on the connection of one poll and never in a migration.
_snapshot_metadata = MetaData()


_snapshot = Table(
    "listsync_sql_snapshot",
    _snapshot_metadata,
    Column("seq", m.BigId, primary_key=True, autoincrement=False),
    Column("audience_key", String(255), nullable=False),
    Column("user_id", String(255), nullable=False),
    Column("email", String(320), nullable=False),
    Column("traits", Text, nullable=False),
    prefixes=["TEMPORARY"],
)

# Built after the table, so CREATE TABLE creates them too; the anti-joins probe one per identity rule.
Index("ix_listsync_sql_snapshot_key", _snapshot.c.audience_key, _snapshot.c.user_id, _snapshot.c.email)
Index("ix_listsync_sql_snapshot_email", _snapshot.c.audience_key, _snapshot.c.email)


def poll_sql(
    factory: sessionmaker[Session],
    source_url: str,
    query: str,
    settings: Settings,
    now_fn: NowFn,
    *,
    chunk: int = 5000,
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

    Events carry timestamp = now and messageId `sql:<audience>:<user>:<email>:<snapshot>` and go
    through `accept_items`, so they take the receiver's path. The inbox is applied first, so the
    diff sees the effect of earlier polls and a replayed snapshot yields nothing.

    The query runs as SQLAlchemy `text()` on its own engine, streamed in chunks of `chunk` rows;
    a literal `:name` in it would be read as a bind parameter and must be written `\\:name`.
    """
    now = now_fn().astimezone(UTC)
    counts = SqlSyncCounts(snapshot_id=now.strftime("%Y%m%dT%H%M%S%fZ"))
    _drain_inbox(factory, settings, now_fn)
    source = create_engine(source_url)
    target = _bind_of(factory)
    try:
        with target.connect() as conn:
            try:
                _create_snapshot(conn)
                _load_snapshot(conn, source, query, now, chunk, counts)
                present = _present_audiences(conn)
                by_user_id = settings.iterable.project_type is not ProjectType.EMAIL
                _emit_enters(conn, now, chunk, counts, by_user_id)
                _emit_exits(conn, present, now, chunk, counts, by_user_id)
                counts.held = _held_audiences(conn, present)
            finally:
                with conn.begin():
                    _snapshot.drop(conn, checkfirst=True)
    finally:
        source.dispose()
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


def _create_snapshot(conn: Connection) -> None:
    with conn.begin():
        _snapshot.drop(conn, checkfirst=True)
        _snapshot.create(conn)


def _load_snapshot(
    conn: Connection, source: Engine, query: str, now: datetime, chunk: int, counts: SqlSyncCounts
) -> None:
    """Stream the query's rows into the snapshot table, normalised as the receiver would."""
    seq = itertools.count(1)
    with source.connect() as src:
        result = src.execution_options(stream_results=True, yield_per=chunk).execute(text(query))
        columns = list(result.keys())
        _check_columns(columns)
        for partition in result.partitions(chunk):
            rows = []
            for row in partition:
                counts.rows += 1
                member = _snapshot_row(row, columns, now, counts)
                if member is not None:
                    rows.append({"seq": next(seq), **member})
            if rows:
                with conn.begin():
                    conn.execute(_snapshot.insert(), rows)


def _check_columns(columns: Sequence[str]) -> None:
    if "audience_key" not in columns or not {"user_id", "email"} & set(columns):
        raise ValueError(
            "the SQL source query must return an audience_key column and a user_id and/or email "
            f"column; it returned {', '.join(columns) or 'no columns'}"
        )


def _snapshot_row(
    row: Row[Any], columns: Sequence[str], now: datetime, counts: SqlSyncCounts
) -> dict[str, str] | None:
    """The normalised key and traits of one source row, or None (counted) when it is unusable.

    Identity is normalised by `validate.validate_event` itself, so a member's key here is the key
    the membership row gets when the event is applied, and the diff compares like with like.
    """
    values = dict(zip(columns, row, strict=True))
    audience = values.pop("audience_key")
    user_id, email = values.pop("user_id", None), values.pop("email", None)
    traits = json.loads(json.dumps(values, default=str))  # Decimal, dates -> JSON values
    if not isinstance(audience, str) or not audience:
        return _invalid(counts, f"audience_key must be a non-empty string, got {audience!r}")
    raw = _sql_event(audience, _text(user_id), _text(email), Desired.IN, now, "check", traits)
    checked = validate.validate_event(raw, received_at=now)
    if isinstance(checked, Rejection):
        return _invalid(counts, checked.reason)
    return {
        "audience_key": audience,
        "user_id": checked.user_id or "",
        "email": checked.email or "",
        "traits": json.dumps(traits, separators=(",", ":")),
    }


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


def _invalid(counts: SqlSyncCounts, reason: str) -> dict[str, str] | None:
    counts.invalid += 1
    if counts.invalid <= 5:  # enough to diagnose; a bad column would otherwise log every row
        logger.warning(
            "SQL source row skipped: %s",
            reason[:200],
            extra={"event": "sql_source_row_invalid", "reason": reason.split(":", 1)[0]},
        )
    return None


def _present_audiences(conn: Connection) -> list[str]:
    with conn.begin():
        return list(conn.scalars(select(_snapshot.c.audience_key).distinct()))


def _same_member_rules(t: Any, member: Any, by_user_id: bool) -> list[Any]:
    """The ways a snapshot row and a membership are the same subscriber, by the rules
    `identity.resolve` folds deltas with: the same userId (whatever the emails when a userId names
    the profile, as in hybrid and userId projects; else an email missing on either side does not
    matter), or the same email where either side has no userId. Matching on the exact pair instead
    would make a query without an email column exit and re-enter members every poll.

    One condition per rule, each an equality an index serves (memberships by (audience, userId)
    and (audience, email); the snapshot likewise): callers probe them as separate EXISTS, so a
    poll costs a few index lookups per row, never a scan per row as an OR across them did.
    """
    same_user = and_(t.user_id != "", member.c.user_id == t.user_id)
    if not by_user_id:
        same_user = and_(same_user, or_(t.email == "", member.c.email == "", member.c.email == t.email))
    return [
        same_user,
        and_(t.email != "", member.c.email == t.email, or_(t.user_id == "", member.c.user_id == "")),
    ]


def _emit_enters(
    conn: Connection, now: datetime, chunk: int, counts: SqlSyncCounts, by_user_id: bool
) -> None:
    """Snapshot rows whose member is not desired-in, page by page (keyset on seq)."""
    member = m.Membership.__table__
    audience = m.Audience.__table__
    t = _snapshot.c
    already_in = or_(
        *(
            exists(
                select(member.c.id)
                .select_from(member.join(audience, audience.c.id == member.c.audience_id))
                .where(audience.c.audience_key == t.audience_key, member.c.desired == Desired.IN, rule)
            )
            for rule in _same_member_rules(t, member, by_user_id)
        )
    )
    after = 0
    while True:
        page = (
            select(t.seq, t.audience_key, t.user_id, t.email, t.traits)
            .where(t.seq > after, ~already_in)
            .order_by(t.seq)
            .limit(chunk)
        )
        rows = _emit_page(conn, page, Desired.IN, now, counts, lambda r: json.loads(r.traits))
        if not rows:
            return
        counts.entered += len(rows)
        after = rows[-1].seq


def _emit_exits(
    conn: Connection, present: Sequence[str], now: datetime, chunk: int, counts: SqlSyncCounts, by_user_id: bool
) -> None:
    """Desired-in members of audiences in the result that have no row in it (keyset on id)."""
    if not present:
        return
    member = m.Membership.__table__
    audience = m.Audience.__table__
    t = _snapshot.c
    in_snapshot = or_(
        *(
            exists().where(t.audience_key == audience.c.audience_key, rule)
            for rule in _same_member_rules(t, member, by_user_id)
        )
    )
    after = 0
    while True:
        page = (
            select(member.c.id, audience.c.audience_key, member.c.user_id, member.c.email)
            .select_from(member.join(audience, audience.c.id == member.c.audience_id))
            .where(
                member.c.id > after,
                member.c.desired == Desired.IN,
                audience.c.audience_key.in_(present),
                ~in_snapshot,
            )
            .order_by(member.c.id)
            .limit(chunk)
        )
        rows = _emit_page(conn, page, Desired.OUT, now, counts, lambda _r: {})
        if not rows:
            return
        counts.exited += len(rows)
        after = rows[-1].id


def _emit_page(
    conn: Connection,
    page: Any,
    desired: Desired,
    now: datetime,
    counts: SqlSyncCounts,
    traits_of: Callable[[Any], dict[str, Any]],
) -> list[Any]:
    """One page of members as synthetic Audience Entered/Exited events, accepted in one commit."""
    with Session(bind=conn) as session, session.begin():
        rows = session.execute(page).all()
        events = [
            _sql_event(
                r.audience_key,
                r.user_id or None,
                r.email or None,
                desired,
                now,
                counts.snapshot_id,
                traits_of(r),
            )
            for r in rows
        ]
        if events:
            counts.events.add(_accept_events(session, events, now))
    return list(rows)


def _held_audiences(conn: Connection, present: Sequence[str]) -> list[str]:
    """Audiences this source fed (a desired-in member set by a `sql:` event) that it now omits."""
    member = m.Membership.__table__
    audience = m.Audience.__table__
    query = (
        select(audience.c.audience_key)
        .distinct()
        .select_from(member.join(audience, audience.c.id == member.c.audience_id))
        .where(
            member.c.desired == Desired.IN,
            member.c.desired_message_id.like(f"{SQL_MESSAGE_PREFIX}%"),
            audience.c.audience_key.not_in(present),
        )
        .order_by(audience.c.audience_key)
    )
    with conn.begin():
        return list(conn.scalars(query))


def _accept_events(session: Session, events: Sequence[dict[str, Any]], now: datetime) -> IngestCounts:
    items = [extract.RawEvent(event, 0) for event in events]  # our own events: size is not the sender's
    return accept_items(session, items, source=SQL_SOURCE, now=now)


def _sql_event(
    audience: str,
    user_id: str | None,
    email: str | None,
    desired: Desired,
    now: datetime,
    snapshot_id: str,
    traits: dict[str, Any],
) -> dict[str, Any]:
    """A synthetic Engage-style track event for one delta."""
    entered = desired is Desired.IN
    properties: dict[str, Any] = {**traits, "audience_key": audience, audience: entered}
    if email:
        properties["email"] = email
    event: dict[str, Any] = {
        "type": "track",
        "event": AUDIENCE_ENTERED if entered else AUDIENCE_EXITED,
        "messageId": _message_id(audience, user_id, email, snapshot_id),
        "timestamp": now.isoformat(),
        "properties": properties,
        "context": {
            "personas": {"computation_class": "audience", "computation_key": audience},
            "library": {"name": "listsync-sql"},
        },
    }
    if user_id:
        event["userId"] = user_id
    else:
        # Segment requires userId or anonymousId; an email-only member gets a stable stand-in.
        event["anonymousId"] = f"email:{email}"
    return event


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
