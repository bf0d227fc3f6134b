"""The inbox: events stored before the receiver answers, and the dead letters beside them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.session import insert_for, is_postgres, key_filters, rows_affected
from listsync.ingest.fast_path import InboxRow
from listsync.json_text import dumps as json_text


def store_events(
    session: Session,
    events: Sequence[InboxRow],
    *,
    source: str,
    now: datetime,
    rules: str | None = None,
) -> int:
    """Append events to the inbox; a messageId already there is skipped. Returns how many were new.

    `rules`: the fingerprint of the validation rules that accepted them (`stored.RULES`)."""
    rows = stored_rows(events, source=source, now=now, rules=rules, postgres=is_postgres(session))
    return insert_stored(session, rows)


StoredRow = tuple[Any, ...]
"""An inbox row in its columns' stored form, as `stored_rows` makes it and `insert_stored` takes it."""


def stored_rows(
    events: Sequence[InboxRow], *, source: str, now: datetime, rules: str | None, postgres: bool
) -> list[StoredRow]:
    """The events as the driver takes them (no database needed: a worker process may make them)."""
    to_stored = stamp_for(postgres)
    stamps: dict[datetime, Any] = {}  # events of one batch often share a timestamp

    def stamp(value: datetime) -> Any:
        stored = stamps.get(value)
        if stored is None:
            stored = stamps[value] = to_stored(value)
        return stored

    received = stamp(now)
    return [
        (
            e.message_id,
            e.type,
            e.event,
            e.user_id,
            e.anonymous_id,
            e.email,
            stamp(e.timestamp),
            received,
            source,
            json_text(e.payload),
            e.is_audience,
            rules,
        )
        for e in events
    ]


def stored_payload(row: StoredRow) -> str:
    """The payload's JSON text of a stored row."""
    return str(row[9])


def insert_stored(session: Session, rows: Sequence[StoredRow]) -> int:
    """Insert stored rows, skipping messageIds already there; returns how many were new.

    One prepared INSERT run by the driver's executemany (psycopg pipelines it, sqlite3 steps
    it), with the values already in the column's stored form: SQLAlchemy's per-row bind
    processing and a multi-VALUES statement re-parsed per batch cost more than the insert."""
    if not rows:
        return 0
    # DO NOTHING skips messageIds already stored (also by a concurrent writer); the rowcount counts
    # only what this transaction really inserted.
    statement = _INSERT_PG if is_postgres(session) else _INSERT_SQLITE
    return rows_affected(session.connection().exec_driver_sql(statement, list(rows)))


_INBOX_COLUMNS = (
    "message_id, type, event, user_id, anonymous_id, email, timestamp, received_at, source, payload, is_audience, rules"
)
_INSERT_SQLITE = (
    f"INSERT INTO inbox ({_INBOX_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (message_id) DO NOTHING"
)
_INSERT_PG = (
    f"INSERT INTO inbox ({_INBOX_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s) "
    "ON CONFLICT (message_id) DO NOTHING"
)


def stamp_for(postgres: bool) -> Callable[[datetime], Any]:
    """A UTC datetime as the driver takes it for a `UTCDateTime` column (see models.UTCDateTime)."""
    if postgres:
        return lambda value: value.astimezone(UTC)
    # SQLAlchemy's SQLite DATETIME storage format: naive UTC, always with microseconds.
    return lambda value: value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def store_rejections(
    session: Session, rejections: Sequence[tuple[str, str]], *, source: str, now: datetime
) -> None:
    """Dead-letter (reason, redacted payload text) pairs."""
    if rejections:
        session.execute(
            insert_for(session, m.DeadLetter),
            [{"received_at": now, "source": source, "reason": r, "payload": p} for r, p in rejections],
        )


@dataclass(frozen=True)
class StoredEvent:
    """An inbox row as the fold reads it: the payload, and what validation made of it when stored."""

    id: int
    payload: dict[str, Any]
    received_at: datetime
    rules: str | None
    type: str
    message_id: str
    timestamp: datetime
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    email: str | None


_STORED_COLUMNS = tuple(name for name in StoredEvent.__dataclass_fields__)


def unapplied_events(session: Session, limit: int) -> list[StoredEvent]:
    """The oldest inbox events not yet folded into memberships (rows locked on PostgreSQL)."""
    inbox = m.table(m.InboxEvent)
    stmt = (
        select(*(inbox.c[name] for name in _STORED_COLUMNS))
        .where(inbox.c.applied_at.is_(None))
        .order_by(inbox.c.id)
        .limit(limit)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    return [StoredEvent(*row) for row in session.execute(stmt)]


def events_by_id(session: Session, ids: Sequence[int]) -> dict[int, StoredEvent]:
    """These inbox events (already locked by the caller's batch), by id."""
    inbox = m.table(m.InboxEvent)
    found: dict[int, StoredEvent] = {}
    for keys in key_filters(session, inbox.c.id, list(ids)):
        stmt = select(*(inbox.c[name] for name in _STORED_COLUMNS)).where(keys)
        found.update((row.id, StoredEvent(*row)) for row in session.execute(stmt))
    return found


def mark_applied(session: Session, ids: Sequence[int], now: datetime) -> None:
    inbox = m.table(m.InboxEvent)
    for keys in key_filters(session, inbox.c.id, list(ids)):
        session.execute(update(inbox).where(keys).values(applied_at=now))


APPLY_LOCK_KEY = 0x6C697374  # "list": one advisory lock id for folding the inbox


def serialize_inbox_apply(session: Session) -> None:
    """On PostgreSQL, let one replica at a time fold the inbox into memberships (held until commit).

    Folding is order-independent per member, but two replicas locking overlapping memberships in
    different orders could deadlock; a transaction-scoped advisory lock avoids that and cannot
    leak through a connection pool.
    """
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": APPLY_LOCK_KEY})
