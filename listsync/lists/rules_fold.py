"""The rules' fold, in Python: each delta resolved by `identity` and moved by `membership`, over the
memberships it may be about, loaded and written back by id. It folds what the set-based path
(`lists.set_fold`) leaves to it: merges, renames, several deltas for one member, email changes,
events stored under other validation rules, and any batch whose set-based fold failed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from listsync.config import Settings
from listsync.db import audiences, memberships
from listsync.db.inbox import StoredEvent
from listsync.domain import (
    Desired,
    EmailChange,
    InboundEvent,
    Member,
    MembershipDelta,
    ProjectType,
    Rejection,
)
from listsync.ingest import audience, stored, validate
from listsync.ingest.scrub import kept_payload
from listsync.lists import identity
from listsync.lists import membership as rules
from listsync.lists.fast_fold import FoldItem
from listsync.lists.planner import select_data_fields


def fold_events(
    session: Session, settings: Settings, rows: Sequence[StoredEvent], now: datetime
) -> list[tuple[str, str]]:
    """Fold inbox rows into memberships in inbox order; returns the rows refused by validation."""
    pending: list[MembershipDelta] = []
    refused: list[tuple[str, str]] = []
    for row in rows:
        event = event_of(row)
        if isinstance(event, Rejection):
            # It passed this check when accepted; a later, stricter release refuses it. It is
            # recorded, not silently ignored.
            reason = f"{event.reason} (inbox event {row.id}, refused when applied)"
            refused.append((reason, kept_payload(row.payload)))
            continue
        pending.extend(audience.extract_deltas(event))
        change = audience.extract_email_change(event)
        if change is not None:
            _apply_deltas(session, settings, pending, now)
            pending = []
            apply_email_change(session, change, settings.iterable.project_type, now)
    _apply_deltas(session, settings, pending, now)
    return refused


def event_of(row: StoredEvent) -> InboundEvent | Rejection:
    """The stored event, validated again unless the running rules accepted it (a later, stricter
    release must refuse what an older one let in; the same rules would only say yes again)."""
    if row.rules != stored.RULES:
        return validate.validate_event(row.payload, received_at=row.received_at)
    return stored.stored_event(
        row.payload,
        type=row.type,
        message_id=row.message_id,
        timestamp=row.timestamp,
        event=row.event,
        user_id=row.user_id,
        anonymous_id=row.anonymous_id,
        email=row.email,
    )


def _apply_deltas(
    session: Session, settings: Settings, deltas: Sequence[MembershipDelta], now: datetime
) -> None:
    if not deltas:
        return
    audience_ids = audiences.ensure_audiences(session, (d.audience_key for d in deltas), now)
    fold_deltas(session, fold_items(settings, deltas, audience_ids), settings.iterable.project_type, now)
    for key, event_settings in _latest_event_settings(deltas).items():
        audiences.record_audience_settings(session, audience_ids[key], event_settings)


def fold_items(
    settings: Settings, deltas: Iterable[MembershipDelta], audience_ids: dict[str, int]
) -> list[FoldItem]:
    """(audience_id, delta, data fields) of the deltas whose desired state is known."""
    return [
        (audience_ids[d.audience_key], d, select_data_fields(d.traits, settings.audience(d.audience_key).data_fields))
        for d in deltas
        if d.desired is not Desired.UNKNOWN
    ]


def _latest_event_settings(deltas: Sequence[MembershipDelta]) -> dict[str, dict[str, Any]]:
    """The per-audience settings of the latest delta that carried any (already in our names)."""
    return {d.audience_key: dict(d.audience_settings) for d in deltas if d.audience_settings}


class Members:
    """The memberships a batch of deltas touches, indexed by identity, plus the ones it creates."""

    def __init__(self, rows: Iterable[tuple[int, int, Member]]) -> None:
        self.states: dict[int, Member] = {}
        self.audience: dict[int, int] = {}
        self.by_user: dict[tuple[int, str], set[int]] = defaultdict(set)
        self.by_email: dict[tuple[int, str], set[int]] = defaultdict(set)
        self.dirty: set[int] = set()
        self.removed: set[int] = set()
        self.position: dict[int, int] = {}
        self._next_new = -1
        for member_id, audience_id, state in rows:
            self._index(member_id, audience_id, state)

    def _index(self, member_id: int, audience_id: int, state: Member) -> None:
        self.states[member_id], self.audience[member_id] = state, audience_id
        if state.user_id:
            self.by_user[(audience_id, state.user_id)].add(member_id)
        if state.email:
            self.by_email[(audience_id, state.email)].add(member_id)

    def candidates(self, audience_id: int, who: identity.Identity) -> dict[int, identity.Identity]:
        """Live memberships of the audience sharing a userId or an email with `who`, by their
        current identifiers (an index entry may be older than the row it points to)."""
        ids = self.by_user.get((audience_id, who.user_id or ""), set()) | self.by_email.get(
            (audience_id, who.email or ""), set()
        )
        return {i: rules.current_identity(self.states[i]) for i in ids if i in self.states}

    def add(self, audience_id: int, state: Member, position: int) -> None:
        member_id, self._next_new = self._next_new, self._next_new - 1
        self._index(member_id, audience_id, state)
        self.dirty.add(member_id)
        self.position[member_id] = position

    def put(self, member_id: int, state: Member) -> None:
        old = self.states[member_id]
        if (old.user_id, old.email) != (state.user_id, state.email):
            self._index(member_id, self.audience[member_id], state)
        self.states[member_id] = state
        self.dirty.add(member_id)

    def absorb(self, member_id: int, others: Sequence[int], project_type: ProjectType) -> None:
        """Merge rows of one Iterable profile into `member_id`; the others are deleted."""
        merged = rules.absorb(self.states[member_id], [self.states[i] for i in others], project_type)
        for other in others:
            del self.states[other]
            self.dirty.discard(other)
            if other > 0:
                self.removed.add(other)
        self.put(member_id, merged)

    def created(self) -> list[tuple[int, int, Member]]:
        """(position of the creating delta in the batch, audience_id, member) of the new rows."""
        return [(self.position[i], self.audience[i], self.states[i]) for i in self.dirty if i < 0]

    def changed(self) -> dict[int, Member]:
        return {i: self.states[i] for i in sorted(self.dirty) if i > 0}


def fold_deltas(session: Session, items: Sequence[FoldItem], project_type: ProjectType, now: datetime) -> int:
    """Fold (audience_id, delta, data_fields) into memberships, delta by delta in batch order.
    Returns how many memberships changed. `identity.resolve` says which membership each delta
    is about (and which rows name the same Iterable profile and are merged); only when none is
    a new row created. New rows are inserted in the order of their deltas."""
    known = fold_by_rules(session, list(enumerate(items)), project_type)
    created = sorted(known.created(), key=lambda row: row[0])
    changed = known.changed()
    memberships.write_members(
        session, removed=known.removed, created=[(a, member) for _, a, member in created], changed=changed, now=now
    )
    return len(created) + len(changed) + len(known.removed)


def _identifiers(items: Sequence[FoldItem]) -> tuple[set[int], set[str], set[str]]:
    """The audiences, userIds and emails of the items (for the candidate look-up)."""
    return {a for a, _, _ in items}, {d.user_id or "" for _, d, _ in items}, {d.email or "" for _, d, _ in items}


def fold_by_rules(
    session: Session, items: Sequence[tuple[int, FoldItem]], project_type: ProjectType
) -> Members:
    """The rules' fold of (position, item) pairs over their candidates, in memory."""
    if not items:
        return Members(())
    known = Members(memberships.load_candidates(session, *_identifiers([item for _, item in items])))
    for position, (audience_id, delta, fields) in items:
        _fold_delta(known, audience_id, delta, fields, project_type, position)
    return known


def _fold_delta(
    known: Members,
    audience_id: int,
    delta: MembershipDelta,
    fields: dict[str, Any] | None,
    project_type: ProjectType,
    position: int,
) -> None:
    who = identity.identity(delta.user_id, delta.email)
    match = identity.resolve(project_type, who, known.candidates(audience_id, who))
    if not match.targets:
        known.add(audience_id, rules.new_member(delta, fields, project_type), position)
        return
    if match.absorbed:
        known.absorb(match.targets[0], match.absorbed, project_type)
    for member_id in match.targets:
        state = known.states[member_id]
        if len(match.targets) == 1:
            kept = identity.adopt(project_type, rules.current_identity(state), who, rules.newer(delta, state))
            state = rules.adopt_identity(state, kept, project_type)
        updated = rules.apply_delta(state, delta, fields, project_type) or state
        if updated != known.states[member_id]:
            known.put(member_id, updated)


def apply_email_change(session: Session, change: EmailChange, project_type: ProjectType, now: datetime) -> int:
    """A plain identify gave a userId a (possibly) new email: per audience, `identity.email_change`
    says which membership that changes and whether it is renamed (the same Iterable profile) or
    split (email projects: the old address's profile leaves, the new one's enters)."""
    by_audience: dict[int, dict[int, tuple[Member, datetime | None]]] = defaultdict(dict)
    for member_id, audience_id, member, email_at in memberships.members_of_user(session, change.user_id):
        by_audience[audience_id][member_id] = (member, email_at)
    moved = 0
    for audience_id, rows in by_audience.items():
        found = identity.email_change(
            project_type,
            change.user_id,
            change.email,
            {i: identity.identity(member.user_id, member.email) for i, (member, _) in rows.items()},
        )
        if found is None:
            continue
        member_id, effect = found
        member, email_at = rows[member_id]
        if email_at is not None and change.timestamp <= email_at:
            continue  # a late, older identify must not bring back an address the user left
        if effect is identity.EmailEffect.RENAME:
            renamed = rules.change_email(member, change.email, project_type)
            memberships.save_email_change(session, member_id, renamed, now, change.timestamp)
        elif not _split_email(session, audience_id, member_id, member, change, project_type, now):
            continue
        moved += 1
    return moved


def _split_email(
    session: Session,
    audience_id: int,
    member_id: int,
    member: Member,
    change: EmailChange,
    project_type: ProjectType,
    now: datetime,
) -> bool:
    """The old address leaves as of the change; the new address, unless it already has a
    membership of its own, enters in its place. False when a later audience event outranks it."""
    if (change.timestamp, change.message_id) <= (member.desired_at, member.desired_message_id):
        return False
    left, entered = rules.split_email(member, change, project_type)
    memberships.save_email_change(session, member_id, left, now, change.timestamp)
    if entered is not None and not memberships.email_taken(session, audience_id, change.email):
        memberships.insert_member(session, audience_id, entered, now, change.timestamp)
    return True
