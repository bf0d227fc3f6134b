"""Group commit: concurrent requests' inbox writes share one durable commit.

A commit is durable only once the database has flushed it (SQLite synchronous=FULL, PostgreSQL's
WAL flush), and that flush, not the insert, bounds a receiver that commits once per request. Here
one writer thread takes every job waiting, runs each in its own savepoint of one transaction and
commits once; each caller is answered only after that commit returned, so "200 after the events
are durable" holds for every request of the group.

Isolation: a job that raises is rolled back to its savepoint and its caller gets the exception;
the others' work commits. Should the commit itself fail (or the transaction be unusable), nothing
of the group is stored and each job is run again alone, so one request's failure never becomes
another's.

A job may also bring a `shared` form of its work, run without a savepoint (savepoints cost more
than a request's insert): should any shared form raise, the whole group is rolled back and every
job runs again alone, its plain work in its own transaction. The receiver's shared form skips
the savepoints of its own refusal handling too (`accept.store_checked(isolate=False)`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from listsync.db.session import transaction

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Events per commit: a group stops growing past this, so one commit stays a bounded transaction.
MAX_GROUP_EVENTS = 10_000
# The writer thread ends after this long without work (a new job starts it again).
IDLE_SECONDS = 2.0


@dataclass
class _Job:
    work: Callable[[Session], Any]
    weight: int
    shared: Callable[[Session], Any] | None = None
    future: Future[Any] = field(default_factory=Future)


class GroupCommitter:
    """Runs `work(session)` callables in shared transactions, one writer thread at a time."""

    def __init__(self, factory: sessionmaker[Session], *, max_group_events: int = MAX_GROUP_EVENTS) -> None:
        self._factory = factory
        self._max_events = max_group_events
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def run(
        self, work: Callable[[Session], T], *, weight: int = 1, shared: Callable[[Session], T] | None = None
    ) -> T:
        """`work(session)`'s result once the transaction it ran in has committed (or its error).

        `shared`: the same work without savepoints, for a group's shared transaction (see above)."""
        job = _Job(work, max(weight, 1), shared)
        self._jobs.put(job)
        self._ensure_writer()
        return job.future.result()  # type: ignore[no-any-return]

    def queued(self) -> int:
        """Jobs waiting for the writer (approximate, as any queue size read by another thread)."""
        return self._jobs.qsize()

    def _ensure_writer(self) -> None:
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write, name="listsync-group-commit", daemon=True)
                self._writer.start()

    def _write(self) -> None:
        while True:
            try:
                first = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    # A job put before this check is taken by this writer; one put after it starts a new one.
                    if self._jobs.empty():
                        self._writer = None
                        return
                continue
            self._commit(self._group(first))

    def _group(self, first: _Job) -> list[_Job]:
        group, events = [first], first.weight
        while events < self._max_events:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            group.append(job)
            events += job.weight
        return group

    def _commit(self, group: list[_Job]) -> None:
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        alone = len(group) == 1
        try:
            with transaction(self._factory) as session:
                for job in group:
                    if job.shared is not None and not alone:  # an error sends the group job by job
                        outcomes.append((job, job.shared(session), None))
                    else:
                        outcomes.append(_run_in_savepoint(session, job))
        except Exception as exc:
            if alone:
                group[0].future.set_exception(exc)
                return
            logger.info(
                "a group commit of %d requests failed; committing them one by one",
                len(group),
                extra={"event": "receiver_group_commit_split"},
            )
            for job in group:
                self._commit([job])
            return
        except BaseException as exc:  # the writer is going down: no request may wait forever
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            raise
        for job, result, error in outcomes:
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)


def _run_in_savepoint(session: Session, job: _Job) -> tuple[_Job, Any, BaseException | None]:
    try:
        with session.begin_nested():
            return job, job.work(session), None
    except Exception as exc:
        return job, None, exc
