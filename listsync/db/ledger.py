"""The request ledger: each Iterable call of the lists pipeline, written before it is sent and
completed with its members' outcomes after it is answered. A request's row names its members; an
item row is written only for a member whose outcome is not the request's own (see revision 0010)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.session import is_postgres


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
    """Write the request before the call, its members in its own row (one row per request, not
    per member), so a crash leaves a trace to resolve."""
    requests = m.table(m.ApiRequest)
    request_id = session.execute(
        insert(requests)
        .values(
            run_id=run_id,
            audience_id=audience_id,
            endpoint=endpoint,
            item_count=len(member_ids),
            status=m.RequestStatus.IN_FLIGHT,
            owner=owner,
            member_ids=json.dumps(list(member_ids), separators=(",", ":")),
            started_at=now,
        )
        .returning(requests.c.id)
    ).scalar_one()
    return int(request_id)


_ITEM_COLUMNS = "request_id, membership_id, outcome, error, sent_email, sent_user_id"

_ITEM_ARRAYS = ("ids", "outcomes", "errors", "emails", "users")

Sent = Mapping[int, tuple[str | None, str | None]]
"""The (email, userId) each member was sent with, by membership id."""


def _insert_items(
    session: Session, request_id: int, outcomes: Mapping[int, tuple[str, str | None]], sent: Sent
) -> None:
    """The members whose outcome is not the request's own: one statement of arrays on
    PostgreSQL, the driver's own executemany on SQLite (a resolved request names every member).
    A member a fold deleted while the request was out is left out (its items went with it before
    revision 0010, by the foreign key's cascade)."""
    rows = [(i, outcome, error, *sent.get(i, (None, None))) for i, (outcome, error) in outcomes.items()]
    if not rows:
        return
    if is_postgres(session):
        session.execute(
            text(
                f"INSERT INTO api_request_items ({_ITEM_COLUMNS}) SELECT :r, t.* FROM unnest("
                "CAST(:ids AS bigint[]), CAST(:outcomes AS varchar[]), CAST(:errors AS text[]), "
                "CAST(:emails AS varchar[]), CAST(:users AS varchar[])) AS t(id, o, e, em, u) "
                "WHERE EXISTS (SELECT 1 FROM memberships ms WHERE ms.id = t.id)"
            ),
            {"r": request_id, **{name: [row[n] for row in rows] for n, name in enumerate(_ITEM_ARRAYS)}},
        )
        return
    session.connection().exec_driver_sql(
        f"INSERT INTO api_request_items ({_ITEM_COLUMNS}) SELECT ?, ?, ?, ?, ?, ? "
        "WHERE EXISTS (SELECT 1 FROM memberships WHERE id = ?)",
        [(request_id, *row, row[0]) for row in rows],
    )


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
    common: tuple[str, str | None] | None = None,
    sent: Sent | None = None,
) -> None:
    """Complete the request. `outcomes`: (outcome, error) by member; with `common` (the
    request's own outcome, which `record.status` implies), only the members whose outcome
    differs from it are named, and only those get an item row."""
    session.execute(
        update(m.ApiRequest)
        .where(m.ApiRequest.id == request_id)
        .values(**dataclasses.asdict(record), finished_at=now)
    )
    others = {i: o for i, o in outcomes.items() if o != common} if common is not None else outcomes
    if others:
        # Only members the request still carries: one a fold deleted meanwhile left it (on SQLite
        # its id may already be a newcomer's).
        carried = set(request_member_ids(session, request_id))
        others = {i: o for i, o in others.items() if i in carried}
    if common is None:
        # Every member named: a request written before revision 0010 already has its items.
        session.execute(delete(m.RequestItem).where(m.RequestItem.request_id == request_id))
    _insert_items(session, request_id, others, sent or {})


def in_flight_requests(session: Session, audience_id: int) -> list[m.ApiRequest]:
    return list(
        session.scalars(
            select(m.ApiRequest)
            .where(m.ApiRequest.audience_id == audience_id, m.ApiRequest.status == m.RequestStatus.IN_FLIGHT)
            .order_by(m.ApiRequest.id)
        )
    )


def request_member_ids(session: Session, request_id: int) -> list[int]:
    """The members a request was sent for: its own row's list (requests written before revision
    0010 named each member in api_request_items instead)."""
    packed = session.scalar(select(m.ApiRequest.member_ids).where(m.ApiRequest.id == request_id))
    if packed is not None:
        return [int(i) for i in json.loads(packed)]
    return list(
        session.scalars(select(m.RequestItem.membership_id).where(m.RequestItem.request_id == request_id))
    )
