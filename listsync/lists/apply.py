"""Inbox -> memberships, the lists pipeline's first step: each batch of committed inbox events is
folded into the audiences' members, and the events are marked applied in the same transaction.

A batch is staged in the database (`db.fold_stage`) and folded the set-based way
(`lists.set_fold`): the common deltas by a few SQL statements, the rest by the rules in Python
(`lists.rules_fold`). Which membership a delta is about, and which rows name one Iterable profile,
is `identity`'s decision; how a member's state moves is `membership`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.orm import Session

from listsync.config import Settings
from listsync.context import SyncContext
from listsync.db import fold, fold_stage, inbox
from listsync.db.session import describe_refusal, refused_by_data, transaction
from listsync.domain import Desired, ProjectType
from listsync.ingest import stored
from listsync.ingest.scrub import kept_payload
from listsync.lists import fast_fold, rules_fold, set_fold

BATCH = 5000  # inbox events per transaction


def apply_all(ctx: SyncContext) -> int:
    """Fold every committed inbox event into memberships."""
    total = 0
    while True:
        with transaction(ctx.factory) as session:
            applied = apply_inbox(session, ctx.settings, ctx.clock())
        total += applied
        if applied == 0:
            return total


def apply_inbox(session: Session, settings: Settings, now: datetime, *, limit: int = BATCH) -> int:
    """Fold up to `limit` unapplied inbox events into memberships; returns how many were applied.

    One event never blocks another: should folding the batch fail on an event's data, the batch
    is folded again event by event by the rules, each in a savepoint, and the events that still
    fail are recorded in rejected_events with the reason, marked applied, and left behind. A
    database that is unavailable is not an event's fault: that error propagates and the batch is
    retried.
    """
    inbox.serialize_inbox_apply(session)
    fold.keep_plans_fresh(session)
    staged = fold_stage.stage_inbox(session, limit, stored.RULES)
    if staged == 0:
        return 0
    try:
        with session.begin_nested():
            refused = set_fold.fold_staged_inbox(session, settings, now)
    except Exception as exc:
        if not refused_by_data(exc):
            raise
        rows = inbox.events_by_id(session, fold_stage.positions(session))
        refused = _fold_one_by_one(session, settings, [rows[i] for i in sorted(rows)], now)
    inbox.store_rejections(session, refused, source="inbox", now=now)
    fold_stage.mark_applied(session, now)
    return staged


def _fold_one_by_one(
    session: Session, settings: Settings, rows: Sequence[inbox.StoredEvent], now: datetime
) -> list[tuple[str, str]]:
    refused: list[tuple[str, str]] = []
    for row in rows:
        try:
            with session.begin_nested():
                refused.extend(rules_fold.fold_events(session, settings, [row], now))
        except Exception as exc:
            if not refused_by_data(exc):
                raise
            reason = f"apply_failed: {describe_refusal(exc)} (inbox event {row.id}, refused when applied)"
            refused.append((reason, kept_payload(row.payload)))
    return refused


def apply_deltas(
    session: Session,
    deltas: Sequence[fast_fold.FoldItem],
    project_type: ProjectType,
    now: datetime,
    *,
    set_based: bool = True,
) -> fast_fold.FoldCounts:
    """Fold (audience_id, delta, data_fields) items, read already, into memberships, in event-time
    order per member: the set-based way (the default), or every one by the rules (`set_based`
    False). New rows are inserted in the order of their deltas."""
    items = [item for item in deltas if item[1].desired is not Desired.UNKNOWN]
    if set_based:
        return set_fold.fold_staged_deltas(session, items, project_type, now)
    rules_fold.fold_deltas(session, items, project_type, now)
    return fast_fold.FoldCounts(by_rules=len(items))
