"""The request ledger: each Iterable call of the lists pipeline, written before it is sent and
completed with its members' outcomes after it is answered."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    bindparam,
    insert,
    select,
    text,
    update,
)
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
    sent: Sequence[tuple[str | None, str | None]] | None = None,
) -> int:
    """Write the request and its members before the call, so a crash leaves a trace to resolve.
    `sent`: the (email, userId) each member is sent with, in `member_ids` order."""
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
            started_at=now,
        )
        .returning(requests.c.id)
    ).scalar_one()
    if member_ids:
        _insert_items(session, request_id, member_ids, sent or [(None, None)] * len(member_ids))
    return int(request_id)


_ITEM_COLUMNS = "request_id, membership_id, sent_email, sent_user_id"


def _insert_items(
    session: Session,
    request_id: int,
    member_ids: Sequence[int],
    sent: Sequence[tuple[str | None, str | None]],
) -> None:
    """A request's members, on the hot path of a large sync: one statement of arrays on PostgreSQL,
    the driver's own executemany on SQLite (no per-row parameter processing either way)."""
    if len(sent) != len(member_ids):
        raise ValueError("one sent identity per member")
    if is_postgres(session):
        session.execute(
            text(
                f"INSERT INTO api_request_items ({_ITEM_COLUMNS}) SELECT :r, t.* FROM unnest("
                "CAST(:ids AS bigint[]), CAST(:emails AS varchar[]), CAST(:users AS varchar[])) AS t"
            ),
            {
                "r": request_id,
                "ids": list(member_ids),
                "emails": [e for e, _ in sent],
                "users": [u for _, u in sent],
            },
        )
        return
    session.connection().exec_driver_sql(
        f"INSERT INTO api_request_items ({_ITEM_COLUMNS}) VALUES (?, ?, ?, ?)",
        [(request_id, i, e, u) for i, (e, u) in zip(member_ids, sent, strict=True)],
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
) -> None:
    """Complete the request. `outcomes`: (outcome, error) by member; with `common`, only the
    members whose outcome differs from it need be named."""
    session.execute(
        update(m.ApiRequest)
        .where(m.ApiRequest.id == request_id)
        .values(**dataclasses.asdict(record), finished_at=now)
    )
    items = m.table(m.RequestItem)
    if common is None and outcomes:
        # Most members of a request share one outcome: one statement for it, then the exceptions.
        common = Counter(outcomes.values()).most_common(1)[0][0]
    if common is not None:
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
