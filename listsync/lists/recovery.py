"""In-doubt requests and reconciliation: what Iterable really has decides."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from sqlalchemy.orm import Session

from listsync.context import RunReport, SyncContext
from listsync.db import ledger, memberships
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.domain import (
    Desired,
    Member,
    ProjectType,
    Synced,
)
from listsync.errors import ListNotFoundError, PermanentError, RetryableError
from listsync.iterable.payloads import Subscriber
from listsync.lists import identity, planner
from listsync.lists import membership as rules
from listsync.lists.record import confirm
from listsync.lists.remote import list_users, mark_missing

logger = logging.getLogger(__name__)


def reconcile_audience(
    session: Session,
    audience_id: int,
    emails: set[str],
    user_ids: set[str],
    project_type: ProjectType,
    now: datetime,
) -> dict[str, int]:
    """Repair stored state from the list Iterable really has, in both directions.

    missing: should be in, Iterable lacks them -> resent. extra: Iterable has them, we want them
    out (or never heard of them) -> queued for unsubscribe. adopted: in both but not recorded as
    synced -> recorded, nothing sent.
    """
    counts = {"missing": 0, "extra": 0, "adopted": 0, "unknown_added": 0}
    seen_emails: set[str] = set()
    seen_ids: set[str] = set()
    changed: dict[int, Member] = {}
    for member_id, state in memberships.audience_members(session, audience_id):
        present = bool((state.email and state.email in emails) or (state.user_id and state.user_id in user_ids))
        seen_emails.add(state.email)
        seen_ids.add(state.user_id)
        fixed = _reconciled(state, present, project_type, counts)
        if fixed is not None:
            changed[member_id] = fixed
    memberships.save_members(session, changed, now)
    unknown_emails, unknown_ids = _strangers(
        emails - seen_emails, user_ids - seen_ids, seen_emails, seen_ids, project_type
    )
    counts["unknown_skipped"] = (
        len(emails - seen_emails) + len(user_ids - seen_ids) - len(unknown_emails) - len(unknown_ids)
    )
    counts["unknown_added"] = memberships.adopt_unknown(session, audience_id, unknown_emails, unknown_ids, now)
    counts["extra"] += counts["unknown_added"]
    return counts


def _strangers(
    emails: set[str], user_ids: set[str], seen_emails: set[str], seen_ids: set[str], project_type: ProjectType
) -> tuple[set[str], set[str]]:
    """The list members that are surely nobody listsync knows. getUsers gives emails and userIds
    as separate lists, so in a hybrid project an unknown email may be the email of a member stored
    by userId alone (and an unknown userId that of a member stored by email alone): those are left
    alone rather than unsubscribed by mistake."""
    if project_type is ProjectType.USER_ID:
        return set(), user_ids
    return (emails if "" not in seen_emails else set()), (user_ids if "" not in seen_ids else set())


def _reconciled(
    state: Member, present: bool, project_type: ProjectType, counts: dict[str, int]
) -> Member | None:
    if state.desired is Desired.IN and not present and state.synced is Synced.IN:
        counts["missing"] += 1
        return rules.settle(replace(state, synced=None, synced_email=None, synced_user_id=None), project_type)
    if state.desired is Desired.IN and present and state.synced is not Synced.IN:
        counts["adopted"] += 1
        return rules.confirm(state, Synced.IN, state.email or None, state.user_id or None, project_type)
    if state.desired is not Desired.IN and present and state.synced is not Synced.IN:
        counts["extra"] += 1
        return rules.settle(
            replace(
                state,
                synced=Synced.IN,
                synced_email=state.email or None,
                synced_user_id=state.user_id or None,
            ),
            project_type,
        )
    return None


def _in_list(who: Subscriber, emails: set[str], user_ids: set[str]) -> bool:
    return bool((who.email and who.email in emails) or (who.user_id and who.user_id in user_ids))


def _sent_identity(state: Member, subscribing: bool, project_type: ProjectType) -> Subscriber:
    """Who an in-doubt request was about: what the planner sends for this member."""
    who = identity.for_request(
        project_type, rules.current_identity(state), rules.synced_identity(state), subscribing
    )
    return planner.to_subscriber(who, None)


def resolve_in_flight(ctx: SyncContext, audience: m.Audience, report: RunReport) -> bool:
    """Settle requests a crashed run left in flight; False if that is not possible now."""
    if ctx.client.is_dry_run:
        return True
    with transaction(ctx.factory) as session:
        requests = [(r.id, r.endpoint) for r in ledger.in_flight_requests(session, audience.id)]
        members = {rid: ledger.request_member_ids(session, rid) for rid, _ in requests}
    if not requests:
        return True
    if audience.list_id is None:
        return True
    try:
        with transaction(ctx.factory) as session:
            # Hybrid projects unsubscribe by userId, so an in-doubt exit is looked up by userId.
            need_ids = ctx.settings.iterable.project_type is ProjectType.HYBRID or any(
                not s.email for ids in members.values() for s in memberships.member_states(session, ids).values()
            )
        emails, user_ids = list_users(ctx, audience.list_id, need_ids)
    except ListNotFoundError as exc:
        mark_missing(ctx, audience, report, exc)
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
        states = memberships.member_states(session, member_ids)
        updated: dict[int, Member] = {}
        outcomes: dict[int, tuple[str, str | None]] = {}
        for member_id, state in states.items():
            sent = _sent_identity(state, subscribing, project_type)
            applied = _in_list(sent, emails, user_ids) == subscribing
            outcomes[member_id] = ("applied" if applied else "not_applied", None)
            if applied:
                updated[member_id] = confirm(state, sent, subscribing, project_type)
        ledger.finish_request(
            session, request_id, ledger.RequestRecord(status=m.RequestStatus.RESOLVED), now, outcomes
        )
        memberships.save_members(session, updated, now)


def reconcile(ctx: SyncContext, audience: m.Audience, list_id: int) -> dict[str, int]:
    """Compare the list Iterable has with the stored state and queue whatever repairs it."""
    with transaction(ctx.factory) as session:
        need_ids = memberships.audience_has_members_without_email(session, audience.id)
    emails, user_ids = list_users(ctx, list_id, need_ids)
    with transaction(ctx.factory) as session:
        found = reconcile_audience(
            session, audience.id, emails, user_ids, ctx.settings.iterable.project_type, ctx.clock()
        )
    logger.info(
        "reconciled audience %r: %s",
        audience.audience_key,
        found,
        extra={"event": "reconciled", "audience": audience.audience_key},
    )
    return found
