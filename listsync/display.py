"""Text for people: the tables and lines `status`, `plan`, `runs` and `sync` print.

Pure functions of rows and reports, so each verb stays a few lines and tests can read the output
without a terminal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from listsync.context import RunReport
    from listsync.preview import Plan

DELIVERY_COLUMNS = ["action", "endpoint", "pending", "waiting_retry"]
SAMPLE_COLUMNS = ["audience_key", "direction", "user_id", "email"]
EVENT_SAMPLE_COLUMNS = ["event", "action", "endpoint", "user_id", "email"]


def table(rows: list[dict[str, Any]], columns: list[str], empty: str = "(none)") -> str:
    """Rows as left-aligned columns under a header line; `empty` when there are none."""
    if not rows:
        return empty
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def backlog_line(waiting: dict[str, Any], *, actions_enabled: bool) -> str:
    """One line under the audience table: what was accepted but is not in it yet."""
    inbox = f"inbox: {waiting['inbox_unapplied']} events waiting to be applied"
    if waiting["inbox_unapplied"]:
        inbox += f" (oldest received {waiting['oldest_unapplied_at']})"
    if not actions_enabled:
        return inbox + "; event deliveries: off ([actions] enabled = false)"
    return (
        f"{inbox}; event deliveries: {waiting['deliveries_pending']} pending "
        f"({waiting['deliveries_waiting_retry']} waiting to retry), {waiting['deliveries_failed']} failed"
        + (f"; {waiting['inbox_unrouted']} events not routed to actions yet" if waiting["inbox_unrouted"] else "")
    )


def plan_text(plan: Plan, audience_columns: list[str]) -> str:
    parts = [table(plan.audiences, audience_columns, "(no audiences yet)")]
    samples = [{"audience_key": row["audience_key"], **m} for row in plan.audiences for m in row.get("sample", [])]
    if samples:
        parts += ["", "sample members:", table(samples, SAMPLE_COLUMNS)]
    parts += ["", "event deliveries:", table(plan.event_deliveries, DELIVERY_COLUMNS, "(none pending)")]
    if plan.event_sample:
        parts += ["", "sample events:", table(plan.event_sample, EVENT_SAMPLE_COLUMNS)]
    if plan.folded:
        parts += ["", f"({plan.folded} inbox events were folded for this preview only; nothing was written)"]
    return "\n".join(parts)


BREAKDOWN_COLUMNS = ["audience", "requests", "subscribed", "unsubscribed", "not_confirmed"]
RECONCILE_COLUMNS = ["audience", "missing_resent", "extra_unsubscribed", "unknown_to_listsync", "adopted"]
RUNS_COLUMNS = [
    "run_id",
    "started_at",
    "duration_seconds",
    "trigger",
    "status",
    "requests",
    "members_changed",
    "failures",
    "events_delivered",
    "events_failed",
    "retrying",
    "held",
]


def run_summary(report: RunReport, breakdown: list[dict[str, Any]], duration: float | None) -> str:
    """What `listsync sync` prints once at the end: a headline, then small tables."""
    from listsync import run_log

    took = f" in {duration:.1f} s" if duration is not None else ""
    lines = [f"run {report.run_id} finished{took}: {run_log.counts_text(report)}"]
    if breakdown:
        lines += ["", table(breakdown, BREAKDOWN_COLUMNS)]
    if report.reconciled:
        lines += ["", "reconciled (read back from Iterable):", table(_reconciled_rows(report), RECONCILE_COLUMNS)]
    if report.held:
        lines.append("held: " + ", ".join(report.held) + " (release with --allow-mass-unsubscribe)")
    if report.missing_lists:
        lines.append("lists missing in Iterable: " + ", ".join(report.missing_lists))
    lines += report.errors
    if report.fatal:
        lines.append(report.fatal)
    return "\n".join(lines)


def _reconciled_rows(report: RunReport) -> list[dict[str, Any]]:
    return [
        {
            "audience": key,
            "missing_resent": found.get("missing", 0),
            "extra_unsubscribed": found.get("extra", 0),
            "unknown_to_listsync": found.get("unknown_added", 0),
            "adopted": found.get("adopted", 0),
        }
        for key, found in report.reconciled.items()
    ]


def runs_table(rows: list[dict[str, Any]]) -> str:
    shown = [{**row, "started_at": str(row["started_at"])[:19].replace("T", " ")} for row in rows]
    return table(shown, RUNS_COLUMNS, "(no runs yet)")
