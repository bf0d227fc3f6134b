"""The set-based fold's statements: the stored identifiers a batch of deltas touches, and the
common update (`listsync.lists.fast_fold` says which deltas take it and why) applied to many
memberships in one statement.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Update,
    and_,
    bindparam,
    case,
    false,
    func,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.session import is_postgres, key_filters
from listsync.domain import Desired, MembershipDelta, MemberState, ProjectType, Synced

_T = m.table(m.Membership)


def stored_keys(
    session: Session, audience_ids: set[int], user_ids: set[str], emails: set[str]
) -> list[Any]:
    """(id, audience_id, user_id, email, desired_at, desired_message_id) of the memberships of
    these audiences sharing a userId or an email with the given ones, locked on PostgreSQL (so
    what the fold decides from them still holds when it writes)."""
    columns = (_T.c.id, _T.c.audience_id, _T.c.user_id, _T.c.email, _T.c.desired_at, _T.c.desired_message_id)
    found: dict[int, Any] = {}
    for column, values in ((_T.c.user_id, user_ids - {""}), (_T.c.email, emails - {""})):
        for keys in key_filters(session, column, sorted(values)):
            stmt = select(*columns).where(_T.c.audience_id.in_(sorted(audience_ids)), keys)
            if is_postgres(session):
                stmt = stmt.with_for_update()
            found.update((row.id, row) for row in session.execute(stmt))
    return list(found.values())


_GROWN = text(
    "SELECT c.reltuples, s.n_mod_since_analyze FROM pg_class c"
    " JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.oid = 'memberships'::regclass"
)
ANALYZE_AFTER = 5000  # changed rows since the last ANALYZE, at least


def keep_plans_fresh(session: Session) -> None:
    """ANALYZE memberships on PostgreSQL once it changed by more than half its analyzed size.

    The look-ups above are planned from table statistics. A first sync grows memberships from
    nothing far faster than autovacuum analyzes it (once a minute at best), and a plan made for an
    empty table scans the whole audience for every batch: quadratic. Re-analyzing whenever the
    table has grown by half (a handful of times per first sync, each a sample of 30,000 rows)
    keeps the index plans.
    """
    if not is_postgres(session):
        return
    found = session.execute(_GROWN).one_or_none()
    if found is None:
        return
    analyzed, changed = max(float(found[0] or 0), 0.0), int(found[1] or 0)
    if changed > max(ANALYZE_AFTER, analyzed / 2):
        session.execute(text("ANALYZE memberships"))


UpdateItem = tuple[int, MembershipDelta, dict[str, Any] | None]  # (member id, delta, data fields)


def update_from_deltas(
    session: Session, items: Sequence[UpdateItem], project_type: ProjectType, now: datetime
) -> None:
    """Apply newer deltas to memberships whose identifiers they already carry (one statement per
    desired state, with or without data fields). The caller checked that each delta is newer
    than its row, with the row locked; the state is computed from the row as it is now."""
    groups: dict[tuple[Desired, bool], list[dict[str, Any]]] = defaultdict(list)
    for member_id, delta, fields in items:
        params = {"b_id": member_id, "b_at": delta.timestamp, "b_msg": delta.message_id, "b_now": now}
        if fields is not None:
            params["b_fields"] = fields
        groups[(delta.desired, fields is not None)].append(params)
    for (desired, with_fields), rows in groups.items():
        session.execute(_update_statement(desired, with_fields, project_type), rows)


@cache
def _update_statement(desired: Desired, with_fields: bool, project_type: ProjectType) -> Update:
    """`membership.apply_delta` for a newer delta about a member whose identifiers it carries:

    desired/desired_at/desired_message_id from the delta; data fields replaced only when the delta
    has some; unless the desired state is unchanged and the member failed (the failure sticks),
    the state is `settle`'s (pending exactly when `needs_send`), and a changed desired state
    clears attempts and the last error. next_attempt_at is cleared whenever attempts end up 0, as
    `memberships.write_members` does for the rules' path.
    """
    changed = _T.c.desired != desired
    values: dict[str, Any] = {
        "desired": desired,
        "desired_at": bindparam("b_at", type_=_T.c.desired_at.type),
        "desired_message_id": bindparam("b_msg", type_=_T.c.desired_message_id.type),
        "state": case(
            (and_(~changed, _T.c.state == MemberState.FAILED), _T.c.state),
            (_needs_send(desired, project_type), MemberState.PENDING),
            else_=MemberState.SYNCED,
        ),
        "attempts": case((changed, 0), else_=_T.c.attempts),
        "last_error": case((changed, null()), else_=_T.c.last_error),
        "next_attempt_at": case((or_(changed, _T.c.attempts == 0), null()), else_=_T.c.next_attempt_at),
        "updated_at": bindparam("b_now", type_=_T.c.updated_at.type),
    }
    if with_fields:
        values["data_fields"] = bindparam("b_fields", type_=_T.c.data_fields.type)
    return update(_T).where(_T.c.id == bindparam("b_id")).values(values)


def _needs_send(desired: Desired, project_type: ProjectType) -> ColumnElement[bool]:
    """`membership.needs_send` of the row with `desired`, its identifiers unchanged."""
    listed = and_(_T.c.synced.is_not(None), _T.c.synced == Synced.IN)
    if desired is Desired.IN:
        return or_(~listed, and_(listed, _stale(project_type)))
    if desired is Desired.OUT:
        return listed
    return false()


def _stale(project_type: ProjectType) -> ColumnElement[bool]:
    """`identity.stale(current, synced)` of the row ('' and NULL both mean absent)."""
    synced_email = func.coalesce(_T.c.synced_email, "")
    if project_type is ProjectType.USER_ID:
        return false()
    if project_type is ProjectType.HYBRID:
        new_user_id = and_(_T.c.user_id != "", _T.c.user_id != func.coalesce(_T.c.synced_user_id, ""))
        return or_(new_user_id, and_(synced_email != "", _T.c.email != synced_email))
    return and_(_T.c.email != "", _T.c.email != synced_email)
