"""The Iterable side of an audience's list: find or create it, notice it is gone, read it back."""

from __future__ import annotations

import logging

from listsync.context import RunReport, SyncContext
from listsync.db import audiences, memberships
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.domain import ProjectType
from listsync.engine import note
from listsync.errors import IterableError, ListNotFoundError

logger = logging.getLogger(__name__)


def ensure_list(ctx: SyncContext, audience: m.Audience) -> int | None:
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
        audiences.set_list(session, audience.id, list_id, m.ListState.READY)
    logger.info(
        "audience %r uses Iterable list %s", key, list_id, extra={"event": "list_ready", "list_id": list_id}
    )
    return list_id


def reset_missing_lists(ctx: SyncContext) -> None:
    with transaction(ctx.factory) as session:
        for audience_id, key in audiences.missing_list_audiences(session):
            audiences.set_list(session, audience_id, None, m.ListState.PENDING)
            resent = memberships.resend_all(session, audience_id, ctx.clock())
            logger.info(
                "audience %r: list will be recreated and %d members resent",
                key,
                resent,
                extra={"event": "list_recreate", "audience": key},
            )


def mark_missing(
    ctx: SyncContext, audience: m.Audience, report: RunReport, error: ListNotFoundError
) -> None:
    with transaction(ctx.factory) as session:
        audiences.set_list(session, audience.id, audience.list_id, m.ListState.MISSING)
    note(report.missing_lists, audience.audience_key)
    logger.error(
        "Iterable no longer knows list %s of audience %r (%s); sending to it stopped. Run "
        "`listsync sync --recreate-missing-lists` to recreate it.",
        audience.list_id,
        audience.audience_key,
        error,
        extra={"event": "list_missing", "audience": audience.audience_key},
    )


def list_still_exists(ctx: SyncContext, list_id: int) -> bool:
    """Whether GET /api/lists still shows the list; True when that cannot be told right now (a
    refused key included: the next send meets it and stops the run, after this answer is recorded)."""
    try:
        return any(lst.id == list_id for lst in ctx.client.get_lists())
    except IterableError:
        return True


def list_users(ctx: SyncContext, list_id: int, need_user_ids: bool) -> tuple[set[str], set[str]]:
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
