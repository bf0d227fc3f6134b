"""How a finished run is told: one log line with the counts a person needs, or nothing at all for
a daemon tick that found no work (an idle daemon stays quiet and leaves no sync_runs row)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from listsync.context import RunReport

logger = logging.getLogger("listsync.sync")


def is_idle(report: RunReport) -> bool:
    """Nothing sent, nothing failed, nothing to say: true of most daemon ticks."""
    return not (
        report.requests
        or report.subscribed
        or report.unsubscribed
        or report.failed
        or report.events_delivered
        or report.events_failed
        or report.missing_lists
        or report.errors
        or report.fatal
        or report.reconciled
    )


def counts_text(report: RunReport) -> str:
    text = (
        f"{report.requests} requests; {report.subscribed} subscribed; {report.unsubscribed} unsubscribed; "
        f"{report.failed} failed; {report.retrying} waiting to retry; "
        f"{report.events_delivered} events delivered; {report.events_failed} events failed"
    )
    return text + ("; dry run: nothing sent, nothing marked synced" if report.dry_run else "")


def log_finished(report: RunReport, *, trigger: str, duration: float | None) -> None:
    """INFO for the daemon's runs; DEBUG for `listsync sync`, which prints its own summary table."""
    level = logging.DEBUG if trigger == "sync" or (trigger == "daemon" and is_idle(report)) else logging.INFO
    took = f" in {duration:.1f} s" if duration is not None else ""
    logger.log(
        level,
        "sync run %s finished%s: %s",
        report.run_id,
        took,
        counts_text(report),
        extra={
            "event": "run_finished",
            "run_id": report.run_id,
            "trigger": trigger,
            "duration_s": duration,
            "requests": report.requests,
            "subscribed": report.subscribed,
            "unsubscribed": report.unsubscribed,
            "failed": report.failed,
            "retrying": report.retrying,
            "events_delivered": report.events_delivered,
            "events_failed": report.events_failed,
            "held": report.held,
            "missing_lists": report.missing_lists,
            "fatal": report.fatal,
            "dry_run": report.dry_run,
        },
    )
