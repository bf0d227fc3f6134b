"""Retention: what finished work is deleted, and when, so the database stays bounded.

What grows without bound otherwise: the inbox (one row per accepted event, with its event
deliveries), the request ledger (api_requests, and api_request_items: a row per member refused),
sync_runs, and dead_letters. Memberships do not: there is one row per (audience, subscriber).

Only finished work is pruned. An inbox event goes once it is applied to memberships, routed to its
actions (when actions are on) and none of its deliveries is pending; its finished deliveries go
with it (ON DELETE CASCADE). A request in flight is never touched: it is how a crash is settled.
Deletes go in batches of their own transactions, so a prune never holds the write lock for long.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, exists, select
from sqlalchemy.orm import Session, sessionmaker

from listsync.config import RetentionSettings
from listsync.db import models as m
from listsync.db.session import transaction

logger = logging.getLogger(__name__)

BATCH = 5000
ITEM_REQUESTS_BATCH = 20  # requests per transaction when their member rows go too


@dataclass
class Pruned:
    inbox: int = 0
    request_items: int = 0  # requests whose per-member rows were deleted
    requests: int = 0
    runs: int = 0
    rejected: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def text(self) -> str:
        return (
            f"{self.inbox} inbox events, the member rows of {self.request_items} requests, "
            f"{self.requests} requests, {self.runs} runs, {self.rejected} rejected events"
        )


def _cutoff(now: datetime, days: float) -> datetime | None:
    return now - timedelta(days=days) if days > 0 else None


def _old_inbox(cutoff: datetime, require_routed: bool) -> Select[int]:
    inbox, d = m.InboxEvent, m.EventDelivery
    pending = exists().where(d.inbox_id == inbox.id, d.state == m.DeliveryState.PENDING)
    stmt = select(inbox.id).where(inbox.received_at < cutoff, inbox.applied_at.is_not(None), ~pending)
    return stmt.where(inbox.routed_at.is_not(None)) if require_routed else stmt


def _old_requests(cutoff: datetime) -> Select[int]:
    r = m.ApiRequest
    return select(r.id).where(r.finished_at < cutoff, r.status != m.RequestStatus.IN_FLIGHT)


def _old_items(cutoff: datetime) -> Select[int]:
    i = m.RequestItem
    return select(i.request_id).where(i.request_id.in_(_old_requests(cutoff))).distinct()


def _old_runs(cutoff: datetime) -> Select[int]:
    run = m.SyncRun
    return select(run.id).where(run.finished_at < cutoff, run.status != m.RunStatus.RUNNING)


def _old_rejected(cutoff: datetime) -> Select[int]:
    return select(m.DeadLetter.id).where(m.DeadLetter.received_at < cutoff)


def _delete_batches(
    factory: sessionmaker[Session], ids: Select[int], column: Any, *, batch_size: int = BATCH
) -> int:
    """Delete the rows whose `column` is among `ids`, `batch_size` ids per transaction, until none
    is left; returns how many ids were deleted."""
    total = 0
    while True:
        with transaction(factory) as session:
            batch = list(session.scalars(ids.limit(batch_size)))
            if batch:
                session.execute(delete(column.class_).where(column.in_(batch)))
        total += len(batch)
        if len(batch) < batch_size:
            return total


def prune(
    factory: sessionmaker[Session], retention: RetentionSettings, now: datetime, *, actions_enabled: bool
) -> Pruned:
    """Delete what the retention settings no longer keep; returns how many rows of each kind went."""
    pruned = Pruned()
    if cutoff := _cutoff(now, retention.inbox_days):
        pruned.inbox = _delete_batches(factory, _old_inbox(cutoff, actions_enabled), m.InboxEvent.id)
    if cutoff := _cutoff(now, retention.request_items_days):
        # Counted in requests whose items went: a list request holds up to 1,000 of them.
        pruned.request_items = _delete_batches(
            factory, _old_items(cutoff), m.RequestItem.request_id, batch_size=ITEM_REQUESTS_BATCH
        )
    if cutoff := _cutoff(now, retention.runs_days):
        # Requests first: their items go with them (CASCADE); runs then have nothing pointing at them.
        pruned.requests = _delete_batches(
            factory, _old_requests(cutoff), m.ApiRequest.id, batch_size=ITEM_REQUESTS_BATCH
        )
        pruned.runs = _delete_batches(factory, _old_runs(cutoff), m.SyncRun.id)
    if cutoff := _cutoff(now, retention.rejected_days):
        pruned.rejected = _delete_batches(factory, _old_rejected(cutoff), m.DeadLetter.id)
    if pruned.total:
        counts = {f"pruned_{f.name}": getattr(pruned, f.name) for f in fields(pruned)}
        logger.info("pruned %s", pruned.text(), extra={"event": "pruned", **counts})
    return pruned
