"""The set-based fold's statements over the staged batch (`db.fold_stage`): which deltas the
database folds alone (`classify`; `listsync.lists.fast_fold` says why their outcome is the rules'
outcome), and the inserts and updates that apply them, a few statements per batch.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache

from sqlalchemy import (
    ColumnElement,
    TextClause,
    Update,
    and_,
    bindparam,
    case,
    false,
    func,
    null,
    or_,
    text,
    update,
)
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.fold_stage import STAGE
from listsync.db.session import is_postgres, rows_affected
from listsync.domain import Desired, MemberState, ProjectType, Synced

_T = m.table(m.Membership)


_GROWN = text(
    "SELECT c.reltuples, s.n_mod_since_analyze FROM pg_class c"
    " JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.oid = 'memberships'::regclass"
)
ANALYZE_AFTER = 1000  # changed rows since the last ANALYZE, at least (below one batch of the fold)


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


def classify(session: Session) -> dict[str, int]:
    """Sort the staged deltas (known desired state) into the set-based path (`set`: `member_id`
    the stored member with the delta's identifiers, or none) and the rules' (`rules`).

    `set` takes a delta that is alone in its batch (no other delta of the audience, and no event
    Python reads, names its userId or its email) and whose audience holds no member sharing its
    userId or email except, at most, one with exactly its identifiers. Returns the counts
    (`insert`, `update`, `rules`)."""
    for statement in _CLASSIFY:
        session.execute(statement)
    counts = {"insert": 0, "update": 0, "rules": 0}
    for cls, new, n in session.execute(_COUNTS):
        counts["rules" if cls == "rules" else "insert" if new else "update"] += n
    return counts


_OTHER_IN_BATCH = """EXISTS (SELECT 1 FROM fold_stage o WHERE o.{key} = fold_stage.{key} AND o.pos <> fold_stage.pos
      AND (o.kind IN ('event', 'change')
           OR (o.kind = 'delta' AND o.desired <> 'unknown' AND o.audience_id = fold_stage.audience_id)))"""
_OTHER_STORED = """EXISTS (SELECT 1 FROM memberships m WHERE m.audience_id = fold_stage.audience_id
      AND m.{key} = fold_stage.{key} AND m.id <> COALESCE(fold_stage.member_id, 0))"""
# Two statements: the second looks for other members by (audience, key) and id alone, which each
# key's index covers (a condition on the other identifier would lead SQLite to scan the audience).
_CLASSIFY = (
    text("""
UPDATE fold_stage SET member_id = (SELECT m.id FROM memberships m WHERE m.audience_id = fold_stage.audience_id
    AND m.user_id = COALESCE(fold_stage.user_id, '') AND m.email = COALESCE(fold_stage.email, ''))
WHERE kind = 'delta' AND desired <> 'unknown'
"""),
    text(f"""
UPDATE fold_stage SET cls = CASE WHEN (user_id IS NULL AND email IS NULL)
    OR {_OTHER_IN_BATCH.format(key="user_id")}
    OR {_OTHER_IN_BATCH.format(key="email")}
    OR {_OTHER_STORED.format(key="user_id")}
    OR {_OTHER_STORED.format(key="email")}
    THEN 'rules' ELSE 'set' END
WHERE kind = 'delta' AND desired <> 'unknown'
"""),
)
_COUNTS = text(
    "SELECT cls, member_id IS NULL, count(*) FROM fold_stage WHERE kind = 'delta' AND cls IS NOT NULL GROUP BY 1, 2"
)

END = 2**62  # past every staged position


def insert_new(session: Session, after: int, before: int, now: datetime) -> int:
    """Insert the staged new members with positions in (after, before), in position order: the
    set-based path's (`membership.new_member` of the delta: pending when it wants in) and the ones
    the rules created (`made`, with their state)."""
    return rows_affected(session.execute(_insert(is_postgres(session)), {"after": after, "before": before, "now": now}))


@cache
def _insert(postgres: bool) -> TextClause:
    json_null = "'null'::jsonb" if postgres else "'null'"
    return text(f"""
INSERT INTO memberships (audience_id, user_id, email, desired, desired_at, desired_message_id, data_fields,
  synced, synced_email, synced_user_id, state, attempts, last_error, created_at, updated_at)
SELECT audience_id, COALESCE(user_id, ''), COALESCE(email, ''), desired, ts, msg, COALESCE(data_fields, {json_null}),
  synced, synced_email, synced_user_id, COALESCE(state, CASE WHEN desired = 'in' THEN 'pending' ELSE 'synced' END),
  COALESCE(attempts, 0), last_error, :now, :now
FROM fold_stage WHERE ((cls = 'set' AND member_id IS NULL) OR cls = 'made') AND pos > :after AND pos < :before
ORDER BY pos
""").bindparams(bindparam("now", type_=m.UTCDateTime()))


def update_matched(session: Session, project_type: ProjectType, now: datetime) -> int:
    """Apply the set-based deltas to the stored members with their identifiers, where newer."""
    return rows_affected(session.execute(_update_statement(project_type, is_postgres(session)), {"b_now": now}))


@cache
def _update_statement(project_type: ProjectType, postgres: bool) -> Update:
    """`membership.apply_delta` for a newer delta about a member whose identifiers it carries:

    desired/desired_at/desired_message_id from the delta; data fields replaced only when the delta
    has some; unless the desired state is unchanged and the member failed (the failure sticks),
    the state is `settle`'s (pending exactly when `needs_send`), and a changed desired state
    clears attempts and the last error. next_attempt_at is cleared whenever attempts end up 0, as
    `memberships.update_members` does for the rules' path. Newer is (timestamp, messageId) as
    Python orders them (code points: PostgreSQL compares in the "C" collation).
    """
    changed = _T.c.desired != STAGE.c.desired
    stored_msg = _T.c.desired_message_id.collate("C") if postgres else _T.c.desired_message_id
    newer = or_(STAGE.c.ts > _T.c.desired_at, and_(STAGE.c.ts == _T.c.desired_at, STAGE.c.msg > stored_msg))
    values = {
        "desired": STAGE.c.desired,
        "desired_at": STAGE.c.ts,
        "desired_message_id": STAGE.c.msg,
        "data_fields": func.coalesce(STAGE.c.data_fields, _T.c.data_fields),
        "state": case(
            (and_(~changed, _T.c.state == MemberState.FAILED), _T.c.state),
            (_needs_send(project_type), MemberState.PENDING),
            else_=MemberState.SYNCED,
        ),
        "attempts": case((changed, 0), else_=_T.c.attempts),
        "last_error": case((changed, null()), else_=_T.c.last_error),
        "next_attempt_at": case((or_(changed, _T.c.attempts == 0), null()), else_=_T.c.next_attempt_at),
        "updated_at": bindparam("b_now", type_=_T.c.updated_at.type),
    }
    return (
        update(_T)
        .where(_T.c.id == STAGE.c.member_id, STAGE.c.cls == "set", newer)
        .values(values)
        .execution_options(synchronize_session=False)
    )


def _needs_send(project_type: ProjectType) -> ColumnElement[bool]:
    """`membership.needs_send` of the row with the staged desired state, its identifiers unchanged."""
    listed = and_(_T.c.synced.is_not(None), _T.c.synced == Synced.IN)
    return or_(
        and_(STAGE.c.desired == Desired.IN.value, or_(~listed, and_(listed, _stale(project_type)))),
        and_(STAGE.c.desired == Desired.OUT.value, listed),
    )


def _stale(project_type: ProjectType) -> ColumnElement[bool]:
    """`identity.stale(current, synced)` of the row ('' and NULL both mean absent)."""
    synced_email = func.coalesce(_T.c.synced_email, "")
    if project_type is ProjectType.USER_ID:
        return false()
    if project_type is ProjectType.HYBRID:
        new_user_id = and_(_T.c.user_id != "", _T.c.user_id != func.coalesce(_T.c.synced_user_id, ""))
        return or_(new_user_id, and_(synced_email != "", _T.c.email != synced_email))
    return and_(_T.c.email != "", _T.c.email != synced_email)
