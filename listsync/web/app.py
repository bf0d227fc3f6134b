"""The status page as a Starlette app under /status: routes, authentication, and loading each page's
rows from listsync.db.dashboard in a worker thread.

Decisions:

* Every page is behind the admin token, not only the ones with personal data: the audience keys
  and counts are business data too, and one rule is easier to get right. `Authorization: Bearer
  <token>` works for scripts; browsers log in with a form that sets an HttpOnly, SameSite=Strict
  cookie holding an HMAC of the token (never the token itself), so the cookie is worthless once
  the token changes. Tokens are compared with `hmac.compare_digest`.
* A browser without credentials is redirected to the login form; any other client gets 401. The
  token and the login form's body are never logged (uvicorn's access log is off as well).
* Read-only: the app gets a session factory over a read-only engine and only runs SELECTs.
* `?partial=1` answers only the inner HTML of <main>; the page's script polls it to refresh in
  place. The script is allowed by its hash in the Content-Security-Policy, nothing else runs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from urllib.parse import parse_qs

from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from listsync.config import StatusPageSettings
from listsync.db import dashboard as q
from listsync.domain import utcnow
from listsync.web import html, pages

logger = logging.getLogger(__name__)

COOKIE = "listsync_status"
_SESSION_LABEL = b"listsync status page session v1"
_MAX_FORM_BYTES = 4096
Clock = Callable[[], datetime]
Handler = Callable[[Request], Awaitable[Response]]


def build_app(
    settings: StatusPageSettings, factory: sessionmaker[Session], *, clock: Clock | None = None
) -> Starlette:
    """The status page on its own: everything under /status, and / redirects there."""
    return Starlette(routes=[mount(settings, factory, clock=clock), Route("/", _to_status, methods=["GET"])])


def mount(
    settings: StatusPageSettings, factory: sessionmaker[Session], *, clock: Clock | None = None
) -> Mount:
    """The status page's routes under /status, to add to another app (the receiver's)."""
    site = _Site(settings, factory, clock or utcnow)
    routes = [
        Route("/", site.guard(site.overview), methods=["GET"]),
        Route("/audience", site.guard(site.audience), methods=["GET"]),
        Route("/runs", site.guard(site.runs), methods=["GET"]),
        Route("/rejected", site.guard(site.rejected), methods=["GET"]),
        Route("/login", site.login_form, methods=["GET"]),
        Route("/login", site.login, methods=["POST"]),
        Route("/logout", site.logout, methods=["POST"]),
    ]
    return Mount(html.PREFIX, routes=routes)


async def _to_status(_request: Request) -> Response:
    return RedirectResponse(f"{html.PREFIX}/", status_code=303)


class _Site:
    """The handlers, closed over the token, the session factory and the clock."""

    def __init__(self, settings: StatusPageSettings, factory: sessionmaker[Session], clock: Clock) -> None:
        self._token = settings.admin_token.get_secret_value().encode("utf-8")
        self._session_value = hmac.new(self._token, _SESSION_LABEL, hashlib.sha256).hexdigest()
        self._refresh = settings.refresh_seconds
        self._factory = factory
        self._clock = clock
        script = html.REFRESH_SCRIPT % max(1, int(self._refresh))
        digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
        self._csp = (
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
            f"script-src 'sha256-{digest}'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        )

    # --- authentication -----------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given.strip():
            return hmac.compare_digest(given.strip().encode("utf-8"), self._token)
        cookie = request.cookies.get(COOKIE, "")
        return bool(cookie) and hmac.compare_digest(
            cookie.encode("utf-8"), self._session_value.encode("ascii")
        )

    def guard(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if self._authorized(request):
                return self._secure(await handler(request))
            if "authorization" not in request.headers and "text/html" in request.headers.get("accept", ""):
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(html.url("/login", next=target), status_code=303)
            logger.info(
                "status page refused a request without a valid token",
                extra={"event": "status_page_unauthorized", "path": request.url.path},
            )
            return Response(
                "authentication required\n",
                status_code=401,
                media_type="text/plain",
                headers={"WWW-Authenticate": 'Bearer realm="listsync status"'},
            )

        return guarded

    def _secure(self, response: Response) -> Response:
        response.headers.update(
            {
                "Content-Security-Policy": self._csp,
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY",
            }
        )
        return response

    async def login_form(self, request: Request) -> Response:
        return self._secure(HTMLResponse(_login_page(_safe_next(request.query_params.get("next")), error="")))

    async def login(self, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_FORM_BYTES:
                return Response("form too large\n", status_code=413)
        form = parse_qs(body.decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0].strip().encode("utf-8")
        target = _safe_next((form.get("next") or [""])[0])
        if not given or not hmac.compare_digest(given, self._token):
            logger.info("status page login refused", extra={"event": "status_page_login_refused"})
            page = _login_page(target, error="That token is not the status page's admin token.")
            return self._secure(HTMLResponse(page, status_code=401))
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, self._session_value, httponly=True, samesite="strict", path=html.PREFIX)
        return response

    async def logout(self, _request: Request) -> Response:
        response = RedirectResponse(html.url("/login"), status_code=303)
        response.delete_cookie(COOKIE, path=html.PREFIX)
        return response

    # --- pages --------------------------------------------------------------------------------

    def _answer(self, request: Request, title: str, main: str, now: datetime) -> Response:
        if request.query_params.get("partial") == "1":
            return HTMLResponse(main)
        return HTMLResponse(
            html.document(title, main, refresh_seconds=self._refresh, updated=f"{html.when(now)} UTC")
        )

    async def overview(self, request: Request) -> Response:
        window = _window(request)
        after = request.query_params.get("after") or None
        data = await run_in_threadpool(self._load_overview, window, after)
        return self._answer(request, "Overview", pages.overview(data), data.now)

    def _load_overview(self, window: str, after: str | None) -> pages.Overview:
        now = self._clock()
        since = now - timedelta(seconds=pages.WINDOWS[window])
        with self._factory() as session:
            return pages.Overview(
                now=now,
                window=window,
                audiences=q.audiences_page(session, after=after),
                after=after,
                buckets=q.run_buckets(session, since=since, until=now),
                runs=q.runs_page(session, since=since, limit=10),
                rejected=q.rejected_groups(session, since=since, samples=0),
                deliveries=q.deliveries_by_action_state(session),
            )

    async def audience(self, request: Request) -> Response:
        key = request.query_params.get("key", "")
        requests_before = _int(request, "requests_before")
        failed_after = _int(request, "failed_after")
        data = await run_in_threadpool(self._load_audience, key, requests_before, failed_after)
        if data is None:
            return self._answer(
                request,
                "Unknown audience",
                f'<section><p class="error">No audience {html.esc(key)!s}.</p></section>',
                self._clock(),
            )
        return self._answer(request, key, pages.audience_detail(data), data.now)

    def _load_audience(
        self, key: str, requests_before: int | None, failed_after: int | None
    ) -> pages.AudienceDetail | None:
        now = self._clock()
        with self._factory() as session:
            found = q.audience(session, key)
            if found is None:
                return None
            return pages.AudienceDetail(
                now=now,
                audience=found,
                requests=q.requests_page(session, found.id, before=requests_before),
                failed=q.failed_members_page(session, found.id, after=failed_after),
                requests_before=requests_before,
                failed_after=failed_after,
            )

    async def runs(self, request: Request) -> Response:
        window, before = _window(request), _int(request, "before")
        show_all = request.query_params.get("all") == "1"
        data = await run_in_threadpool(self._load_runs, window, before, show_all)
        return self._answer(request, "Runs", pages.runs(data), data.now)

    def _load_runs(self, window: str, before: int | None, show_all: bool) -> pages.Runs:
        now = self._clock()
        since = now - timedelta(seconds=pages.WINDOWS[window])
        with self._factory() as session:
            return pages.Runs(
                now=now,
                window=window,
                buckets=q.run_buckets(session, since=since, until=now),
                runs=q.runs_page(session, since=since, before=before, limit=50, active_only=not show_all),
                before=before,
                show_all=show_all,
            )

    async def rejected(self, request: Request) -> Response:
        window = _window(request)
        data = await run_in_threadpool(self._load_rejected, window)
        return self._answer(request, "Rejected events", pages.rejected(data), data.now)

    def _load_rejected(self, window: str) -> pages.Rejected:
        now = self._clock()
        with self._factory() as session:
            groups = q.rejected_groups(session, since=now - timedelta(seconds=pages.WINDOWS[window]))
        return pages.Rejected(now=now, window=window, groups=groups)


def _window(request: Request) -> str:
    chosen = request.query_params.get("window", pages.DEFAULT_WINDOW)
    return chosen if chosen in pages.WINDOWS else pages.DEFAULT_WINDOW


def _int(request: Request, name: str) -> int | None:
    try:
        return int(request.query_params[name])
    except (KeyError, ValueError):
        return None


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path of the status page only, never another site."""
    if target and target.startswith(f"{html.PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{html.PREFIX}/"


def _login_page(target: str, *, error: str) -> str:
    problem = f'<p class="error">{html.esc(error)}</p>' if error else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Log in · listsync status</title>'
        f"<style>{html.STYLE}</style></head><body>"
        f'<form class="login" method="post" action="{html.PREFIX}/login"><h1>listsync status</h1>{problem}'
        '<label for="token">Admin token</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>'
        f'<input type="hidden" name="next" value="{html.esc(target)}">'
        '<button type="submit">Log in</button></form></body></html>'
    )
