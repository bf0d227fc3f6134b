"""The set-based fold of a staged batch (`db.fold_stage`): the database reads the deltas out of the
stored events, folds the common ones itself (`fast_fold` says which, and why that is the rules'
outcome), and Python folds only the rest, with the rules, in batch order (`rules_fold`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.orm import Session

from listsync.config import Settings
from listsync.db import audiences, fold, fold_stage, inbox, memberships
from listsync.db.session import is_postgres
from listsync.domain import Desired, MembershipDelta, ProjectType, Rejection
from listsync.ingest import audience
from listsync.ingest.scrub import kept_payload
from listsync.lists import fast_fold, rules_fold

Refused = list[tuple[str, str]]


def fold_staged_inbox(session: Session, settings: Settings, now: datetime) -> Refused:
    """Fold the staged inbox events into memberships; returns the events refused by validation.

    A batch holding events stored under other validation rules is folded in Python, each event
    validated again (the set-based path trusts what the running rules accepted)."""
    if "check" in fold_stage.staged_kinds(session):
        rows = inbox.events_by_id(session, fold_stage.positions(session))
        return rules_fold.fold_events(session, settings, [rows[i] for i in sorted(rows)], now)
    fold_stage.drop_idle_changes(session)
    keys = fold_stage.delta_keys(session)
    if not is_postgres(session):
        fold_stage.to_python(session, [key for key in keys if not fast_fold.path_safe(key)])
    ids = audiences.ensure_audiences(session, keys, now)
    fold_stage.set_audience_ids(session, ids)
    _stage_data_fields(session, settings, keys)
    _, refused = _fold_classified(session, settings.iterable.project_type, now, settings)
    _record_settings(session, now)
    return refused


def fold_staged_deltas(
    session: Session, items: Sequence[fast_fold.FoldItem], project_type: ProjectType, now: datetime
) -> fast_fold.FoldCounts:
    """Fold (audience_id, delta, data fields) items, already read, the set-based way."""
    fold_stage.stage_deltas(session, [(pos, a, delta, fields) for pos, (a, delta, fields) in enumerate(items)])
    counts, _ = _fold_classified(session, project_type, now, None)
    return counts


def _stage_data_fields(session: Session, settings: Settings, keys: Sequence[str]) -> None:
    """The staged deltas' data fields, per group of audiences configured with the same names."""
    for names, group in fast_fold.by_field_names(keys, lambda key: settings.audience(key).data_fields).items():
        if not is_postgres(session) and not all(fast_fold.path_safe(name) for name in names):
            fold_stage.to_python(session, group)
        else:
            fold_stage.select_data_fields(session, names, group)


def _fold_classified(
    session: Session, project_type: ProjectType, now: datetime, settings: Settings | None
) -> tuple[fast_fold.FoldCounts, Refused]:
    """Classify the staged deltas, fold the rules' share in Python in batch order (flushed before
    an email change, as the rules fold does), insert every new member in batch order, and apply
    the set-based updates. `settings`: to read the events the database left to Python."""
    found = fold.classify(session)
    counts = fast_fold.FoldCounts(inserted=found["insert"], updated=found["update"], by_rules=found["rules"])
    rows = fold_stage.python_rows(session)
    events = inbox.events_by_id(session, [row.pos for row in rows if row.kind != "delta"]) if settings else {}
    pending: list[tuple[int, fast_fold.FoldItem]] = []
    refused: Refused = []
    inserted_upto = -1  # positions start at 0
    for row in rows:
        if row.kind == "delta":
            pending.append((row.pos, _item_of(row)))
            continue
        assert settings is not None
        stored = events[row.pos]
        event = rules_fold.event_of(stored)
        if isinstance(event, Rejection):
            refused.append((f"{event.reason} (inbox event {row.pos}, refused when applied)", kept_payload(stored.payload)))
            continue
        deltas = audience.extract_deltas(event)
        if deltas:
            ids = audiences.ensure_audiences(session, (d.audience_key for d in deltas), now)
            items = rules_fold.fold_items(settings, deltas, ids)
            pending.extend((row.pos, item) for item in items)
            counts.by_rules += len(items)
        change = audience.extract_email_change(event)
        if change is None:
            continue
        # The change reads and writes rows of its user: the rules' deltas before it are written
        # first; in email projects it may create a member, after the batch's earlier new ones.
        if pending or project_type is ProjectType.EMAIL:
            _flush(session, pending, project_type, now, after=inserted_upto, before=row.pos)
            pending, inserted_upto = [], row.pos
        rules_fold.apply_email_change(session, change, project_type, now)
    _flush(session, pending, project_type, now, after=inserted_upto, before=fold.END)
    fold.update_matched(session, project_type, now)
    return counts, refused


def _item_of(row: fold_stage.StagedRow) -> fast_fold.FoldItem:
    assert row.audience_id is not None and row.ts is not None and row.desired is not None
    delta = MembershipDelta(
        audience_key=row.audience_key or "",
        user_id=row.user_id,
        email=row.email,
        desired=Desired(row.desired),
        timestamp=row.ts,
        message_id=row.msg or "",
    )
    return row.audience_id, delta, row.data_fields


def _flush(
    session: Session,
    pending: Sequence[tuple[int, fast_fold.FoldItem]],
    project_type: ProjectType,
    now: datetime,
    *,
    after: int,
    before: int,
) -> None:
    """Write the rules' fold of `pending`, and insert the batch's new members positioned in
    (after, before), in batch order (deletes, updates, inserts, as `memberships.write_members`
    orders them)."""
    known = rules_fold.fold_by_rules(session, pending, project_type)
    memberships.delete_members(session, known.removed)
    memberships.update_members(session, known.changed(), now)
    fold_stage.stage_created(session, known.created())
    fold.insert_new(session, after, before, now)


def _record_settings(session: Session, now: datetime) -> None:
    """Per audience, the Engage settings of the batch's latest event that carried any."""
    latest = fold_stage.latest_settings(session)
    if not latest:
        return
    ids = audiences.ensure_audiences(session, (key for key, _ in latest), now)
    for key, sent in latest:
        found = audience.audience_settings(sent)
        if found:
            audiences.record_audience_settings(session, ids[key], found)
