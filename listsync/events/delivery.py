"""Route -> send -> record for per-event actions (Iterable (Actions)): the inbox's events become
users/update, events/track, commerce calls, delivered once in effect and in order per user.

Routing (`events.route`) has written one `event_deliveries` row per (event, mapping); here
pending rows are sent in id order. A user's row waits while an earlier row of the
  same user is pending (waiting for a retry, or failed transiently in this pass), so one user's
  events reach Iterable in order. Outcomes are recorded after Iterable answers.

"Once in effect": a crash between the answer and the record, or a retry after an unanswered
request, sends the same body again. Events and purchases carry an id that Iterable updates rather
than duplicates; user updates and carts are idempotent. So nothing needs an in-flight ledger.

Errors: a refused key (401/403) stops delivery and keeps every row pending (`fatal`); transient
failures retry with capped exponential backoff ([sync] retry_*), up to [actions] max_attempts;
permanent refusals (invalid email, bad data) fail that row with Iterable's reason. Bulk answers
are read per item.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from listsync import context
from listsync.db import deliveries, leases
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.domain import PendingDelivery
from listsync.engine import StopRun, repeat_passes, still_ours, stop_refused
from listsync.errors import AuthError, IterableError, PermanentError
from listsync.events import actions
from listsync.events.bulk_calls import BulkCalls, Call, bulk_chunks, wire_body
from listsync.events.route import RouteCounts, Router
from listsync.iterable.payloads import BulkResult
from listsync.lists import identity
from listsync.lists.membership import retry_delay

logger = logging.getLogger(__name__)

PAGE_SIZE = 1000
# Bulk calls a key may have queued ahead of the wire while routing goes on (about 1 MB each).
MAX_QUEUED_CALLS = 20
MAX_PASSES = 50
LEASE_NAME = "event_deliveries"
# Routes one inbox batch in the given transaction; False once none is left.
Route = Callable[[Session], bool]
UPSERT_ENDPOINTS = frozenset({"users/update", "users/bulkUpdate"})
# Iterable answers these from updateEmail when the old address is not (or no longer) there, or
# when the new one already has a profile of its own (a list subscribe may have made it); the
# update that follows creates or finds the user, so they are not failures of the event.
_TOLERATED_UPDATE_EMAIL_CODES = frozenset({"UnknownEmailError", "UnknownUserIdError", "EmailAlreadyExists"})


@dataclass
class DeliveryReport:
    """What one `deliver_pending` did. `retrying`: rows still pending at the end."""

    routed: int = 0
    delivered: int = 0
    failed: int = 0
    skipped: int = 0
    retrying: int = 0
    requests: int = 0
    fatal: str | None = None


def deliver_pending(ctx: context.SyncContext, *, now_fn: Callable[[], datetime] | None = None) -> DeliveryReport:
    """Route new inbox events to their actions, then send what is due until nothing is."""
    clock = now_fn or ctx.clock
    report = DeliveryReport()
    settings = ctx.settings.actions
    if not settings.enabled:
        return report
    if not _take_lease(ctx, clock()):
        logger.info("another replica is delivering events", extra={"event": "delivery_lease_busy"})
        return report
    try:
        router = Router(ctx, settings.compiled(), clock)
        routed = RouteCounts()
        try:
            if ctx.client.is_dry_run:
                while router.route_batch(routed):
                    pass
                _log_dry_run(ctx)
                return report
            _send_all(ctx, report, clock, lambda session: router.route_in(session, routed))
        finally:
            report.routed, report.skipped, report.failed = routed.routed, routed.skipped, report.failed + routed.failed
        report.retrying = _count_pending(ctx)
    finally:
        _release_lease(ctx, clock())
    return report


def _send_all(
    ctx: context.SyncContext, report: DeliveryReport, clock: Callable[[], datetime], route: Route
) -> None:
    """Passes over the pending rows until one sends nothing or nothing is due. The first pass
    routes the inbox as it goes (`route`: one batch in the given transaction, False once none is left)."""

    def one_pass() -> bool:
        before = report.requests
        _Sender(ctx, report, clock, route).run()
        if report.requests == before or ctx.should_stop():
            return False
        with transaction(ctx.factory) as session:
            return deliveries.any_due(session, clock())

    repeat_passes(one_pass, max_passes=MAX_PASSES)


class _Sender:
    """One pass: pages of pending rows in id order, blocked users skipped, bulk rows batched."""

    def __init__(
        self,
        ctx: context.SyncContext,
        report: DeliveryReport,
        clock: Callable[[], datetime],
        route: Route,
    ) -> None:
        self.ctx = ctx
        self.route = route
        self.client = ctx.client
        self.project_type = ctx.settings.iterable.project_type
        self.report = report
        self.clock = clock
        self.blocked: set[str] = set()
        self.batches: dict[tuple[str, bool], list[PendingDelivery]] = defaultdict(list)  # (endpoint, updateOnly)
        self.known_emails: dict[str, str] = {}
        self.outcomes: list[dict[str, Any]] = []
        self.delivered: list[int] = []
        self.renamed: set[int] = set()  # rows whose stored email changed before sending
        # Which users each bulk key holds, open or on the wire (per-user order across endpoints).
        self.open_users: dict[tuple[str, bool], set[str]] = defaultdict(set)
        self.calls = BulkCalls(self._bulk_call)  # queued or on the wire, per bulk key

    def run(self) -> None:
        """Per page, one transaction records the last page's outcomes, renews the lease, routes the
        next inbox batch and reads the next page of pending rows (one commit per page); the page is
        then sent while routing goes on: its bulk calls wait for their rate limit in the pool.
        Rows routed later have higher ids, so pages stay in id order."""
        after = 0
        routing = True
        try:
            while not self.ctx.should_stop():
                self._settle_answered()
                rows: list[PendingDelivery] = []
                with transaction(self.ctx.factory) as session:
                    ours = self._record_in(session)
                    if ours:
                        routing = routing and self.route(session)
                        rows = deliveries.pending_page(session, after, PAGE_SIZE)
                        # What this pass delivered or moved is newer than the rows recorded so far.
                        self.known_emails = {**deliveries.delivered_emails(session, rows), **self.known_emails}
                self.outcomes, self.delivered = [], []  # committed
                if not still_ours(ours, "event delivery"):
                    raise StopRun
                if not rows and routing:
                    continue  # that batch made nothing to send
                if not rows:
                    for key in list(self.batches):
                        self._flush(key)
                    return
                after = rows[-1].id
                self._page(rows)
        except BaseException:
            self.calls.halt()  # what is queued and not on the wire yet stays pending
            raise
        finally:
            self._settle_all()

    def _settle_all(self) -> None:
        """Record every call still on the wire, each on its own: one that raises (a refused key)
        does not leave the others' answers unread, and what is queued behind it is not sent.
        Each answer is recorded as it is read, with the lease renewed: once the lease is lost,
        nothing more goes out. The first error is raised after recording."""
        errors: list[BaseException] = []
        for key in self.calls.busy_keys():
            while self.calls.queued(key):
                try:
                    self._settle_next(key)
                    if not errors:
                        self._record()
                except BaseException as exc:
                    self.calls.halt()
                    errors.append(exc)
        self.calls.close()
        self._record()
        if errors:
            raise errors[0]

    def _page(self, rows: Sequence[PendingDelivery]) -> None:
        """Route a page's rows into open batches (kept open across pages, so bulk calls go full)
        and send single calls in order; a bulk batch is sent when full, or first when a user's
        single call must not overtake it."""
        now = self.clock()
        for row in rows:
            if row.user_key in self.blocked:
                continue
            if row.next_attempt_at is not None and row.next_attempt_at > now:
                self.blocked.add(row.user_key)  # its later rows wait behind it
                continue
            self._one(row)

    def _one(self, row: PendingDelivery) -> None:
        if row.endpoint in UPSERT_ENDPOINTS and not self._move_email(row):
            return
        if row.endpoint in actions.BULK_ENDPOINTS:
            key = (row.endpoint, row.body.get("updateOnly") is True)
            self._flush_user(row.user_key, keep=key)  # its earlier updateOnly/plain batch goes first
            if self.calls.holds(key, row.user_key):
                self._settle(key)  # its earlier call of this key is answered before it joins another
            if row.user_key in self.blocked:
                return
            self.batches[key].append(row)
            self.open_users[key].add(row.user_key)
            if len(self.batches[key]) >= PAGE_SIZE:
                self._flush(key)
            return
        self._flush_user(row.user_key)
        if row.user_key not in self.blocked:
            self._attempt([row], lambda: self._single(row))

    def _flush_user(self, user_key: str, keep: tuple[str, bool] | None = None) -> None:
        """Send the open batches holding this user and wait for their answers, so a later row of
        the user cannot overtake them. For a bulk row (`keep`: the key it joins) only the other
        batches of its own endpoint count: two profile updates of one user must land in order,
        while a user's profile update and event are independent in Iterable, as in Segment's
        destination, and keeping them apart keeps both endpoints' calls full."""

        def counts(key: tuple[str, bool]) -> bool:
            return keep is None or (key[0] == keep[0] and key != keep)

        for key in [k for k, users in self.open_users.items() if user_key in users and counts(k)]:
            self._flush(key)
        for key in [k for k in self.calls.busy_keys() if self.calls.holds(k, user_key) and counts(k)]:
            self._settle(key)

    def _single(self, row: PendingDelivery) -> None:
        call = {
            "users/update": self.client.update_user,
            "events/track": self.client.track_event,
            "commerce/trackPurchase": self.client.track_purchase,
            "commerce/updateCart": self.client.update_cart,
        }[row.endpoint]
        self.report.requests += 1
        call(wire_body(row.body))

    def _move_email(self, row: PendingDelivery) -> bool:
        """Change the profile's email before its update: for an explicit newEmail, or when a known
        userId arrives with another email than it was last delivered with. `identity.email_update`
        says how: users/updateEmail in email-based projects; elsewhere the update by userId carries
        the new email. False if the row failed or must wait."""
        explicit = row.body.get("newEmail")
        if explicit:
            change = identity.email_update(self.project_type, row.user_id, row.email)
        else:
            old = self.known_emails.get(row.user_id or "")
            if not row.user_id or not row.email or not old or old == row.email:
                return True
            change = identity.email_update(self.project_type, row.user_id, old)
        new_email = explicit or row.email or ""
        if change is not None and change.endpoint == identity.UPDATE_EMAIL:
            self._flush_user(row.user_key)
            if row.user_key in self.blocked:
                return False
            if not self._attempt([row], self._update_email(change, new_email), settle=False):
                return False
            if row.user_id:
                self.known_emails[row.user_id] = new_email
        if explicit:
            row.body, row.email = {**row.body, "email": new_email}, new_email
            self.renamed.add(row.id)
        return True

    def _update_email(self, change: identity.EmailUpdate, new_email: str) -> Callable[[], None]:
        def call() -> None:
            self.report.requests += 1
            try:
                self.client.update_email(
                    new_email=new_email, current_email=change.current_email, current_user_id=change.current_user_id
                )
            except PermanentError as exc:
                if exc.code not in _TOLERATED_UPDATE_EMAIL_CODES:
                    raise

        return call

    def _attempt(self, rows: Sequence[PendingDelivery], call: Callable[[], object], *, settle: bool = True) -> bool:
        """Run one request for `rows` and record what it means for them; True on success."""
        try:
            call()
        except AuthError as exc:
            stop_refused(self.report, exc, kept="events stay pending")
        except PermanentError as exc:
            for row in rows:
                self._fail(row, f"{type(exc).__name__}: {exc}")
            return False
        except IterableError as exc:  # RetryableError, and anything else Iterable-shaped: try later
            for row in rows:
                self._retry(row, f"{type(exc).__name__}: {exc}")
            return False
        if settle:
            for row in rows:
                self._delivered(row)
        return True

    def _flush(self, key: tuple[str, bool]) -> None:
        rows = self.batches.pop(key, [])
        self.open_users.pop(key, None)
        for index, chunk in enumerate(bulk_chunks(rows)):
            if index:
                self._settle(key)  # a user split across two calls: the first is answered first
            # A user blocked by an earlier chunk's failure keeps its later rows back (per-user order).
            ready = [row for row in chunk if row.user_key not in self.blocked]
            if ready:
                self._send_bulk(key, ready)

    def _send_bulk(self, key: tuple[str, bool], rows: Sequence[PendingDelivery]) -> None:
        """Queue one bulk call. Each (endpoint, updateOnly) sends its calls one after another from
        its own thread, so one key's calls are answered in order; different keys, each paced by
        its endpoint's rate limit, are on the wire side by side. Routing goes on meanwhile, up to
        MAX_QUEUED_CALLS calls ahead of the wire."""
        self.report.requests += 1
        self.calls.submit(key, rows, [wire_body(row.body) for row in rows])
        while self.calls.queued(key) > MAX_QUEUED_CALLS:
            self._settle_next(key)

    def _bulk_call(self, key: tuple[str, bool], items: list[dict[str, Any]]) -> BulkResult:
        endpoint, update_only = key
        if endpoint == "users/bulkUpdate":
            return self.client.bulk_update_users(items, update_only=update_only)
        return self.client.track_bulk(items)

    def _settle(self, key: tuple[str, bool]) -> None:
        """Wait for every call of the key and record what each means for its rows."""
        while self.calls.queued(key):
            self._settle_next(key)

    def _settle_answered(self) -> None:
        """Record the calls answered so far, without waiting, so their outcomes go out with the page."""
        for key in self.calls.busy_keys():
            while (call := self.calls.pop_done(key)) is not None:
                self._read(call)

    def _settle_next(self, key: tuple[str, bool]) -> None:
        call = self.calls.pop(key)
        if call is not None:
            self._read(call)

    def _read(self, call: Call) -> None:
        result: list[BulkResult | None] = []
        if not self._attempt(call.rows, lambda: result.append(call.future.result()), settle=False):
            return
        answer = result[0]
        if answer is None:
            self.blocked.update(call.users)  # never sent: pending still, nothing of theirs overtakes it
            return
        self._settle_bulk(call.rows, answer)

    def _settle_bulk(self, rows: Sequence[PendingDelivery], result: BulkResult) -> None:
        for row in rows:
            outcome = result.outcome(row.email, row.user_id)
            if outcome.value == "ok":
                self._delivered(row)
            else:
                self._fail(row, f"{outcome.value}: Iterable refused this item of the bulk request")

    # outcomes, written after each page

    def _delivered(self, row: PendingDelivery) -> None:
        if row.id in self.renamed:
            now = self.clock()
            self.outcomes.append(_outcome(row, m.DeliveryState.DELIVERED, row.attempts, None, None, now, now))
        else:
            self.delivered.append(row.id)  # the common outcome: recorded for all of them at once
        if row.user_id and row.email:
            self.known_emails[row.user_id] = row.email
        self.report.delivered += 1

    def _fail(self, row: PendingDelivery, reason: str) -> None:
        now = self.clock()
        self.outcomes.append(_outcome(row, m.DeliveryState.FAILED, row.attempts + 1, None, reason, None, now))
        self.report.failed += 1
        logger.warning("event delivery failed: %s", reason, extra={"event": "event_delivery_failed", "id": row.id})

    def _retry(self, row: PendingDelivery, reason: str) -> None:
        attempts = row.attempts + 1
        limit = self.ctx.settings.actions.max_attempts
        if attempts >= limit:
            self._fail(row, f"gave up after {attempts} attempts: {reason}")
            return
        sync_settings = self.ctx.settings.sync
        delay = retry_delay(attempts, sync_settings.retry_base_seconds, sync_settings.retry_max_seconds)
        now = self.clock()
        self.outcomes.append(
            _outcome(row, m.DeliveryState.PENDING, attempts, now + timedelta(seconds=delay), reason, None, now)
        )
        self.blocked.add(row.user_key)

    def _record(self) -> None:
        with transaction(self.ctx.factory) as session:
            renewed = self._record_in(session)
        self.outcomes, self.delivered = [], []  # committed
        if not still_ours(renewed, "event delivery"):
            raise StopRun

    def _record_in(self, session: Session) -> bool:
        """Write the outcomes so far and renew the lease; False if the lease is lost. The outcomes
        are of calls this replica made while it held the lease, so they stand either way. The
        caller clears them once the transaction has committed (writing them again is harmless)."""
        deliveries.mark_delivered(session, self.delivered, self.clock())
        deliveries.record_outcomes(session, self.outcomes)
        return leases.try_lease(session, LEASE_NAME, self.ctx.owner, self.clock(), _lease_ttl(self.ctx))


def _outcome(
    row: PendingDelivery,
    state: m.DeliveryState,
    attempts: int,
    next_attempt_at: datetime | None,
    error: str | None,
    delivered_at: datetime | None,
    now: datetime,
) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": state,
        "attempts": attempts,
        "next_attempt_at": next_attempt_at,
        "last_error": error,
        "delivered_at": delivered_at,
        "updated_at": now,
        "email": row.email,
    }


def _log_dry_run(ctx: context.SyncContext) -> None:
    logger.info(
        "dry run: %d event deliveries would be sent", _count_pending(ctx), extra={"event": "delivery_dry_run"}
    )


def _count_pending(ctx: context.SyncContext) -> int:
    with transaction(ctx.factory) as session:
        return deliveries.count_pending(session)


def _lease_ttl(ctx: context.SyncContext) -> timedelta:
    return timedelta(seconds=ctx.settings.sync.lease_seconds)


def _take_lease(ctx: context.SyncContext, now: datetime) -> bool:
    """One replica delivers at a time, so one user's rows cannot be sent by two in parallel."""
    with transaction(ctx.factory) as session:
        return leases.try_lease(session, LEASE_NAME, ctx.owner, now, _lease_ttl(ctx))


def _release_lease(ctx: context.SyncContext, now: datetime) -> None:
    with transaction(ctx.factory) as session:
        leases.release_lease(session, LEASE_NAME, ctx.owner, now)


