"""The status page's queries: read-only, paged, each served by an index (revision 0005).

Every list is a keyset page (`after`/`before` an id or key, `limit` + 1 rows to know whether a next
page exists), so a page costs the same at the first and the millionth row. Counts per audience come
from the covering indexes `ix_memberships_status` and `ix_memberships_desired` (revision 0009),
restricted to the audiences shown; the run chart and the rejected events are bounded by a time window on an indexed timestamp.
Nothing here writes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, case, func, select, text
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.domain import Desired, MemberState, Synced

T = TypeVar("T")
R = TypeVar("R")


def _copied(row_type: type[R], source: object, **overrides: Any) -> R:
    """A row of `row_type` whose fields are the same-named attributes of `source`."""
    values = {f.name: getattr(source, f.name) for f in fields(row_type)}  # type: ignore[arg-type]
    return row_type(**{**values, **overrides})
SAMPLES_PER_REASON = 3


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of rows, and the cursor of the next page (None on the last)."""

    rows: list[T]
    next_cursor: str | None


@dataclass(frozen=True)
class AudienceRow:
    id: int
    audience_key: str
    list_id: int | None
    list_state: str
    hold_reason: str | None
    last_synced_at: datetime | None
    members: int = 0
    synced_members: int = 0
    pending_subscribe: int = 0
    pending_unsubscribe: int = 0
    failed: int = 0
    newest_delta_at: datetime | None = None
    oldest_pending_at: datetime | None = None

    def lag_seconds(self, now: datetime) -> float:
        """Age of the oldest change still waiting to be sent (0 when in step): the same measure
        as the `listsync_sync_lag_seconds` gauge."""
        if self.oldest_pending_at is None:
            return 0.0
        return max(0.0, (now - self.oldest_pending_at).total_seconds())


@dataclass(frozen=True)
class RunRow:
    id: int
    trigger: str
    owner: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    requests: int
    subscribed: int
    unsubscribed: int
    failed: int
    summary: str | None

    @property
    def duration_seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True)
class RunBucket:
    """The runs that started in one slice of the chart's window."""

    start: datetime
    runs: int
    changed: int
    failed: int
    max_duration_seconds: float


@dataclass(frozen=True)
class RequestRow:
    id: int
    endpoint: str
    item_count: int
    status: str
    http_status: int | None
    iterable_code: str | None
    success_count: int | None
    fail_count: int | None
    error: str | None
    started_at: datetime
    elapsed_ms: int | None


@dataclass(frozen=True)
class FailedMember:
    id: int
    user_id: str
    email: str
    desired: str
    last_error: str | None
    updated_at: datetime


@dataclass(frozen=True)
class RejectedSample:
    id: int
    received_at: datetime
    source: str
    reason: str
    payload: str


@dataclass(frozen=True)
class RejectedGroup:
    code: str
    count: int
    last_at: datetime
    samples: list[RejectedSample]


@dataclass(frozen=True)
class DeliveryCount:
    action: str
    state: str
    count: int


# --- audiences ----------------------------------------------------------------------------------


def audiences_page(session: Session, *, after: str | None = None, limit: int = 50) -> Page[AudienceRow]:
    """Audiences in key order from `after`, with their member counts."""
    stmt = select(m.Audience).order_by(m.Audience.audience_key).limit(limit + 1)
    if after is not None:
        stmt = stmt.where(m.Audience.audience_key > after)
    found = list(session.execute(stmt).scalars())
    rows = _with_counts(session, found[:limit])
    return Page(rows, rows[-1].audience_key if len(found) > limit else None)


def audience(session: Session, audience_key: str) -> AudienceRow | None:
    found = session.execute(select(m.Audience).where(m.Audience.audience_key == audience_key)).scalar()
    return _with_counts(session, [found])[0] if found else None


def _with_counts(session: Session, audiences: Sequence[m.Audience]) -> list[AudienceRow]:
    counts = _member_counts(session, [a.id for a in audiences])
    return [
        AudienceRow(
            id=a.id,
            audience_key=a.audience_key,
            list_id=a.list_id,
            list_state=str(a.list_state),
            hold_reason=a.hold_reason,
            last_synced_at=a.last_synced_at,
            **counts.get(a.id, {}),
        )
        for a in audiences
    ]


# Every (state, desired, synced) a member can be in; each but the settled one is one range of the
# partial ix_memberships_status, the settled one is counted from ix_memberships_desired.
_COMBOS = list(itertools.product(MemberState, Desired, [*Synced, None]))
_SETTLED = (MemberState.SYNCED, Desired.IN, Synced.IN)
_UNSETTLED_COMBOS = [c for c in _COMBOS if c != _SETTLED]


def _member_counts(session: Session, audience_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The audience_status view's counts, plus the newest and oldest-pending change times."""
    return {audience_id: _counts_of(session, audience_id) for audience_id in audience_ids}


def _counts_of(session: Session, audience_id: int) -> dict[str, Any]:
    """One statement of scalar subqueries, each an equality range of an index: a count(*) per
    combination (SQLite steps the index without comparing keys, several times faster than one
    GROUP BY over the same rows), and the first or last desired_at of a range, which is one index
    seek. The settled rows are the members wanted in less the unsettled ones wanted in. A
    million-member audience costs one pass over its ix_memberships_desired entries wanted in."""
    ms = m.Membership

    def where(state: MemberState, desired: Desired, synced: Synced | None) -> Select[Any]:
        in_sync = ms.synced.is_(None) if synced is None else ms.synced == synced
        return select(ms.desired_at).where(
            ms.audience_id == audience_id, ms.state == state, ms.desired == desired, in_sync, text(m.UNSETTLED)
        )

    def wanted(desired: Desired) -> Select[Any]:
        return select(ms.desired_at).where(ms.audience_id == audience_id, ms.desired == desired)

    counts = [
        select(func.count()).select_from(where(*combo).subquery()).scalar_subquery()
        for combo in _UNSETTLED_COMBOS
    ]
    wanted_in = select(func.count()).select_from(wanted(Desired.IN).subquery()).scalar_subquery()
    newest = [wanted(d).order_by(ms.desired_at.desc()).limit(1).scalar_subquery() for d in Desired]
    pending = [c for c in _UNSETTLED_COMBOS if c[0] == MemberState.PENDING]
    oldest = [where(*c).order_by(ms.desired_at).limit(1).scalar_subquery() for c in pending]
    row = session.execute(select(wanted_in, *counts, *newest, *oldest)).one()
    n = dict(zip(_UNSETTLED_COMBOS, row[1 : 1 + len(counts)], strict=True))
    n[_SETTLED] = row[0] - sum(v for (_s, d, _y), v in n.items() if d == Desired.IN)
    times = [_as_utc(t) for t in row[1 + len(counts) :]]
    newest_at = [t for t in times[: len(newest)] if t is not None]
    oldest_at = [t for t in times[len(newest) :] if t is not None]
    return {
        "members": sum(v for (_s, d, _y), v in n.items() if d == Desired.IN),
        "synced_members": sum(v for (_s, _d, y), v in n.items() if y == Synced.IN),
        "pending_subscribe": sum(
            v for (s, d, _y), v in n.items() if s == MemberState.PENDING and d == Desired.IN
        ),
        "pending_unsubscribe": sum(
            v for (s, d, _y), v in n.items() if s == MemberState.PENDING and d != Desired.IN
        ),
        "failed": sum(v for (s, _d, _y), v in n.items() if s == MemberState.FAILED),
        "newest_delta_at": max(newest_at, default=None),
        "oldest_pending_at": min(oldest_at, default=None),
    }


def _as_utc(value: object) -> datetime | None:
    """An aggregate over a CASE loses the column type on SQLite: parse what comes back as text."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- runs ---------------------------------------------------------------------------------------


def runs_page(
    session: Session, *, since: datetime, before: int | None = None, limit: int = 20, active_only: bool = True
) -> Page[RunRow]:
    """Runs started since `since`, newest first. `active_only` leaves out the daemon's idle ticks
    (nothing sent, nothing failed, status ok), which are most rows of a quiet day."""
    r = m.SyncRun
    # Runs are read newest first by id; the window's first id bounds that walk, so a page with few
    # active runs never reads past the window into the months of idle ticks before it. Ids follow
    # start times (one sequence, runs start as they are numbered) up to replicas' clock skew.
    first = session.scalar(select(r.id).where(r.started_at >= since).order_by(r.started_at).limit(1))
    if first is None:
        return Page([], None)
    stmt = select(r).where(r.id >= first, r.started_at >= since).order_by(r.id.desc()).limit(limit + 1)
    if before is not None:
        stmt = stmt.where(r.id < before)
    if active_only:
        stmt = stmt.where((r.requests > 0) | (r.failed > 0) | (r.status != m.RunStatus.OK))
    found = list(session.execute(stmt).scalars())
    rows = [_run_row(run) for run in found[:limit]]
    return Page(rows, str(rows[-1].id) if len(found) > limit else None)


def _run_row(run: m.SyncRun) -> RunRow:
    return _copied(RunRow, run, status=str(run.status))


_BUCKETS_SQL = {
    "sqlite": """
        SELECT CAST((CAST(strftime('%s', started_at) AS REAL) - :since) / :width AS INTEGER) AS bucket,
               count(*) AS runs, sum(subscribed + unsubscribed) AS changed, sum(failed) AS failed,
               max((julianday(finished_at) - julianday(started_at)) * 86400.0) AS duration
        FROM sync_runs WHERE started_at >= :since_at AND started_at < :until_at
        GROUP BY bucket""",
    "postgresql": """
        SELECT CAST(floor((extract(epoch FROM started_at) - :since) / :width) AS INTEGER) AS bucket,
               count(*) AS runs, sum(subscribed + unsubscribed) AS changed, sum(failed) AS failed,
               max(extract(epoch FROM finished_at - started_at)) AS duration
        FROM sync_runs WHERE started_at >= :since_at AND started_at < :until_at
        GROUP BY bucket""",
}


def run_buckets(session: Session, *, since: datetime, until: datetime, buckets: int = 48) -> list[RunBucket]:
    """The window cut into `buckets` equal slices, each with its runs' changes, failures and
    longest duration; slices without runs are present with zeros, so the chart's x axis is time."""
    width = (until - since).total_seconds() / buckets
    sql = text(_BUCKETS_SQL[session.get_bind().dialect.name])
    params = {
        "since": since.timestamp(),
        "width": width,
        "since_at": _bind_time(session, since),
        "until_at": _bind_time(session, until),
    }
    found = {int(row.bucket): row for row in session.execute(sql, params)}
    out = []
    for index in range(buckets):
        row = found.get(index)
        start = since + timedelta(seconds=width * index)
        if row is None:
            out.append(RunBucket(start, 0, 0, 0, 0.0))
        else:
            out.append(
                RunBucket(
                    start, row.runs, int(row.changed or 0), int(row.failed or 0), float(row.duration or 0)
                )
            )
    return out


def _bind_time(session: Session, value: datetime) -> object:
    """A timestamp as the UTC column type stores it, for the text queries above."""
    return m.UTCDateTime().process_bind_param(value, session.get_bind().dialect)


# --- one audience -------------------------------------------------------------------------------


def requests_page(
    session: Session, audience_id: int, *, before: int | None = None, limit: int = 20
) -> Page[RequestRow]:
    """The audience's requests in the ledger, newest first (ix_api_requests_audience)."""
    r = m.ApiRequest
    stmt = select(r).where(r.audience_id == audience_id).order_by(r.id.desc()).limit(limit + 1)
    if before is not None:
        stmt = stmt.where(r.id < before)
    found = list(session.execute(stmt).scalars())
    rows = [_copied(RequestRow, q, status=str(q.status)) for q in found[:limit]]
    return Page(rows, str(rows[-1].id) if len(found) > limit else None)


def failed_members_page(
    session: Session, audience_id: int, *, after: int | None = None, limit: int = 20
) -> Page[FailedMember]:
    """The audience's failed members with their reasons, in id order (ix_memberships_failed)."""
    ms = m.Membership
    stmt = (
        select(ms.id, ms.user_id, ms.email, ms.desired, ms.last_error, ms.updated_at)
        .where(ms.audience_id == audience_id, ms.state == MemberState.FAILED)
        .order_by(ms.id)
        .limit(limit + 1)
    )
    if after is not None:
        stmt = stmt.where(ms.id > after)
    found = session.execute(stmt).all()
    rows = [
        FailedMember(row.id, row.user_id, row.email, str(row.desired), row.last_error, row.updated_at)
        for row in found[:limit]
    ]
    return Page(rows, str(rows[-1].id) if len(found) > limit else None)


# --- rejected events and deliveries -------------------------------------------------------------


def _reason_code(dialect: str) -> ColumnElement[str]:
    """The code before the first ':' of a dead letter's reason ('code: explanation')."""
    d = m.DeadLetter.reason
    if dialect == "postgresql":
        return func.split_part(d, ":", 1)
    return case((func.instr(d, ":") > 0, func.substr(d, 1, func.instr(d, ":") - 1)), else_=d)


def rejected_groups(
    session: Session, *, since: datetime, samples: int = SAMPLES_PER_REASON
) -> list[RejectedGroup]:
    """Dead letters received since `since`, grouped by reason code, largest group first, each with
    its latest few rows (payloads were scrubbed of secrets when stored)."""
    d = m.DeadLetter
    code = _reason_code(session.get_bind().dialect.name).label("code")
    stmt = (
        select(code, func.count().label("n"), func.max(d.received_at).label("last_at"))
        .where(d.received_at >= since)
        .group_by(code)
        .order_by(func.count().desc(), code)
    )
    groups = session.execute(stmt).all()
    return [
        RejectedGroup(
            row.code, row.n, _as_utc(row.last_at) or since, _samples(session, row.code, since, samples)
        )
        for row in groups
    ]


def _samples(session: Session, code: str, since: datetime, limit: int) -> list[RejectedSample]:
    d = m.DeadLetter
    reason_code = _reason_code(session.get_bind().dialect.name)
    stmt = (
        select(d)
        .where(d.received_at >= since, reason_code == code)
        .order_by(d.received_at.desc(), d.id.desc())
        .limit(limit)
    )
    return [
        RejectedSample(row.id, row.received_at, row.source, row.reason, row.payload)
        for row in session.execute(stmt).scalars()
    ]


def deliveries_by_action_state(session: Session) -> list[DeliveryCount]:
    """event_deliveries counted by action and state (an index-only scan of ix_event_deliveries_action_state)."""
    e = m.EventDelivery
    stmt = (
        select(e.action, e.state, func.count().label("n"))
        .group_by(e.action, e.state)
        .order_by(e.action, e.state)
    )
    return [DeliveryCount(str(row.action), str(row.state), row.n) for row in session.execute(stmt)]
