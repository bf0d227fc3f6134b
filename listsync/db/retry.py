"""`listsync sync --retry-failed`: give what failed for good another try.

Members and event deliveries that Iterable refused (or that a run marked failed) go back to
pending with a fresh attempt count; the run that follows sends them like any other change.
Deliveries that never had a request (not sendable as mapped: no endpoint) stay failed: resending
cannot help them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.session import rows_affected
from listsync.domain import MemberState


def retry_failed_members(session: Session, now: datetime, audience_keys: list[str] | None = None) -> int:
    stmt = update(m.Membership).where(m.Membership.state == MemberState.FAILED)
    if audience_keys:
        audience_ids = select(m.Audience.id).where(m.Audience.audience_key.in_(audience_keys))
        stmt = stmt.where(m.Membership.audience_id.in_(audience_ids))
    result = session.execute(
        stmt.values(state=MemberState.PENDING, attempts=0, next_attempt_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return rows_affected(result)


def retry_failed_deliveries(session: Session, now: datetime) -> int:
    d = m.EventDelivery
    result = session.execute(
        update(d)
        .where(d.state == m.DeliveryState.FAILED, d.endpoint.is_not(None))
        .values(state=m.DeliveryState.PENDING, attempts=0, next_attempt_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return rows_affected(result)
