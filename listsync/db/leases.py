"""Named leases: which replica runs a singleton job (event delivery) right now."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import (
    or_,
    update,
)
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.session import insert_for, rows_affected


def try_lease(session: Session, name: str, owner: str, now: datetime, ttl: timedelta) -> bool:
    """Take or renew the named lease if it is free, expired or already ours. Works on both databases:
    a lost race shows up as a row owned by someone else, not as an error."""
    # RETURNING, not the rowcount: PostgreSQL's driver reports -1 for this INSERT through the session.
    inserted = session.execute(
        insert_for(session, m.table(m.Lease)).on_conflict_do_nothing(index_elements=["name"]).returning(m.Lease.name),
        {"name": name, "owner": owner, "until": now + ttl},
    )
    if inserted.first() is not None:
        return True
    taken = session.execute(
        update(m.Lease)
        .where(m.Lease.name == name, or_(m.Lease.owner == owner, m.Lease.until < now))
        .values(owner=owner, until=now + ttl)
        .execution_options(synchronize_session=False)
    )
    return rows_affected(taken) > 0


def release_lease(session: Session, name: str, owner: str, now: datetime) -> None:
    """Let the named lease lapse now if it is ours, so another replica need not wait for it."""
    session.execute(update(m.Lease).where(m.Lease.name == name, m.Lease.owner == owner).values(until=now))
