"""The polled sources as the CLI and the daemon run them: `listsync ingest FILE`, and one job per
configured source (drop folder, SQL query)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from listsync.config import Settings
from listsync.domain import utcnow
from listsync.ingest.accept import IngestCounts
from listsync.ingest.files import open_ndjson, poll_folder, stream_reader
from listsync.ingest.sql_source import poll_sql

logger = logging.getLogger(__name__)

NowFn = Callable[[], datetime]


@contextmanager
def path_reader(factory: sessionmaker[Session], path: str) -> Iterator[Callable[[], IngestCounts]]:
    """`listsync ingest FILE`: NDJSON from a file, a .gz file, or stdin for `-`. The reading starts
    here (see `files.stream_reader`); the function yielded stores it all and returns the counts."""
    source = "stdin" if path == "-" else f"file:{Path(path).name}"
    with open_ndjson(path) as handle, stream_reader(factory, handle, source=source, now_fn=utcnow) as store:
        yield store


def poll_configured_sources(factory: sessionmaker[Session], settings: Settings) -> None:
    """One poll of every configured source (what `listsync sync` does before sending)."""
    for name, _interval, job in scheduled_jobs(factory, settings):
        logger.info("polling source %s", name, extra={"event": "source_poll", "source": name})
        job()


def scheduled_jobs(
    factory: sessionmaker[Session], settings: Settings
) -> list[tuple[str, float, Callable[[], Any]]]:
    """(name, interval in seconds, job) for each configured polled source."""
    jobs: list[tuple[str, float, Callable[[], Any]]] = []
    files = settings.sources.files
    if files.path:
        folder = Path(files.path)
        jobs.append(("files", files.interval_seconds, lambda: poll_folder(factory, folder, utcnow)))
    sql = settings.sources.sql
    if sql.url.get_secret_value() and sql.query:
        url = sql.url.get_secret_value()
        jobs.append(
            ("sql", sql.interval_seconds, lambda: poll_sql(factory, url, sql.query, settings, utcnow))
        )
    return jobs
