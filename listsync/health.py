"""`GET /health/live` (liveness) and `GET /health` (readiness, with what is degraded and why).

Liveness only says the process answers: restarting listsync cures none of the states below, so a
container's HEALTHCHECK or a liveness probe should use /health/live.

Readiness checks, in order of severity:

* database_unreachable (503): no query answers.
* database_unwritable (503): a real, committed write fails (disk full, read-only file), or the
  SQLite file was deleted under the running process. Events cannot be stored: not ready.
* api_key_refused / iterable_unreachable (200): the last run ended on that. Events are still
  stored durably, so the receiver stays in rotation; the body says what is wrong.
* sync_lag (200): accepted work waited longer than [health] max_sync_lag_seconds.

`status` is "ok" or the name of the most severe state; `degraded` lists every state and `reasons`
explains each. The state is read from the database, so every replica gives the same answer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from listsync.config import Settings
from listsync.db import health_queries, leases
from listsync.db.session import transaction
from listsync.domain import utcnow

logger = logging.getLogger(__name__)

PROBE_LEASE = "health-probe"
# Words of the run summaries that engine.stop_refused and stop_unreachable write for these two fatal states.
_FATAL_STATES = {
    "api_key_refused": "API key was refused",
    "iterable_unreachable": "could not reach Iterable",
}


@dataclass
class Health:
    degraded: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    ready: bool = True

    def add(self, state: str, reason: str, *, ready: bool = True) -> None:
        self.degraded.append(state)
        self.reasons[state] = reason
        self.ready = self.ready and ready

    @property
    def status(self) -> str:
        return self.degraded[0] if self.degraded else "ok"

    def body(self) -> dict[str, Any]:
        return {"status": self.status, "degraded": self.degraded, "reasons": self.reasons}


def check(factory: sessionmaker[Session], settings: Settings, now: datetime) -> Health:
    health = Health()
    if not _database_checks(factory, settings, now, health):
        return health
    with factory() as session:
        _last_run_checks(session, health)
        if not settings.iterable.dry_run and settings.health.max_sync_lag_seconds > 0:
            _lag_check(session, now, settings.health.max_sync_lag_seconds, health)
    return health


def _database_checks(factory: sessionmaker[Session], settings: Settings, now: datetime, health: Health) -> bool:
    try:
        with factory() as session:
            health_queries.ping(session)
    except SQLAlchemyError as exc:
        health.add("database_unreachable", f"the database does not answer: {_first_line(exc)}", ready=False)
        return False
    missing = _missing_sqlite_file(settings.database_url)
    if missing:
        health.add("database_unwritable", f"the SQLite file {missing} no longer exists", ready=False)
        return False
    try:
        with transaction(factory) as session:
            leases.try_lease(session, PROBE_LEASE, PROBE_LEASE, now, timedelta(seconds=1))
    except SQLAlchemyError as exc:
        health.add("database_unwritable", f"a write to the database failed: {_first_line(exc)}", ready=False)
        return False
    return True


def _missing_sqlite_file(database_url: str) -> str | None:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    path = os.path.abspath(url.database)
    return None if os.path.exists(path) else path


def _last_run_checks(session: Session, health: Health) -> None:
    run = health_queries.last_finished_run(session)
    if run is None or run.status != "failed":
        return
    for state, words in _FATAL_STATES.items():
        if words in (run.summary or ""):
            fatal = _fatal_part(run.summary, words)
            health.add(state, f"run {run.id} at {run.finished_at:%Y-%m-%d %H:%M:%S} UTC: {fatal}")


def _fatal_part(summary: str, words: str) -> str:
    """The fatal message ends a run summary; it starts with the part that holds `words`."""
    parts = summary.split("; ")
    first = next(i for i, part in enumerate(parts) if words in part)
    return "; ".join(parts[first:])


def _lag_check(session: Session, now: datetime, limit: float, health: Health) -> None:
    oldest = health_queries.oldest_waiting_work(session)
    if oldest is None:
        return
    lag = (now - oldest).total_seconds()
    if lag > limit:
        health.add(
            "sync_lag",
            f"accepted work has waited {lag:.0f} s, more than [health] max_sync_lag_seconds = {limit:g}",
        )


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    text_ = str(cause).strip()
    return f"{type(cause).__name__}: {text_.splitlines()[0] if text_ else ''}"


def routes(settings: Settings, factory: sessionmaker[Session]) -> list[Route]:
    async def live(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(_request: Request) -> Response:
        health = await run_in_threadpool(check, factory, settings, utcnow())
        if health.degraded:
            # Not ready is news; the other states were logged by the run that met them.
            logger.log(
                logging.DEBUG if health.ready else logging.WARNING,
                "health: %s",
                "; ".join(health.reasons.values()),
                extra={"event": "health_degraded", **health.body()},
            )
        return JSONResponse(health.body(), status_code=200 if health.ready else 503)

    return [Route("/health/live", live, methods=["GET"]), Route("/health", ready, methods=["GET"])]
