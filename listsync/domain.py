"""Plain values shared by every layer: what flows from receive to store to plan to send.

Frozen dataclasses and text enums only; no ORM, no HTTP. The repository converts rows to these
values at its edge so the pure modules (extraction, identity, planner, mapping) never see a session.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


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
