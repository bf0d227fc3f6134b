"""The only module that queries the sync state. Sessions come in; domain values go out.

Transactions are the caller's: each function does its part inside the session it is given, so a
caller can put "record the response" and "update the members" in one commit.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Integer,
    RowMapping,
    Select,
    and_,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from listsync import identity
from listsync import membership as rules
from listsync.db import models as m
from listsync.db.session import rows_affected
from listsync.domain import Desired, EmailChange, InboundEvent, MembershipDelta, ProjectType, Synced
from listsync.planner import PendingMember

KEY_CHUNK = 400


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _chunks(items: Sequence[Any], size: int = KEY_CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- ingest -----------------------------------------------------------------------------------


def store_events(
    session: Session,
    events: Sequence[InboundEvent],
    *,
    source: str,
    now: datetime,
    audience_flags: Sequence[bool],
) -> int:
    """Append events to the inbox; a messageId already there is skipped. Returns how many were new."""
    if not events:
        return 0
    rows = [
        {
            "message_id": e.message_id,
            "type": e.type,
            "event": e.event,
            "user_id": e.user_id,
            "anonymous_id": e.anonymous_id,
            "email": e.email,
            "timestamp": e.timestamp,
            "received_at": now,
            "source": source,
            "payload": dict(e.raw),
            "is_audience": flag,
        }
        for e, flag in zip(events, audience_flags, strict=True)
    ]
    new = 0
    table = m.table(m.InboxEvent)
    # DO NOTHING skips messageIds already stored (also by a concurrent writer); RETURNING counts
    # only what this transaction really inserted. Core + RETURNING batches rows on both databases.
    stmt = _insert(session, table).on_conflict_do_nothing(index_elements=["message_id"]).returning(table.c.id)
    for chunk in _chunks(rows, 500):
        new += len(session.execute(stmt, list(chunk)).all())
    return new


def store_rejections(
    session: Session, rejections: Sequence[tuple[str, str]], *, source: str, now: datetime
) -> None:
    """Dead-letter (reason, redacted payload text) pairs."""
    if rejections:
        session.execute(
            _insert(session, m.DeadLetter),
            [{"received_at": now, "source": source, "reason": r, "payload": p} for r, p in rejections],
        )


@dataclass(frozen=True)
class StoredEvent:
    id: int
    payload: dict[str, Any]
    received_at: datetime


def unapplied_events(session: Session, limit: int) -> list[StoredEvent]:
    """The oldest inbox events not yet folded into memberships (rows locked on PostgreSQL)."""
    inbox = m.table(m.InboxEvent)
    stmt = (
        select(inbox.c.id, inbox.c.payload, inbox.c.received_at)
        .where(inbox.c.applied_at.is_(None))
        .order_by(inbox.c.id)
        .limit(limit)
    )
    if _is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    return [StoredEvent(i, p, r) for i, p, r in session.execute(stmt)]


def mark_applied(session: Session, ids: Sequence[int], now: datetime) -> None:
    inbox = m.table(m.InboxEvent)
    for chunk in _chunks(list(ids), 1000):
        session.execute(update(inbox).where(inbox.c.id.in_(chunk)).values(applied_at=now))


# --- memberships --------------------------------------------------------------------------------


def ensure_audiences(session: Session, keys: Iterable[str], now: datetime) -> dict[str, int]:
    """Audience ids by key, creating rows for keys seen for the first time."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    stmt = _insert(session, m.Audience).on_conflict_do_nothing(index_elements=["audience_key"])
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


_STATE_COLUMNS = (
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


def _to_state(row: Any) -> rules.MemberState:
    return rules.MemberState(
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


def _state_values(state: rules.MemberState) -> dict[str, Any]:
    return {name: getattr(state, name) for name in _STATE_COLUMNS}


def load_candidates(
    session: Session, audience_ids: set[int], user_ids: set[str], emails: set[str]
) -> list[m.Membership]:
    """Memberships of these audiences that share a userId or an email with the given ones."""
    found: dict[int, m.Membership] = {}
    for column, values in ((m.Membership.user_id, user_ids - {""}), (m.Membership.email, emails - {""})):
        for chunk in _chunks(sorted(values)):
            stmt = select(m.Membership).where(m.Membership.audience_id.in_(audience_ids), column.in_(chunk))
            if _is_postgres(session):
                stmt = stmt.with_for_update()
            found.update({row.id: row for row in session.scalars(stmt)})
    return list(found.values())


class _Members:
    """The memberships a batch of deltas touches, indexed by identity, plus the ones it creates."""

    def __init__(self, rows: Iterable[m.Membership]) -> None:
        self.states: dict[int, rules.MemberState] = {}
        self.audience: dict[int, int] = {}
        self.by_user: dict[tuple[int, str], set[int]] = defaultdict(set)
        self.by_email: dict[tuple[int, str], set[int]] = defaultdict(set)
        self.dirty: set[int] = set()
        self.removed: set[int] = set()
        self._next_new = -1
        for row in rows:
            self._index(row.id, row.audience_id, _to_state(row))

    def _index(self, member_id: int, audience_id: int, state: rules.MemberState) -> None:
        self.states[member_id], self.audience[member_id] = state, audience_id
        if state.user_id:
            self.by_user[(audience_id, state.user_id)].add(member_id)
        if state.email:
            self.by_email[(audience_id, state.email)].add(member_id)

    def candidates(self, audience_id: int, who: identity.Identity) -> dict[int, identity.Identity]:
        """Live memberships of the audience sharing a userId or an email with `who`, by their
        current identifiers (an index entry may be older than the row it points to)."""
        ids = self.by_user.get((audience_id, who.user_id or ""), set()) | self.by_email.get(
            (audience_id, who.email or ""), set()
        )
        return {i: rules.current_identity(self.states[i]) for i in ids if i in self.states}

    def add(self, audience_id: int, state: rules.MemberState) -> None:
        member_id, self._next_new = self._next_new, self._next_new - 1
        self._index(member_id, audience_id, state)
        self.dirty.add(member_id)

    def put(self, member_id: int, state: rules.MemberState) -> None:
        old = self.states[member_id]
        if (old.user_id, old.email) != (state.user_id, state.email):
            self._index(member_id, self.audience[member_id], state)
        self.states[member_id] = state
        self.dirty.add(member_id)

    def absorb(self, member_id: int, others: Sequence[int], project_type: ProjectType) -> None:
        """Merge rows of one Iterable profile into `member_id`; the others are deleted."""
        merged = rules.absorb(self.states[member_id], [self.states[i] for i in others], project_type)
        for other in others:
            del self.states[other]
            self.dirty.discard(other)
            if other > 0:
                self.removed.add(other)
        self.put(member_id, merged)


def apply_deltas(
    session: Session,
    deltas: Sequence[tuple[int, MembershipDelta, dict[str, Any] | None]],
    project_type: ProjectType,
    now: datetime,
) -> int:
    """Fold (audience_id, delta, data_fields) into memberships, in event-time order per member.
    Returns how many memberships changed. `identity.resolve` says which membership each delta
    is about (and which rows name the same Iterable profile and are merged); only when none is
    a new row created."""
    known = _Members(
        load_candidates(
            session,
            {a for a, _, _ in deltas},
            {d.user_id or "" for _, d, _ in deltas},
            {d.email or "" for _, d, _ in deltas},
        )
    )
    for audience_id, delta, fields in deltas:
        if delta.desired is Desired.UNKNOWN:
            continue
        _fold(known, audience_id, delta, fields, project_type)
    _write_members(session, known, now)
    return len(known.dirty) + len(known.removed)


def _fold(
    known: _Members,
    audience_id: int,
    delta: MembershipDelta,
    fields: dict[str, Any] | None,
    project_type: ProjectType,
) -> None:
    who = identity.identity(delta.user_id, delta.email)
    match = identity.resolve(project_type, who, known.candidates(audience_id, who))
    if not match.targets:
        known.add(audience_id, rules.new_member(delta, fields, project_type))
        return
    if match.absorbed:
        known.absorb(match.targets[0], match.absorbed, project_type)
    for member_id in match.targets:
        state = known.states[member_id]
        if len(match.targets) == 1:
            kept = identity.adopt(project_type, rules.current_identity(state), who, rules.newer(delta, state))
            state = rules.adopt_identity(state, kept, project_type)
        updated = rules.apply_delta(state, delta, fields, project_type) or state
        if updated != known.states[member_id]:
            known.put(member_id, updated)


def _write_members(session: Session, known: _Members, now: datetime) -> None:
    if known.removed:
        session.execute(delete(m.Membership).where(m.Membership.id.in_(sorted(known.removed))))
    inserts, updates = [], []
    # New members (negative ids: -1, -2, ...) are inserted in the order their events came.
    for member_id in sorted(known.dirty, key=lambda i: (i < 0, abs(i))):
        values = _state_values(known.states[member_id])
        if member_id < 0:
            inserts.append(
                {
                    "audience_id": known.audience[member_id],
                    **values,
                    "created_at": now,
                    "updated_at": now,
                    "next_attempt_at": None,
                }
            )
        else:
            reset = {"next_attempt_at": None} if values["attempts"] == 0 else {}
            updates.append({"id": member_id, **values, "updated_at": now, **reset})
    if inserts:
        session.execute(_insert(session, m.Membership), inserts)
    if updates:
        session.execute(update(m.Membership), updates)


def apply_email_change(
    session: Session, change: EmailChange, project_type: ProjectType, now: datetime
) -> int:
    """A plain identify gave a userId a (possibly) new email: per audience, `identity.email_change`
    says which membership that changes and whether it is renamed (the same Iterable profile) or
    split (email projects: the old address's profile leaves, the new one's enters)."""
    stmt = select(m.Membership).where(m.Membership.user_id == change.user_id)
    rows = list(session.scalars(stmt.with_for_update() if _is_postgres(session) else stmt))
    by_audience: dict[int, list[m.Membership]] = defaultdict(list)
    for row in rows:
        by_audience[row.audience_id].append(row)
    moved = 0
    for members in by_audience.values():
        found = identity.email_change(
            project_type, change.user_id, change.email, {r.id: identity.identity(r.user_id, r.email) for r in members}
        )
        if found is None:
            continue
        row = next(r for r in members if r.id == found[0])
        if row.email_at is not None and change.timestamp <= row.email_at:
            continue  # a late, older identify must not bring back an address the user left
        if found[1] is identity.EmailEffect.RENAME:
            _save_member(session, row.id, rules.change_email(_to_state(row), change.email, project_type), now, change)
        elif not _split_email(session, row, change, project_type, now):
            continue
        moved += 1
    return moved


def _save_member(
    session: Session, member_id: int, state: rules.MemberState, now: datetime, change: EmailChange
) -> None:
    session.execute(
        update(m.Membership)
        .where(m.Membership.id == member_id)
        .values(**_state_values(state), next_attempt_at=None, updated_at=now, email_at=change.timestamp)
    )


def _split_email(
    session: Session, row: m.Membership, change: EmailChange, project_type: ProjectType, now: datetime
) -> bool:
    """The old address leaves as of the change; the new address, unless it already has a
    membership of its own, enters in its place. False when a later audience event outranks it."""
    state = _to_state(row)
    if (change.timestamp, change.message_id) <= (state.desired_at, state.desired_message_id):
        return False
    left, entered = rules.split_email(state, change, project_type)
    _save_member(session, row.id, left, now, change)
    taken = select(m.Membership.id).where(
        m.Membership.audience_id == row.audience_id, m.Membership.email == change.email
    )
    if entered is not None and session.scalar(taken.limit(1)) is None:
        session.execute(
            _insert(session, m.Membership),
            [{"audience_id": row.audience_id, **_state_values(entered), "created_at": now,
              "updated_at": now, "next_attempt_at": None, "email_at": change.timestamp}],
        )
    return True


# --- sync: claims, reading work, recording outcomes ---------------------------------------------


def _due(now: datetime) -> Any:
    return or_(m.Membership.next_attempt_at.is_(None), m.Membership.next_attempt_at <= now)


def _audiences_with_work(now: datetime) -> Select[int]:
    # EXISTS per audience stops at the first due member (pending index); an IN (subquery) would
    # collect every pending member of every audience on each claim.
    pending = (
        select(m.Membership.id)
        .where(m.Membership.audience_id == m.Audience.id, m.Membership.state == m.MemberState.PENDING, _due(now))
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
    if _is_postgres(session):
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


def guard_counts(session: Session, audience_id: int, now: datetime) -> tuple[int, int]:
    """(pending unsubscribes due now, members Iterable has as subscribed)."""
    row = session.execute(
        select(
            func.coalesce(
                func.sum(
                    func.cast(
                        and_(
                            m.Membership.state == m.MemberState.PENDING,
                            m.Membership.desired != Desired.IN,
                            _due(now),
                        ),
                        Integer,
                    )
                ),
                0,
            ),
            func.coalesce(func.sum(func.cast(m.Membership.synced == Synced.IN, Integer)), 0),
        ).where(m.Membership.audience_id == audience_id)
    ).one()
    return int(row[0]), int(row[1])


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
        select(*(table.c[name] for name in _PENDING_COLUMNS))
        .where(
            table.c.audience_id == audience_id,
            table.c.state == m.MemberState.PENDING,
            _due(now),
            table.c.id > after_id,
        )
        .order_by(table.c.id)
        .limit(limit)
    )
    if subscribing is not None:
        stmt = stmt.where((table.c.desired == Desired.IN) if subscribing else (table.c.desired != Desired.IN))
    # Plain rows, not ORM objects: this is the hot path of a large sync.
    return [
        PendingMember(
            id=r.id,
            user_id=r.user_id,
            email=r.email,
            desired=Desired(r.desired),
            synced=Synced(r.synced) if r.synced else None,
            synced_email=r.synced_email,
            synced_user_id=r.synced_user_id,
            data_fields=r.data_fields,
        )
        for r in session.execute(stmt)
    ]


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


def begin_request(
    session: Session,
    *,
    run_id: int | None,
    audience_id: int | None,
    endpoint: str,
    member_ids: Sequence[int],
    owner: str,
    now: datetime,
) -> int:
    """Write the request and its members before the call, so a crash leaves a trace to resolve."""
    request = m.ApiRequest(
        run_id=run_id,
        audience_id=audience_id,
        endpoint=endpoint,
        item_count=len(member_ids),
        status=m.RequestStatus.IN_FLIGHT,
        owner=owner,
        started_at=now,
    )
    session.add(request)
    session.flush()
    if member_ids:
        session.execute(
            _insert(session, m.RequestItem),
            [{"request_id": request.id, "membership_id": i} for i in member_ids],
        )
    return request.id


@dataclass(frozen=True)
class RequestRecord:
    status: m.RequestStatus
    http_status: int | None = None
    iterable_code: str | None = None
    success_count: int | None = None
    fail_count: int | None = None
    error: str | None = None
    elapsed_ms: int | None = None


def finish_request(
    session: Session,
    request_id: int,
    record: RequestRecord,
    now: datetime,
    outcomes: Mapping[int, tuple[str, str | None]],
) -> None:
    session.execute(
        update(m.ApiRequest)
        .where(m.ApiRequest.id == request_id)
        .values(
            status=record.status,
            http_status=record.http_status,
            iterable_code=record.iterable_code,
            success_count=record.success_count,
            fail_count=record.fail_count,
            error=record.error,
            elapsed_ms=record.elapsed_ms,
            finished_at=now,
        )
    )
    items = m.table(m.RequestItem)
    if outcomes:
        # Most members of a request share one outcome: one statement for it, then the exceptions.
        common = Counter(outcomes.values()).most_common(1)[0][0]
        session.execute(
            update(items).where(items.c.request_id == request_id).values(outcome=common[0], error=common[1])
        )
        others = [
            {"b_member": member_id, "b_outcome": outcome, "b_error": error}
            for member_id, (outcome, error) in outcomes.items()
            if (outcome, error) != common
        ]
        if others:
            session.execute(
                update(items)
                .where(items.c.request_id == request_id, items.c.membership_id == bindparam("b_member"))
                .values(outcome=bindparam("b_outcome"), error=bindparam("b_error")),
                others,
            )


def save_members(
    session: Session,
    states: Mapping[int, rules.MemberState],
    now: datetime,
    next_attempts: Mapping[int, datetime | None] | None = None,
) -> None:
    if not states:
        return
    rows = []
    for member_id, state in states.items():
        row = {f"b_{name}": value for name, value in _state_values(state).items()}
        row.update(b_id=member_id, b_updated_at=now, b_next_attempt_at=(next_attempts or {}).get(member_id))
        rows.append(row)
    session.execute(_SAVE_MEMBER, rows)


_SAVE_MEMBER = (
    update(m.table(m.Membership))
    .where(m.table(m.Membership).c.id == bindparam("b_id"))
    .values({name: bindparam(f"b_{name}") for name in (*_STATE_COLUMNS, "updated_at", "next_attempt_at")})
)


def member_states(session: Session, ids: Sequence[int]) -> dict[int, rules.MemberState]:
    """Current state of these members, locked on PostgreSQL until the transaction ends."""
    table = m.table(m.Membership)
    found: dict[int, rules.MemberState] = {}
    for chunk in _chunks(list(ids), 1000):
        stmt = select(table.c.id, *(table.c[name] for name in _STATE_COLUMNS)).where(table.c.id.in_(chunk))
        if _is_postgres(session):
            stmt = stmt.with_for_update()
        found.update({row.id: _to_state(row) for row in session.execute(stmt)})
    return found


def in_flight_requests(session: Session, audience_id: int) -> list[m.ApiRequest]:
    return list(
        session.scalars(
            select(m.ApiRequest)
            .where(m.ApiRequest.audience_id == audience_id, m.ApiRequest.status == m.RequestStatus.IN_FLIGHT)
            .order_by(m.ApiRequest.id)
        )
    )


def request_member_ids(session: Session, request_id: int) -> list[int]:
    return list(
        session.scalars(select(m.RequestItem.membership_id).where(m.RequestItem.request_id == request_id))
    )


def set_list(session: Session, audience_id: int, list_id: int | None, state: m.ListState) -> None:
    session.execute(
        update(m.Audience).where(m.Audience.id == audience_id).values(list_id=list_id, list_state=state)
    )


def set_hold(session: Session, audience_id: int, reason: str | None) -> None:
    session.execute(update(m.Audience).where(m.Audience.id == audience_id).values(hold_reason=reason))


def mark_synced_at(session: Session, audience_id: int, now: datetime) -> None:
    session.execute(update(m.Audience).where(m.Audience.id == audience_id).values(last_synced_at=now))


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
                (m.Membership.desired == Desired.IN, m.MemberState.PENDING), else_=m.MemberState.SYNCED
            ),
        )
    )
    return rows_affected(result)


# --- runs and status -----------------------------------------------------------------------------


def start_run(session: Session, *, trigger: str, owner: str, now: datetime) -> int:
    run = m.SyncRun(trigger=trigger, owner=owner, started_at=now, status=m.RunStatus.RUNNING)
    session.add(run)
    session.flush()
    return run.id


def finish_run(
    session: Session,
    run_id: int,
    *,
    status: m.RunStatus,
    now: datetime,
    requests: int,
    subscribed: int,
    unsubscribed: int,
    failed: int,
    summary: str | None,
) -> None:
    session.execute(
        update(m.SyncRun)
        .where(m.SyncRun.id == run_id)
        .values(
            status=status,
            finished_at=now,
            requests=requests,
            subscribed=subscribed,
            unsubscribed=unsubscribed,
            failed=failed,
            summary=summary,
        )
    )


def audience_status(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(text("SELECT * FROM audience_status ORDER BY audience_key")).mappings()
    return [_jsonable_row(row) for row in rows]


def _jsonable_row(row: RowMapping) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        out[str(key)] = value.isoformat() if isinstance(value, datetime) else value
    decoded: dict[str, Any] = json.loads(json.dumps(out, default=str))
    return decoded


def count_waiting(session: Session) -> int:
    """Members whose change failed transiently and is still waiting to be sent again."""
    stmt = select(func.count()).where(
        m.Membership.state == m.MemberState.PENDING, m.Membership.next_attempt_at.is_not(None)
    )
    return session.scalar(stmt) or 0


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


def audience_has_members_without_email(session: Session, audience_id: int) -> bool:
    stmt = (
        select(m.Membership.id)
        .where(m.Membership.audience_id == audience_id, m.Membership.email == "")
        .limit(1)
    )
    return session.scalar(stmt) is not None


RECONCILE_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def reconcile_audience(
    session: Session,
    audience_id: int,
    emails: set[str],
    user_ids: set[str],
    project_type: ProjectType,
    now: datetime,
) -> dict[str, int]:
    """Repair stored state from the list Iterable really has, in both directions.

    missing: should be in, Iterable lacks them -> resent. extra: Iterable has them, we want them
    out (or never heard of them) -> queued for unsubscribe. adopted: in both but not recorded as
    synced -> recorded, nothing sent.
    """
    counts = {"missing": 0, "extra": 0, "adopted": 0, "unknown_added": 0}
    seen_emails: set[str] = set()
    seen_ids: set[str] = set()
    changed: dict[int, rules.MemberState] = {}
    rows = session.scalars(
        select(m.Membership).where(m.Membership.audience_id == audience_id).execution_options(yield_per=5000)
    )
    for row in rows:
        state = _to_state(row)
        present = bool((row.email and row.email in emails) or (row.user_id and row.user_id in user_ids))
        seen_emails.add(row.email)
        seen_ids.add(row.user_id)
        fixed = _reconciled(state, present, project_type, counts)
        if fixed is not None:
            changed[row.id] = fixed
    save_members(session, changed, now)
    unknown_emails, unknown_ids = _strangers(
        emails - seen_emails, user_ids - seen_ids, seen_emails, seen_ids, project_type
    )
    counts["unknown_skipped"] = (
        len(emails - seen_emails) + len(user_ids - seen_ids) - len(unknown_emails) - len(unknown_ids)
    )
    counts["unknown_added"] = _adopt_unknown(session, audience_id, unknown_emails, unknown_ids, now)
    counts["extra"] += counts["unknown_added"]
    return counts


def _strangers(
    emails: set[str], user_ids: set[str], seen_emails: set[str], seen_ids: set[str], project_type: ProjectType
) -> tuple[set[str], set[str]]:
    """The list members that are surely nobody listsync knows. getUsers gives emails and userIds
    as separate lists, so in a hybrid project an unknown email may be the email of a member stored
    by userId alone (and an unknown userId that of a member stored by email alone): those are left
    alone rather than unsubscribed by mistake."""
    if project_type is ProjectType.USER_ID:
        return set(), user_ids
    return (emails if "" not in seen_emails else set()), (user_ids if "" not in seen_ids else set())


def _reconciled(
    state: rules.MemberState, present: bool, project_type: ProjectType, counts: dict[str, int]
) -> rules.MemberState | None:
    if state.desired is Desired.IN and not present and state.synced is Synced.IN:
        counts["missing"] += 1
        return rules.settle(replace(state, synced=None, synced_email=None, synced_user_id=None), project_type)
    if state.desired is Desired.IN and present and state.synced is not Synced.IN:
        counts["adopted"] += 1
        return rules.confirm(state, Synced.IN, state.email or None, state.user_id or None, project_type)
    if state.desired is not Desired.IN and present and state.synced is not Synced.IN:
        counts["extra"] += 1
        return rules.settle(
            replace(
                state,
                synced=Synced.IN,
                synced_email=state.email or None,
                synced_user_id=state.user_id or None,
            ),
            project_type,
        )
    return None


def _adopt_unknown(
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
            state=m.MemberState.PENDING,
            attempts=0,
            created_at=now,
            updated_at=now,
        )
    for chunk in _chunks(rows, 500):
        session.execute(_insert(session, m.Membership).on_conflict_do_nothing(), list(chunk))
    return len(rows)


def all_audiences(session: Session) -> list[m.Audience]:
    return list(session.scalars(select(m.Audience).order_by(m.Audience.audience_key)))


# --- coordination between replicas -------------------------------------------------------------

APPLY_LOCK_KEY = 0x6C697374  # "list": one advisory lock id for folding the inbox


def serialize_inbox_apply(session: Session) -> None:
    """On PostgreSQL, let one replica at a time fold the inbox into memberships (held until commit).

    Folding is order-independent per member, but two replicas locking overlapping memberships in
    different orders could deadlock; a transaction-scoped advisory lock avoids that and cannot
    leak through a connection pool.
    """
    if _is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": APPLY_LOCK_KEY})


def try_lease(session: Session, name: str, owner: str, now: datetime, ttl: timedelta) -> bool:
    """Take or renew the named lease if it is free, expired or already ours. Works on both databases:
    a lost race shows up as a row owned by someone else, not as an error."""
    inserted = session.execute(
        _insert(session, m.table(m.Lease)).on_conflict_do_nothing(index_elements=["name"]),
        {"name": name, "owner": owner, "until": now + ttl},
    )
    if rows_affected(inserted):
        return True
    taken = session.execute(
        update(m.Lease)
        .where(m.Lease.name == name, or_(m.Lease.owner == owner, m.Lease.until < now))
        .values(owner=owner, until=now + ttl)
        .execution_options(synchronize_session=False)
    )
    return rows_affected(taken) > 0
