"""The status page's views: rows from listsync.db.dashboard in, the HTML of <main> out. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from listsync.db import dashboard as q
from listsync.web import chart
from listsync.web.html import ago, badge, esc, link, number, section, stamp, table, url, when

WINDOWS = {"1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
DEFAULT_WINDOW = "24h"
PAYLOAD_CHARS = 600
RELEASE_HOLD = "listsync sync --allow-mass-unsubscribe"
RECREATE_LIST = "listsync sync --recreate-missing-lists"
DELIVERY_STATES = ("pending", "delivered", "failed", "skipped")


@dataclass(frozen=True)
class Overview:
    now: datetime
    window: str
    audiences: q.Page[q.AudienceRow]
    after: str | None
    buckets: list[q.RunBucket]
    runs: q.Page[q.RunRow]
    rejected: list[q.RejectedGroup]
    deliveries: list[q.DeliveryCount]


@dataclass(frozen=True)
class AudienceDetail:
    now: datetime
    audience: q.AudienceRow
    requests: q.Page[q.RequestRow]
    failed: q.Page[q.FailedMember]
    requests_before: int | None
    failed_after: int | None


@dataclass(frozen=True)
class Runs:
    now: datetime
    window: str
    buckets: list[q.RunBucket]
    runs: q.Page[q.RunRow]
    before: int | None
    show_all: bool


@dataclass(frozen=True)
class Rejected:
    now: datetime
    window: str
    groups: list[q.RejectedGroup]


def _stamp(now: datetime) -> str:
    return f'<div hidden data-updated="{esc(when(now))} UTC"></div>'


# --- overview -----------------------------------------------------------------------------------


def overview(data: Overview) -> str:
    runs_more = link("/runs", "all runs in the window", window=data.window)
    return "".join(
        [
            _stamp(data.now),
            section(
                "Audiences",
                _audience_table(data.audiences.rows, data.now)
                + _pager(data.audiences.next_cursor, "/", "after", first=data.after is not None),
                section_id="audiences",
            ),
            section(
                "Runs",
                _window_links("/", data.window)
                + chart.run_chart(data.buckets)
                + "<h3>Latest runs that sent or failed</h3>"
                + _runs_table(data.runs.rows)
                + f'<div class="pager">{runs_more}</div>',
                section_id="runs",
            ),
            section("Rejected events", _rejected_summary(data.rejected, data.window), section_id="rejected"),
            section("Event deliveries", _deliveries_table(data.deliveries), section_id="deliveries"),
        ]
    )


def _audience_table(rows: Sequence[q.AudienceRow], now: datetime) -> str:
    headers = [
        "audience",
        "list id",
        "state",
        "desired",
        "synced",
        "pending +",
        "pending −",
        "failed",
        "last synced",
        "newest delta",
        "lag",
    ]
    return table(
        headers, [_audience_cells(a, now) for a in rows], numeric=range(3, 8), empty="no audiences yet"
    )


def _audience_cells(a: q.AudienceRow, now: datetime) -> list[str]:
    name = link("/audience", a.audience_key, key=a.audience_key)
    state = badge(a.list_state)
    if a.hold_reason:
        state += " " + badge("held")
        name += f'<div class="hold">{_with_command(a.hold_reason, RELEASE_HOLD)}</div>'

    elif a.list_state == "missing":
        name += (
            f'<div class="hold">list missing in Iterable; recreate: <code>{esc(RECREATE_LIST)}</code></div>'
        )
    return [
        name,
        esc(a.list_id),
        state,
        number(a.members),
        number(a.synced_members),
        number(a.pending_subscribe),
        number(a.pending_unsubscribe),
        number(a.failed),
        stamp(a.last_synced_at),
        stamp(a.newest_delta_at),
        f'<span class="nowrap">{esc(ago(a.lag_seconds(now)))}</span>'
        if a.oldest_pending_at
        else '<span class="muted nowrap">in step</span>',
    ]


def _with_command(reason: str, command: str) -> str:
    """The reason with its releasing command set as code, or followed by it if it does not name it."""
    quoted = esc(f"`{command}`")
    text = esc(reason)
    if quoted in text:
        return text.replace(quoted, f"<code>{esc(command)}</code>")
    return f"{text}; release with <code>{esc(command)}</code>"


def _pager(cursor: str | None, path: str, param: str, *, first: bool, **keep: object) -> str:
    links = []
    if first:
        links.append(link(path, "first page", **keep))
    if cursor is not None:
        links.append(link(path, "next page →", **{**keep, param: cursor}))
    return f'<div class="pager">{" · ".join(links)}</div>' if links else ""


def _window_links(path: str, chosen: str, **keep: object) -> str:
    links = []
    for name in WINDOWS:
        cls = ' class="on"' if name == chosen else ""
        links.append(f'<a{cls} href="{esc(url(path, **{**keep, "window": name}))}">{esc(name)}</a>')
    return f'<div class="windows">window: {"".join(links)}</div>'


def _runs_table(rows: Sequence[q.RunRow]) -> str:
    headers = [
        "run",
        "trigger",
        "status",
        "started",
        "duration",
        "requests",
        "subscribed",
        "unsubscribed",
        "failed",
        "summary",
    ]
    cells = [
        [
            esc(r.id),
            esc(r.trigger),
            badge(r.status),
            stamp(r.started_at),
            esc(f"{r.duration_seconds:.2f} s" if r.duration_seconds is not None else ""),
            number(r.requests),
            number(r.subscribed),
            number(r.unsubscribed),
            number(r.failed),
            f'<span class="muted">{esc(r.summary)}</span>',
        ]
        for r in rows
    ]
    return table(headers, cells, numeric=range(5, 9), empty="no runs in the window")


def _rejected_summary(groups: Sequence[q.RejectedGroup], window: str) -> str:
    cells = [[f"<code>{esc(g.code)}</code>", number(g.count), stamp(g.last_at)] for g in groups]
    more = link("/rejected", "samples of each reason", window=window)
    return (
        _window_links("/", window)
        + table(["reason", "events", "latest"], cells, numeric=[1], empty="nothing rejected in the window")
        + f'<div class="pager">{more}</div>'
    )


def _deliveries_table(counts: Sequence[q.DeliveryCount]) -> str:
    by_action: dict[str, dict[str, int]] = {}
    for c in counts:
        by_action.setdefault(c.action, {})[c.state] = c.count
    cells = [
        [esc(action), *(number(states.get(s, 0)) for s in DELIVERY_STATES), number(sum(states.values()))]
        for action, states in by_action.items()
    ]
    return table(
        ["action", *DELIVERY_STATES, "total"], cells, numeric=range(1, 6), empty="no event deliveries yet"
    )


# --- one audience -------------------------------------------------------------------------------


def audience_detail(data: AudienceDetail) -> str:
    a = data.audience
    requests = _requests_table(data.requests.rows) + _pager(
        data.requests.next_cursor,
        "/audience",
        "requests_before",
        first=data.requests_before is not None,
        key=a.audience_key,
        failed_after=data.failed_after,
    )
    failed = _failed_table(data.failed.rows) + _pager(
        data.failed.next_cursor,
        "/audience",
        "failed_after",
        first=data.failed_after is not None,
        key=a.audience_key,
        requests_before=data.requests_before,
    )
    return "".join(
        [
            _stamp(data.now),
            section(f"Audience {a.audience_key}", _audience_table([a], data.now), section_id="audience"),
            section("Failed members", failed, section_id="failed"),
            section("Recent requests (the ledger)", requests, section_id="requests"),
        ]
    )


def _requests_table(rows: Sequence[q.RequestRow]) -> str:
    headers = [
        "request",
        "endpoint",
        "items",
        "status",
        "http",
        "Iterable code",
        "ok / failed",
        "elapsed",
        "started",
        "error",
    ]
    cells = [
        [
            esc(r.id),
            esc(r.endpoint),
            number(r.item_count),
            badge(r.status),
            esc(r.http_status),
            esc(r.iterable_code),
            esc(f"{r.success_count} / {r.fail_count}" if r.success_count is not None else ""),
            esc(f"{r.elapsed_ms} ms" if r.elapsed_ms is not None else ""),
            stamp(r.started_at),
            f'<span class="muted">{esc(r.error)}</span>',
        ]
        for r in rows
    ]
    return table(headers, cells, numeric=[2], empty="no requests for this audience")


def _failed_table(rows: Sequence[q.FailedMember]) -> str:
    cells = [
        [
            esc(f.user_id),
            esc(f.email),
            esc(f.desired),
            f'<span class="error">{esc(f.last_error)}</span>',
            stamp(f.updated_at),
        ]
        for f in rows
    ]
    return table(["user id", "email", "desired", "reason", "updated"], cells, empty="no failed members")


# --- runs and rejected events -------------------------------------------------------------------


def runs(data: Runs) -> str:
    keep = {"window": data.window, "all": "1" if data.show_all else None}
    toggle = (
        link("/runs", "only runs that sent or failed", window=data.window)
        if data.show_all
        else link("/runs", "include idle runs", window=data.window, all="1")
    )
    body = (
        _window_links("/runs", data.window, all=keep["all"])
        + chart.run_chart(data.buckets)
        + f'<div class="pager">{toggle}</div>'
        + _runs_table(data.runs.rows)
        + _pager(data.runs.next_cursor, "/runs", "before", first=data.before is not None, **keep)
    )
    return _stamp(data.now) + section("Run history", body, section_id="runs")


def rejected(data: Rejected) -> str:
    parts = [_window_links("/rejected", data.window)]
    if not data.groups:
        parts.append('<p class="muted">nothing rejected in the window</p>')
    for g in data.groups:
        samples = [
            [
                stamp(s.received_at),
                esc(s.source),
                f"<code>{esc(s.reason)}</code>",
                f"<code>{esc(_cut(s.payload))}</code>",
            ]
            for s in g.samples
        ]
        parts.append(
            f"<h3><code>{esc(g.code)}</code> · {number(g.count)} events</h3>"
            + table(["received", "source", "reason", "payload (secrets removed)"], samples, empty="")
        )
    return _stamp(data.now) + section("Rejected events by reason", "".join(parts), section_id="rejected")


def _cut(text: str) -> str:
    return text if len(text) <= PAYLOAD_CHARS else text[:PAYLOAD_CHARS] + " …"
