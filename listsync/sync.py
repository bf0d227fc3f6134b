"""One run of both pipelines, as `listsync sync` runs it once and `listsync daemon` on its schedule.

The inbox is folded into memberships (`lists.apply`), the audiences are sent (`lists.pipeline`),
then the per-event actions are routed and delivered (`events.route`, `events.delivery`), and the
run is recorded in `sync_runs`. Both pipelines send through the rules of `engine`.
"""

from __future__ import annotations

import logging

from listsync import run_log
from listsync.context import Progress, RunOptions, RunReport, SyncContext
from listsync.db import memberships, retry, runs
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.events import delivery
from listsync.lists.apply import apply_all
from listsync.lists.pipeline import passes
from listsync.lists.remote import reset_missing_lists

logger = logging.getLogger(__name__)


def run_once(
    ctx: SyncContext, options: RunOptions | None = None, progress: Progress | None = None
) -> RunReport:
    """Apply the inbox, then send until no audience has work that is due."""
    options = options or RunOptions()
    report = RunReport(dry_run=ctx.client.is_dry_run)
    apply_all(ctx)
    if options.retry_failed:
        _retry_failed(ctx)
    with transaction(ctx.factory) as session:
        report.run_id = runs.start_run(session, trigger=options.trigger, owner=ctx.owner, now=ctx.clock())
    if options.recreate_missing_lists:
        reset_missing_lists(ctx)
    passes(ctx, options, report, progress)
    if not report.fatal:
        events = delivery.deliver_pending(ctx)
        report.events_delivered, report.events_failed = events.delivered, events.failed
        report.requests += events.requests
        report.events_retrying = events.retrying
        report.fatal = events.fatal
    _finish(ctx, report, options.trigger)
    return report


def _retry_failed(ctx: SyncContext) -> None:
    with transaction(ctx.factory) as session:
        members = retry.retry_failed_members(session, ctx.clock())
        events = retry.retry_failed_deliveries(session, ctx.clock())
    logger.info(
        "retrying what failed: %d members, %d event deliveries",
        members,
        events,
        extra={"event": "retry_failed", "members": members, "deliveries": events},
    )


# --- lists -----------------------------------------------------------------------------------------


# --- the guard --------------------------------------------------------------------------------------


# --- sending ----------------------------------------------------------------------------------------


# --- in-doubt requests and reconciliation -----------------------------------------------------------


def _finish(ctx: SyncContext, report: RunReport, trigger: str) -> None:
    status = m.RunStatus.FAILED if report.fatal else m.RunStatus.OK
    duration = None
    with transaction(ctx.factory) as session:
        # Counted at the end, not as failures happen: a later pass of this run may have delivered
        # members that an earlier pass had to put back.
        report.retrying = memberships.count_waiting(session) + report.events_retrying
        if report.run_id is not None:
            runs.finish_run(
                session,
                report.run_id,
                status=status,
                now=ctx.clock(),
                requests=report.requests,
                subscribed=report.subscribed,
                unsubscribed=report.unsubscribed,
                failed=report.failed,
                summary=report.summary(),
            )
            runs.record_outcome(
                session,
                report.run_id,
                held=report.held,
                events_delivered=report.events_delivered,
                events_failed=report.events_failed,
                retrying=report.retrying,
            )
            duration = runs.duration_seconds(session, report.run_id)
            if trigger == "daemon" and run_log.is_idle(report):
                runs.forget(session, report.run_id)
    run_log.log_finished(report, trigger=trigger, duration=duration)
