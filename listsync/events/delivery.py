"""Route -> send -> record for per-event actions (Iterable (Actions)): the inbox's events become
users/update, events/track, commerce calls, delivered once in effect and in order per user.

Routing (`events.route`) writes one `event_deliveries` row per (event, mapping); passes
(`events.sender`) send the pending rows in id order, in order per user, and record each outcome
after Iterable answers (`events.outcomes`). One replica delivers at a time (a lease).

"Once in effect": a crash between the answer and the record, or a retry after an unanswered
request, sends the same body again. Events and purchases carry an id that Iterable updates rather
than duplicates; user updates and carts are idempotent. So nothing needs an in-flight ledger.

Errors: a refused key (401/403) stops delivery and keeps every row pending (`fatal`); transient
failures retry with capped exponential backoff ([sync] retry_*), up to [actions] max_attempts;
permanent refusals (invalid email, bad data) fail that row with Iterable's reason. Bulk answers
are read per item.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from listsync import context
from listsync.db import deliveries, leases
from listsync.db.session import transaction
from listsync.engine import repeat_passes
from listsync.events.outcomes import LEASE_NAME, DeliveryReport, lease_ttl
from listsync.events.route import RouteCounts, Router
from listsync.events.sender import PAGE_SIZE, Route, Sender

__all__ = ["LEASE_NAME", "PAGE_SIZE", "DeliveryReport", "deliver_pending"]

logger = logging.getLogger(__name__)

MAX_PASSES = 50


def deliver_pending(ctx: context.SyncContext, *, now_fn: Callable[[], datetime] | None = None) -> DeliveryReport:
    """Route new inbox events to their actions, then send what is due until nothing is."""
    clock = now_fn or ctx.clock
    report = DeliveryReport()
    settings = ctx.settings.actions
    if not settings.enabled:
        return report
    if not _take_lease(ctx, clock()):
        logger.info("another replica is delivering events", extra={"event": "delivery_lease_busy"})
        return report
    try:
        router = Router(ctx, settings.compiled(), clock)
        routed = RouteCounts()
        try:
            if ctx.client.is_dry_run:
                while router.route_batch(routed):
                    pass
                _log_dry_run(ctx)
                return report
            _send_all(ctx, report, clock, lambda session: router.route_in(session, routed))
        finally:
            report.routed, report.skipped, report.failed = routed.routed, routed.skipped, report.failed + routed.failed
        report.retrying = _count_pending(ctx)
    finally:
        _release_lease(ctx, clock())
    return report


def _send_all(
    ctx: context.SyncContext, report: DeliveryReport, clock: Callable[[], datetime], route: Route
) -> None:
    """Passes over the pending rows until one sends nothing or nothing is due. The first pass
    routes the inbox as it goes (`route`: one batch in the given transaction, False once none is left)."""

    def one_pass() -> bool:
        before = report.requests
        Sender(ctx, report, clock, route).run()
        if report.requests == before or ctx.should_stop():
            return False
        with transaction(ctx.factory) as session:
            return deliveries.any_due(session, clock())

    repeat_passes(one_pass, max_passes=MAX_PASSES)


def _log_dry_run(ctx: context.SyncContext) -> None:
    logger.info(
        "dry run: %d event deliveries would be sent", _count_pending(ctx), extra={"event": "delivery_dry_run"}
    )


def _count_pending(ctx: context.SyncContext) -> int:
    with transaction(ctx.factory) as session:
        return deliveries.count_pending(session)


def _take_lease(ctx: context.SyncContext, now: datetime) -> bool:
    """One replica delivers at a time, so one user's rows cannot be sent by two in parallel."""
    with transaction(ctx.factory) as session:
        return leases.try_lease(session, LEASE_NAME, ctx.owner, now, lease_ttl(ctx))


def _release_lease(ctx: context.SyncContext, now: datetime) -> None:
    with transaction(ctx.factory) as session:
        leases.release_lease(session, LEASE_NAME, ctx.owner, now)


