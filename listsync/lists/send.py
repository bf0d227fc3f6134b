"""Plan -> send -> record for one audience: pending members page by page, the fewest requests
possible, each written to the ledger before it is sent and recorded with its members' new state
in one transaction after Iterable answers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from listsync.config import AudienceSettings, Settings
from listsync.context import Progress, RunOptions, RunReport, SyncContext
from listsync.db import audiences, ledger, memberships
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.domain import Desired, Direction, Member, PendingMember, ProjectType, Synced
from listsync.engine import note, stop_refused, stop_unreachable, unreachable
from listsync.errors import AuthError, ListNotFoundError, PermanentError, RetryableError
from listsync.iterable.payloads import BulkResult, ItemOutcome, Subscriber
from listsync.lists import membership as rules
from listsync.lists import planner
from listsync.lists.remote import list_still_exists, mark_missing

logger = logging.getLogger(__name__)

PAGE_SIZE = 10_000


def effective_settings(settings: Settings, audience: m.Audience) -> AudienceSettings:
    return settings.audience(audience.audience_key, audience.settings)


def held(ctx: SyncContext, audience: m.Audience, options: RunOptions, report: RunReport) -> bool:
    sync = ctx.settings.sync
    limits = planner.GuardLimits(sync.max_unsubscribe_fraction, sync.guard_min_list_size)
    with transaction(ctx.factory) as session:
        unsubscribes, synced = memberships.guard_counts(session, audience.id, ctx.clock())
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
    audience_settings = effective_settings(ctx.settings, audience)
    for subscribing in (True, False):
        if not _send_direction(ctx, audience, list_id, subscribing, audience_settings, report, progress):
            return
    if not ctx.client.is_dry_run:
        with transaction(ctx.factory) as session:
            audiences.mark_synced_at(session, audience.id, ctx.clock())


def _send_direction(
    ctx: SyncContext,
    audience: m.Audience,
    list_id: int,
    subscribing: bool,
    audience_settings: AudienceSettings,
    report: RunReport,
    progress: Progress | None,
) -> bool:
    """Send one direction's pending members page by page. A page's last, partly filled batch is
    carried into the next page, so the run uses the fewest requests possible. False: stop."""
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
        _record_unsendable(ctx, plan.unsendable, report)
        batches, carry = _hold_back_partial(
            plan.batches, carry + page, ctx.settings.sync.batch_size, last_page
        )
        for batch in batches:
            if ctx.should_stop() or not _still_ours(ctx, audience):
                return False
            if not _send_batch(ctx, audience, list_id, batch, audience_settings, report):
                return False
            if progress:
                progress(audience.audience_key, len(batch.member_ids))
        if last_page:
            return True


def _hold_back_partial(
    batches: list[planner.Batch], members: list[PendingMember], batch_size: int, last_page: bool
) -> tuple[list[planner.Batch], list[PendingMember]]:
    if last_page or not batches or len(batches[-1].member_ids) >= batch_size:
        return batches, []
    held = set(batches[-1].member_ids)
    return batches[:-1], [member for member in members if member.id in held]


def _still_ours(ctx: SyncContext, audience: m.Audience) -> bool:
    """Extend this replica's lease before each request; False when another replica has taken the
    audience over (our lease lapsed, e.g. during long retries): then we must not send for it."""
    until = ctx.clock() + timedelta(seconds=ctx.settings.sync.lease_seconds)
    with transaction(ctx.factory) as session:
        ours = audiences.renew_lease(session, audience.id, ctx.owner, until)
    if not ours:
        logger.warning(
            "audience %r was taken over by another replica; leaving it",
            audience.audience_key,
            extra={"event": "lease_lost", "audience": audience.audience_key},
        )
    return ours


def _record_unsendable(ctx: SyncContext, unsendable: Sequence[tuple[int, str]], report: RunReport) -> None:
    if not unsendable or ctx.client.is_dry_run:
        return
    project_type = ctx.settings.iterable.project_type
    with transaction(ctx.factory) as session:
        states = memberships.member_states(session, [member_id for member_id, _ in unsendable])
        reasons = dict(unsendable)
        updated = {
            i: rules.fail(s, reasons[i], subscribing=s.desired is Desired.IN, project_type=project_type)
            for i, s in states.items()
        }
        memberships.save_members(session, updated, ctx.clock())
    report.failed += len(unsendable)


def _call(
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


def _send_batch(
    ctx: SyncContext,
    audience: m.Audience,
    list_id: int,
    batch: planner.Batch,
    audience_settings: AudienceSettings,
    report: RunReport,
) -> bool:
    """Send one request and record its outcome; False when the audience must stop for this run."""
    endpoint = f"lists/{batch.direction.value}"
    if ctx.client.is_dry_run:
        _call(ctx, list_id, batch, audience_settings)
        report.requests += 1
        return True
    with transaction(ctx.factory) as session:
        request_id = ledger.begin_request(
            session,
            run_id=report.run_id,
            audience_id=audience.id,
            endpoint=endpoint,
            member_ids=batch.member_ids,
            owner=ctx.owner,
            now=ctx.clock(),
        )
    report.requests += 1
    try:
        result = _call(ctx, list_id, batch, audience_settings)
    except AuthError as exc:
        _record_failure(ctx, request_id, batch, exc, report, retry=False, keep_pending=True)
        stop_refused(report, exc)
    except ListNotFoundError as exc:
        _record_failure(ctx, request_id, batch, exc, report, retry=False, keep_pending=True)
        mark_missing(ctx, audience, report, exc)
        return False
    except PermanentError as exc:
        if exc.code == "BatchTooLarge" and len(batch.member_ids) > 1:
            _record_failure(ctx, request_id, batch, exc, report, retry=False, keep_pending=True)
            return all(
                _send_batch(ctx, audience, list_id, half, audience_settings, report)
                for half in _halves(batch)
            )
        if not list_still_exists(ctx, list_id):
            # Iterable's wording for a deleted list is undocumented; asking is more reliable.
            _record_failure(ctx, request_id, batch, exc, report, retry=False, keep_pending=True)
            mark_missing(
                ctx, audience, report, ListNotFoundError(str(exc), status=exc.status, code=exc.code)
            )
            return False
        _record_failure(ctx, request_id, batch, exc, report, retry=False, keep_pending=False)
        return True
    except RetryableError as exc:
        _record_failure(ctx, request_id, batch, exc, report, retry=True, keep_pending=True)
        if unreachable(exc):
            stop_unreachable(report, exc)
        return True
    _record_success(ctx, audience, request_id, batch, result, report)
    return True


def _halves(batch: planner.Batch) -> list[planner.Batch]:
    middle = len(batch.member_ids) // 2
    return [
        planner.Batch(batch.direction, batch.member_ids[:middle], batch.subscribers[:middle]),
        planner.Batch(batch.direction, batch.member_ids[middle:], batch.subscribers[middle:]),
    ]


def _item_verdict(direction: Direction, outcome: ItemOutcome, update_only: bool) -> tuple[bool, str | None]:
    """(confirmed, failure reason) for one member of a 2xx answer."""
    if outcome is ItemOutcome.OK:
        return True, None
    if outcome is ItemOutcome.NOT_FOUND and direction is Direction.UNSUBSCRIBE:
        return True, None  # not in the list, or no such user: either way it is out
    reasons = {
        ItemOutcome.NOT_FOUND: "not_found: no such user in Iterable"
        + (" (update_existing_users_only is set)" if update_only else ""),
        ItemOutcome.INVALID: "invalid: Iterable refused the email or userId as invalid",
        ItemOutcome.FORGOTTEN: "forgotten: the user was forgotten (GDPR) in Iterable; not retried",
        ItemOutcome.CONFLICT: "conflict: the email and userId belong to different Iterable users",
        ItemOutcome.INVALID_DATA: "invalid_data: Iterable refused the user's data fields",
    }
    return False, reasons[outcome]


def _record_success(
    ctx: SyncContext,
    audience: m.Audience,
    request_id: int,
    batch: planner.Batch,
    result: BulkResult,
    report: RunReport,
) -> None:
    subscribing = batch.direction is Direction.SUBSCRIBE
    update_only = bool(effective_settings(ctx.settings, audience).update_existing_users_only)
    project_type = ctx.settings.iterable.project_type
    now = ctx.clock()
    outcomes: dict[int, tuple[str, str | None]] = {}
    with transaction(ctx.factory) as session:
        states = memberships.member_states(session, batch.member_ids)
        updated: dict[int, Member] = {}
        for member_id, subscriber in zip(batch.member_ids, batch.subscribers, strict=True):
            outcome = result.outcome(subscriber.email, subscriber.user_id)
            confirmed, reason = _item_verdict(batch.direction, outcome, update_only)
            outcomes[member_id] = (outcome.value, reason)
            state = states[member_id]
            if confirmed:
                updated[member_id] = confirm(state, subscriber, subscribing, project_type)
                report.subscribed += subscribing
                report.unsubscribed += not subscribing
            else:
                updated[member_id] = rules.fail(
                    state, reason or "", subscribing=subscribing, project_type=project_type
                )
                report.failed += 1
        status = m.RequestStatus.OK if result.fail_count == 0 else m.RequestStatus.PARTIAL
        record = ledger.RequestRecord(
            status=status,
            http_status=result.http_status,
            success_count=result.success_count,
            fail_count=result.fail_count,
            elapsed_ms=result.elapsed_ms,
        )
        ledger.finish_request(session, request_id, record, now, outcomes)
        memberships.save_members(session, updated, now)


def confirm(
    state: Member, subscriber: Subscriber, subscribing: bool, project_type: ProjectType
) -> Member:
    if subscribing:
        return rules.confirm(
            state, Synced.IN, subscriber.email or None, subscriber.user_id or None, project_type
        )
    return rules.confirm(state, Synced.OUT, None, None, project_type)


def _record_failure(
    ctx: SyncContext,
    request_id: int,
    batch: planner.Batch,
    exc: Exception,
    report: RunReport,
    *,
    retry: bool,
    keep_pending: bool,
) -> None:
    """A request that failed as a whole: its members wait (transient, auth, missing list) or fail."""
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    reason = f"{type(exc).__name__}: {exc}"
    now = ctx.clock()
    sync = ctx.settings.sync
    subscribing = batch.direction is Direction.SUBSCRIBE
    project_type = ctx.settings.iterable.project_type
    with transaction(ctx.factory) as session:
        states = memberships.member_states(session, batch.member_ids)
        updated: dict[int, Member] = {}
        next_attempts: dict[int, datetime | None] = {}
        for member_id, state in states.items():
            if keep_pending:
                updated[member_id] = rules.retry_later(state, reason) if retry else state
                delay = rules.retry_delay(
                    updated[member_id].attempts, sync.retry_base_seconds, sync.retry_max_seconds
                )
                next_attempts[member_id] = now + timedelta(seconds=delay) if retry else None
            else:
                updated[member_id] = rules.fail(
                    state, reason, subscribing=subscribing, project_type=project_type
                )
        record = ledger.RequestRecord(
            status=m.RequestStatus.FAILED, http_status=status, iterable_code=code, error=reason
        )
        ledger.finish_request(
            session, request_id, record, now, {i: ("error", reason) for i in batch.member_ids}
        )
        memberships.save_members(session, updated, now, next_attempts)
    if not retry and not keep_pending:
        report.failed += len(batch.member_ids)
    logger.warning(
        "%s of %d members failed: %s",
        batch.direction.value,
        len(batch.member_ids),
        reason,
        extra={"event": "request_failed", "status": status, "code": code},
    )
