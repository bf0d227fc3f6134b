"""Plain values shared by every layer: what flows from receive to store to plan to send.

Frozen dataclasses and text enums only; no ORM, no HTTP. The repository converts rows to these
values at its edge so the pure modules (extraction, identity, planner, mapping) never see a session.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any


def utcnow() -> datetime:
    """The one clock: every "now" listsync records comes from here (or a SyncContext's `clock`)."""
    return datetime.now(UTC)


class ActionKind(StrEnum):
    """The four Iterable (Actions) actions."""

    UPSERT_USER = "upsert_user"
    CUSTOM_EVENT = "custom_event"
    TRACK_PURCHASE = "track_purchase"
    CART_UPDATES = "cart_updates"


class ProjectType(StrEnum):
    """Iterable's three project types (see `listsync.identity`). "hybrid" also serves email-based
    projects, as Segment's setting does; "email" makes each email its own profile."""

    EMAIL = "email"
    HYBRID = "hybrid"
    USER_ID = "userId"


class Desired(StrEnum):
    """What the latest event says about a member. UNKNOWN: seen, but without a membership flag."""

    IN = "in"
    OUT = "out"
    UNKNOWN = "unknown"


class Synced(StrEnum):
    """What listsync last confirmed in Iterable for a member."""

    IN = "in"
    OUT = "out"


class Direction(StrEnum):
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"


@dataclass(frozen=True)
class InboundEvent:
    """A validated Segment-format event, normalised for extraction and storage."""

    type: str
    message_id: str
    timestamp: datetime
    user_id: str | None
    anonymous_id: str | None
    email: str | None
    event: str | None
    name: str | None
    traits: Mapping[str, Any]
    properties: Mapping[str, Any]
    context: Mapping[str, Any]
    raw: Mapping[str, Any]


@dataclass(frozen=True)
class MembershipDelta:
    """One user's membership of one audience, as an event states it."""

    audience_key: str
    user_id: str | None
    email: str | None
    desired: Desired
    timestamp: datetime
    message_id: str
    traits: Mapping[str, Any] = field(default_factory=dict)
    audience_settings: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class EmailChange:
    """A plain identify that gives a known userId a (possibly) new email address."""

    user_id: str
    email: str
    timestamp: datetime
    message_id: str


@dataclass(frozen=True)
class Rejection:
    """Why an inbound event could not be accepted; stored with the payload in rejected events."""

    reason: str


class MemberState(StrEnum):
    """Where a membership stands with Iterable: something to send, nothing to send, or given up."""

    PENDING = "pending"
    SYNCED = "synced"
    FAILED = "failed"


@dataclass(frozen=True)
class Member:
    """One membership as the rules read and write it (the columns of `memberships` they own)."""

    user_id: str
    email: str
    desired: Desired
    desired_at: datetime
    desired_message_id: str
    data_fields: dict[str, Any] | None
    synced: Synced | None
    synced_email: str | None
    synced_user_id: str | None
    state: str
    attempts: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class PendingMember:
    id: int
    user_id: str
    email: str
    desired: Desired
    synced: Synced | None
    synced_email: str | None
    synced_user_id: str | None
    data_fields: Mapping[str, Any] | None


@dataclass(frozen=True)
class FileVersion:
    """A file of the drop folder as seen by one poll: its real path and what identifies its content."""

    path: Path
    size: int
    mtime_ns: int


@dataclass
class PendingDelivery:
    """A pending event delivery as the sender holds it (body and email may change before it is sent)."""

    id: int
    endpoint: str
    body: dict[str, Any]
    user_key: str
    user_id: str | None
    email: str | None
    attempts: int
    next_attempt_at: datetime | None
