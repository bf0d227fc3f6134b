"""One delivery pass: pending rows in id order, sent in order per user, bulk rows batched.

A user's row waits while an earlier row of the same user is pending (waiting for a retry, or
failed transiently in this pass), so one user's events reach Iterable in order. Bulk rows go
into open batches per (endpoint, updateOnly), kept open across pages so calls go full; each
key's calls are queued to its own worker (`bulk_calls`) while routing goes on. Outcomes
(`outcomes.Outcomes`) are written with the next page's transaction.

A stop (lease lost, refused key, a graceful stop of the daemon) sends nothing queued behind the
call on the wire: those rows stay pending for the next run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from listsync import context
from listsync.db import deliveries
from listsync.db.session import transaction
from listsync.domain import PendingDelivery
from listsync.engine import StopRun, still_ours, stop_refused
from listsync.errors import AuthError, IterableError, PermanentError
from listsync.events import actions
from listsync.events.bulk_calls import BulkCalls, Call, bulk_chunks, wire_body
from listsync.events.outcomes import DeliveryReport, Outcomes
from listsync.iterable.payloads import BulkResult
from listsync.lists import identity

PAGE_SIZE = 1000
# Bulk calls a key may have queued ahead of the wire while routing goes on (about 1 MB each).
MAX_QUEUED_CALLS = 20
# Routes one inbox batch in the given transaction; False once none is left.
Route = Callable[[Session], bool]
UPSERT_ENDPOINTS = frozenset({"users/update", "users/bulkUpdate"})
# Iterable answers these from updateEmail when the old address is not (or no longer) there, or
# when the new one already has a profile of its own (a list subscribe may have made it); the
# update that follows creates or finds the user, so they are not failures of the event.
_TOLERATED_UPDATE_EMAIL_CODES = frozenset({"UnknownEmailError", "UnknownUserIdError", "EmailAlreadyExists"})


class Sender:
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
        self.outcomes = Outcomes(ctx, report, clock)
        # Which users each bulk key holds, open or on the wire (per-user order across endpoints).
        self.open_users: dict[tuple[str, bool], set[str]] = defaultdict(set)
        self.calls = BulkCalls(self._bulk_call, stopped=ctx.should_stop)  # queued or on the wire, per bulk key

    def run(self) -> None:
        """Per page, one transaction records the last page's outcomes, renews the lease, routes the
        next inbox batch and reads the next page of pending rows (one commit per page); the page is
        then sent while routing goes on: its bulk calls wait for their rate limit in the pool.
        Rows routed later have higher ids, so pages stay in id order.

        These commits do not wait for the disk (`durable=False`): a power loss that loses the
        last of them leaves those events unrouted, or those rows pending, so they are routed or
        sent again, which is once in effect (the module docstring of `delivery`)."""
        after = 0
        routing = True
        try:
            while not self.ctx.should_stop():
                self._settle_answered()
                rows: list[PendingDelivery] = []
                with transaction(self.ctx.factory, durable=False) as session:
                    ours = self.outcomes.write_in(session)
                    if ours:
                        routing = routing and self.route(session)
                        rows = deliveries.pending_page(session, after, PAGE_SIZE)
                        # What this pass delivered or moved is newer than the rows recorded so far.
                        known = self.outcomes.known_emails
                        self.outcomes.known_emails = {**deliveries.delivered_emails(session, rows), **known}
                self.outcomes.committed()
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
            self.calls.halt()  # a graceful stop: what is queued stays pending for the next run
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
        stopped = self.ctx.should_stop
        for row in rows:
            if stopped():
                return  # the rest of the page stays pending
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
            old = self.outcomes.known_emails.get(row.user_id or "")
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
                self.outcomes.known_emails[row.user_id] = new_email
        if explicit:
            row.body, row.email = {**row.body, "email": new_email}, new_email
            self.outcomes.renamed.add(row.id)
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
                self.outcomes.fail(row, f"{type(exc).__name__}: {exc}")
            return False
        except IterableError as exc:  # RetryableError, and anything else Iterable-shaped: try later
            for row in rows:
                if self.outcomes.retry(row, f"{type(exc).__name__}: {exc}"):
                    self.blocked.add(row.user_key)
            return False
        if settle:
            for row in rows:
                self.outcomes.delivered(row)
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
        if not any(result.failed.values()):  # the common answer: no item named as refused
            self.outcomes.all_delivered(rows)
            return
        for row in rows:
            outcome = result.outcome(row.email, row.user_id)
            if outcome.value == "ok":
                self.outcomes.delivered(row)
            else:
                self.outcomes.fail(row, f"{outcome.value}: Iterable refused this item of the bulk request")

    def _record(self) -> None:
        with transaction(self.ctx.factory, durable=False) as session:
            renewed = self.outcomes.write_in(session)
        self.outcomes.committed()
        if not still_ours(renewed, "event delivery"):
            raise StopRun
