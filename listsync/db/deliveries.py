"""Event deliveries: the rows routing writes and delivery sends, in id order per user."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.inbox import stamp_for
from listsync.db.session import is_postgres, key_filters
from listsync.domain import PendingDelivery
from listsync.json_text import fast_loads


class Unrouted(NamedTuple):
    """An inbox event not routed yet, as routing reads it."""

    id: int
    message_id: str
    type: str
    event: str | None
    payload: dict[str, Any]
    timestamp: datetime
    is_audience: bool


_UNROUTED = (
    "SELECT id, message_id, type, event, {payload}, timestamp, is_audience FROM inbox "
    "WHERE routed_at IS NULL ORDER BY id LIMIT {limit}"
)


def unrouted(session: Session, limit: int) -> list[Unrouted]:
    """The next `limit` unrouted inbox events in id order (locked, skipping locked ones, on
    PostgreSQL). Read by the driver and each payload decoded once here (orjson where it gives the
    stdlib's result): SQLAlchemy's per-row JSON and datetime processing cost more than the query."""
    postgres = is_postgres(session)
    sql = _UNROUTED.format(payload="payload::text" if postgres else "payload", limit=int(limit))
    rows = session.connection().exec_driver_sql(sql + (" FOR UPDATE SKIP LOCKED" if postgres else "")).all()
    stamp = _stamp_reader(postgres)
    return [
        Unrouted(row[0], row[1], row[2], row[3], _decode(row[4]), stamp(row[5]), bool(row[6])) for row in rows
    ]


def _decode(text: str) -> Any:
    try:
        return fast_loads(text)
    except ValueError:
        return json.loads(text)


def _stamp_reader(postgres: bool) -> Callable[[Any], datetime]:
    """A `UTCDateTime` column's value as the driver returns it -> an aware UTC datetime."""
    if postgres:
        return lambda value: value.astimezone(UTC)
    return lambda value: datetime.fromisoformat(value).replace(tzinfo=UTC)


DELIVERY_COLUMNS = (
    "inbox_id", "message_id", "event_type", "event_name", "mapping", "action", "state", "last_error",
    "endpoint", "body", "user_key", "user_id", "email", "iterable_id", "attempts", "created_at", "updated_at",
)
_BODY = DELIVERY_COLUMNS.index("body")
_INSERT = "INSERT INTO event_deliveries ({names}) VALUES ({marks}) ON CONFLICT (inbox_id, mapping) DO NOTHING"


def insert_deliveries(session: Session, rows: Sequence[tuple[Any, ...]]) -> None:
    """Append delivery rows: tuples in DELIVERY_COLUMNS order, enums as their values, the body as
    JSON text, the last two (created_at, updated_at) aware datetimes. One prepared statement run by the driver's
    executemany. A (event, mapping) pair already there was routed by a run that crashed before
    marking the inbox row; the first row stands."""
    if not rows:
        return
    postgres = is_postgres(session)
    to_stored = stamp_for(postgres)
    marks = ["%s" if postgres else "?"] * len(DELIVERY_COLUMNS)
    if postgres:
        marks[_BODY] = "%s::jsonb"
    sql = _INSERT.format(names=", ".join(DELIVERY_COLUMNS), marks=", ".join(marks))
    stored: dict[datetime, Any] = {}  # one routing batch shares its timestamp

    def stamp(value: datetime) -> Any:
        if value not in stored:
            stored[value] = to_stored(value)
        return stored[value]

    values = [(*row[:-2], stamp(row[-2]), stamp(row[-1])) for row in rows]
    session.connection().exec_driver_sql(sql, values)


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
