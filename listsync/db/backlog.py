"""Work accepted but not done yet, read for people: the sync_backlog view, pending event deliveries
by action, and sample members and events for `listsync plan --sample N`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from listsync.db import memberships
from listsync.db import models as m
from listsync.domain import Desired


def backlog(session: Session) -> dict[str, Any]:
    """The one row of the sync_backlog view (counts of unapplied inbox rows, pending deliveries...)."""
    row = session.execute(text("SELECT * FROM sync_backlog")).mappings().one()
    return {key: (value.isoformat() if isinstance(value, datetime) else value) for key, value in row.items()}


def pending_deliveries(session: Session) -> list[dict[str, Any]]:
    """Pending event deliveries per (action, endpoint), with how many wait for a retry."""
    d = m.EventDelivery
    # count(column) counts non-NULL values: the rows with a retry time set.
    stmt = (
        select(d.action, d.endpoint, func.count().label("pending"), func.count(d.next_attempt_at))
        .where(d.state == m.DeliveryState.PENDING)
        .group_by(d.action, d.endpoint)
        .order_by(d.action, d.endpoint)
    )
    return [
        {"action": str(action), "endpoint": endpoint, "pending": pending, "waiting_retry": int(waits or 0)}
        for action, endpoint, pending, waits in session.execute(stmt)
    ]


def member_sample(session: Session, audience_key: str, now: datetime, size: int) -> list[dict[str, Any]]:
    """The first `size` members the next run would send for one audience."""
    audience_id = session.scalar(select(m.Audience.id).where(m.Audience.audience_key == audience_key))
    if audience_id is None or size <= 0:
        return []
    members = memberships.pending_members(session, audience_id, now, after_id=0, limit=size)
    return [
        {
            "direction": "subscribe" if member.desired is Desired.IN else "unsubscribe",
            "user_id": member.user_id or None,
            "email": member.email or None,
        }
        for member in members
    ]


def delivery_sample(session: Session, size: int) -> list[dict[str, Any]]:
    """The first `size` pending event deliveries, in the order they would be sent."""
    d = m.EventDelivery
    stmt = (
        select(d.message_id, d.action, d.endpoint, d.user_id, d.email)
        .where(d.state == m.DeliveryState.PENDING)
        .order_by(d.id)
        .limit(max(0, size))
    )
    return [
        {"event": message_id, "action": str(action), "endpoint": endpoint, "user_id": user_id, "email": email}
        for message_id, action, endpoint, user_id, email in session.execute(stmt)
    ]
