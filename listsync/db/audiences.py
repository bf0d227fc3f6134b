"""Audiences: one row per audience key, its Iterable list, its settings and the replica lease on it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Select,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from listsync.db import memberships
from listsync.db import models as m
from listsync.db.session import insert_for, is_postgres, rows_affected
from listsync.domain import (
    MemberState,
)


def ensure_audiences(session: Session, keys: Iterable[str], now: datetime) -> dict[str, int]:
    """Audience ids by key, creating rows for keys seen for the first time."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    stmt = insert_for(session, m.Audience).on_conflict_do_nothing(index_elements=["audience_key"])
    session.execute(
        stmt,
        [
            {
                "audience_key": k,
                "list_state": m.ListState.PENDING,
                "settings": {},
                "created_at": now,
                "updated_at": now,
            }
            for k in wanted
        ],
    )
    found = session.execute(
        select(m.Audience.audience_key, m.Audience.id).where(m.Audience.audience_key.in_(wanted))
    )
    return {key: audience_id for key, audience_id in found}


def record_audience_settings(session: Session, audience_id: int, event_settings: Mapping[str, Any]) -> None:
    session.execute(
        update(m.Audience).where(m.Audience.id == audience_id).values(settings=dict(event_settings))
    )


def _audiences_with_work(now: datetime) -> Select[int]:
    # EXISTS per audience stops at the first due member (pending index); an IN (subquery) would
    # collect every pending member of every audience on each claim.
    pending = (
        select(m.Membership.id)
        .where(m.Membership.audience_id == m.Audience.id, m.Membership.state == MemberState.PENDING, memberships.due(now))
        .exists()
    )
    in_flight = (
        select(m.ApiRequest.id)
        .where(m.ApiRequest.audience_id == m.Audience.id, m.ApiRequest.status == m.RequestStatus.IN_FLIGHT)
        .exists()
    )
    return select(m.Audience.id).where(or_(pending, in_flight))


def claim_audience(
    session: Session,
    *,
    owner: str,
    now: datetime,
    lease: timedelta,
    skip: Iterable[int] = (),
    only: Iterable[int] | None = None,
) -> m.Audience | None:
    """Lease one audience that has work and that no live replica holds."""
    stmt = (
        select(m.Audience)
        .where(
            m.Audience.id.in_(_audiences_with_work(now)) if only is None else m.Audience.id.in_(list(only))
        )
        .where(
            or_(
                m.Audience.lease_until.is_(None),
                m.Audience.lease_until < now,
                m.Audience.lease_owner == owner,
            )
        )
        .where(m.Audience.id.not_in(list(skip)))
        .order_by(m.Audience.id)
        .limit(1)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    audience = session.scalar(stmt)
    if audience is not None:
        audience.lease_owner, audience.lease_until = owner, now + lease
    return audience


def release_audience(session: Session, audience_id: int, owner: str) -> None:
    session.execute(
        update(m.Audience)
        .where(m.Audience.id == audience_id, m.Audience.lease_owner == owner)
        .values(lease_owner=None, lease_until=None)
    )


def set_list(session: Session, audience_id: int, list_id: int | None, state: m.ListState) -> None:
    session.execute(
        update(m.Audience).where(m.Audience.id == audience_id).values(list_id=list_id, list_state=state)
    )


def set_hold(session: Session, audience_id: int, reason: str | None) -> None:
    session.execute(update(m.Audience).where(m.Audience.id == audience_id).values(hold_reason=reason))


def mark_synced_at(session: Session, audience_id: int, now: datetime) -> None:
    session.execute(update(m.Audience).where(m.Audience.id == audience_id).values(last_synced_at=now))


def renew_lease(session: Session, audience_id: int, owner: str, until: datetime) -> bool:
    """Extend our lease on an audience; False when it is no longer ours."""
    result = session.execute(
        update(m.Audience)
        .where(m.Audience.id == audience_id, m.Audience.lease_owner == owner)
        .values(lease_until=until)
        .execution_options(synchronize_session=False)
    )
    return rows_affected(result) > 0


def audiences_with_lists(session: Session) -> list[int]:
    return list(
        session.scalars(
            select(m.Audience.id).where(m.Audience.list_state == m.ListState.READY).order_by(m.Audience.id)
        )
    )


def missing_list_audiences(session: Session) -> list[tuple[int, str]]:
    rows = session.execute(
        select(m.Audience.id, m.Audience.audience_key).where(m.Audience.list_state == m.ListState.MISSING)
    )
    return [(audience_id, key) for audience_id, key in rows]


def all_audiences(session: Session) -> list[m.Audience]:
    return list(session.scalars(select(m.Audience).order_by(m.Audience.audience_key)))
