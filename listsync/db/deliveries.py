"""Event deliveries: the rows routing writes and delivery sends, in id order per user."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.session import chunks, insert_for, is_postgres, key_filters
from listsync.domain import PendingDelivery


def unrouted(session: Session, limit: int) -> list[Any]:
    inbox = m.table(m.InboxEvent)
    stmt = (
        select(
            inbox.c.id, inbox.c.message_id, inbox.c.type, inbox.c.event, inbox.c.payload,
            inbox.c.timestamp, inbox.c.is_audience,
        )
        .where(inbox.c.routed_at.is_(None))
        .order_by(inbox.c.id)
        .limit(limit)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    return list(session.execute(stmt))


def insert_deliveries(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    table = m.table(m.EventDelivery)
    insert = insert_for(session, table)
    # A (event, mapping) pair already there was routed by a run that crashed before marking the
    # inbox row; the first row stands.
    stmt = insert.on_conflict_do_nothing(index_elements=["inbox_id", "mapping"])
    for chunk in chunks(rows, 500):
        session.execute(stmt, list(chunk))


def mark_routed(session: Session, ids: Sequence[int], now: datetime) -> None:
    if ids:
        session.execute(update(m.InboxEvent).where(m.InboxEvent.id.in_(ids)).values(routed_at=now))


def pending_page(session: Session, after: int, limit: int) -> list[PendingDelivery]:
    d = m.EventDelivery
    stmt = (
        select(d.id, d.endpoint, d.body, d.user_key, d.user_id, d.email, d.attempts, d.next_attempt_at)
        .where(d.state == m.DeliveryState.PENDING, d.id > after)
        .order_by(d.id)
        .limit(limit)
    )
    return [PendingDelivery(*row) for row in session.execute(stmt)]


def delivered_emails(session: Session, rows: Sequence[PendingDelivery]) -> dict[str, str]:
    """The email each userId was last delivered with, for the userIds of upserts in `rows`."""
    user_ids = sorted({r.user_id for r in rows if r.user_id and r.endpoint.startswith("users/")})
    found: dict[str, str] = {}
    d = m.EventDelivery
    for start in range(0, len(user_ids), 500):
        stmt = (
            select(d.user_id, d.email)
            .where(d.user_id.in_(user_ids[start : start + 500]), d.state == m.DeliveryState.DELIVERED)
            .where(d.email.is_not(None))
            .order_by(d.id)
        )
        found.update({user_id: email for user_id, email in session.execute(stmt) if user_id and email})
    return found


def any_due(session: Session, now: datetime) -> bool:
    d = m.EventDelivery
    stmt = select(d.id).where(
        d.state == m.DeliveryState.PENDING, (d.next_attempt_at.is_(None)) | (d.next_attempt_at <= now)
    )
    return session.scalar(stmt.limit(1)) is not None


def count_pending(session: Session) -> int:
    stmt = select(func.count()).where(m.EventDelivery.state == m.DeliveryState.PENDING)
    return int(session.scalar(stmt) or 0)


def mark_delivered(session: Session, ids: Sequence[int], now: datetime) -> None:
    """Delivered as stored: attempts and email stay, the error and the retry time are cleared."""
    d = m.table(m.EventDelivery)
    for keys in key_filters(session, d.c.id, ids):
        session.execute(
            update(d)
            .where(keys)
            .values(state=m.DeliveryState.DELIVERED, delivered_at=now, updated_at=now, next_attempt_at=None, last_error=None)
        )


_OUTCOME_COLUMNS = ("state", "attempts", "next_attempt_at", "last_error", "delivered_at", "updated_at", "email")
_RECORD_OUTCOME = (
    update(m.table(m.EventDelivery))
    .where(m.table(m.EventDelivery).c.id == bindparam("b_id"))
    .values({name: bindparam(f"b_{name}") for name in _OUTCOME_COLUMNS})
)


def record_outcomes(session: Session, outcomes: Sequence[dict[str, Any]]) -> None:
    """Write what one page of sends did: one row of new values per delivery, by id (one Core
    executemany: the ORM's per-row bookkeeping cost more than the statement)."""
    if outcomes:
        session.execute(_RECORD_OUTCOME, [{f"b_{key}": value for key, value in row.items()} for row in outcomes])
