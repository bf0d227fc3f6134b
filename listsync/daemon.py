"""`listsync daemon`: the receiver, the pollers and periodic list syncs in one process.

APScheduler 3 runs the periodic jobs from an in-memory job store (never a shared one: 3.x cannot
coordinate several schedulers). Each job runs at most once at a time and missed ticks coalesce.
SIGTERM/SIGINT stop the receiver first, let the batch in flight finish and be recorded, then exit 0.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, timedelta
from typing import IO, TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import make_url

from listsync import context, sync
from listsync.config import Settings
from listsync.db import leases
from listsync.db import session as dbs
from listsync.db.session import transaction
from listsync.domain import utcnow
from listsync.errors import ConfigError, ListsyncError
from listsync.iterable.client import client_from_settings

if TYPE_CHECKING:
    from listsync.ingest.receiver import ReceiverServer
    from listsync.web import StatusPage

logger = logging.getLogger(__name__)


@contextmanager
def single_daemon(database_url: str) -> Iterator[None]:
    """On SQLite, refuse a second daemon on the same file: it cannot share the work safely.
    An OS file lock is released by the kernel even after kill -9, so it never goes stale."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        yield
        return
    lock_path = f"{os.path.abspath(url.database)}.daemon.lock"
    handle: IO[str] = open(lock_path, "a+")  # noqa: SIM115 - held for the daemon's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ListsyncError(
            f"another listsync daemon is already running on {url.database}; SQLite supports one daemon per "
            "database file (use PostgreSQL for several replicas)"
        ) from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _guarded(name: str, job: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        try:
            job()
        except Exception:
            logger.exception(
                "%s failed; it will run again at the next tick",
                name,
                extra={"event": "job_failed", "job": name},
            )

    return run


def _schedule(scheduler: BackgroundScheduler, name: str, seconds: float, job: Callable[[], Any]) -> None:
    scheduler.add_job(
        _guarded(name, job),
        "interval",
        seconds=seconds,
        id=name,
        name=name,
        next_run_time=utcnow(),
        coalesce=True,
        max_instances=1,
        misfire_grace_time=max(1, int(seconds)),
    )


_RUN_LOCK = threading.Lock()


def _run_serialized(ctx: context.SyncContext, options: context.RunOptions) -> None:
    """The sync and reconcile jobs share this process's owner name, so leases cannot keep them
    apart: one run at a time per process (replicas still run side by side)."""
    with _RUN_LOCK:
        sync.run_once(ctx, options)


def _one_replica(ctx: context.SyncContext, name: str, seconds: float, job: Callable[[], Any]) -> Callable[[], None]:
    """Run a periodic job only on the replica holding its lease (a database row, not APScheduler's
    job store, which 3.x cannot share). The lease outlives a tick, so a dead holder is replaced
    after at most a few intervals."""
    ttl = timedelta(seconds=max(30.0, 3 * seconds))

    def run_if_leader() -> None:
        with transaction(ctx.factory) as session:
            leader = leases.try_lease(session, f"job:{name}", ctx.owner, ctx.clock(), ttl)
        if leader:
            job()

    return run_if_leader


def run(settings: Settings) -> int:
    stopping = threading.Event()
    _install_signal_handlers(stopping)
    dbs.upgrade(settings.database_url)
    with single_daemon(settings.database_url):
        engine = dbs.make_engine(settings.database_url)
        factory = dbs.session_factory(engine)
        with client_from_settings(settings.iterable, keep_alive=settings.sync.max_in_flight) as client:
            ctx = context.SyncContext(
                settings=settings, factory=factory, client=client, should_stop=stopping.is_set
            )
            _serve(settings, ctx, stopping)
        engine.dispose()
    logger.info("listsync daemon stopped", extra={"event": "daemon_stopped"})
    return 0


def _serve(settings: Settings, ctx: context.SyncContext, stopping: threading.Event) -> None:
    from listsync import web
    from listsync.ingest import sources

    if ctx.client.is_dry_run:
        logger.warning(
            "no iterable.api_key configured: dry run, requests are logged and nothing is sent",
            extra={"event": "dry_run"},
        )
    scheduler = BackgroundScheduler(timezone=UTC)
    _schedule(
        scheduler,
        "sync",
        settings.sync.interval_seconds,
        lambda: _run_serialized(ctx, context.RunOptions(trigger="daemon")),
    )
    for name, seconds, job in sources.scheduled_jobs(ctx.factory, settings):
        _schedule(scheduler, name, seconds, _one_replica(ctx, name, seconds, job))
    if settings.sync.reconcile_interval_seconds > 0:
        _schedule(
            scheduler,
            "reconcile",
            settings.sync.reconcile_interval_seconds,
            lambda: _run_serialized(ctx, context.RunOptions(trigger="reconcile", reconcile=True)),
        )
    prune_every = settings.retention.prune_interval_seconds
    _schedule(scheduler, "prune", prune_every, _one_replica(ctx, "prune", prune_every, lambda: _prune(ctx)))
    page = web.status_page(settings)
    server = _receiver_server(settings, ctx, page) if settings.receiver.enabled else None
    if server:
        _start_listening(server, "receiver", settings.receiver.host, settings.receiver.port)
    page_server = _status_page_server(settings, page)
    if page_server:
        _start_listening(page_server, "status_page", settings.status_page.host, settings.status_page.port)
    scheduler.start()
    logger.info(
        "listsync daemon running",
        extra={"event": "daemon_started", "receiver_port": server.port if server else None},
    )
    stopping.wait()
    logger.info("stopping: finishing the batch in flight", extra={"event": "daemon_stopping"})
    if server:
        server.stop()
    if page_server:
        page_server.stop()
    if page:
        page.close()
    scheduler.shutdown(wait=True)


def _receiver_server(settings: Settings, ctx: context.SyncContext, page: StatusPage | None) -> ReceiverServer:
    from listsync.ingest import receiver

    app = receiver.build_app(settings, ctx.factory)
    if page and page.on_receiver:
        app = page.over(app)
    return receiver.ReceiverServer(app, host=settings.receiver.host, port=settings.receiver.port)


def _status_page_server(settings: Settings, page: StatusPage | None) -> ReceiverServer | None:
    """The status page on its own port, unless it is off or served by the receiver."""
    from listsync.ingest import receiver

    if page is None or page.on_receiver:
        return None
    host, port = settings.status_page.host, settings.status_page.port
    return receiver.ReceiverServer(page.app, host=host, port=port, name="status_page")


def _prune(ctx: context.SyncContext) -> None:
    from listsync.db import retention

    retention.prune(
        ctx.factory, ctx.settings.retention, ctx.clock(), actions_enabled=ctx.settings.actions.enabled
    )


def _start_listening(server: Any, section: str, host: str, port: int) -> None:
    """A port in use or a host that cannot be bound is a configuration problem: one line, exit 2."""
    try:
        server.start()
    except OSError as exc:
        raise ConfigError(
            f"the {section.replace('_', ' ')} cannot listen on {host}:{port} ({section}.host, {section}.port): "
            f"{exc.strerror or exc}"
        ) from None


def _install_signal_handlers(stopping: threading.Event) -> None:
    def handle(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
