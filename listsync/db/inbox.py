"""The inbox: events stored before the receiver answers, and the dead letters beside them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.session import chunks, insert_for, is_postgres, key_filters
from listsync.domain import (
    InboundEvent,
)


def store_events(
    session: Session,
    events: Sequence[InboundEvent],
    *,
    source: str,
    now: datetime,
    audience_flags: Sequence[bool],
    rules: str | None = None,
) -> int:
    """Append events to the inbox; a messageId already there is skipped. Returns how many were new.
    `rules`: the fingerprint of the validation rules that accepted them (`extract.RULES`)."""
    if not events:
        return 0
    rows = [
        {
            "message_id": e.message_id,
            "type": e.type,
            "event": e.event,
            "user_id": e.user_id,
            "anonymous_id": e.anonymous_id,
            "email": e.email,
            "timestamp": e.timestamp,
            "received_at": now,
            "source": source,
            "payload": dict(e.raw),
            "is_audience": flag,
            "rules": rules,
        }
        for e, flag in zip(events, audience_flags, strict=True)
    ]
    new = 0
    table = m.table(m.InboxEvent)
    # DO NOTHING skips messageIds already stored (also by a concurrent writer); RETURNING counts
    # only what this transaction really inserted. Core + RETURNING batches rows on both databases.
    stmt = insert_for(session, table).on_conflict_do_nothing(index_elements=["message_id"]).returning(table.c.id)
    for chunk in chunks(rows, 500):
        new += len(session.execute(stmt, list(chunk)).all())
    return new


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
