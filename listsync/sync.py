"""Plan -> send -> record: the lists engine that both `listsync daemon` and `listsync sync` run.

One run applies the inbox, then takes audiences one at a time under a lease (so replicas share the
work and a dead replica's audiences come back when its lease expires) and, for each, sends the
members whose desired state differs from what Iterable has.

Each request is written to the ledger *before* it is sent and completed, together with its
members' new state, in one transaction *after* Iterable answers. A crash in between leaves an
in-flight request: the next run that takes the audience reads the list back from Iterable and
settles those members from what is really there, so nothing is lost and nothing is sent twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from sqlalchemy.orm import Session, sessionmaker

from listsync import identity, planner, run_log
from listsync import membership as rules
from listsync.config import AudienceSettings, Settings
from listsync.db import models as m
from listsync.db import repo, retry, runs
from listsync.db.session import transaction
from listsync.domain import Desired, Direction, ProjectType, Synced
from listsync.errors import AuthError, IterableError, ListNotFoundError, PermanentError, RetryableError
from listsync.ingest.accept import apply_inbox
from listsync.iterable.client import CONNECT_FAILED, IterableClient
from listsync.iterable.payloads import BulkResult, ItemOutcome, Subscriber

logger = logging.getLogger(__name__)

PAGE_SIZE = 10_000
MAX_PASSES = 50
Progress = Callable[[str, int], None]


def utcnow() -> datetime:
    return datetime.now(UTC)


def replica_name() -> str:
    """Unique per process, so a restarted replica does not mistake its old claims for live ones."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class SyncContext:
    settings: Settings
    factory: sessionmaker[Session]
    client: IterableClient
    owner: str = field(default_factory=replica_name)
    clock: Callable[[], datetime] = utcnow
    should_stop: Callable[[], bool] = lambda: False


@dataclass(frozen=True)
class RunOptions:
    trigger: str = "sync"
    allow_mass_unsubscribe: bool = False
    recreate_missing_lists: bool = False
    reconcile: bool = False
    retry_failed: bool = False


@dataclass
class RunReport:
    run_id: int | None = None
    requests: int = 0
    subscribed: int = 0
    unsubscribed: int = 0
    failed: int = 0
    retrying: int = 0
    held: list[str] = field(default_factory=list)
    missing_lists: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    fatal: str | None = None
    reconciled: dict[str, dict[str, int]] = field(default_factory=dict)
    dry_run: bool = False
    events_delivered: int = 0
    events_failed: int = 0
    events_retrying: int = 0

    @property
    def exit_code(self) -> int:
        """0: all delivered; 1: some members or events failed, wait or are held; 2: configuration/connection."""
        if self.fatal:
            return 2
        if (
            self.failed
            or self.events_failed
            or self.retrying
            or self.held
            or self.missing_lists
            or self.errors
        ):
            return 1
        return 0

    def summary(self) -> str:
        parts = [
            f"{self.requests} requests",
            f"{self.subscribed} subscribed",
            f"{self.unsubscribed} unsubscribed",
            f"{self.failed} failed",
            f"{self.retrying} waiting to retry",
            f"{self.events_delivered} events delivered",
            f"{self.events_failed} events failed",
        ]
        if self.dry_run:
            parts.append("dry run: nothing sent, nothing marked synced")
        if self.held:
            parts.append("held: " + ", ".join(self.held))
        if self.missing_lists:
            parts.append("lists missing in Iterable: " + ", ".join(self.missing_lists))
        parts += [_reconciled_text(key, found) for key, found in self.reconciled.items()]
        parts += self.errors
        if self.fatal:
            parts.append(self.fatal)
        return "; ".join(parts)


def _reconciled_text(key: str, found: dict[str, int]) -> str:
    """What `--reconcile` found in one list, in the words of the repair it queued."""
    return (
        f"reconciled {key}: {found.get('missing', 0)} missing (resent), {found.get('extra', 0)} extra "
        f"(unsubscribed; {found.get('unknown_added', 0)} unknown to listsync), "
        f"{found.get('adopted', 0)} adopted"
    )


def _note(names: list[str], name: str) -> None:
    """Add to a report list once, however many passes of a run see the same audience."""
    if name not in names:
        names.append(name)


class _StopRun(Exception):
    """Raised inside a run when nothing more may be sent (the API key was refused)."""


def _stop_refused(report: RunReport, exc: AuthError) -> NoReturn:
    """A refused key is a configuration problem, not the members': keep them pending, send nothing more."""
    report.fatal = f"the API key was refused by Iterable ({exc.status}); nothing more was sent"
    logger.error(report.fatal, extra={"event": "auth_refused"})
    raise _StopRun from None


def _unreachable(exc: RetryableError) -> bool:
    """Not even a connection to Iterable on the client's last try, after all its retries. A
    dropped socket or a timeout is not enough: those happen to a reachable Iterable too."""
    return exc.code == CONNECT_FAILED


def _stop_unreachable(report: RunReport, exc: RetryableError) -> NoReturn:
    """Iterable cannot be reached: a connection problem (exit 2), not the members'. Whatever was
    in hand stays pending; going on would only spend every remaining batch on the same failure."""
    report.fatal = f"could not reach Iterable ({exc}); nothing more was sent"
    logger.error(report.fatal, extra={"event": "iterable_unreachable"})
    raise _StopRun from None


def effective_settings(settings: Settings, audience: m.Audience) -> AudienceSettings:
    return settings.audience(audience.audience_key, audience.settings)


def apply_all(ctx: SyncContext) -> int:
    """Fold every committed inbox event into memberships."""
    total = 0
    while True:
        with transaction(ctx.factory) as session:
            applied = apply_inbox(session, ctx.settings, ctx.clock())
        total += applied
        if applied == 0:
            return total


def run_once(
    ctx: SyncContext, options: RunOptions = RunOptions(), progress: Progress | None = None
) -> RunReport:
    """Apply the inbox, then send until no audience has work that is due."""
    report = RunReport(dry_run=ctx.client.is_dry_run)
    apply_all(ctx)
    if options.retry_failed:
        _retry_failed(ctx)
    with transaction(ctx.factory) as session:
        report.run_id = repo.start_run(session, trigger=options.trigger, owner=ctx.owner, now=ctx.clock())
    if options.recreate_missing_lists:
        _reset_missing_lists(ctx)
    with contextlib.suppress(_StopRun):
        _passes(ctx, options, report, progress)
    if not report.fatal:
        from listsync import delivery  # here: delivery builds on this module's SyncContext

        events = delivery.deliver_pending(ctx)
        report.events_delivered, report.events_failed = events.delivered, events.failed
        report.requests += events.requests
        report.events_retrying = events.retrying
        report.fatal = events.fatal
    _finish(ctx, report, options.trigger)
    return report


def _retry_failed(ctx: SyncContext) -> None:
    with transaction(ctx.factory) as session:
        members = retry.retry_failed_members(session, ctx.clock())
        events = retry.retry_failed_deliveries(session, ctx.clock())
    logger.info(
        "retrying what failed: %d members, %d event deliveries",
        members,
        events,
        extra={"event": "retry_failed", "members": members, "deliveries": events},
    )


def _passes(ctx: SyncContext, options: RunOptions, report: RunReport, progress: Progress | None) -> None:
    reconciled: set[int] = set()
    for _ in range(MAX_PASSES):
        before = report.requests
        done = _one_pass(ctx, options, report, progress, reconciled)
        if not done or report.requests == before or ctx.client.is_dry_run:
            return


def _one_pass(
    ctx: SyncContext, options: RunOptions, report: RunReport, progress: Progress | None, reconciled: set[int]
) -> int:
    """Each audience with due work once; returns how many audiences were processed."""
    seen: list[int] = []
    only = _reconcile_targets(ctx, reconciled) if options.reconcile else None
    while not ctx.should_stop():
        audience = _claim_next(ctx, seen, only)
        if audience is None:
            break
        seen.append(audience.id)
        try:
            _process_audience(ctx, audience, options, report, progress, reconciled)
        except AuthError as exc:
            # Also from the list-level calls (GET lists, create, getUsers), not only from sends.
            _stop_refused(report, exc)
        except IterableError as exc:
            # A list-level call failed after the client's retries. No answer at all stops the run;
            # otherwise this audience waits for the next run, the others go on, and the run says
            # why instead of dying with a traceback.
            if isinstance(exc, RetryableError) and _unreachable(exc):
                _stop_unreachable(report, exc)
            report.errors.append(f"{audience.audience_key}: {exc}")
            logger.warning(
                "audience %r skipped this run: %s",
                audience.audience_key,
                exc,
                extra={"event": "audience_skipped", "audience": audience.audience_key},
            )
        finally:
            with transaction(ctx.factory) as session:
                repo.release_audience(session, audience.id, ctx.owner)
    return len(seen)


def _claim_next(ctx: SyncContext, seen: list[int], reconcile_only: list[int] | None) -> m.Audience | None:
    """The next audience with due work; with --reconcile, also one that merely has a list."""
    lease = timedelta(seconds=ctx.settings.sync.lease_seconds)
    with transaction(ctx.factory) as session:
        for only in (None, reconcile_only) if reconcile_only else (None,):
            audience = repo.claim_audience(
                session, owner=ctx.owner, now=ctx.clock(), lease=lease, skip=seen, only=only
            )
            if audience is not None:
                return audience
    return None


def _reconcile_targets(ctx: SyncContext, done: set[int]) -> list[int]:
    with transaction(ctx.factory) as session:
        return [a for a in repo.audiences_with_lists(session) if a not in done]


def _process_audience(
    ctx: SyncContext,
    audience: m.Audience,
    options: RunOptions,
    report: RunReport,
    progress: Progress | None,
    reconciled: set[int],
) -> None:
    key = audience.audience_key
    if audience.list_state is m.ListState.MISSING:
        _note(report.missing_lists, key)
        return
    if not _resolve_in_flight(ctx, audience, report):
        return
    list_id = audience.list_id if audience.list_id is not None else _ensure_list(ctx, audience)
    if list_id is None:
        return
    if options.reconcile and audience.id not in reconciled:
        reconciled.add(audience.id)
        try:
            report.reconciled[key] = _reconcile(ctx, audience, list_id)
        except ListNotFoundError as exc:  # deleted in Iterable: the same verdict as a send would reach
            _mark_missing(ctx, audience, report, exc)
            return
    if _held(ctx, audience, options, report):
        return
    _send_pending(ctx, audience, list_id, report, progress)


# --- lists -----------------------------------------------------------------------------------------


def _ensure_list(ctx: SyncContext, audience: m.Audience) -> int | None:
    """The id of the Iterable list named exactly like the audience, created if there is none.

    Looking up by name first makes creation idempotent: after a crash between create and store,
    the next run finds the list instead of creating a second one. The audience lease keeps two
    replicas from racing here.
    """
    key = audience.audience_key
    matches = sorted(lst.id for lst in ctx.client.get_lists() if lst.name == key)
    if ctx.client.is_dry_run:
        logger.info("dry run: would create Iterable list %r", key, extra={"event": "list_create_dry_run"})
        return matches[0] if matches else ctx.client.create_list(key)
    list_id = matches[0] if matches else ctx.client.create_list(key)
    if len(matches) > 1:
        logger.warning(
            "several Iterable lists are named %r; using the oldest, %s",
            key,
            list_id,
            extra={"event": "duplicate_lists", "audience": key},
        )
    with transaction(ctx.factory) as session:
        repo.set_list(session, audience.id, list_id, m.ListState.READY)
    logger.info(
        "audience %r uses Iterable list %s", key, list_id, extra={"event": "list_ready", "list_id": list_id}
    )
    return list_id


def _reset_missing_lists(ctx: SyncContext) -> None:
    with transaction(ctx.factory) as session:
        for audience_id, key in repo.missing_list_audiences(session):
            repo.set_list(session, audience_id, None, m.ListState.PENDING)
            resent = repo.resend_all(session, audience_id, ctx.clock())
            logger.info(
                "audience %r: list will be recreated and %d members resent",
                key,
                resent,
                extra={"event": "list_recreate", "audience": key},
            )


def _mark_missing(
    ctx: SyncContext, audience: m.Audience, report: RunReport, error: ListNotFoundError
) -> None:
    with transaction(ctx.factory) as session:
        repo.set_list(session, audience.id, audience.list_id, m.ListState.MISSING)
    _note(report.missing_lists, audience.audience_key)
    logger.error(
        "Iterable no longer knows list %s of audience %r (%s); sending to it stopped. Run "
        "`listsync sync --recreate-missing-lists` to recreate it.",
        audience.list_id,
        audience.audience_key,
        error,
        extra={"event": "list_missing", "audience": audience.audience_key},
    )


# --- the guard --------------------------------------------------------------------------------------


def _held(ctx: SyncContext, audience: m.Audience, options: RunOptions, report: RunReport) -> bool:
    sync = ctx.settings.sync
    limits = planner.GuardLimits(sync.max_unsubscribe_fraction, sync.guard_min_list_size)
    with transaction(ctx.factory) as session:
        unsubscribes, synced = repo.guard_counts(session, audience.id, ctx.clock())
        reason = (
            None
            if options.allow_mass_unsubscribe
            else planner.guard_hold_reason(unsubscribes, synced, limits)
        )
        if reason != audience.hold_reason:
            repo.set_hold(session, audience.id, reason)
    if reason:
        _note(report.held, audience.audience_key)
        logger.warning(
            "audience %r: %s",
            audience.audience_key,
            reason,
            extra={"event": "mass_unsubscribe_held", "audience": audience.audience_key},
        )
    return reason is not None


# --- sending ----------------------------------------------------------------------------------------


def _send_pending(
    ctx: SyncContext, audience: m.Audience, list_id: int, report: RunReport, progress: Progress | None
) -> None:
    audience_settings = effective_settings(ctx.settings, audience)
    for subscribing in (True, False):
        if not _send_direction(ctx, audience, list_id, subscribing, audience_settings, report, progress):
            return
    if not ctx.client.is_dry_run:
        with transaction(ctx.factory) as session:
            repo.mark_synced_at(session, audience.id, ctx.clock())


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
    carry: list[planner.PendingMember] = []
    after_id = 0
    while True:
        with transaction(ctx.factory) as session:
            page = repo.pending_members(
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
    batches: list[planner.Batch], members: list[planner.PendingMember], batch_size: int, last_page: bool
) -> tuple[list[planner.Batch], list[planner.PendingMember]]:
    if last_page or not batches or len(batches[-1].member_ids) >= batch_size:
        return batches, []
    held = set(batches[-1].member_ids)
    return batches[:-1], [member for member in members if member.id in held]


def _still_ours(ctx: SyncContext, audience: m.Audience) -> bool:
    """Extend this replica's lease before each request; False when another replica has taken the
    audience over (our lease lapsed, e.g. during long retries): then we must not send for it."""
    until = ctx.clock() + timedelta(seconds=ctx.settings.sync.lease_seconds)
    with transaction(ctx.factory) as session:
        ours = repo.renew_lease(session, audience.id, ctx.owner, until)
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
        states = repo.member_states(session, [member_id for member_id, _ in unsendable])
        reasons = dict(unsendable)
        updated = {
            i: rules.fail(s, reasons[i], subscribing=s.desired is Desired.IN, project_type=project_type)
            for i, s in states.items()
        }
        repo.save_members(session, updated, ctx.clock())
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
        request_id = repo.begin_request(
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
        _stop_refused(report, exc)
    except ListNotFoundError as exc:
        _record_failure(ctx, request_id, batch, exc, report, retry=False, keep_pending=True)
        _mark_missing(ctx, audience, report, exc)
        return False
    except PermanentError as exc:
        if exc.code == "BatchTooLarge" and len(batch.member_ids) > 1:
            _record_failure(ctx, request_id, batch, exc, report, retry=False, keep_pending=True)
            return all(
                _send_batch(ctx, audience, list_id, half, audience_settings, report)
                for half in _halves(batch)
            )
        if not _list_still_exists(ctx, list_id):
            # Iterable's wording for a deleted list is undocumented; asking is more reliable.
            _record_failure(ctx, request_id, batch, exc, report, retry=False, keep_pending=True)
            _mark_missing(
                ctx, audience, report, ListNotFoundError(str(exc), status=exc.status, code=exc.code)
            )
            return False
        _record_failure(ctx, request_id, batch, exc, report, retry=False, keep_pending=False)
        return True
    except RetryableError as exc:
        _record_failure(ctx, request_id, batch, exc, report, retry=True, keep_pending=True)
        if _unreachable(exc):
            _stop_unreachable(report, exc)
        return True
    _record_success(ctx, audience, request_id, batch, result, report)
    return True


def _list_still_exists(ctx: SyncContext, list_id: int) -> bool:
    """Whether GET /api/lists still shows the list; True when that cannot be told right now."""
    try:
        return any(lst.id == list_id for lst in ctx.client.get_lists())
    except (RetryableError, PermanentError):
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
        states = repo.member_states(session, batch.member_ids)
        updated: dict[int, rules.MemberState] = {}
        for member_id, subscriber in zip(batch.member_ids, batch.subscribers, strict=True):
            outcome = result.outcome(subscriber.email, subscriber.user_id)
            confirmed, reason = _item_verdict(batch.direction, outcome, update_only)
            outcomes[member_id] = (outcome.value, reason)
            state = states[member_id]
            if confirmed:
                updated[member_id] = _confirm(state, subscriber, subscribing, project_type)
                report.subscribed += subscribing
                report.unsubscribed += not subscribing
            else:
                updated[member_id] = rules.fail(
                    state, reason or "", subscribing=subscribing, project_type=project_type
                )
                report.failed += 1
        status = m.RequestStatus.OK if result.fail_count == 0 else m.RequestStatus.PARTIAL
        record = repo.RequestRecord(
            status=status,
            http_status=result.http_status,
            success_count=result.success_count,
            fail_count=result.fail_count,
            elapsed_ms=result.elapsed_ms,
        )
        repo.finish_request(session, request_id, record, now, outcomes)
        repo.save_members(session, updated, now)


def _confirm(
    state: rules.MemberState, subscriber: Subscriber, subscribing: bool, project_type: ProjectType
) -> rules.MemberState:
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
        states = repo.member_states(session, batch.member_ids)
        updated: dict[int, rules.MemberState] = {}
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
        record = repo.RequestRecord(
            status=m.RequestStatus.FAILED, http_status=status, iterable_code=code, error=reason
        )
        repo.finish_request(
            session, request_id, record, now, {i: ("error", reason) for i in batch.member_ids}
        )
        repo.save_members(session, updated, now, next_attempts)
    if not retry and not keep_pending:
        report.failed += len(batch.member_ids)
    logger.warning(
        "%s of %d members failed: %s",
        batch.direction.value,
        len(batch.member_ids),
        reason,
        extra={"event": "request_failed", "status": status, "code": code},
    )


# --- in-doubt requests and reconciliation -----------------------------------------------------------


def _list_users(ctx: SyncContext, list_id: int, need_user_ids: bool) -> tuple[set[str], set[str]]:
    """(emails, userIds) Iterable has in the list; getUsers is limited to 5 calls a minute."""
    project_type = ctx.settings.iterable.project_type
    emails: set[str] = set()
    user_ids: set[str] = set()
    if project_type is not ProjectType.USER_ID:
        emails = {
            e.strip().lower() for e in ctx.client.get_list_users(list_id, prefer_user_id=False) if e.strip()
        }
    if project_type is ProjectType.USER_ID or need_user_ids:
        user_ids = {u.strip() for u in ctx.client.get_list_users(list_id, prefer_user_id=True) if u.strip()}
    return emails, user_ids


def _in_list(who: Subscriber, emails: set[str], user_ids: set[str]) -> bool:
    return bool((who.email and who.email in emails) or (who.user_id and who.user_id in user_ids))


def _sent_identity(state: rules.MemberState, subscribing: bool, project_type: ProjectType) -> Subscriber:
    """Who an in-doubt request was about: what the planner sends for this member."""
    who = identity.for_request(
        project_type, rules.current_identity(state), rules.synced_identity(state), subscribing
    )
    return planner.to_subscriber(who, None)


def _resolve_in_flight(ctx: SyncContext, audience: m.Audience, report: RunReport) -> bool:
    """Settle requests a crashed run left in flight; False if that is not possible now."""
    if ctx.client.is_dry_run:
        return True
    with transaction(ctx.factory) as session:
        requests = [(r.id, r.endpoint) for r in repo.in_flight_requests(session, audience.id)]
        members = {rid: repo.request_member_ids(session, rid) for rid, _ in requests}
    if not requests:
        return True
    if audience.list_id is None:
        return True
    try:
        with transaction(ctx.factory) as session:
            # Hybrid projects unsubscribe by userId, so an in-doubt exit is looked up by userId.
            need_ids = ctx.settings.iterable.project_type is ProjectType.HYBRID or any(
                not s.email for ids in members.values() for s in repo.member_states(session, ids).values()
            )
        emails, user_ids = _list_users(ctx, audience.list_id, need_ids)
    except ListNotFoundError as exc:
        _mark_missing(ctx, audience, report, exc)
        return False
    except (RetryableError, PermanentError) as exc:
        report.errors.append(f"{audience.audience_key}: could not read the list back after a crash: {exc}")
        return False
    for request_id, endpoint in requests:
        _settle_request(ctx, request_id, endpoint == "lists/subscribe", members[request_id], emails, user_ids)
    logger.info(
        "audience %r: settled %d in-doubt requests from Iterable's list",
        audience.audience_key,
        len(requests),
        extra={"event": "in_doubt_resolved", "audience": audience.audience_key},
    )
    return True


def _settle_request(
    ctx: SyncContext,
    request_id: int,
    subscribing: bool,
    member_ids: Sequence[int],
    emails: set[str],
    user_ids: set[str],
) -> None:
    project_type = ctx.settings.iterable.project_type
    now = ctx.clock()
    with transaction(ctx.factory) as session:
        states = repo.member_states(session, member_ids)
        updated: dict[int, rules.MemberState] = {}
        outcomes: dict[int, tuple[str, str | None]] = {}
        for member_id, state in states.items():
            sent = _sent_identity(state, subscribing, project_type)
            applied = _in_list(sent, emails, user_ids) == subscribing
            outcomes[member_id] = ("applied" if applied else "not_applied", None)
            if applied:
                updated[member_id] = _confirm(state, sent, subscribing, project_type)
        repo.finish_request(
            session, request_id, repo.RequestRecord(status=m.RequestStatus.RESOLVED), now, outcomes
        )
        repo.save_members(session, updated, now)


def _reconcile(ctx: SyncContext, audience: m.Audience, list_id: int) -> dict[str, int]:
    """Compare the list Iterable has with the stored state and queue whatever repairs it."""
    with transaction(ctx.factory) as session:
        need_ids = repo.audience_has_members_without_email(session, audience.id)
    emails, user_ids = _list_users(ctx, list_id, need_ids)
    with transaction(ctx.factory) as session:
        found = repo.reconcile_audience(
            session, audience.id, emails, user_ids, ctx.settings.iterable.project_type, ctx.clock()
        )
    logger.info(
        "reconciled audience %r: %s",
        audience.audience_key,
        found,
        extra={"event": "reconciled", "audience": audience.audience_key},
    )
    return found


def _finish(ctx: SyncContext, report: RunReport, trigger: str) -> None:
    status = m.RunStatus.FAILED if report.fatal else m.RunStatus.OK
    duration = None
    with transaction(ctx.factory) as session:
        # Counted at the end, not as failures happen: a later pass of this run may have delivered
        # members that an earlier pass had to put back.
        report.retrying = repo.count_waiting(session) + report.events_retrying
        if report.run_id is not None:
            repo.finish_run(
                session,
                report.run_id,
                status=status,
                now=ctx.clock(),
                requests=report.requests,
                subscribed=report.subscribed,
                unsubscribed=report.unsubscribed,
                failed=report.failed,
                summary=report.summary(),
            )
            runs.record_outcome(
                session,
                report.run_id,
                held=report.held,
                events_delivered=report.events_delivered,
                events_failed=report.events_failed,
                retrying=report.retrying,
            )
            duration = runs.duration_seconds(session, report.run_id)
            if trigger == "daemon" and run_log.is_idle(report):
                runs.forget(session, report.run_id)
    run_log.log_finished(report, trigger=trigger, duration=duration)


def preview(ctx: SyncContext) -> list[dict[str, object]]:
    """What the next run would send per audience, read from the store only (nothing is sent)."""
    apply_all(ctx)
    rows: list[dict[str, object]] = []
    with transaction(ctx.factory) as session:
        audiences = repo.all_audiences(session)
    for audience in audiences:
        rows.append(_preview_audience(ctx, audience))
    return rows


def _preview_audience(ctx: SyncContext, audience: m.Audience) -> dict[str, object]:
    audience_settings = effective_settings(ctx.settings, audience)
    counts = {Direction.SUBSCRIBE: 0, Direction.UNSUBSCRIBE: 0}
    requests = unsendable = 0
    after_id = 0
    with transaction(ctx.factory) as session:
        while members := repo.pending_members(
            session, audience.id, ctx.clock(), after_id=after_id, limit=PAGE_SIZE
        ):
            after_id = members[-1].id
            plan = planner.plan_audience(
                members,
                project_type=ctx.settings.iterable.project_type,
                batch_size=ctx.settings.sync.batch_size,
                data_field_names=audience_settings.data_fields,
            )
            for direction in counts:
                counts[direction] += plan.count(direction)
            requests += len(plan.batches)
            unsendable += len(plan.unsendable)
        unsubscribes, synced = repo.guard_counts(session, audience.id, ctx.clock())
    sync = ctx.settings.sync
    hold = planner.guard_hold_reason(
        unsubscribes, synced, planner.GuardLimits(sync.max_unsubscribe_fraction, sync.guard_min_list_size)
    )
    note = hold or ("list to be created" if audience.list_id is None else "")
    if audience.list_state is m.ListState.MISSING:
        note = "list missing in Iterable: run `listsync sync --recreate-missing-lists`"
    return {
        "audience_key": audience.audience_key,
        "list_id": audience.list_id,
        "subscribe": counts[Direction.SUBSCRIBE],
        "unsubscribe": counts[Direction.UNSUBSCRIBE],
        "requests": requests,
        "unsendable": unsendable,
        "note": note,
    }
