"""Route -> send -> record for per-event actions (Iterable (Actions)): the inbox's events become
users/update, events/track, commerce calls, delivered once in effect and in order per user.

Two steps, like the lists engine:

* **route**: each inbox event not yet routed is matched against the mappings in force; every match
  becomes one `event_deliveries` row holding the request body, built once. The rows and the inbox
  mark are written in one transaction, so an event is routed exactly once.
* **send**: pending rows are sent in id order. A user's row waits while an earlier row of the
  same user is pending (waiting for a retry, or failed transiently in this pass), so one user's
  events reach Iterable in order. Outcomes are recorded after Iterable answers.

"Once in effect": a crash between the answer and the record, or a retry after an unanswered
request, sends the same body again. Events and purchases carry an id that Iterable updates rather
than duplicates; user updates and carts are idempotent. So nothing needs an in-flight ledger.

Errors: a refused key (401/403) stops delivery and keeps every row pending (`fatal`); transient
failures retry with capped exponential backoff ([sync] retry_*), up to [actions] max_attempts;
permanent refusals (invalid email, bad data) fail that row with Iterable's reason. Bulk answers
are read per item. The queries live here, next to their only user, rather than in `db.repo`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from listsync import context
from listsync.db import leases
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.errors import AuthError, IterableError, PermanentError
from listsync.events import actions
from listsync.events.mapping import ActionMapping
from listsync.iterable.payloads import BulkResult, chunk_by_limits, json_size
from listsync.lists import identity
from listsync.lists.membership import retry_delay

logger = logging.getLogger(__name__)

ROUTE_BATCH = 1000
PAGE_SIZE = 1000
MAX_PASSES = 50
LEASE_NAME = "event_deliveries"
UPSERT_ENDPOINTS = frozenset({"users/update", "users/bulkUpdate"})
# Kept in a delivery's stored body beside the request, never sent in it.
_DIRECTIVE_KEYS = ("newEmail", "updateOnly")
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


class _Stop(Exception):
    """The API key was refused: nothing more may be sent."""


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
        _route_all(ctx, settings.compiled(), report, clock)
        if ctx.client.is_dry_run:
            _log_dry_run(ctx)
            return report
        _send_all(ctx, report, clock)
        report.retrying = _count_pending(ctx)
    finally:
        _release_lease(ctx, clock())
    return report


def route_pending(ctx: context.SyncContext) -> int:
    """Route new inbox events to their actions without sending anything; returns how many were
    routed. `listsync plan` calls it inside a transaction it rolls back."""
    report = DeliveryReport()
    if ctx.settings.actions.enabled:
        _route_all(ctx, ctx.settings.actions.compiled(), report, ctx.clock)
    return report.routed


# --- routing ----------------------------------------------------------------------------------------


def _route_all(
    ctx: context.SyncContext, mappings: Sequence[ActionMapping], report: DeliveryReport, clock: Callable[[], datetime]
) -> None:
    settings = ctx.settings.actions
    pages = actions.PageSettings(
        settings.map_all_pages, settings.track_all_pages, settings.track_categorized_pages, settings.track_named_pages
    )
    while True:
        with transaction(ctx.factory) as session:
            rows = _unrouted(session)
            deliveries = [d for row in rows for d in _route(row, mappings, pages, ctx, clock())]
            _insert_deliveries(session, deliveries)
            _mark_routed(session, [row.id for row in rows], clock())
        report.routed += len(rows)
        report.skipped += sum(d["state"] is m.DeliveryState.SKIPPED for d in deliveries)
        report.failed += sum(d["state"] is m.DeliveryState.FAILED for d in deliveries)
        if len(rows) < ROUTE_BATCH:
            return


def event_view(payload: dict[str, Any], message_id: str, timestamp: datetime) -> dict[str, Any]:
    """The event as mappings see it: the stored payload, with the messageId and timestamp that
    validation settled on when the sender left them out (so `$.messageId` always resolves)."""
    view = dict(payload)
    view.setdefault("messageId", message_id)
    if not view.get("timestamp"):
        view["timestamp"] = timestamp.isoformat()
    return view


def _route(
    row: Any, mappings: Sequence[ActionMapping], pages: actions.PageSettings, ctx: context.SyncContext, now: datetime
) -> list[dict[str, Any]]:
    event = event_view(row.payload, row.message_id, row.timestamp)
    out = []
    for mapping in mappings:
        if not mapping.matches(event, is_audience=row.is_audience):
            continue
        built = actions.build(mapping, event, project_type=ctx.settings.iterable.project_type, pages=pages)
        if built is not None:
            out.append(_delivery_row(row, mapping, built, now))
    return out


def _delivery_row(
    row: Any, mapping: ActionMapping, built: actions.Request | actions.Skip, now: datetime
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "inbox_id": row.id,
        "message_id": row.message_id,
        "event_type": row.type,
        "event_name": row.event or row.payload.get("name"),
        "mapping": mapping.name,
        "action": mapping.action,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }
    if isinstance(built, actions.Skip):
        state = m.DeliveryState.FAILED if built.failed else m.DeliveryState.SKIPPED
        return {**values, "state": state, "last_error": built.reason, "user_key": "", "endpoint": None,
                "body": None, "user_id": None, "email": None, "iterable_id": None}
    body = dict(built.body)
    if built.new_email:
        body["newEmail"] = built.new_email  # kept with the body; taken out again before sending
    if built.update_only:
        body["updateOnly"] = True
    return {**values, "state": m.DeliveryState.PENDING, "last_error": None, "endpoint": built.endpoint,
            "body": body, "user_key": built.user_id or built.email or "", "user_id": built.user_id,
            "email": built.email, "iterable_id": built.iterable_id}


# --- sending ----------------------------------------------------------------------------------------


def wire_body(body: dict[str, Any]) -> dict[str, Any]:
    """The stored body as Iterable gets it, without listsync's own directives."""
    return {key: value for key, value in body.items() if key not in _DIRECTIVE_KEYS}


@dataclass
class _Row:
    id: int
    endpoint: str
    body: dict[str, Any]
    user_key: str
    user_id: str | None
    email: str | None
    attempts: int
    next_attempt_at: datetime | None


def _send_all(ctx: context.SyncContext, report: DeliveryReport, clock: Callable[[], datetime]) -> None:
    """Passes over the pending rows until one sends nothing or nothing is due."""
    for _ in range(MAX_PASSES):
        before = report.requests
        sender = _Sender(ctx, report, clock)
        try:
            sender.run()
        except _Stop:
            return
        if report.requests == before or ctx.should_stop() or not _any_due(ctx, clock()):
            return


class _Sender:
    """One pass: pages of pending rows in id order, blocked users skipped, bulk rows batched."""

    def __init__(self, ctx: context.SyncContext, report: DeliveryReport, clock: Callable[[], datetime]) -> None:
        self.ctx = ctx
        self.client = ctx.client
        self.project_type = ctx.settings.iterable.project_type
        self.report = report
        self.clock = clock
        self.blocked: set[str] = set()
        self.batches: dict[tuple[str, bool], list[_Row]] = defaultdict(list)  # (endpoint, updateOnly)
        self.known_emails: dict[str, str] = {}
        self.outcomes: list[dict[str, Any]] = []

    def run(self) -> None:
        after = 0
        while not self.ctx.should_stop():
            with transaction(self.ctx.factory) as session:
                rows = _pending_page(session, after)
                self.known_emails.update(_delivered_emails(session, rows))
            if not rows:
                return
            after = rows[-1].id
            try:
                self._page(rows)
            finally:
                self._record()

    def _page(self, rows: Sequence[_Row]) -> None:
        now = self.clock()
        for row in rows:
            if row.user_key in self.blocked:
                continue
            if row.next_attempt_at is not None and row.next_attempt_at > now:
                self.blocked.add(row.user_key)  # its later rows wait behind it
                continue
            self._one(row)
        for key in list(self.batches):
            self._flush(key)

    def _one(self, row: _Row) -> None:
        if row.endpoint in UPSERT_ENDPOINTS and not self._move_email(row):
            return
        if row.endpoint in actions.BULK_ENDPOINTS:
            key = (row.endpoint, row.body.get("updateOnly") is True)
            self.batches[key].append(row)
            if len(self.batches[key]) >= PAGE_SIZE:
                self._flush(key)
            return
        self._flush_user(row.user_key)
        if row.user_key not in self.blocked:
            self._attempt([row], lambda: self._single(row))

    def _flush_user(self, user_key: str) -> None:
        """Send the open batches holding this user first, so a single call cannot overtake them."""
        for key, rows in list(self.batches.items()):
            if any(r.user_key == user_key for r in rows):
                self._flush(key)

    def _single(self, row: _Row) -> None:
        call = {
            "users/update": self.client.update_user,
            "events/track": self.client.track_event,
            "commerce/trackPurchase": self.client.track_purchase,
            "commerce/updateCart": self.client.update_cart,
        }[row.endpoint]
        self.report.requests += 1
        call(wire_body(row.body))

    def _move_email(self, row: _Row) -> bool:
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

    def _attempt(self, rows: Sequence[_Row], call: Callable[[], object], *, settle: bool = True) -> bool:
        """Run one request for `rows` and record what it means for them; True on success."""
        try:
            call()
        except AuthError as exc:
            self.report.fatal = f"the API key was refused by Iterable ({exc.status}); events stay pending"
            logger.error(self.report.fatal, extra={"event": "auth_refused"})
            raise _Stop from None
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
        if rows:
            for chunk in chunk_by_limits(rows, size_of=lambda row: json_size(wire_body(row.body))):
                # A user blocked by an earlier chunk's failure keeps its later rows back (per-user order).
                ready = [row for row in chunk if row.user_key not in self.blocked]
                if ready:
                    self._send_bulk(key, ready)

    def _send_bulk(self, key: tuple[str, bool], rows: Sequence[_Row]) -> None:
        endpoint, update_only = key
        items = [wire_body(row.body) for row in rows]
        result: list[BulkResult] = []

        def call() -> None:
            self.report.requests += 1
            if endpoint == "users/bulkUpdate":
                result.append(self.client.bulk_update_users(items, update_only=update_only))
            else:
                result.append(self.client.track_bulk(items))

        if self._attempt(rows, call, settle=False):
            self._settle_bulk(rows, result[0])

    def _settle_bulk(self, rows: Sequence[_Row], result: BulkResult) -> None:
        for row in rows:
            outcome = result.outcome(row.email, row.user_id)
            if outcome.value == "ok":
                self._delivered(row)
            else:
                self._fail(row, f"{outcome.value}: Iterable refused this item of the bulk request")

    # outcomes, written after each page

    def _delivered(self, row: _Row) -> None:
        now = self.clock()
        self.outcomes.append(_outcome(row, m.DeliveryState.DELIVERED, row.attempts, None, None, now, now))
        if row.user_id and row.email:
            self.known_emails[row.user_id] = row.email
        self.report.delivered += 1

    def _fail(self, row: _Row, reason: str) -> None:
        now = self.clock()
        self.outcomes.append(_outcome(row, m.DeliveryState.FAILED, row.attempts + 1, None, reason, None, now))
        self.report.failed += 1
        logger.warning("event delivery failed: %s", reason, extra={"event": "event_delivery_failed", "id": row.id})

    def _retry(self, row: _Row, reason: str) -> None:
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
        if self.outcomes:
            with transaction(self.ctx.factory) as session:
                session.execute(update(m.EventDelivery), self.outcomes)
        self.outcomes = []
        with transaction(self.ctx.factory) as session:
            still_ours = leases.try_lease(session, LEASE_NAME, self.ctx.owner, self.clock(), _lease_ttl(self.ctx))
        if not still_ours:
            # Our lease lapsed and another replica took over: sending on would deliver twice.
            logger.warning("event delivery was taken over by another replica", extra={"event": "lease_lost"})
            raise _Stop


def _outcome(
    row: _Row,
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


# --- queries ----------------------------------------------------------------------------------------


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _unrouted(session: Session) -> list[Any]:
    inbox = m.table(m.InboxEvent)
    stmt = (
        select(
            inbox.c.id, inbox.c.message_id, inbox.c.type, inbox.c.event, inbox.c.payload,
            inbox.c.timestamp, inbox.c.is_audience,
        )
        .where(inbox.c.routed_at.is_(None))
        .order_by(inbox.c.id)
        .limit(ROUTE_BATCH)
    )
    if _is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    return list(session.execute(stmt))


def _insert_deliveries(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    table = m.table(m.EventDelivery)
    insert = (postgresql.insert if _is_postgres(session) else sqlite.insert)(table)
    # A (event, mapping) pair already there was routed by a run that crashed before marking the
    # inbox row; the first row stands.
    stmt = insert.on_conflict_do_nothing(index_elements=["inbox_id", "mapping"])
    for start in range(0, len(rows), 500):
        session.execute(stmt, list(rows[start : start + 500]))


def _mark_routed(session: Session, ids: Sequence[int], now: datetime) -> None:
    if ids:
        session.execute(update(m.InboxEvent).where(m.InboxEvent.id.in_(ids)).values(routed_at=now))


def _pending_page(session: Session, after: int) -> list[_Row]:
    d = m.EventDelivery
    stmt = (
        select(d.id, d.endpoint, d.body, d.user_key, d.user_id, d.email, d.attempts, d.next_attempt_at)
        .where(d.state == m.DeliveryState.PENDING, d.id > after)
        .order_by(d.id)
        .limit(PAGE_SIZE)
    )
    return [_Row(*row) for row in session.execute(stmt)]


def _delivered_emails(session: Session, rows: Sequence[_Row]) -> dict[str, str]:
    """The email each userId was last delivered with, for the userIds of upserts in `rows`."""
    user_ids = sorted({r.user_id for r in rows if r.user_id and r.endpoint.startswith("users/")})
    found: dict[str, str] = {}
    d = m.EventDelivery
    for start in range(0, len(user_ids), 500):
        stmt = (
            select(d.user_id, d.email)
            .where(d.user_id.in_(user_ids[start : start + 500]), d.state == m.DeliveryState.DELIVERED)
            .where(d.email.is_not(None))
            .order_by(d.id)
        )
        found.update({user_id: email for user_id, email in session.execute(stmt) if user_id and email})
    return found


def _any_due(ctx: context.SyncContext, now: datetime) -> bool:
    d = m.EventDelivery
    with transaction(ctx.factory) as session:
        stmt = select(d.id).where(
            d.state == m.DeliveryState.PENDING, (d.next_attempt_at.is_(None)) | (d.next_attempt_at <= now)
        )
        return session.scalar(stmt.limit(1)) is not None


def _count_pending(ctx: context.SyncContext) -> int:
    with transaction(ctx.factory) as session:
        stmt = select(func.count()).where(m.EventDelivery.state == m.DeliveryState.PENDING)
        return int(session.scalar(stmt) or 0)


def _lease_ttl(ctx: context.SyncContext) -> timedelta:
    return timedelta(seconds=ctx.settings.sync.lease_seconds)


def _take_lease(ctx: context.SyncContext, now: datetime) -> bool:
    """One replica delivers at a time, so one user's rows cannot be sent by two in parallel."""
    with transaction(ctx.factory) as session:
        return leases.try_lease(session, LEASE_NAME, ctx.owner, now, _lease_ttl(ctx))


def _release_lease(ctx: context.SyncContext, now: datetime) -> None:
    with transaction(ctx.factory) as session:
        session.execute(
            update(m.Lease).where(m.Lease.name == LEASE_NAME, m.Lease.owner == ctx.owner).values(until=now)
        )


def event_status(session: Session) -> list[dict[str, Any]]:
    """The event_status view's rows, oldest first (for status commands and tests)."""
    rows = session.execute(text("SELECT * FROM event_status ORDER BY id")).mappings()
    return [dict(row) for row in rows]


