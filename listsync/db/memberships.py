"""Memberships: the rows the lists pipeline folds deltas into, pages through and records outcomes on.

Rows come in and go out as `domain.Member` values; what a delta or an answer means for a member is
decided in `listsync.lists`, not here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Enum,
    Text,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.session import chunks, insert_for, is_postgres, rows_affected
from listsync.domain import (
    Desired,
    Member,
    MemberState,
    PendingMember,
    Synced,
)

STATE_COLUMNS = (
    "user_id",
    "email",
    "desired",
    "desired_at",
    "desired_message_id",
    "data_fields",
    "synced",
    "synced_email",
    "synced_user_id",
    "state",
    "attempts",
    "last_error",
)


def to_member(row: Any) -> Member:
    return Member(
        user_id=row.user_id,
        email=row.email,
        desired=Desired(row.desired),
        desired_at=row.desired_at,
        desired_message_id=row.desired_message_id,
        data_fields=row.data_fields,
        synced=Synced(row.synced) if row.synced else None,
        synced_email=row.synced_email,
        synced_user_id=row.synced_user_id,
        state=str(row.state),
        attempts=row.attempts,
        last_error=row.last_error,
    )


def member_values(state: Member) -> dict[str, Any]:
    return {name: getattr(state, name) for name in STATE_COLUMNS}


def load_candidates(
    session: Session, audience_ids: set[int], user_ids: set[str], emails: set[str]
) -> list[tuple[int, int, Member]]:
    """(id, audience_id, member) of the memberships of these audiences that share a userId or an
    email with the given ones, locked on PostgreSQL."""
    found: dict[int, tuple[int, int, Member]] = {}
    for column, values in ((m.Membership.user_id, user_ids - {""}), (m.Membership.email, emails - {""})):
        for chunk in chunks(sorted(values)):
            stmt = select(m.Membership).where(m.Membership.audience_id.in_(audience_ids), column.in_(chunk))
            if is_postgres(session):
                stmt = stmt.with_for_update()
            found.update({row.id: (row.id, row.audience_id, to_member(row)) for row in session.scalars(stmt)})
    return list(found.values())


def write_members(
    session: Session,
    *,
    removed: Iterable[int],
    created: Sequence[tuple[int, Member]],
    changed: Mapping[int, Member],
    now: datetime,
) -> None:
    """Delete `removed`, update `changed` by id, then insert `created` ((audience_id, member), in
    that order); a member whose attempts were reset is due at once. Updates go first: one may take
    a row's identifiers away (an email-only member getting its userId) that a new member of the
    same batch then has."""
    delete_members(session, removed)
    update_members(session, changed, now)
    insert_members(session, created, now)


def delete_members(session: Session, removed: Iterable[int]) -> None:
    gone = sorted(removed)
    if gone:
        session.execute(delete(m.Membership).where(m.Membership.id.in_(gone)))


def update_members(session: Session, changed: Mapping[int, Member], now: datetime) -> None:
    """Update members by id; a member whose attempts were reset is due at once."""
    updates = []
    for member_id, member in changed.items():
        reset = {"next_attempt_at": None} if member.attempts == 0 else {}
        updates.append({"id": member_id, **member_values(member), "updated_at": now, **reset})
    if updates:
        session.execute(update(m.Membership), updates)


def insert_members(session: Session, created: Sequence[tuple[int, Member]], now: datetime) -> None:
    """Insert (audience_id, member) rows, in that order (plain rows: a first sync inserts them all)."""
    if created:
        session.execute(
            insert(m.table(m.Membership)),
            [
                {"audience_id": audience_id, **member_values(member), "created_at": now,
                 "updated_at": now, "next_attempt_at": None}
                for audience_id, member in created
            ],
        )


def members_of_user(session: Session, user_id: str) -> list[tuple[int, int, Member, datetime | None]]:
    """(id, audience_id, member, email_at) of every membership with this userId, locked on PostgreSQL."""
    stmt = select(m.Membership).where(m.Membership.user_id == user_id)
    rows = session.scalars(stmt.with_for_update() if is_postgres(session) else stmt)
    return [(row.id, row.audience_id, to_member(row), row.email_at) for row in rows]


def email_taken(session: Session, audience_id: int, email: str) -> bool:
    taken = select(m.Membership.id).where(m.Membership.audience_id == audience_id, m.Membership.email == email)
    return session.scalar(taken.limit(1)) is not None


def insert_member(session: Session, audience_id: int, member: Member, now: datetime, email_at: datetime) -> None:
    session.execute(
        insert_for(session, m.Membership),
        [{"audience_id": audience_id, **member_values(member), "created_at": now,
          "updated_at": now, "next_attempt_at": None, "email_at": email_at}],
    )


def audience_members(session: Session, audience_id: int) -> Iterator[tuple[int, Member]]:
    """Every membership of the audience, streamed."""
    rows = session.scalars(
        select(m.Membership).where(m.Membership.audience_id == audience_id).execution_options(yield_per=5000)
    )
    for row in rows:
        yield row.id, to_member(row)


def save_email_change(session: Session, member_id: int, state: Member, now: datetime, email_at: datetime) -> None:
    session.execute(
        update(m.Membership)
        .where(m.Membership.id == member_id)
        .values(**member_values(state), next_attempt_at=None, updated_at=now, email_at=email_at)
    )


def due(now: datetime) -> Any:
    return or_(m.Membership.next_attempt_at.is_(None), m.Membership.next_attempt_at <= now)


def guard_counts(
    session: Session, audience_id: int, now: datetime, enough: Callable[[int], int | None] | None = None
) -> tuple[int, int]:
    """(pending unsubscribes due now, members Iterable has as subscribed), from indexes: the
    pending rows (ix_memberships_pending), and the subscribed ones as the settled rows (the
    members wanted in, ix_memberships_desired, less the unsettled ones wanted in) plus the
    unsettled ones in the list (the partial ix_memberships_status). No row of the table is read
    but the pending ones, however large the audience.

    `enough(unsubscribes)`: a count of subscribed members the caller needs no more than (None:
    the exact count); the members wanted in are then counted only up to it, so a run with a few
    thousand exits reads a few thousand entries of ix_memberships_desired, not the audience's.
    The second figure is exact below that count and at least that count otherwise."""
    ms = m.table(m.Membership)
    audience = ms.c.audience_id == audience_id
    unsettled = text(m.UNSETTLED)

    def count(*where: Any, limit: int | None = None) -> Any:
        return select(func.count()).select_from(select(ms.c.id).where(audience, *where).limit(limit).subquery())

    row = session.execute(
        select(
            count(ms.c.state == MemberState.PENDING, ms.c.desired != Desired.IN, due(now)).scalar_subquery(),
            count(unsettled, ms.c.desired == Desired.IN).scalar_subquery(),
            count(unsettled, ms.c.synced == Synced.IN).scalar_subquery(),
        )
    ).one()
    unsubscribes, unsettled_in, unsettled_listed = (int(v or 0) for v in row)
    needed = enough(unsubscribes) if enough is not None else None
    # synced = wanted_in - unsettled_in + unsettled_listed reaches `needed` once wanted_in reaches cap
    cap = None if needed is None else needed + unsettled_in - unsettled_listed
    wanted_in = 0
    if cap is None or cap > 0:
        wanted_in = int(session.scalar(count(ms.c.desired == Desired.IN, limit=cap)) or 0)
    return unsubscribes, wanted_in - unsettled_in + unsettled_listed


def pending_members(
    session: Session,
    audience_id: int,
    now: datetime,
    *,
    after_id: int,
    limit: int,
    subscribing: bool | None = None,
) -> list[PendingMember]:
    """Members to send, in id order after `after_id` (keyset pages keep memory flat); optionally
    only those to subscribe (desired in) or only those to unsubscribe."""
    table = m.table(m.Membership)
    stmt = (
        select(*(_raw(table.c[name]) for name in _PENDING_COLUMNS))
        .where(
            table.c.audience_id == audience_id,
            table.c.state == MemberState.PENDING,
            due(now),
            table.c.id > after_id,
        )
        .order_by(table.c.id)
        .limit(limit)
    )
    if subscribing is not None:
        stmt = stmt.where((table.c.desired == Desired.IN) if subscribing else (table.c.desired != Desired.IN))
    # Plain tuples, not ORM objects nor typed rows: this is the hot path of a large sync, so the
    # enums and the JSON are decoded here, once per value, without SQLAlchemy's processors.
    return [
        PendingMember(i, user_id, email, _DESIRED[desired], _SYNCED.get(synced), s_email, s_user, _fields(raw))
        for i, user_id, email, desired, synced, s_email, s_user, raw in session.connection().execute(stmt).all()
    ]


_DESIRED = {d.value: d for d in Desired}
_SYNCED: dict[str | None, Synced] = {s.value: s for s in Synced}


def _fields(raw: str | None) -> Any:
    """Stored data fields from their JSON text ('null' or NULL for none)."""
    return None if raw is None or raw == "null" else json.loads(raw)


def _raw(column: Any) -> Any:
    """The column as the driver returns it, without SQLAlchemy's result processing; JSON as text
    (the driver would decode PostgreSQL's jsonb, where most rows hold no data fields)."""
    if isinstance(column.type, JSON):
        return cast(column, Text)
    return type_coerce(column, Text) if isinstance(column.type, Enum) else column


_PENDING_COLUMNS = (
    "id",
    "user_id",
    "email",
    "desired",
    "synced",
    "synced_email",
    "synced_user_id",
    "data_fields",
)


def save_members(
    session: Session,
    states: Mapping[int, Member],
    now: datetime,
    next_attempts: Mapping[int, datetime | None] | None = None,
) -> None:
    if not states:
        return
    rows = []
    for member_id, state in states.items():
        row = {f"b_{name}": value for name, value in member_values(state).items()}
        row.update(b_id=member_id, b_updated_at=now, b_next_attempt_at=(next_attempts or {}).get(member_id))
        rows.append(row)
    session.execute(_SAVE_MEMBER, rows)


_SAVE_MEMBER = (
    update(m.table(m.Membership))
    .where(m.table(m.Membership).c.id == bindparam("b_id"))
    .values({name: bindparam(f"b_{name}") for name in (*STATE_COLUMNS, "updated_at", "next_attempt_at")})
)


def member_states(session: Session, ids: Sequence[int]) -> dict[int, Member]:
    """Current state of these members, locked on PostgreSQL until the transaction ends."""
    table = m.table(m.Membership)
    found: dict[int, Member] = {}
    for chunk in chunks(list(ids), 1000):
        stmt = select(table.c.id, *(table.c[name] for name in STATE_COLUMNS)).where(table.c.id.in_(chunk))
        if is_postgres(session):
            stmt = stmt.with_for_update()
        found.update({row.id: to_member(row) for row in session.execute(stmt)})
    return found


def resend_all(session: Session, audience_id: int, now: datetime) -> int:
    """Forget what the (recreated) list held: every desired-in member becomes pending again."""
    result = session.execute(
        update(m.Membership)
        .where(m.Membership.audience_id == audience_id)
        .values(
            synced=None,
            synced_email=None,
            synced_user_id=None,
            attempts=0,
            next_attempt_at=None,
            last_error=None,
            updated_at=now,
            state=case(
                (m.Membership.desired == Desired.IN, MemberState.PENDING), else_=MemberState.SYNCED
            ),
        )
    )
    return rows_affected(result)


def count_waiting(session: Session) -> int:
    """Members whose change failed transiently and is still waiting to be sent again."""
    stmt = select(func.count()).where(
        m.Membership.state == MemberState.PENDING, m.Membership.next_attempt_at.is_not(None)
    )
    return session.scalar(stmt) or 0


def audience_has_members_without_email(session: Session, audience_id: int) -> bool:
    stmt = (
        select(m.Membership.id)
        .where(m.Membership.audience_id == audience_id, m.Membership.email == "")
        .limit(1)
    )
    return session.scalar(stmt) is not None


RECONCILE_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def adopt_unknown(
    session: Session, audience_id: int, emails: set[str], user_ids: set[str], now: datetime
) -> int:
    """List members listsync never heard of: recorded as wanted out, so they get unsubscribed.
    Their desired time is the epoch, so any real event about them wins."""
    rows = [{"audience_id": audience_id, "user_id": "", "email": e} for e in sorted(emails)]
    rows += [{"audience_id": audience_id, "user_id": u, "email": ""} for u in sorted(user_ids)]
    for row in rows:
        row.update(
            desired=Desired.OUT,
            desired_at=RECONCILE_EPOCH,
            desired_message_id="reconcile",
            data_fields=None,
            synced=Synced.IN,
            synced_email=row["email"] or None,
            synced_user_id=row["user_id"] or None,
            state=MemberState.PENDING,
            attempts=0,
            created_at=now,
            updated_at=now,
        )
    for chunk in chunks(rows, 500):
        session.execute(insert_for(session, m.Membership).on_conflict_do_nothing(), list(chunk))
    return len(rows)
