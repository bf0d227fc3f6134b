"""The run-history chart as inline SVG, drawn on the server: members changed and failures per
slice of the window as bars (left axis), the longest run's duration as a line (right axis)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from listsync.db.dashboard import RunBucket
from listsync.web.html import ago, esc, when

WIDTH, HEIGHT = 960, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 56, 14, 34
CHANGED, FAILED, DURATION = "#3559e0", "#c4320a", "#d08a00"


def _nice_max(value: float) -> float:
    """The top of an axis with four gridline steps of 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 4.0
    step = 10.0 ** math.floor(math.log10(value / 4))
    for factor in (1, 2, 5, 10):
        if factor * step * 4 >= value:
            return factor * step * 4
    return 40 * step


def run_chart(buckets: Sequence[RunBucket]) -> str:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    count_max = _nice_max(max((max(b.changed, b.failed) for b in buckets), default=0))
    dur_max = _nice_max(max((b.max_duration_seconds for b in buckets), default=0))
    slot = plot_w / max(1, len(buckets))
    bar = max(1.0, slot * 0.38)

    def y_count(value: float) -> float:
        return TOP + plot_h - plot_h * value / count_max

    def y_dur(value: float) -> float:
        return TOP + plot_h - plot_h * value / dur_max

    parts = [_grid(plot_w, plot_h, count_max, dur_max)]
    points = []
    for i, b in enumerate(buckets):
        x = LEFT + i * slot + slot * 0.1
        tip = esc(
            f"{when(b.start)}: {b.runs} runs, {b.changed} changed, {b.failed} failed, "
            f"longest {b.max_duration_seconds:.2f} s"
        )
        parts.append(
            f'<g class="bucket"><title>{tip}</title>'
            f'<rect x="{x:.1f}" y="{TOP}" width="{slot * 0.8:.1f}" height="{plot_h}" fill="transparent"/>'
        )
        if b.changed:
            parts.append(_bar(x, bar, y_count(b.changed), TOP + plot_h, CHANGED, "changed"))
        if b.failed:
            parts.append(_bar(x + bar, bar, y_count(b.failed), TOP + plot_h, FAILED, "failed"))
        parts.append("</g>")
        if b.runs:
            points.append(f"{x + bar:.1f},{y_dur(b.max_duration_seconds):.1f}")
    if points:
        parts.append(
            f'<polyline class="duration" fill="none" stroke="{DURATION}" stroke-width="2" '
            f'points="{" ".join(points)}"/>'
        )
    parts.append(_x_labels(buckets, slot))
    label = "Members changed, failures and run duration over the window"
    return (
        f'<svg id="runs-chart" role="img" aria-label="{label}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="100%" preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{label}</title>{''.join(parts)}</svg>" + _legend()
    )


def _bar(x: float, width: float, top: float, bottom: float, color: str, kind: str) -> str:
    height = max(1.0, bottom - top)
    return f'<rect class="{kind}" x="{x:.1f}" y="{bottom - height:.1f}" width="{width:.1f}" height="{height:.1f}" fill="{color}"/>'


def _grid(plot_w: float, plot_h: float, count_max: float, dur_max: float) -> str:
    lines = []
    for step in range(5):
        frac = step / 4
        y = TOP + plot_h - plot_h * frac
        lines.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e7ec"/>')
        lines.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#667085">'
            f"{count_max * frac:,.4g}</text>"
        )
        lines.append(
            f'<text x="{LEFT + plot_w + 6}" y="{y + 4:.1f}" font-size="11" fill="{DURATION}">'
            f"{esc(_seconds(dur_max * frac))}</text>"
        )
    return "".join(lines)


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value < 120 else ago(value)


def _x_labels(buckets: Sequence[RunBucket], slot: float) -> str:
    if not buckets:
        return ""
    step = max(1, len(buckets) // 6)
    labels = []
    for i in range(0, len(buckets), step):
        x = LEFT + i * slot
        labels.append(
            f'<text x="{x:.1f}" y="{HEIGHT - 12}" font-size="11" fill="#667085">'
            f"{esc(buckets[i].start.strftime('%m-%d %H:%M'))}</text>"
        )
    return "".join(labels)


def _legend() -> str:
    items = [(CHANGED, "members changed"), (FAILED, "members failed"), (DURATION, "longest run (right axis)")]
    spans = "".join(f'<span><i class="swatch" style="background:{c}"></i>{esc(t)}</span>' for c, t in items)
    return f'<div class="legend">{spans}</div>'
