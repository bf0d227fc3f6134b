"""A list request's answer applied to its members in a few statements, whatever its size.

The common outcome of a request (every member confirmed, or every member put back) is one UPDATE
over the request's members, named by the caller (the batch it sent); only the exceptions (refused
items, rows that changed while the request was on the wire) are read back, for
`listsync.lists.membership` to decide in Python. Each statement writes exactly what the pure rule
gives for the rows it matches: the docstrings say why.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, String, bindparam, case, func, literal_column, not_, null, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from listsync.db import models as m
from listsync.db.session import is_postgres, rows_affected
from listsync.domain import Desired, MemberState, Synced

_MEMBERS = m.table(m.Membership)

Sent = Sequence[tuple[int, str, str]]
"""(membership id, email, userId) of each member as its subscribe carried it ('' for not sent)."""


def lock_members(session: Session, member_ids: Sequence[int]) -> None:
    """Lock the request's members on PostgreSQL, so the exceptions read below and the common
    UPDATE see the same rows (SQLite's BEGIN IMMEDIATE already serialises writers)."""
    if is_postgres(session):
        session.execute(select(_MEMBERS.c.id).where(_members(member_ids)).with_for_update())


def _members(member_ids: Sequence[int]) -> ColumnElement[bool]:
    return _MEMBERS.c.id.in_(list(member_ids))


def _sent_columns(session: Session) -> tuple[Any, Any, Any]:
    """The `sent` rows as a table in the statement, (id, email, userId): three arrays unnested on
    PostgreSQL, one JSON array of triples read by json_each on SQLite."""
    if is_postgres(session):
        rows = (
            func.unnest(
                bindparam("ids", type_=ARRAY(BigInteger)),
                bindparam("emails", type_=ARRAY(String)),
                bindparam("users", type_=ARRAY(String)),
            )
            .table_valued("id", "email", "user_id")
            .render_derived(name="sent")
        )
        return rows.c.id, rows.c.email, rows.c.user_id
    triples = func.json_each(bindparam("sent", type_=String)).table_valued("value").alias("sent")
    value = triples.c.value
    return value.op("->>")(literal_column("0")), value.op("->>")(literal_column("1")), value.op("->>")(
        literal_column("2")
    )


def _sent_params(session: Session, sent: Sent) -> dict[str, Any]:
    if is_postgres(session):
        return {"ids": [i for i, _, _ in sent], "emails": [e for _, e, _ in sent], "users": [u for _, _, u in sent]}
    return {"sent": json.dumps(sent, separators=(",", ":"))}


def confirm_subscribed(session: Session, sent: Sent, now: datetime) -> set[int]:
    """Confirm the subscribe for the members Iterable confirmed (`sent`) whose row is as it was
    sent (same identifiers, still wanted in); returns the ids of the others (changed meanwhile,
    or gone), which the caller decides with their rows read under lock: a row this UPDATE did
    not match is not locked by it. They are looked for only when the UPDATE matched fewer rows
    than were sent (RETURNING every id would cost more than the UPDATE's own index work).

    This is `membership.confirm(row, IN, sent email, sent userId)` for exactly those rows: synced
    becomes in with the sent identifiers, which equal the row's own (so NULLIF of them), attempts
    and the error are cleared; and `settle` gives synced, because a desired-in member that Iterable
    has in is pending only when `identity.stale(current, synced)`, and current == synced is never
    stale in any project type. A row whose desired state or identifiers moved is not matched here.
    """
    if not sent:
        return set()
    params = _sent_params(session, sent)
    as_sent = _as_sent(session)
    result = session.execute(
        update(_MEMBERS)
        # UPDATE ... FROM the sent rows (both databases): one primary-key probe per member.
        .where(*as_sent)
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
        .execution_options(synchronize_session=False),
        params,
    )
    if rows_affected(result) == len(sent):
        return set()
    # The UPDATE changed none of the columns this condition reads: it still tells which matched.
    matched = set(session.scalars(select(_MEMBERS.c.id).where(*as_sent), params))
    return {member_id for member_id, _, _ in sent} - matched


def _as_sent(session: Session) -> tuple[ColumnElement[bool], ...]:
    """The member's row still carries the identifiers its subscribe was sent with, and still wants in."""
    member_id, email, user_id = _sent_columns(session)
    return (
        _MEMBERS.c.id == member_id,
        _MEMBERS.c.email == email,
        _MEMBERS.c.user_id == user_id,
        _MEMBERS.c.desired == Desired.IN,
    )


def confirm_unsubscribed(session: Session, member_ids: Sequence[int], now: datetime) -> int:
    """Confirm the unsubscribe for every confirmed member, whatever happened to its row meanwhile.

    This is `membership.confirm(row, OUT, None, None)`: synced becomes out with no identifiers, and
    `settle` then gives pending exactly when the member wants in again (needs_send of a desired-in
    member that Iterable does not have), else synced. Nothing else of the row enters the rule, so
    no row needs Python.
    """
    if not member_ids:
        return 0
    result = session.execute(
        update(_MEMBERS)
        .where(_members(member_ids))
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


def attempts_of(session: Session, member_ids: Sequence[int]) -> list[int]:
    """The distinct attempt counts among the request's members (a retry's delay depends on it)."""
    stmt = select(_MEMBERS.c.attempts).where(_members(member_ids)).distinct()
    return list(session.scalars(stmt))


def put_back(
    session: Session,
    member_ids: Sequence[int],
    now: datetime,
    *,
    reason: str | None,
    attempts: int | None = None,
    next_attempt_at: datetime | None = None,
) -> None:
    """A request that failed as a whole, its members kept pending (`membership.retry_later` when
    `reason` is given: attempts + 1 and the error, due at `next_attempt_at`; else unchanged and due
    now). `attempts` limits it to the members with that many attempts, whose delay is the same."""
    where: list[ColumnElement[bool]] = [_members(member_ids)]
    if attempts is not None:
        where.append(_MEMBERS.c.attempts == attempts)
    values: dict[str, object] = {"next_attempt_at": next_attempt_at, "updated_at": now}
    if reason is not None:
        values.update(attempts=_MEMBERS.c.attempts + 1, last_error=reason)
    session.execute(
        update(_MEMBERS).where(*where).values(**values).execution_options(synchronize_session=False)
    )


def fail_wanted(
    session: Session, member_ids: Sequence[int], reason: str, *, subscribing: bool, now: datetime
) -> None:
    """`membership.fail` for the members that still want the change the request carried: failed,
    attempts + 1, the reason kept. (`failed_unwanted` names the others, which `settle` decides.)"""
    session.execute(
        update(_MEMBERS)
        .where(_members(member_ids), _wants(subscribing))
        .values(
            state=MemberState.FAILED,
            attempts=_MEMBERS.c.attempts + 1,
            last_error=reason,
            next_attempt_at=null(),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )


def failed_unwanted(session: Session, member_ids: Sequence[int], *, subscribing: bool) -> list[int]:
    stmt = select(_MEMBERS.c.id).where(_members(member_ids), not_(_wants(subscribing)))
    return list(session.scalars(stmt))


def _wants(subscribing: bool) -> ColumnElement[bool]:
    """`membership.still_wanted` in SQL."""
    return (_MEMBERS.c.desired == Desired.IN) if subscribing else (_MEMBERS.c.desired != Desired.IN)
