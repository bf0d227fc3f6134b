"""The reads behind GET /health, /metrics and the progress display. Each is one cheap query:
partial indexes find the oldest pending rows without reading the others."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.domain import MemberState


def last_finished_run(session: Session) -> Any:
    r = m.SyncRun
    stmt = (
        select(r.id, r.status, r.summary, r.finished_at)
        .where(r.finished_at.is_not(None))
        .order_by(r.id.desc())
        .limit(1)
    )
    return session.execute(stmt).one_or_none()


def last_successful_run_at(session: Session) -> datetime | None:
    r = m.SyncRun
    return session.scalar(select(func.max(r.finished_at)).where(r.status == m.RunStatus.OK))


def oldest_waiting_work(session: Session) -> datetime | None:
    """Since when the oldest accepted work has waited: an unapplied inbox event (since it was
    received), a pending delivery (since it was routed), or a pending member (since it became
    pending). Members are looked at through the pending index, the first PENDING_SAMPLE of them:
    the oldest rows come first there, and a full scan of a large backlog on every probe would cost
    more than the answer is worth."""
    inbox, d, ms = m.InboxEvent, m.EventDelivery, m.Membership
    first_unapplied = select(func.min(inbox.id)).where(inbox.applied_at.is_(None)).scalar_subquery()
    first_pending = select(func.min(d.id)).where(d.state == m.DeliveryState.PENDING).scalar_subquery()
    members = (
        select(ms.updated_at)
        .where(ms.state == MemberState.PENDING)
        .order_by(ms.audience_id, ms.id)
        .limit(PENDING_SAMPLE)
        .subquery()
    )
    candidates = [
        session.scalar(select(inbox.received_at).where(inbox.id == first_unapplied)),
        session.scalar(select(d.created_at).where(d.id == first_pending)),
        session.scalar(select(func.min(members.c.updated_at))),
    ]
    found = [stamp for stamp in candidates if stamp is not None]
    return min(found) if found else None


PENDING_SAMPLE = 10_000


def ping(session: Session) -> None:
    """Raises when the database does not answer."""
    session.execute(text("SELECT 1"))


def pending_by_audience(session: Session) -> dict[str, int]:
    stmt = (
        select(m.Audience.audience_key, func.count())
        .join(m.Membership, m.Membership.audience_id == m.Audience.id)
        .where(m.Membership.state == MemberState.PENDING)
        .group_by(m.Audience.audience_key)
        .order_by(m.Audience.audience_key)
    )
    return {key: count for key, count in session.execute(stmt)}


def oldest_pending_by_audience(session: Session) -> list[tuple[str, datetime]]:
    stmt = (
        select(m.Audience.audience_key, func.min(m.Membership.desired_at))
        .join(m.Membership, m.Membership.audience_id == m.Audience.id)
        .where(m.Membership.state == MemberState.PENDING)
        .group_by(m.Audience.audience_key)
    )
    return [(key, oldest) for key, oldest in session.execute(stmt) if oldest is not None]


def finished_deliveries(session: Session) -> int:
    stmt = select(func.count()).where(m.EventDelivery.state != m.DeliveryState.PENDING)
    return int(session.scalar(stmt) or 0)


def events_received(session: Session) -> int:
    """Events stored in the inbox plus those refused into rejected_events."""
    events = session.scalar(select(func.count()).select_from(m.InboxEvent)) or 0
    rejected = session.scalar(select(func.count()).select_from(m.DeadLetter)) or 0
    return int(events) + int(rejected)


def unapplied_events(session: Session) -> int:
    stmt = select(func.count()).select_from(m.InboxEvent).where(m.InboxEvent.applied_at.is_(None))
    return int(session.scalar(stmt) or 0)
