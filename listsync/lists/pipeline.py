"""One run of the lists pipeline: audiences taken one at a time under a lease (so replicas share
the work and a dead replica's audiences come back when its lease expires), each settled, checked
and sent."""

from __future__ import annotations

import logging
from datetime import timedelta

from listsync.context import Progress, RunOptions, RunReport, SyncContext
from listsync.db import audiences
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.engine import note, repeat_passes, stop_refused, stop_unreachable, unreachable
from listsync.errors import AuthError, IterableError, ListNotFoundError, RetryableError
from listsync.lists.recovery import reconcile, resolve_in_flight
from listsync.lists.remote import ensure_list, mark_missing
from listsync.lists.send import held, send_pending

logger = logging.getLogger(__name__)


MAX_PASSES = 50


def passes(ctx: SyncContext, options: RunOptions, report: RunReport, progress: Progress | None) -> None:
    reconciled: set[int] = set()

    def one_pass() -> bool:
        before = report.requests
        done = _one_pass(ctx, options, report, progress, reconciled)
        return bool(done) and report.requests > before and not ctx.client.is_dry_run

    repeat_passes(one_pass, max_passes=MAX_PASSES)


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
            stop_refused(report, exc)
        except IterableError as exc:
            # A list-level call failed after the client's retries. No answer at all stops the run;
            # otherwise this audience waits for the next run, the others go on, and the run says
            # why instead of dying with a traceback.
            if isinstance(exc, RetryableError) and unreachable(exc):
                stop_unreachable(report, exc)
            report.errors.append(f"{audience.audience_key}: {exc}")
            logger.warning(
                "audience %r skipped this run: %s",
                audience.audience_key,
                exc,
                extra={"event": "audience_skipped", "audience": audience.audience_key},
            )
        finally:
            with transaction(ctx.factory) as session:
                audiences.release_audience(session, audience.id, ctx.owner)
    return len(seen)


def _claim_next(ctx: SyncContext, seen: list[int], reconcile_only: list[int] | None) -> m.Audience | None:
    """The next audience with due work; with --reconcile, also one that merely has a list."""
    lease = timedelta(seconds=ctx.settings.sync.lease_seconds)
    with transaction(ctx.factory) as session:
        for only in (None, reconcile_only) if reconcile_only else (None,):
            audience = audiences.claim_audience(
                session, owner=ctx.owner, now=ctx.clock(), lease=lease, skip=seen, only=only
            )
            if audience is not None:
                return audience
    return None


def _reconcile_targets(ctx: SyncContext, done: set[int]) -> list[int]:
    with transaction(ctx.factory) as session:
        return [a for a in audiences.audiences_with_lists(session) if a not in done]


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
        note(report.missing_lists, key)
        return
    if not resolve_in_flight(ctx, audience, report):
        return
    list_id = audience.list_id if audience.list_id is not None else ensure_list(ctx, audience)
    if list_id is None:
        return
    if options.reconcile and audience.id not in reconciled:
        reconciled.add(audience.id)
        try:
            report.reconciled[key] = reconcile(ctx, audience, list_id)
        except ListNotFoundError as exc:  # deleted in Iterable: the same verdict as a send would reach
            mark_missing(ctx, audience, report, exc)
            return
    if held(ctx, audience, options, report):
        return
    send_pending(ctx, audience, list_id, report, progress)
