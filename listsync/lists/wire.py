"""Requests in flight for one audience: up to `sync.max_in_flight` list requests on the wire at
once, each written to the ledger before it is handed to a worker thread and recorded, with its
members' new state, by the calling thread once it is answered (so the database is used by one
thread, and the next batch is planned while earlier ones are on the wire).

The stop rules hold with requests in flight: a refused key or an unreachable Iterable stops the
run, a deleted list marks the audience missing, a lost lease leaves the audience; in each case
nothing new is sent, and the requests already on the wire are waited for and recorded first.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

from sqlalchemy.orm import Session

from listsync import engine
from listsync.config import AudienceSettings
from listsync.context import Progress, RunReport, SyncContext
from listsync.db import audiences, ledger
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.domain import Direction
from listsync.engine import stop_refused, stop_unreachable, unreachable
from listsync.errors import AuthError, IterableError, ListNotFoundError, PermanentError, RetryableError
from listsync.iterable.payloads import BulkResult
from listsync.lists import planner, record
from listsync.lists.remote import list_still_exists, mark_missing

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Flight:
    request_id: int
    batch: planner.Batch
    answer: Future[BulkResult]


class Wire:
    """The requests of one audience on the wire. `send` returns False once the audience must
    stop for this run; `drain` waits for and records everything still in flight, then raises
    StopRun if a fatal answer came back meanwhile."""

    def __init__(
        self,
        ctx: SyncContext,
        audience: m.Audience,
        list_id: int,
        audience_settings: AudienceSettings,
        report: RunReport,
        progress: Progress | None,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.ctx, self.audience, self.list_id = ctx, audience, list_id
        self.settings, self.report, self.progress, self.pool = audience_settings, report, progress, pool
        self.limit = ctx.settings.sync.max_in_flight
        self.flights: list[_Flight] = []
        self.queue: deque[planner.Batch] = deque()
        self.halted = False
        self.fatal: Callable[[], NoReturn] | None = None
        self.crash: BaseException | None = None
        self.missing = False

    def send(self, batch: planner.Batch) -> bool:
        self.queue.append(batch)
        self._pump()
        return not self.halted

    def drain(self) -> bool:
        while self.flights or (self.queue and not self.halted):
            self._pump()
            self._land(block=True)
        if self.crash is not None:
            raise self.crash
        if self.fatal is not None:
            self.fatal()
        return not self.halted

    def abandon(self) -> None:
        """Send nothing more; record what is already on the wire (the run is failing anyway)."""
        self.halted = True
        while self.flights:
            self._land(block=True)

    def _pump(self) -> None:
        """Launch queued batches while there is room, as many at once as there is room for;
        wait for an answer when there is none."""
        while self.queue and not self.halted:
            room = self.limit - len(self.flights)
            if room <= 0:
                self._land(block=True)
                continue
            batches = [self.queue[i] for i in range(min(room, len(self.queue)))]
            if self.ctx.should_stop() or not self._launch(batches):
                self.halted = True
                return
            for _ in batches:
                self.queue.popleft()
        self._land(block=False)

    def _launch(self, batches: list[planner.Batch]) -> bool:
        """Renew the lease, write the requests to the ledger (one durable transaction: the one
        wait for the disk per group of requests) and hand them to workers; False, with nothing
        written or sent, when another replica holds the audience."""
        if self.ctx.client.is_dry_run:
            if not lease_renewed(self.ctx, self.audience):
                return False
            for batch in batches:
                call(self.ctx, self.list_id, batch, self.settings)
            self.report.requests += len(batches)
            return True
        with transaction(self.ctx.factory) as session:
            if not lease_renewed(self.ctx, self.audience, session):
                return False
            request_ids = [self._begin(session, batch) for batch in batches]
        for request_id, batch in zip(request_ids, batches, strict=True):
            self.report.requests += 1
            answer = self.pool.submit(call, self.ctx, self.list_id, batch, self.settings)
            self.flights.append(_Flight(request_id, batch, answer))
        return True

    def _begin(self, session: Session, batch: planner.Batch) -> int:
        return ledger.begin_request(
            session,
            run_id=self.report.run_id,
            audience_id=self.audience.id,
            endpoint=f"lists/{batch.direction.value}",
            member_ids=batch.member_ids,
            owner=self.ctx.owner,
            now=self.ctx.clock(),
        )

    def _land(self, *, block: bool) -> None:
        """Record every answered request (waiting for one first when `block`), in launch order."""
        if not self.flights:
            return
        if block:
            wait([f.answer for f in self.flights], return_when=FIRST_COMPLETED)
        for flight in [f for f in self.flights if f.answer.done()]:
            # Taken off the list only as it is recorded: should recording fail, the flights not yet
            # recorded stay listed for `abandon` to record.
            self.flights.remove(flight)
            self._record(flight)

    def _record(self, flight: _Flight) -> None:
        try:
            result = flight.answer.result()
        except IterableError as exc:
            self._failed(flight, exc)
        except BaseException as exc:  # a bug, not an answer: stop, record the rest, then raise it
            self.halted, self.crash = True, self.crash or exc
            return
        else:
            update_only = bool(self.settings.update_existing_users_only)
            answer = record.judge(flight.batch, result, update_only)
            record.record_success(self.ctx, flight.request_id, flight.batch, answer, self.report)
        if self.progress and not self.halted:
            self.progress(self.audience.audience_key, len(flight.batch.member_ids))

    def _failed(self, flight: _Flight, exc: IterableError) -> None:
        batch, request_id = flight.batch, flight.request_id

        def fail(*, retry: bool, keep_pending: bool) -> None:
            record.record_failure(
                self.ctx, request_id, batch, exc, self.report, retry=retry, keep_pending=keep_pending
            )

        if isinstance(exc, AuthError):
            fail(retry=False, keep_pending=True)
            self._stop(lambda: stop_refused(self.report, exc))
        elif isinstance(exc, ListNotFoundError):
            fail(retry=False, keep_pending=True)
            self._list_missing(exc)
        elif isinstance(exc, PermanentError):
            self._permanent(flight, exc, fail)
        elif isinstance(exc, RetryableError):
            fail(retry=True, keep_pending=True)
            if unreachable(exc):
                self._stop(lambda: stop_unreachable(self.report, exc))
        else:
            raise exc

    def _permanent(self, flight: _Flight, exc: PermanentError, fail: Callable[..., None]) -> None:
        if exc.code == "BatchTooLarge" and len(flight.batch.member_ids) > 1:
            fail(retry=False, keep_pending=True)
            self.queue.extendleft(reversed(halves(flight.batch)))
            return
        if not self.missing and not list_still_exists(self.ctx, self.list_id):
            # Iterable's wording for a deleted list is undocumented; asking is more reliable.
            fail(retry=False, keep_pending=True)
            self._list_missing(ListNotFoundError(str(exc), status=exc.status, code=exc.code))
            return
        fail(retry=False, keep_pending=self.missing)  # once the list is gone, nothing is the members' fault

    def _list_missing(self, exc: ListNotFoundError) -> None:
        self.halted = True
        if not self.missing:
            self.missing = True
            mark_missing(self.ctx, self.audience, self.report, exc)

    def _stop(self, stop: Callable[[], NoReturn]) -> None:
        self.halted = True
        if self.fatal is None:
            self.fatal = stop


def halves(batch: planner.Batch) -> list[planner.Batch]:
    middle = len(batch.member_ids) // 2
    return [
        planner.Batch(batch.direction, batch.member_ids[:middle], batch.subscribers[:middle]),
        planner.Batch(batch.direction, batch.member_ids[middle:], batch.subscribers[middle:]),
    ]


def lease_renewed(ctx: SyncContext, audience: m.Audience, session: Session | None = None) -> bool:
    """Extend this replica's lease before each request (in `session`, else in a transaction of
    its own); False when another replica has taken the audience over (our lease lapsed, e.g.
    during long retries): then we must not send for it."""
    until = ctx.clock() + timedelta(seconds=ctx.settings.sync.lease_seconds)
    if session is None:
        with transaction(ctx.factory) as own:
            ours = audiences.renew_lease(own, audience.id, ctx.owner, until)
    else:
        ours = audiences.renew_lease(session, audience.id, ctx.owner, until)
    return engine.still_ours(ours, f"audience {audience.audience_key!r}", audience=audience.audience_key)


def call(
    ctx: SyncContext, list_id: int, batch: planner.Batch, audience_settings: AudienceSettings
) -> BulkResult:
    if batch.direction is Direction.SUBSCRIBE:
        return ctx.client.subscribe(
            list_id,
            batch.subscribers,
            update_existing_users_only=audience_settings.update_existing_users_only,
        )
    return ctx.client.unsubscribe(
        list_id,
        batch.subscribers,
        campaign_id=audience_settings.campaign_id or None,
        channel_unsubscribe=audience_settings.channel_unsubscribe,
    )
