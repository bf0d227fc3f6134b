"""Inbox -> route, the per-event pipeline's first step: each inbox event not yet routed is matched
against the mappings in force, and every match becomes one `event_deliveries` row holding the
request body, built once. The rows and the inbox mark are written in one transaction, so an event
is routed exactly once."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from listsync import context
from listsync.db import deliveries as deliveries_db
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.events import actions
from listsync.events.mapping import ActionMapping

logger = logging.getLogger(__name__)

ROUTE_BATCH = 1000
AUDIENCE_BATCH = 20_000  # audience events marked routed unread per transaction, when no mapping takes them


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
    router = Router(ctx, mappings, clock)
    while router.route_batch(report):
        pass
    return report


class Router:
    """Routes the inbox one batch (one transaction) at a time, so delivery can send what one batch
    made while it routes the next."""

    def __init__(
        self, ctx: context.SyncContext, mappings: Sequence[ActionMapping], clock: Callable[[], datetime]
    ) -> None:
        settings = ctx.settings.actions
        self.ctx, self.mappings, self.clock = ctx, mappings, clock
        self.project_type = ctx.settings.iterable.project_type
        self.pages = actions.PageSettings(
            settings.map_all_pages, settings.track_all_pages, settings.track_categorized_pages,
            settings.track_named_pages,
        )
        self.takes_audiences = any(mapping.audiences for mapping in mappings)
        # Marking audience events unread stops once a call finds fewer than a batch: each call
        # scans the unrouted events, so calling it for every batch of an inbox without audience
        # events would read the whole inbox per batch. Later arrivals wait for the next run.
        self.unread_left = not self.takes_audiences
        self.done = False

    def route_batch(self, report: RouteCounts) -> bool:
        """Route up to ROUTE_BATCH events in a transaction of their own; False once none is left."""
        if self.done:
            return False
        with transaction(self.ctx.factory) as session:
            return self.route_in(session, report)

    def route_in(self, session: Session, report: RouteCounts) -> bool:
        """Route up to ROUTE_BATCH events in the caller's transaction (the rows and the inbox marks
        commit together, or neither); False once none is left."""
        if self.done:
            return False
        now = self.clock()
        unread = 0
        if self.unread_left:
            unread = deliveries_db.mark_audience_routed(session, now, AUDIENCE_BATCH)
            self.unread_left = unread == AUDIENCE_BATCH
        rows = deliveries_db.unrouted(session, ROUTE_BATCH, audiences=self.takes_audiences)
        made = [d for row in rows for d in self._route(row, now)]
        deliveries_db.insert_deliveries(session, made)
        deliveries_db.mark_routed(session, [row.id for row in rows], now)
        report.routed += len(rows) + unread
        report.skipped += sum(d[_STATE] == _SKIPPED for d in made)
        report.failed += sum(d[_STATE] == _FAILED for d in made)
        self.done = len(rows) < ROUTE_BATCH and not self.unread_left
        return not self.done

    def _route(self, row: deliveries_db.Unrouted, now: datetime) -> list[tuple[Any, ...]]:
        event = event_view(row)
        out = []
        for mapping in self.mappings:
            if row.is_audience and not mapping.audiences or not mapping.test(event):
                continue
            built = actions.build(mapping, event, project_type=self.project_type, pages=self.pages)
            if built is not None:
                out.append(_delivery_row(row, mapping, built, now))
        return out


def event_view(row: deliveries_db.Unrouted) -> dict[str, Any]:
    """The event as mappings see it: the stored payload, with the messageId and timestamp that
    validation settled on when the sender left them out (so `$.messageId` always resolves)."""
    view = dict(row.payload)
    view.setdefault("messageId", row.message_id)
    if not view.get("timestamp"):
        view["timestamp"] = row.timestamp.isoformat()
    return view


_STATE = deliveries_db.DELIVERY_COLUMNS.index("state")
_PENDING, _SKIPPED, _FAILED = (m.DeliveryState.PENDING.value, m.DeliveryState.SKIPPED.value,
                               m.DeliveryState.FAILED.value)


def _delivery_row(
    row: deliveries_db.Unrouted, mapping: ActionMapping, built: actions.Request | actions.Skip, now: datetime
) -> tuple[Any, ...]:
    """One row in deliveries_db.DELIVERY_COLUMNS order."""
    head = (row.id, row.message_id, row.type, row.event or row.payload.get("name"), mapping.name,
            mapping.action.value)
    if isinstance(built, actions.Skip):
        state = _FAILED if built.failed else _SKIPPED
        return (*head, state, built.reason, None, None, "", None, None, None, 0, now, now)
    return (*head, _PENDING, None, built.endpoint, _stored_body(built), built.user_id or built.email or "",
            built.user_id, built.email, built.iterable_id, 0, now, now)


def _stored_body(built: actions.Request) -> str:
    """The body as JSON text, with listsync's directives beside the request (newEmail, updateOnly:
    taken out again before sending)."""
    if built.body_json is not None and not built.new_email and not built.update_only:
        return built.body_json
    body = dict(built.body)
    if built.new_email:
        body["newEmail"] = built.new_email
    if built.update_only:
        body["updateOnly"] = True
    return json.dumps(body, allow_nan=False)
