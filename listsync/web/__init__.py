"""The read-only status page the daemon serves: audiences, runs, failures in a browser.

html.py (escaping, tables, the frame), chart.py (the run chart as SVG), pages.py (rows -> HTML),
app.py (routes and authentication). Its queries are in listsync.db.dashboard. Off unless
`[status_page] enabled`; on its own port, or at /status on the receiver's server.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Mount

from listsync.config import Settings
from listsync.db import session as dbs
from listsync.web import app


class StatusPage:
    """The status page's ASGI app over its own read-only engine; `close()` disposes of it."""

    def __init__(self, settings: Settings) -> None:
        self._engine = dbs.make_engine(settings.database_url, read_only=True)
        self._factory = dbs.session_factory(self._engine)
        self._settings = settings.status_page
        self.app = app.build_app(self._settings, self._factory)

    @property
    def on_receiver(self) -> bool:
        return self._settings.on_receiver

    def over(self, receiver_app: Starlette) -> Starlette:
        """The receiver's app with the status page at /status in front of it."""
        return Starlette(routes=[app.mount(self._settings, self._factory), Mount("/", app=receiver_app)])

    def close(self) -> None:
        self._engine.dispose()


def status_page(settings: Settings) -> StatusPage | None:
    return StatusPage(settings) if settings.status_page.enabled else None
