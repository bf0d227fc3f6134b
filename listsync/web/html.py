"""HTML building blocks of the status page: escaping, tables, the page frame.

Plain string building rather than a template engine: the page is a handful of tables, and every
value passes through `esc` (or is a number we formatted), so no template language is needed to
keep it safe. The style sheet and the refresh script are inline: nothing is fetched from anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from urllib.parse import urlencode

PREFIX = "/status"

STYLE = """
:root { --fg:#1d2330; --muted:#667085; --line:#e4e7ec; --bg:#f8f9fb; --ok:#12805c; --bad:#c4320a;
        --warn:#b54708; --accent:#3559e0; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg);
       background:var(--bg); }
header { display:flex; align-items:baseline; gap:1.5rem; padding:.8rem 1.5rem; background:#fff;
         border-bottom:1px solid var(--line); }
header h1 { font-size:1.1rem; margin:0; }
header nav a { margin-right:1rem; }
header .updated { margin-left:auto; color:var(--muted); font-size:.85rem; }
main { padding:1rem 1.5rem 3rem; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:1rem 1.2rem;
          margin-bottom:1.2rem; overflow-x:auto; }
h2 { font-size:1rem; margin:0 0 .7rem; }
h3 { font-size:.9rem; margin:.8rem 0 .4rem; }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:.35rem .6rem; border-bottom:1px solid var(--line); vertical-align:top; }
th { font-weight:600; color:var(--muted); font-size:.8rem; text-transform:uppercase; letter-spacing:.02em; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
.muted { color:var(--muted); }
.badge { display:inline-block; padding:0 .45rem; border-radius:999px; font-size:.8rem; background:#eef1f6; }
.badge.ok, .badge.ready, .badge.delivered, .badge.synced { background:#e3f5ec; color:var(--ok); }
.badge.failed, .badge.missing, .badge.held { background:#fdece6; color:var(--bad); }
.badge.pending, .badge.partial, .badge.running, .badge.in_flight { background:#fef4e6; color:var(--warn); }
.hold { color:var(--bad); margin-top:.2rem; font-size:.85rem; }
code { font:12px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; background:#f2f4f7; padding:0 .25rem;
       border-radius:3px; word-break:break-all; }
.pager { margin-top:.6rem; }
.windows a { margin-right:.6rem; } .windows a.on { font-weight:700; color:var(--fg); }
.legend span { margin-right:1rem; font-size:.85rem; }
.swatch { display:inline-block; width:.8rem; height:.8rem; border-radius:2px; vertical-align:middle;
          margin-right:.3rem; }
form.login { max-width:22rem; margin:4rem auto; }
form.login input { width:100%; padding:.5rem; margin:.4rem 0 .8rem; font-size:1rem; }
form.login button { padding:.45rem 1rem; font-size:1rem; }
.error { color:var(--bad); }
time, .nowrap { white-space:nowrap; }
"""

# Reloads the <main> of the page in place, so the scroll position and the chosen window survive;
# without JavaScript the <noscript> meta refresh reloads the whole page instead.
REFRESH_SCRIPT = """
(function () {
  var seconds = %d;
  function refresh() {
    var url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    fetch(url, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (r) { if (r.status === 401 || r.redirected) { window.location.reload(); } return r.text(); })
      .then(function (html) {
        var main = document.querySelector("main");
        if (html && main) { main.innerHTML = html; }
        var stamp = document.getElementById("updated");
        var fresh = main && main.querySelector("[data-updated]");
        if (stamp && fresh) { stamp.textContent = "updated " + fresh.getAttribute("data-updated"); }
      })
      .catch(function () {})
      .then(function () { window.setTimeout(refresh, seconds * 1000); });
  }
  window.setTimeout(refresh, seconds * 1000);
})();
"""


def esc(value: object) -> str:
    return "" if value is None else escape(str(value), quote=True)


def when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def stamp(value: datetime | None) -> str:
    """A UTC time as an HTML <time> that does not wrap in a narrow column."""
    if value is None:
        return ""
    return f'<time datetime="{esc(value.isoformat())}">{esc(when(value))}</time>'


def ago(seconds: float | None) -> str:
    """A duration as people read it: 42 s, 7 min, 3 h 5 min, 2 d 4 h."""
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def number(value: int | float | None) -> str:
    if value is None:
        return ""
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


def badge(state: str) -> str:
    return f'<span class="badge {esc(state)}">{esc(state)}</span>'


def link(path: str, text: str, **params: object) -> str:
    return f'<a href="{esc(url(path, **params))}">{esc(text)}</a>'


def url(path: str, **params: object) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None and v != ""})
    return f"{PREFIX}{path}" + (f"?{query}" if query else "")


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: Iterable[int] = (), empty: str
) -> str:
    """A table whose cells are already HTML; `numeric` columns are right-aligned."""
    right = set(numeric)

    def cls(i: int) -> str:
        return ' class="num"' if i in right else ""

    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="muted">{esc(empty)}</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title: str, body: str, *, section_id: str) -> str:
    return f'<section id="{esc(section_id)}"><h2>{esc(title)}</h2>{body}</section>'


def document(title: str, main: str, *, refresh_seconds: float | None, updated: str) -> str:
    """The whole page: header, navigation, <main>, and the refresh script when it refreshes."""
    refresh = ""
    if refresh_seconds:
        seconds = max(1, int(refresh_seconds))
        refresh = (
            f'<noscript><meta http-equiv="refresh" content="{seconds}"></noscript>'
            f"<script>{REFRESH_SCRIPT % seconds}</script>"
        )
    nav = " ".join([link("/", "Overview"), link("/runs", "Runs"), link("/rejected", "Rejected events")])
    logout = f'<form method="post" action="{PREFIX}/logout" style="margin:0"><button>Log out</button></form>'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · listsync</title><style>{STYLE}</style>{refresh}</head><body>"
        f"<header><h1>listsync status</h1><nav>{nav}</nav>"
        f'<span class="updated" id="updated">updated {esc(updated)}</span>{logout}</header>'
        f"<main>{main}</main></body></html>"
    )
