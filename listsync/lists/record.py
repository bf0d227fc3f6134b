"""Record one request's answer: the ledger row completed and its members' new state, in one
transaction. The common outcome is a few set-based statements (`db.outcomes`); only the members
whose outcome is not the common one (refused items, rows changed while the request was on the wire)
are read back and decided by `membership.confirm` / `membership.fail` in Python."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from listsync.context import RunReport, SyncContext
from listsync.db import ledger, memberships, outcomes
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.domain import Desired, Direction, Member, ProjectType, Synced
from listsync.iterable.payloads import BulkResult, ItemOutcome, Subscriber
from listsync.lists import membership as rules
from listsync.lists import planner

logger = logging.getLogger(__name__)

CONFIRMED = {
    Direction.SUBSCRIBE: (ItemOutcome.OK.value,),
    # not in the list, or no such user: either way it is out
    Direction.UNSUBSCRIBE: (ItemOutcome.OK.value, ItemOutcome.NOT_FOUND.value),
}


def item_verdict(direction: Direction, outcome: ItemOutcome, update_only: bool) -> tuple[bool, str | None]:
    """(confirmed, failure reason) for one member of a 2xx answer."""
    if outcome.value in CONFIRMED[direction]:
        return True, None
    reasons = {
        ItemOutcome.NOT_FOUND: "not_found: no such user in Iterable"
        + (" (update_existing_users_only is set)" if update_only else ""),
        ItemOutcome.INVALID: "invalid: Iterable refused the email or userId as invalid",
        ItemOutcome.FORGOTTEN: "forgotten: the user was forgotten (GDPR) in Iterable; not retried",
        ItemOutcome.CONFLICT: "conflict: the email and userId belong to different Iterable users",
        ItemOutcome.INVALID_DATA: "invalid_data: Iterable refused the user's data fields",
    }
    return False, reasons[outcome]


def confirm(state: Member, subscriber: Subscriber, subscribing: bool, project_type: ProjectType) -> Member:
    if subscribing:
        return rules.confirm(
            state, Synced.IN, subscriber.email or None, subscriber.user_id or None, project_type
        )
    return rules.confirm(state, Synced.OUT, None, None, project_type)


@dataclass(frozen=True)
class Answer:
    """What one request brought back, decided per member: the outcomes that are not plain OK."""

    result: BulkResult
    refused: dict[int, tuple[str, str | None]]


def judge(batch: planner.Batch, result: BulkResult, update_only: bool) -> Answer:
    """Per-member verdicts; an answer without failure buckets is all OK, with no per-member work."""
    refused: dict[int, tuple[str, str | None]] = {}
    if result.failed:
        for member_id, subscriber in zip(batch.member_ids, batch.subscribers, strict=True):
            outcome = result.outcome(subscriber.email, subscriber.user_id)
            if outcome is not ItemOutcome.OK:
                confirmed, reason = item_verdict(batch.direction, outcome, update_only)
                refused[member_id] = (outcome.value, reason)
    return Answer(result, refused)


def record_success(
    ctx: SyncContext, request_id: int, batch: planner.Batch, answer: Answer, report: RunReport
) -> None:
    subscribing = batch.direction is Direction.SUBSCRIBE
    confirmed = CONFIRMED[batch.direction]
    now = ctx.clock()
    result = answer.result
    record = ledger.RequestRecord(
        status=m.RequestStatus.OK if result.fail_count == 0 else m.RequestStatus.PARTIAL,
        http_status=result.http_status,
        success_count=result.success_count,
        fail_count=result.fail_count,
        elapsed_ms=result.elapsed_ms,
    )
    ok = (ItemOutcome.OK.value, None)
    confirmed_sent = [
        (i, s.email or "", s.user_id or "")
        for i, s in zip(batch.member_ids, batch.subscribers, strict=True)
        if answer.refused.get(i, ok)[0] in confirmed
    ]
    with transaction(ctx.factory, durable=False) as session:
        ledger.finish_request(
            session, request_id, record, now, answer.refused, common=ok, sent=_sent_identities(batch, answer)
        )
        if subscribing:
            unmatched = outcomes.confirm_subscribed(session, confirmed_sent, now)
            exceptions = [i for i in batch.member_ids if i in unmatched or i in answer.refused]
        else:
            exceptions = [i for i, (outcome, _) in answer.refused.items() if outcome not in confirmed]
            outcomes.confirm_unsubscribed(session, [i for i, _, _ in confirmed_sent], now)
        _decide_exceptions(ctx, session, batch, exceptions, answer, now)
    failed = sum(outcome not in confirmed for outcome, _ in answer.refused.values())
    report.failed += failed
    done = len(batch.member_ids) - failed
    report.subscribed += done if subscribing else 0
    report.unsubscribed += 0 if subscribing else done


def _sent_identities(batch: planner.Batch, answer: Answer) -> dict[int, tuple[str | None, str | None]]:
    """What the refused members were sent with, for their ledger items."""
    return {
        i: (s.email or None, s.user_id or None)
        for i, s in zip(batch.member_ids, batch.subscribers, strict=True)
        if i in answer.refused
    }


def _decide_exceptions(
    ctx: SyncContext,
    session: Session,
    batch: planner.Batch,
    exceptions: Sequence[int],
    answer: Answer,
    now: datetime,
) -> None:
    """The members the set-based statements left alone, through the pure rules one by one."""
    if not exceptions:
        return
    subscribing = batch.direction is Direction.SUBSCRIBE
    project_type = ctx.settings.iterable.project_type
    sent = dict(zip(batch.member_ids, batch.subscribers, strict=True))
    states = memberships.member_states(session, exceptions)
    updated: dict[int, Member] = {}
    for member_id, state in states.items():
        outcome, reason = answer.refused.get(member_id, (ItemOutcome.OK.value, None))
        if outcome in CONFIRMED[batch.direction]:
            updated[member_id] = confirm(state, sent[member_id], subscribing, project_type)
        else:
            updated[member_id] = rules.fail(
                state, reason or "", subscribing=subscribing, project_type=project_type
            )
    memberships.save_members(session, updated, now)


def record_failure(
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
    subscribing = batch.direction is Direction.SUBSCRIBE
    record = ledger.RequestRecord(
        status=m.RequestStatus.FAILED, http_status=status, iterable_code=code, error=reason
    )
    with transaction(ctx.factory, durable=False) as session:
        ledger.finish_request(session, request_id, record, now, {}, common=("error", reason))
        outcomes.lock_members(session, batch.member_ids)
        if keep_pending:
            _put_back(ctx, session, batch.member_ids, reason if retry else None, now)
        else:
            unwanted = outcomes.failed_unwanted(session, batch.member_ids, subscribing=subscribing)
            outcomes.fail_wanted(session, batch.member_ids, reason, subscribing=subscribing, now=now)
            project_type = ctx.settings.iterable.project_type
            states = memberships.member_states(session, unwanted)
            settled = {
                i: rules.fail(s, reason, subscribing=subscribing, project_type=project_type)
                for i, s in states.items()
            }
            memberships.save_members(session, settled, now)
    if not retry and not keep_pending:
        report.failed += len(batch.member_ids)
    logger.warning(
        "%s of %d members failed: %s",
        batch.direction.value,
        len(batch.member_ids),
        reason,
        extra={"event": "request_failed", "status": status, "code": code},
    )


def _put_back(
    ctx: SyncContext, session: Session, member_ids: Sequence[int], reason: str | None, now: datetime
) -> None:
    """`membership.retry_later` (when `reason`) set-based: one UPDATE per distinct attempt count,
    as the backoff delay depends on it (usually one: the members of a batch move together)."""
    if reason is None:
        outcomes.put_back(session, member_ids, now, reason=None)
        return
    sync = ctx.settings.sync
    # Highest count first: each UPDATE raises its members' count, which must not make them match
    # the next, lower count's UPDATE as well.
    for attempts in sorted(outcomes.attempts_of(session, member_ids), reverse=True):
        delay = rules.retry_delay(attempts + 1, sync.retry_base_seconds, sync.retry_max_seconds)
        outcomes.put_back(
            session,
            member_ids,
            now,
            reason=reason,
            attempts=attempts,
            next_attempt_at=now + timedelta(seconds=delay),
        )


def record_unsendable(ctx: SyncContext, unsendable: Sequence[tuple[int, str]], report: RunReport) -> None:
    if not unsendable or ctx.client.is_dry_run:
        return
    project_type = ctx.settings.iterable.project_type
    with transaction(ctx.factory, durable=False) as session:
        states = memberships.member_states(session, [member_id for member_id, _ in unsendable])
        reasons = dict(unsendable)
        updated = {
            i: rules.fail(s, reasons[i], subscribing=s.desired is Desired.IN, project_type=project_type)
            for i, s in states.items()
        }
        memberships.save_members(session, updated, ctx.clock())
    report.failed += len(unsendable)
