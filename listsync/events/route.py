"""Inbox -> route, the per-event pipeline's first step: each inbox event not yet routed is matched
against the mappings in force, and every match becomes one `event_deliveries` row holding the
request body, built once. The rows and the inbox mark are written in one transaction, so an event
is routed exactly once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from listsync import context
from listsync.db import deliveries as deliveries_db
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.events import actions
from listsync.events.mapping import ActionMapping

logger = logging.getLogger(__name__)

ROUTE_BATCH = 1000


@dataclass
class RouteCounts:
    """Inbox events routed, and the deliveries routing itself skipped or failed."""

    routed: int = 0
    skipped: int = 0
    failed: int = 0


def route_pending(ctx: context.SyncContext) -> int:
    """Route new inbox events to their actions without sending anything; returns how many were
    routed. `listsync plan` calls it inside a transaction it rolls back."""
    if not ctx.settings.actions.enabled:
        return 0
    return route_all(ctx, ctx.settings.actions.compiled(), ctx.clock).routed


def route_all(
    ctx: context.SyncContext, mappings: Sequence[ActionMapping], clock: Callable[[], datetime]
) -> RouteCounts:
    report = RouteCounts()
    settings = ctx.settings.actions
    pages = actions.PageSettings(
        settings.map_all_pages, settings.track_all_pages, settings.track_categorized_pages, settings.track_named_pages
    )
    while True:
        with transaction(ctx.factory) as session:
            rows = deliveries_db.unrouted(session, ROUTE_BATCH)
            deliveries = [d for row in rows for d in _route(row, mappings, pages, ctx, clock())]
            deliveries_db.insert_deliveries(session, deliveries)
            deliveries_db.mark_routed(session, [row.id for row in rows], clock())
        report.routed += len(rows)
        report.skipped += sum(d["state"] is m.DeliveryState.SKIPPED for d in deliveries)
        report.failed += sum(d["state"] is m.DeliveryState.FAILED for d in deliveries)
        if len(rows) < ROUTE_BATCH:
            return report


def event_view(payload: dict[str, Any], message_id: str, timestamp: datetime) -> dict[str, Any]:
    """The event as mappings see it: the stored payload, with the messageId and timestamp that
    validation settled on when the sender left them out (so `$.messageId` always resolves)."""
    view = dict(payload)
    view.setdefault("messageId", message_id)
    if not view.get("timestamp"):
        view["timestamp"] = timestamp.isoformat()
    return view


def _route(
    row: Any, mappings: Sequence[ActionMapping], pages: actions.PageSettings, ctx: context.SyncContext, now: datetime
) -> list[dict[str, Any]]:
    event = event_view(row.payload, row.message_id, row.timestamp)
    out = []
    for mapping in mappings:
        if not mapping.matches(event, is_audience=row.is_audience):
            continue
        built = actions.build(mapping, event, project_type=ctx.settings.iterable.project_type, pages=pages)
        if built is not None:
            out.append(_delivery_row(row, mapping, built, now))
    return out


def _delivery_row(
    row: Any, mapping: ActionMapping, built: actions.Request | actions.Skip, now: datetime
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "inbox_id": row.id,
        "message_id": row.message_id,
        "event_type": row.type,
        "event_name": row.event or row.payload.get("name"),
        "mapping": mapping.name,
        "action": mapping.action,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }
    if isinstance(built, actions.Skip):
        state = m.DeliveryState.FAILED if built.failed else m.DeliveryState.SKIPPED
        return {**values, "state": state, "last_error": built.reason, "user_key": "", "endpoint": None,
                "body": None, "user_id": None, "email": None, "iterable_id": None}
    body = dict(built.body)
    if built.new_email:
        body["newEmail"] = built.new_email  # kept with the body; taken out again before sending
    if built.update_only:
        body["updateOnly"] = True
    return {**values, "state": m.DeliveryState.PENDING, "last_error": None, "endpoint": built.endpoint,
            "body": body, "user_key": built.user_id or built.email or "", "user_id": built.user_id,
            "email": built.email, "iterable_id": built.iterable_id}
