"""What a delivery pass records: each delivery's outcome, kept until the next page's transaction
writes them all (with the lease renewed in the same transaction).

Delivered is the common outcome: those rows are recorded by id, all at once. A row whose email
changed before sending (an explicit newEmail), a failure and a retry each carry their own values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from listsync import context
from listsync.db import deliveries, leases
from listsync.db import models as m
from listsync.domain import PendingDelivery
from listsync.lists.membership import retry_delay

logger = logging.getLogger(__name__)

LEASE_NAME = "event_deliveries"


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


class Outcomes:
    """The outcomes of one pass not written yet, and the emails each userId was last delivered with."""

    def __init__(self, ctx: context.SyncContext, report: DeliveryReport, clock: Callable[[], datetime]) -> None:
        self.ctx, self.report, self.clock = ctx, report, clock
        self.rows: list[dict[str, Any]] = []
        self.delivered_ids: list[int] = []
        self.renamed: set[int] = set()  # rows whose stored email changed before sending
        self.known_emails: dict[str, str] = {}

    def delivered(self, row: PendingDelivery) -> None:
        if row.id in self.renamed:
            now = self.clock()
            self.rows.append(_outcome(row, m.DeliveryState.DELIVERED, row.attempts, None, None, now, now))
        else:
            self.delivered_ids.append(row.id)
        if row.user_id and row.email:
            self.known_emails[row.user_id] = row.email
        self.report.delivered += 1

    def all_delivered(self, rows: Sequence[PendingDelivery]) -> None:
        """`delivered` for each of `rows` (a bulk call whose answer refused none of them)."""
        if self.renamed and not self.renamed.isdisjoint(row.id for row in rows):
            for row in rows:
                self.delivered(row)
            return
        self.delivered_ids.extend(row.id for row in rows)
        self.known_emails.update((row.user_id, row.email) for row in rows if row.user_id and row.email)
        self.report.delivered += len(rows)

    def fail(self, row: PendingDelivery, reason: str) -> None:
        now = self.clock()
        self.rows.append(_outcome(row, m.DeliveryState.FAILED, row.attempts + 1, None, reason, None, now))
        self.report.failed += 1
        logger.warning("event delivery failed: %s", reason, extra={"event": "event_delivery_failed", "id": row.id})

    def retry(self, row: PendingDelivery, reason: str) -> bool:
        """Pending again with a backoff; False when that was the last attempt (the row failed)."""
        attempts = row.attempts + 1
        limit = self.ctx.settings.actions.max_attempts
        if attempts >= limit:
            self.fail(row, f"gave up after {attempts} attempts: {reason}")
            return False
        sync_settings = self.ctx.settings.sync
        delay = retry_delay(attempts, sync_settings.retry_base_seconds, sync_settings.retry_max_seconds)
        now = self.clock()
        self.rows.append(
            _outcome(row, m.DeliveryState.PENDING, attempts, now + timedelta(seconds=delay), reason, None, now)
        )
        return True

    def write_in(self, session: Session) -> bool:
        """Write the outcomes so far and renew the lease; False if the lease is lost. The outcomes
        are of calls this replica made while it held the lease, so they stand either way. The
        caller calls `committed` once the transaction has (writing them again is harmless)."""
        deliveries.mark_delivered(session, self.delivered_ids, self.clock())
        deliveries.record_outcomes(session, self.rows)
        return leases.try_lease(session, LEASE_NAME, self.ctx.owner, self.clock(), lease_ttl(self.ctx))

    def committed(self) -> None:
        self.rows, self.delivered_ids = [], []


def lease_ttl(ctx: context.SyncContext) -> timedelta:
    return timedelta(seconds=ctx.settings.sync.lease_seconds)


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
