"""The run ledger as people read it: what a run did beyond runs.finish_run's counts, the run
history (the run_history view), and a finished run's breakdown per audience from the request ledger."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from listsync.db import models as m

# Item outcomes that mean the change is in Iterable (see lists.record.item_verdict and in-doubt settling).
_SUBSCRIBED = ("ok", "applied")
_UNSUBSCRIBED = ("ok", "not_found", "applied")


def record_outcome(
    session: Session,
    run_id: int,
    *,
    held: Sequence[str],
    events_delivered: int,
    events_failed: int,
    retrying: int,
) -> None:
    session.execute(
        update(m.SyncRun)
        .where(m.SyncRun.id == run_id)
        .values(
            held=", ".join(held) or None,
            events_delivered=events_delivered,
            events_failed=events_failed,
            retrying=retrying,
        )
    )


def forget(session: Session, run_id: int) -> None:
    """Drop the row of a run that did nothing (an idle daemon tick), so the history shows work."""
    session.execute(delete(m.SyncRun).where(m.SyncRun.id == run_id))


def duration_seconds(session: Session, run_id: int) -> float | None:
    row = session.execute(
        select(m.SyncRun.started_at, m.SyncRun.finished_at).where(m.SyncRun.id == run_id)
    ).one_or_none()
    if row is None or row.finished_at is None:
        return None
    elapsed: timedelta = row.finished_at - row.started_at
    return elapsed.total_seconds()


def history(session: Session, *, limit: int, trigger: str | None = None) -> list[dict[str, Any]]:
    """The newest `limit` rows of the run_history view, newest first."""
    where = "WHERE trigger = :trigger " if trigger else ""
    rows = session.execute(
        text(f"SELECT * FROM run_history {where}ORDER BY run_id DESC LIMIT :limit"),  # noqa: S608
        {"limit": limit, "trigger": trigger},
    ).mappings()
    return [{k: _plain(k, v) for k, v in row.items()} for row in rows]


def _plain(key: str, value: Any) -> Any:
    """The same JSON-friendly value from both databases: a view hands SQLite's timestamps over as
    text and PostgreSQL's numeric as Decimal."""
    if key in _TIMESTAMPS and value is not None:
        stamp = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


_TIMESTAMPS = ("started_at", "finished_at")


def audience_breakdown(session: Session, run_id: int) -> list[dict[str, Any]]:
    """Per audience: the requests a run sent and what Iterable confirmed of them. A member with
    no ledger item had its request's own outcome (revision 0010); requests written before it
    have an item per member."""
    r, i, a = m.ApiRequest.__table__, m.RequestItem.__table__, m.Audience.__table__
    sent = (
        select(a.c.audience_key, r.c.id, r.c.endpoint, r.c.status, r.c.item_count, r.c.member_ids.is_not(None))
        .select_from(r.join(a, a.c.id == r.c.audience_id))
        .where(r.c.run_id == run_id)
    )
    items = (
        select(i.c.request_id, i.c.outcome, func.count())
        .select_from(i.join(r, r.c.id == i.c.request_id))
        .where(r.c.run_id == run_id)
        .group_by(i.c.request_id, i.c.outcome)
    )
    outcomes: dict[int, dict[str | None, int]] = {}
    for request_id, outcome, count in session.execute(items):
        outcomes.setdefault(request_id, {})[outcome] = count
    rows: dict[str, dict[str, Any]] = {}
    requests: dict[str, int] = {}
    for key, request_id, endpoint, status, item_count, compact in session.execute(sent):
        row = rows.setdefault(key, {"audience": key, "subscribed": 0, "unsubscribed": 0, "not_confirmed": 0})
        requests[key] = requests.get(key, 0) + 1
        counts = dict(outcomes.get(request_id, {}))
        own = _REQUEST_OUTCOME.get(str(status)) if compact else None
        if own is not None:
            counts[own] = counts.get(own, 0) + item_count - sum(counts.values())
        subscribing = endpoint == "lists/subscribe"
        for outcome, count in counts.items():
            if outcome is None:
                continue
            if outcome in (_SUBSCRIBED if subscribing else _UNSUBSCRIBED):
                row["subscribed" if subscribing else "unsubscribed"] += count
            else:
                row["not_confirmed"] += count
    return [{**rows[key], "requests": requests[key]} for key in sorted(rows)]


# The outcome of a request's members that have no ledger item, by the request's status.
_REQUEST_OUTCOME = {m.RequestStatus.OK.value: "ok", m.RequestStatus.PARTIAL.value: "ok", m.RequestStatus.FAILED.value: "error"}


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
