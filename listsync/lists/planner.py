"""PURE: turn an audience's pending members into Iterable list requests.

No database, no HTTP, no clock. Given the members whose desired state differs from what Iterable
has, the audience's settings and the project type, it returns the subscribe and unsubscribe batches
(each one request: <= batch_size subscribers and <= 4 MB), the members that cannot be sent (missing
the identifier the project type needs), and whether the mass-unsubscribe guard holds the run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from listsync.domain import Desired, Direction, PendingMember, ProjectType, Synced
from listsync.iterable.dates import convert_dates
from listsync.iterable.payloads import Subscriber, chunk_by_limits, json_size
from listsync.lists import identity


@dataclass(frozen=True)
class Batch:
    """One request: the members it carries and the exact subscribers sent for them."""

    direction: Direction
    member_ids: tuple[int, ...]
    subscribers: tuple[Subscriber, ...]


@dataclass(frozen=True)
class Plan:
    batches: list[Batch] = field(default_factory=list)
    unsendable: list[tuple[int, str]] = field(default_factory=list)

    def count(self, direction: Direction) -> int:
        return sum(len(b.member_ids) for b in self.batches if b.direction is direction)


@dataclass(frozen=True)
class GuardLimits:
    max_unsubscribe_fraction: float
    min_list_size: int


def guard_hold_reason(unsubscribes: int, synced_members: int, limits: GuardLimits) -> str | None:
    """Why a run must be held, or None. Tiny lists are exempt: one exit from a list of one is not a
    mass unsubscribe, and holding it would only confuse."""
    if synced_members < limits.min_list_size or unsubscribes == 0:
        return None
    if unsubscribes <= limits.max_unsubscribe_fraction * synced_members:
        return None
    return (
        f"mass unsubscribe held: {unsubscribes} of {synced_members} synced members "
        f"({unsubscribes / synced_members:.0%}) would be unsubscribed, more than "
        f"sync.max_unsubscribe_fraction = {limits.max_unsubscribe_fraction}; "
        "run `listsync sync --allow-mass-unsubscribe` to release"
    )


_COUNT_LIMIT = 2**62


def guard_enough(unsubscribes: int, limits: GuardLimits) -> int | None:
    """How many synced members are enough to know the guard holds nothing (`guard_hold_reason`
    is None from that count up), so a run need not count a large audience to the end; None when
    only the exact count will do. No unsubscribe: none are needed."""
    if unsubscribes == 0:
        return 0
    if limits.max_unsubscribe_fraction <= 0:
        return None
    # unsubscribes <= fraction * synced from here up (one more absorbs the division's rounding)
    enough = unsubscribes / limits.max_unsubscribe_fraction
    if enough >= _COUNT_LIMIT:  # a tiny fraction: beyond what a LIMIT (bigint) can say
        return None
    return max(limits.min_list_size, math.ceil(enough) + 1)


def select_data_fields(traits: Mapping[str, Any] | None, names: Sequence[str]) -> dict[str, Any] | None:
    """The configured trait names copied into dataFields on subscribe."""
    if not traits or not names:
        return None
    chosen = {name: traits[name] for name in names if name in traits}
    return chosen or None


def plan_audience(
    members: Iterable[PendingMember],
    *,
    project_type: ProjectType,
    batch_size: int,
    data_field_names: Sequence[str] = (),
) -> Plan:
    """Batches for the members that need sending: subscribes first, then unsubscribes."""
    plan = Plan()
    subscribes: list[tuple[int, Subscriber]] = []
    unsubscribes: list[tuple[int, Subscriber]] = []
    for member in members:
        _route(member, project_type, data_field_names, plan, subscribes, unsubscribes)
    plan.batches.extend(_batches(Direction.SUBSCRIBE, subscribes, batch_size))
    plan.batches.extend(_batches(Direction.UNSUBSCRIBE, unsubscribes, batch_size))
    return plan


def _route(
    member: PendingMember,
    project_type: ProjectType,
    names: Sequence[str],
    plan: Plan,
    subscribes: list[tuple[int, Subscriber]],
    unsubscribes: list[tuple[int, Subscriber]],
) -> None:
    subscribing = member.desired is Desired.IN
    if not subscribing and member.synced is not Synced.IN:
        return
    if subscribing:  # `addressee`, without the synced identity a subscribe does not use
        current = identity.identity(member.user_id, member.email)
        who = identity.for_subscribe(project_type, current)
    else:
        who = addressee(member, project_type, subscribing)
        current = identity.Identity(who.user_id, who.email)
    reason = identity.missing_identifier(project_type, current)
    if reason:
        plan.unsendable.append((member.id, reason))
    elif subscribing:
        fields = select_data_fields(member.data_fields, names)
        subscribes.append((member.id, to_subscriber(who, fields)))
    else:
        unsubscribes.append((member.id, to_subscriber(who, None)))


def addressee(member: PendingMember, project_type: ProjectType, subscribing: bool) -> identity.Addressee:
    """Who a subscribe or unsubscribe for this member names, as `identity` decides it."""
    current = identity.identity(member.user_id, member.email)
    synced = identity.identity(member.synced_user_id, member.synced_email)
    return identity.for_request(project_type, current, synced, subscribing)


def to_subscriber(who: identity.Addressee, data_fields: Mapping[str, Any] | None) -> Subscriber:
    return Subscriber(
        email=who.email,
        user_id=who.user_id,
        data_fields=convert_dates(data_fields) if data_fields else None,
        prefer_user_id=who.prefer_user_id,
    )


def _batches(direction: Direction, items: list[tuple[int, Subscriber]], batch_size: int) -> list[Batch]:
    subscribing = direction is Direction.SUBSCRIBE

    def size(item: tuple[int, Subscriber]) -> int:
        subscriber = item[1]
        plain = plain_size(subscriber, subscribing)
        if plain is not None:
            return plain
        return json_size(subscriber.to_json() if subscribing else subscriber.identity_json())

    return [
        Batch(direction, tuple(i for i, _ in chunk), tuple(s for _, s in chunk))
        for chunk in chunk_by_limits(items, max_items=batch_size, size_of=size)
    ]


def plain_size(subscriber: Subscriber, subscribing: bool) -> int | None:
    """`json_size` of a subscriber's wire form, counted without serialising it, when it has no
    data fields and its identifiers need no escaping (printable ASCII without quotes or
    backslashes: one byte per character); None otherwise. This is almost every member of a large
    sync, and the sizing is then a few length additions instead of a JSON encoding."""
    if subscriber.data_fields:
        return None
    email, user_id = subscriber.email or "", subscriber.user_id or ""
    if not (_verbatim(email) and _verbatim(user_id)):
        return None
    # {"email":"E","userId":"U","preferUserId":true}: braces, keys, quotes and commas.
    parts = [10 + len(email)] if email else []
    parts += [11 + len(user_id)] if user_id else []
    parts += [19] if subscribing and subscriber.prefer_user_id else []
    return 2 + sum(parts) + len(parts) - 1


def _verbatim(value: str) -> bool:
    return value.isascii() and value.isprintable() and '"' not in value and "\\" not in value
