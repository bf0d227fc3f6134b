"""Event deliveries: the rows routing writes and delivery sends, in id order per user."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.inbox import stamp_for
from listsync.db.session import chunks, is_postgres, key_filters, rows_affected
from listsync.domain import PendingDelivery
from listsync.json_text import fast_loads, has_long_digits


class Unrouted(NamedTuple):
    """An inbox event not routed yet, as routing reads it. `stored_timestamp` is the driver's value,
    read as a datetime only when asked (`timestamp`): most payloads carry their own."""

    id: int
    message_id: str
    type: str
    event: str | None
    payload: dict[str, Any]
    stored_timestamp: Any
    is_audience: bool

    @property
    def timestamp(self) -> datetime:
        return read_stamp(self.stored_timestamp)


_UNROUTED = (
    "SELECT id, message_id, type, event, {payload}, timestamp, is_audience FROM inbox "
    "WHERE routed_at IS NULL {audiences}ORDER BY id LIMIT {limit}"
)

_AUDIENCE_ROUTED = (
    "UPDATE inbox SET routed_at = {now} WHERE routed_at IS NULL AND id IN "
    "(SELECT id FROM inbox WHERE routed_at IS NULL AND is_audience ORDER BY id LIMIT {limit}{lock})"
)


def mark_audience_routed(session: Session, now: datetime, limit: int) -> int:
    """Marks up to `limit` unrouted audience events routed without reading them (when no mapping
    takes audience events they make no delivery); returns how many it marked. A first sync's
    inbox is mostly such events: reading and decoding each cost more than the rest of routing."""
    postgres = is_postgres(session)
    # Rows a fold holds are left for the next batch, as `unrouted` does: waiting on them could
    # deadlock with a `listsync plan` that folds and routes in one transaction.
    sql = _AUDIENCE_ROUTED.format(
        now="%s" if postgres else "?", limit=int(limit), lock=" FOR UPDATE SKIP LOCKED" if postgres else ""
    )
    value: Any = now if postgres else stamp_for(False)(now)
    result = session.connection().exec_driver_sql(sql, (value,))
    return rows_affected(result)


def unrouted(session: Session, limit: int, *, audiences: bool = True) -> list[Unrouted]:
    """The next `limit` unrouted inbox events in id order (locked, skipping locked ones, on
    PostgreSQL); without the audience events when `audiences` is False. Read by the driver, each
    payload decoded once here: SQLAlchemy's per-row JSON and datetime processing cost more than
    the query."""
    postgres = is_postgres(session)
    sql = _UNROUTED.format(
        payload="payload::text" if postgres else "payload", limit=int(limit),
        audiences="" if audiences else "AND NOT is_audience ",
    )
    rows = _fetch_all(session, sql + (" FOR UPDATE SKIP LOCKED" if postgres else ""))
    payloads = decode_all([row[4] for row in rows])
    return [
        Unrouted(row[0], row[1], row[2], row[3], payload, row[5], bool(row[6]))
        for row, payload in zip(rows, payloads, strict=True)
    ]


def _fetch_all(session: Session, sql: str) -> list[tuple[Any, ...]]:
    """The rows of one query as the driver's tuples, on the session's connection (so in its
    transaction), without SQLAlchemy's Row objects: these pages are read a thousand rows at a time."""
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def decode_all(texts: Sequence[str | None]) -> list[Any]:
    """JSON texts (or NULLs) decoded, by orjson when it gives the stdlib's result (one check of the
    digits for the whole batch: a run that could be an integer beyond 64 bits goes to the stdlib)."""
    checked = not has_long_digits("\n".join(text for text in texts if text is not None))
    return [None if text is None else _decode(text, checked) for text in texts]


def _decode(text: str, digits_checked: bool) -> Any:
    try:
        return fast_loads(text, digits_checked=digits_checked)
    except ValueError:
        return json.loads(text)


def read_stamp(value: Any) -> datetime:
    """A `UTCDateTime` column's value as the driver returns it (a datetime from psycopg, SQLite's
    text) -> an aware UTC datetime."""
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


DELIVERY_COLUMNS = (
    "inbox_id", "message_id", "event_type", "event_name", "mapping", "action", "state", "last_error",
    "endpoint", "body", "user_key", "user_id", "email", "iterable_id", "attempts", "created_at", "updated_at",
)
_INSERT = "INSERT INTO event_deliveries ({names}) {values} ON CONFLICT (inbox_id, mapping) DO NOTHING"
_PG_ARRAY_TYPES = {"inbox_id": "bigint", "attempts": "integer", "created_at": "timestamptz", "updated_at": "timestamptz"}


def insert_deliveries(session: Session, rows: Sequence[tuple[Any, ...]]) -> None:
    """Append delivery rows: tuples in DELIVERY_COLUMNS order, enums as their values, the body as
    JSON text, the last two (created_at, updated_at) aware datetimes. One statement of arrays on
    PostgreSQL (one per row, even pipelined, cost more than the rows), one prepared executemany on
    SQLite. A (event, mapping) pair already there was routed by a run that crashed before marking
    the inbox row; the first row stands."""
    if not rows:
        return
    names = ", ".join(DELIVERY_COLUMNS)
    if is_postgres(session):
        arrays = ", ".join(f"%s::{_PG_ARRAY_TYPES.get(name, 'text')}[]" for name in DELIVERY_COLUMNS)
        picked = ", ".join(f"t.{name}::jsonb" if name == "body" else f"t.{name}" for name in DELIVERY_COLUMNS)
        values = f"SELECT {picked} FROM unnest({arrays}) AS t({names})"
        columns = [list(column) for column in zip(*rows, strict=True)]
        session.connection().exec_driver_sql(_INSERT.format(names=names, values=values), tuple(columns))
        return
    to_stored = stamp_for(False)
    stored: dict[datetime, Any] = {}  # one routing batch shares its timestamp

    def stamp(value: datetime) -> Any:
        if value not in stored:
            stored[value] = to_stored(value)
        return stored[value]

    marks = ", ".join("?" for _ in DELIVERY_COLUMNS)
    stamped = [(*row[:-2], stamp(row[-2]), stamp(row[-1])) for row in rows]
    session.connection().exec_driver_sql(_INSERT.format(names=names, values=f"VALUES ({marks})"), stamped)


def mark_routed(session: Session, ids: Sequence[int], now: datetime) -> None:
    if not is_postgres(session):
        _update_ids(session, "inbox", "routed_at = ?", (stamp_for(False)(now),), ids)
        return
    inbox = m.table(m.InboxEvent)
    for keys in key_filters(session, inbox.c.id, ids):
        session.execute(update(inbox).where(keys).values(routed_at=now))


def _update_ids(session: Session, table: str, assignments: str, values: tuple[Any, ...], ids: Sequence[int]) -> None:
    """SQLite: UPDATE `table` SET `assignments` (qmark parameters: `values`) where the id is one of
    `ids`, written into the statement as integer literals, KEY_CHUNK a statement: compiling
    SQLAlchemy's expanding IN list cost more than the update itself."""
    for chunk in chunks(ids):
        listed = ",".join(str(int(key)) for key in chunk)
        session.connection().exec_driver_sql(f"UPDATE {table} SET {assignments} WHERE id IN ({listed})", values)


_PENDING_PAGE = (
    "SELECT id, endpoint, {body}, user_key, user_id, email, attempts, next_attempt_at FROM event_deliveries "
    "WHERE state = 'pending' AND id > {after} ORDER BY id LIMIT {limit}"
)


def pending_page(session: Session, after: int, limit: int) -> list[PendingDelivery]:
    """The next `limit` pending deliveries after id `after`, read by the driver (as `unrouted`)."""
    postgres = is_postgres(session)
    sql = _PENDING_PAGE.format(body="body::text" if postgres else "body", after=int(after), limit=int(limit))
    rows = _fetch_all(session, sql)
    bodies = decode_all([row[2] for row in rows])
    return [
        PendingDelivery(row[0], row[1], body, row[3], row[4], row[5], row[6], None if row[7] is None else read_stamp(row[7]))
        for row, body in zip(rows, bodies, strict=True)
    ]


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
    if not is_postgres(session):
        stamp = stamp_for(False)(now)
        assignments = "state = ?, delivered_at = ?, updated_at = ?, next_attempt_at = NULL, last_error = NULL"
        _update_ids(session, "event_deliveries", assignments, (m.DeliveryState.DELIVERED.value, stamp, stamp), ids)
        return
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
