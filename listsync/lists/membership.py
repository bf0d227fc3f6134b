"""PURE: how one member's state moves when an event arrives or Iterable answers.

The stored row keeps two things apart: `desired` (what the latest event says) and `synced` (what
Iterable last confirmed). A member is pending exactly when sending would change Iterable. Deltas
are applied by event time, not arrival time, so a late, older event never undoes a newer one.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from listsync.domain import Desired, EmailChange, Member, MembershipDelta, MemberState, ProjectType, Synced
from listsync.lists import identity

PENDING, SYNCED, FAILED = MemberState.PENDING, MemberState.SYNCED, MemberState.FAILED


def newer(delta: MembershipDelta, current: Member) -> bool:
    """Event-time order, with the messageId as a stable tie-break between equal timestamps."""
    return newer_than(delta, current.desired_at, current.desired_message_id)


def newer_than(delta: MembershipDelta, desired_at: datetime, desired_message_id: str) -> bool:
    """`newer`, against a stored (desired_at, desired_message_id)."""
    return (delta.timestamp, delta.message_id) > (desired_at, desired_message_id)


def current_identity(member: Member) -> identity.Identity:
    return identity.identity(member.user_id, member.email)


def synced_identity(member: Member) -> identity.Identity:
    """The identifiers Iterable was last given for this member."""
    return identity.identity(member.synced_user_id, member.synced_email)


def identity_moved(member: Member, project_type: ProjectType) -> bool:
    """A subscribed member whose identifiers moved since Iterable confirmed them (`identity.stale`)."""
    if member.synced is not Synced.IN:
        return False
    return identity.stale(project_type, current_identity(member), synced_identity(member))


def needs_send(member: Member, project_type: ProjectType) -> bool:
    if member.desired is Desired.IN:
        return member.synced is not Synced.IN or identity_moved(member, project_type)
    if member.desired is Desired.OUT:
        return member.synced is Synced.IN
    return False


def settle(member: Member, project_type: ProjectType) -> Member:
    """Recompute the state column after desired or synced changed; a failure sticks until then."""
    return replace(member, state=PENDING if needs_send(member, project_type) else SYNCED)


def new_member(
    delta: MembershipDelta, data_fields: dict[str, Any] | None, project_type: ProjectType
) -> Member:
    member = Member(
        user_id=delta.user_id or "",
        email=delta.email or "",
        desired=delta.desired,
        desired_at=delta.timestamp,
        desired_message_id=delta.message_id,
        data_fields=data_fields,
        synced=None,
        synced_email=None,
        synced_user_id=None,
        state=PENDING,
    )
    return settle(member, project_type)


def apply_delta(
    member: Member, delta: MembershipDelta, data_fields: dict[str, Any] | None, project_type: ProjectType
) -> Member | None:
    """The member after this delta, or None when the delta changes nothing (older, replayed, no flag)."""
    if delta.desired is Desired.UNKNOWN or not newer(delta, member):
        return None
    changed = member.desired is not delta.desired
    updated = replace(
        member,
        desired=delta.desired,
        desired_at=delta.timestamp,
        desired_message_id=delta.message_id,
        data_fields=data_fields if data_fields is not None else member.data_fields,
    )
    if changed or member.state != FAILED:
        updated = replace(
            settle(updated, project_type),
            attempts=0 if changed else member.attempts,
            last_error=None if changed else member.last_error,
        )
    return updated


def change_email(member: Member, email: str, project_type: ProjectType) -> Member:
    """The member after its user's email changed: a subscribed member is re-sent with the new one."""
    moved = replace(member, email=email)
    return replace(settle(moved, project_type), attempts=0, last_error=None)


def split_email(
    member: Member, change: EmailChange, project_type: ProjectType
) -> tuple[Member, Member | None]:
    """An email change in an email project: the old address's profile leaves the audience as of
    the change, and (when the member was in) the new address's profile enters in its place."""
    left = replace(member, desired=Desired.OUT, desired_at=change.timestamp, desired_message_id=change.message_id)
    left = replace(settle(left, project_type), attempts=0, last_error=None)
    if member.desired is not Desired.IN:
        return left, None
    entered = replace(
        member, email=change.email, synced=None, synced_email=None, synced_user_id=None, attempts=0, last_error=None
    )
    return left, settle(entered, project_type)


def absorb(member: Member, others: list[Member], project_type: ProjectType) -> Member:
    """One membership for rows that name one Iterable profile: the latest desired state wins, and
    what Iterable was given is kept if any of them is in the list, so an exit still removes it."""
    latest = max([member, *others], key=lambda s: (s.desired_at, s.desired_message_id))
    merged = replace(
        member, desired=latest.desired, desired_at=latest.desired_at, desired_message_id=latest.desired_message_id
    )
    listed = next((s for s in [member, *others] if s.synced is Synced.IN), None)
    if listed is not None:
        merged = replace(
            merged, synced=Synced.IN, synced_email=listed.synced_email, synced_user_id=listed.synced_user_id
        )
    return settle(merged, project_type)


def confirm(
    member: Member, sent: Synced, email: str | None, user_id: str | None, project_type: ProjectType
) -> Member:
    """Iterable accepted a change for this member: record it, then see if anything is still due
    (the desired state may have moved on while the request was in flight)."""
    confirmed = replace(
        member, synced=sent, synced_email=email, synced_user_id=user_id, attempts=0, last_error=None
    )
    return settle(confirmed, project_type)


def still_wanted(member: Member, subscribing: bool) -> bool:
    """Whether the member still wants the change a finished request carried."""
    return (member.desired is Desired.IN) == subscribing


def fail(member: Member, reason: str, *, subscribing: bool, project_type: ProjectType) -> Member:
    """Iterable refused this member's change for good: keep it visible, stop sending it. If the
    desired state moved on meanwhile, the failure belongs to the old change and is not kept."""
    if not still_wanted(member, subscribing):
        return settle(member, project_type)
    return replace(member, state=FAILED, attempts=member.attempts + 1, last_error=reason)


def retry_later(member: Member, reason: str) -> Member:
    """A transient failure: the change stays pending; the caller sets when to try again."""
    return replace(member, attempts=member.attempts + 1, last_error=reason)


def retry_delay(attempts: int, base_seconds: float, max_seconds: float) -> float:
    """Capped exponential backoff for members whose request failed transiently."""
    if attempts <= 0 or base_seconds <= 0:
        return 0.0
    return float(min(max_seconds, base_seconds * 2 ** min(attempts - 1, 30)))


def adopt_identity(member: Member, who: identity.Identity, project_type: ProjectType) -> Member:
    """The member with the identifiers `identity.adopt` chose; a failure caused by the old ones
    (a missing userId, an unknown user) is cleared, as sending with the new ones may work."""
    if who == current_identity(member):
        return member
    moved = replace(member, user_id=who.user_id or "", email=who.email or "")
    return replace(settle(moved, project_type), attempts=0, last_error=None)
