"""A list request's answer applied to its members in a few statements, whatever its size.

The common outcome of a request (every member confirmed, or every member put back) is one UPDATE
over the request's ledger items; only the exceptions (refused items, rows that changed while the
request was on the wire) are read back, for `listsync.lists.membership` to decide in Python. Each
statement writes exactly what the pure rule gives for the rows it matches: the docstrings say why.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import Select, and_, case, func, not_, null, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from listsync.db import models as m
from listsync.db.session import is_postgres
from listsync.domain import Desired, MemberState, Synced

_MEMBERS = m.table(m.Membership)
_ITEMS = m.table(m.RequestItem)


def lock_members(session: Session, request_id: int) -> None:
    """Lock the request's members on PostgreSQL, so the exceptions read below and the common
    UPDATE see the same rows (SQLite's BEGIN IMMEDIATE already serialises writers)."""
    if is_postgres(session):
        session.execute(
            select(_MEMBERS.c.id).where(_MEMBERS.c.id.in_(_request_members(request_id))).with_for_update()
        )


def _request_members(request_id: int, outcomes: Collection[str] | None = None) -> Select[tuple[int]]:
    stmt = select(_ITEMS.c.membership_id).where(_ITEMS.c.request_id == request_id)
    return stmt.where(_ITEMS.c.outcome.in_(list(outcomes))) if outcomes is not None else stmt


def _sent_as_now() -> ColumnElement[bool]:
    """The member's row still carries the identifiers its subscribe was sent with, and still wants in."""
    return and_(
        _ITEMS.c.membership_id == _MEMBERS.c.id,
        func.coalesce(_ITEMS.c.sent_email, "") == _MEMBERS.c.email,
        func.coalesce(_ITEMS.c.sent_user_id, "") == _MEMBERS.c.user_id,
        _MEMBERS.c.desired == Desired.IN,
    )


def confirm_subscribed(
    session: Session, request_id: int, confirmed: Collection[str], now: datetime
) -> set[int]:
    """Confirm the subscribe for members whose row is as it was sent (`_sent_as_now`); returns
    their ids. The request's other members (refused, changed meanwhile, or gone) are the caller's
    to decide, with their rows read under lock: a row this UPDATE did not match is not locked by it.

    This is `membership.confirm(row, IN, sent email, sent userId)` for exactly those rows: synced
    becomes in with the sent identifiers, which equal the row's own (so NULLIF of them), attempts
    and the error are cleared; and `settle` gives synced, because a desired-in member that Iterable
    has in is pending only when `identity.stale(current, synced)`, and current == synced is never
    stale in any project type. A row whose desired state or identifiers moved is not matched here.
    """
    result = session.execute(
        update(_MEMBERS)
        # UPDATE ... FROM the ledger items (both databases): one join driven by the request's key.
        .where(_ITEMS.c.request_id == request_id, _ITEMS.c.outcome.in_(list(confirmed)), _sent_as_now())
        .values(
            synced=Synced.IN,
            synced_email=func.nullif(_MEMBERS.c.email, ""),
            synced_user_id=func.nullif(_MEMBERS.c.user_id, ""),
            state=MemberState.SYNCED,
            attempts=0,
            last_error=null(),
            next_attempt_at=null(),
            updated_at=now,
        )
        .returning(_MEMBERS.c.id)
        .execution_options(synchronize_session=False)
    )
    return set(result.scalars())


def confirm_unsubscribed(session: Session, request_id: int, confirmed: Collection[str], now: datetime) -> int:
    """Confirm the unsubscribe for every confirmed member, whatever happened to its row meanwhile.

    This is `membership.confirm(row, OUT, None, None)`: synced becomes out with no identifiers, and
    `settle` then gives pending exactly when the member wants in again (needs_send of a desired-in
    member that Iterable does not have), else synced. Nothing else of the row enters the rule, so
    no row needs Python.
    """
    result = session.execute(
        update(_MEMBERS)
        .where(_MEMBERS.c.id.in_(_request_members(request_id, confirmed)))
        .values(
            synced=Synced.OUT,
            synced_email=null(),
            synced_user_id=null(),
            state=case((_MEMBERS.c.desired == Desired.IN, MemberState.PENDING), else_=MemberState.SYNCED),
            attempts=0,
            last_error=null(),
            next_attempt_at=null(),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def attempts_of(session: Session, request_id: int) -> list[int]:
    """The distinct attempt counts among the request's members (a retry's delay depends on it)."""
    stmt = select(_MEMBERS.c.attempts).where(_MEMBERS.c.id.in_(_request_members(request_id))).distinct()
    return list(session.scalars(stmt))


def put_back(
    session: Session,
    request_id: int,
    now: datetime,
    *,
    reason: str | None,
    attempts: int | None = None,
    next_attempt_at: datetime | None = None,
) -> None:
    """A request that failed as a whole, its members kept pending (`membership.retry_later` when
    `reason` is given: attempts + 1 and the error, due at `next_attempt_at`; else unchanged and due
    now). `attempts` limits it to the members with that many attempts, whose delay is the same."""
    where: list[ColumnElement[bool]] = [_MEMBERS.c.id.in_(_request_members(request_id))]
    if attempts is not None:
        where.append(_MEMBERS.c.attempts == attempts)
    values: dict[str, object] = {"next_attempt_at": next_attempt_at, "updated_at": now}
    if reason is not None:
        values.update(attempts=_MEMBERS.c.attempts + 1, last_error=reason)
    session.execute(
        update(_MEMBERS).where(*where).values(**values).execution_options(synchronize_session=False)
    )


def fail_wanted(session: Session, request_id: int, reason: str, *, subscribing: bool, now: datetime) -> None:
    """`membership.fail` for the members that still want the change the request carried: failed,
    attempts + 1, the reason kept. (`failed_unwanted` names the others, which `settle` decides.)"""
    session.execute(
        update(_MEMBERS)
        .where(_MEMBERS.c.id.in_(_request_members(request_id)), _wants(subscribing))
        .values(
            state=MemberState.FAILED,
            attempts=_MEMBERS.c.attempts + 1,
            last_error=reason,
            next_attempt_at=null(),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )


def failed_unwanted(session: Session, request_id: int, *, subscribing: bool) -> list[int]:
    stmt = select(_MEMBERS.c.id).where(
        _MEMBERS.c.id.in_(_request_members(request_id)), not_(_wants(subscribing))
    )
    return list(session.scalars(stmt))


def _wants(subscribing: bool) -> ColumnElement[bool]:
    """`membership.still_wanted` in SQL."""
    return (_MEMBERS.c.desired == Desired.IN) if subscribing else (_MEMBERS.c.desired != Desired.IN)
