"""`listsync plan`: what the next run would send, computed by the engine's own code inside one
database transaction that is rolled back, so nothing changes.

The inbox is folded and routed exactly as a run would do it (the same functions, not a second
implementation that could disagree), through a session factory bound to one connection whose outer
transaction is never committed: every `transaction()` of the engine becomes a savepoint in it.
On SQLite that transaction holds the write lock while the preview runs; with a daemon running the
inbox backlog it folds is a few seconds' worth, so the receiver waits that long at most.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from listsync.context import SyncContext
from listsync.db import audiences, backlog, memberships
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.domain import Direction
from listsync.events import route
from listsync.lists import planner
from listsync.lists.apply import apply_all
from listsync.lists.send import PAGE_SIZE, effective_settings


@dataclass
class Plan:
    audiences: list[dict[str, Any]]
    event_deliveries: list[dict[str, Any]]
    event_sample: list[dict[str, Any]] = field(default_factory=list)
    folded: int = 0  # inbox events folded for the preview (and rolled back)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@contextmanager
def rolled_back(ctx: SyncContext) -> Iterator[SyncContext]:
    """A copy of `ctx` whose every transaction is undone when the block ends."""
    engine: Engine = ctx.factory.kw["bind"]
    with engine.connect() as connection:
        outer = connection.begin()
        try:
            factory = sessionmaker(
                bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
            )
            yield dataclasses.replace(ctx, factory=factory)
        finally:
            outer.rollback()


def plan(ctx: SyncContext, *, sample: int = 0) -> Plan:
    """The next run's list changes per audience and its pending event deliveries, with up to
    `sample` example members per audience and `sample` example events."""
    with rolled_back(ctx) as view:
        folded = apply_all(view)
        per_audience = audiences_preview(view)
        route.route_pending(view)
        with view.factory() as session:
            for row in per_audience:
                if sample:
                    row["sample"] = backlog.member_sample(session, str(row["audience_key"]), view.clock(), sample)
            deliveries = backlog.pending_deliveries(session)
            events = backlog.delivery_sample(session, sample) if sample else []
    return Plan(audiences=per_audience, event_deliveries=deliveries, event_sample=events, folded=folded)


def audiences_preview(ctx: SyncContext) -> list[dict[str, object]]:
    """What the next run would send per audience, read from the store only (nothing is sent)."""
    rows: list[dict[str, object]] = []
    with transaction(ctx.factory) as session:
        every = audiences.all_audiences(session)
    for audience in every:
        rows.append(_preview_audience(ctx, audience))
    return rows


def _preview_audience(ctx: SyncContext, audience: m.Audience) -> dict[str, object]:
    audience_settings = effective_settings(ctx.settings, audience)
    counts = {Direction.SUBSCRIBE: 0, Direction.UNSUBSCRIBE: 0}
    requests = unsendable = 0
    after_id = 0
    with transaction(ctx.factory) as session:
        while page := memberships.pending_members(
            session, audience.id, ctx.clock(), after_id=after_id, limit=PAGE_SIZE
        ):
            after_id = page[-1].id
            plan = planner.plan_audience(
                page,
                project_type=ctx.settings.iterable.project_type,
                batch_size=ctx.settings.sync.batch_size,
                data_field_names=audience_settings.data_fields,
            )
            for direction in counts:
                counts[direction] += plan.count(direction)
            requests += len(plan.batches)
            unsendable += len(plan.unsendable)
        unsubscribes, synced = memberships.guard_counts(session, audience.id, ctx.clock())
    sync = ctx.settings.sync
    hold = planner.guard_hold_reason(
        unsubscribes, synced, planner.GuardLimits(sync.max_unsubscribe_fraction, sync.guard_min_list_size)
    )
    note = hold or ("list to be created" if audience.list_id is None else "")
    if audience.list_state is m.ListState.MISSING:
        note = "list missing in Iterable: run `listsync sync --recreate-missing-lists`"
    return {
        "audience_key": audience.audience_key,
        "list_id": audience.list_id,
        "subscribe": counts[Direction.SUBSCRIBE],
        "unsubscribe": counts[Direction.UNSUBSCRIBE],
        "requests": requests,
        "unsendable": unsendable,
        "note": note,
    }
