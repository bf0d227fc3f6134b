"""Plan -> send -> record for one audience: pending members page by page, the fewest requests
possible, up to `sync.max_in_flight` of them on the wire at once (`lists.wire`), each written to
the ledger before it is sent and recorded with its members' new state in one transaction after
Iterable answers (`lists.record`)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from listsync.config import AudienceSettings, Settings
from listsync.context import Progress, RunOptions, RunReport, SyncContext
from listsync.db import audiences, memberships
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.domain import PendingMember
from listsync.engine import note
from listsync.lists import planner, record
from listsync.lists.wire import Wire

logger = logging.getLogger(__name__)

PAGE_SIZE = 10_000


def effective_settings(settings: Settings, audience: m.Audience) -> AudienceSettings:
    return settings.audience(audience.audience_key, audience.settings)


def held(ctx: SyncContext, audience: m.Audience, options: RunOptions, report: RunReport) -> bool:
    sync = ctx.settings.sync
    limits = planner.GuardLimits(sync.max_unsubscribe_fraction, sync.guard_min_list_size)

    def enough(unsubscribes: int) -> int | None:
        """The synced members worth counting (none when the run may unsubscribe any share)."""
        return 0 if options.allow_mass_unsubscribe else planner.guard_enough(unsubscribes, limits)

    with transaction(ctx.factory) as session:
        unsubscribes, synced = memberships.guard_counts(session, audience.id, ctx.clock(), enough)
        reason = (
            None
            if options.allow_mass_unsubscribe
            else planner.guard_hold_reason(unsubscribes, synced, limits)
        )
        if reason != audience.hold_reason:
            audiences.set_hold(session, audience.id, reason)
    if reason:
        note(report.held, audience.audience_key)
        logger.warning(
            "audience %r: %s",
            audience.audience_key,
            reason,
            extra={"event": "mass_unsubscribe_held", "audience": audience.audience_key},
        )
    return reason is not None


def send_pending(
    ctx: SyncContext, audience: m.Audience, list_id: int, report: RunReport, progress: Progress | None
) -> None:
    """Subscribes, then unsubscribes: each direction is drained before the next starts, so no
    member is ever in two requests at once (batches of one direction are disjoint by construction)."""
    audience_settings = effective_settings(ctx.settings, audience)
    with ThreadPoolExecutor(ctx.settings.sync.max_in_flight, thread_name_prefix="listsync-send") as pool:
        for subscribing in (True, False):
            on_wire = Wire(ctx, audience, list_id, audience_settings, report, progress, pool)
            if not _send_direction(ctx, audience, subscribing, audience_settings, on_wire):
                return
    if not ctx.client.is_dry_run:
        with transaction(ctx.factory) as session:
            audiences.mark_synced_at(session, audience.id, ctx.clock())


def _send_direction(
    ctx: SyncContext, audience: m.Audience, subscribing: bool, audience_settings: AudienceSettings, on_wire: Wire
) -> bool:
    """Send one direction's pending members page by page. A page's last, partly filled batch is
    carried into the next page, so the run uses the fewest requests possible; the next page is
    read and planned while the previous one's requests are on the wire. False: stop."""
    try:
        sent_all = _plan_and_send(ctx, audience, subscribing, audience_settings, on_wire)
        drained = on_wire.drain()
    except BaseException:
        on_wire.abandon()
        raise
    return drained and sent_all


def _plan_and_send(
    ctx: SyncContext, audience: m.Audience, subscribing: bool, audience_settings: AudienceSettings, on_wire: Wire
) -> bool:
    carry: list[PendingMember] = []
    after_id = 0
    while True:
        with transaction(ctx.factory) as session:
            page = memberships.pending_members(
                session, audience.id, ctx.clock(), after_id=after_id, limit=PAGE_SIZE, subscribing=subscribing
            )
        last_page = len(page) < PAGE_SIZE
        after_id = page[-1].id if page else after_id
        plan = planner.plan_audience(
            carry + page,
            project_type=ctx.settings.iterable.project_type,
            batch_size=ctx.settings.sync.batch_size,
            data_field_names=audience_settings.data_fields,
        )
        record.record_unsendable(ctx, plan.unsendable, on_wire.report)
        batches, carry = _hold_back_partial(
            plan.batches, carry + page, ctx.settings.sync.batch_size, last_page
        )
        for batch in batches:
            if not on_wire.send(batch):
                return False
        if last_page:
            return True


def _hold_back_partial(
    batches: list[planner.Batch], members: list[PendingMember], batch_size: int, last_page: bool
) -> tuple[list[planner.Batch], list[PendingMember]]:
    if last_page or not batches or len(batches[-1].member_ids) >= batch_size:
        return batches, []
    held = set(batches[-1].member_ids)
    return batches[:-1], [member for member in members if member.id in held]
