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

from listsync import delivery, sync
from listsync.db import backlog


@dataclass
class Plan:
    audiences: list[dict[str, Any]]
    event_deliveries: list[dict[str, Any]]
    event_sample: list[dict[str, Any]] = field(default_factory=list)
    folded: int = 0  # inbox events folded for the preview (and rolled back)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@contextmanager
def rolled_back(ctx: sync.SyncContext) -> Iterator[sync.SyncContext]:
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


def plan(ctx: sync.SyncContext, *, sample: int = 0) -> Plan:
    """The next run's list changes per audience and its pending event deliveries, with up to
    `sample` example members per audience and `sample` example events."""
    with rolled_back(ctx) as view:
        folded = sync.apply_all(view)
        audiences = sync.preview(view)
        delivery.route_pending(view)
        with view.factory() as session:
            for row in audiences:
                if sample:
                    row["sample"] = backlog.member_sample(session, str(row["audience_key"]), view.clock(), sample)
            deliveries = backlog.pending_deliveries(session)
            events = backlog.delivery_sample(session, sample) if sample else []
    return Plan(audiences=audiences, event_deliveries=deliveries, event_sample=events, folded=folded)
