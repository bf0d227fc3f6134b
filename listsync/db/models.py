"""The sync state as tables a person can read with SQL.

Enum values are stored as readable text (VARCHAR + CHECK, never native enums), timestamps are UTC,
and every column carries a comment. The views of the user-facing contract (audience_status,
member_status, rejected_events) are defined in `views.py` and created by the migrations.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime, TypeDecorator

from listsync.domain import ActionKind, Desired, MemberState, Synced, utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        # SQLite compares timestamps as text, so store one uniform naive-UTC format there.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def text_enum(enum: type[StrEnum], name: str) -> Enum:
    return Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class ListState(StrEnum):
    PENDING = "pending"  # no Iterable list yet
    READY = "ready"
    MISSING = "missing"  # Iterable refused the stored list id; sending stopped


class RequestStatus(StrEnum):
    IN_FLIGHT = "in_flight"  # written before the call: a crash leaves it for in-doubt recovery
    OK = "ok"
    PARTIAL = "partial"
    FAILED = "failed"
    RESOLVED = "resolved"  # was in doubt after a crash; outcome read back from Iterable


class RunStatus(StrEnum):
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    ABORTED = "aborted"


class DeliveryState(StrEnum):
    PENDING = "pending"  # to send (or waiting for a retry)
    DELIVERED = "delivered"
    FAILED = "failed"  # refused for good, or not sendable as mapped
    SKIPPED = "skipped"  # nothing to send: no email or userId


def table(model: type[Base]) -> Table:
    """The Core table of a model, typed as a Table (`__table__` is typed as any FromClause)."""
    return cast(Table, model.__table__)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: Json}


class Audience(Base):
    __tablename__ = "audiences"
    __table_args__ = {"comment": "One row per audience key; each maps to one Iterable list."}

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    audience_key: Mapped[str] = mapped_column(
        String(255), unique=True, comment="Engage audience key; also the Iterable list name"
    )
    list_id: Mapped[int | None] = mapped_column(BigInteger, comment="Iterable list id, once found or created")
    list_state: Mapped[ListState] = mapped_column(
        text_enum(ListState, "list_state"),
        default=ListState.PENDING,
        comment="pending: no list yet; ready; missing: Iterable refused the list id",
    )
    settings: Mapped[dict[str, Any]] = mapped_column(
        default=dict, comment="effective per-audience settings (config over event-supplied settings)"
    )
    hold_reason: Mapped[str | None] = mapped_column(
        Text, comment="why sending is held (mass-unsubscribe guard); NULL when not held"
    )
    lease_owner: Mapped[str | None] = mapped_column(String(255), comment="replica currently syncing it")
    lease_until: Mapped[datetime | None] = mapped_column(comment="the claim expires at this UTC time")
    last_synced_at: Mapped[datetime | None] = mapped_column(comment="end of the last run that sent to it")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, comment="UTC")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, comment="UTC")


# A membership other than the common settled one (synced, wanted in, in the list): the rows of the
# partial ix_memberships_status. A query that is to use that index repeats this condition verbatim.
UNSETTLED = "NOT (state = 'synced' AND desired = 'in' AND COALESCE(synced, '') = 'in')"


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (
        UniqueConstraint("audience_id", "user_id", "email", name="uq_memberships_identity"),
        Index(
            "ix_memberships_pending",
            "audience_id",
            "id",
            sqlite_where=text("state = 'pending'"),
            postgresql_where=text("state = 'pending'"),
        ),
        Index("ix_memberships_user_id", "user_id"),
        Index("ix_memberships_email", "audience_id", "email"),
        # Status page: per-audience counts from indexes alone, and failed members paged by id.
        # ix_memberships_status leaves out the common settled row (in the list, as wanted), so that
        # confirming a subscribe only deletes index entries; ix_memberships_desired, which no
        # answer from Iterable changes, counts that row (see `dashboard`).
        Index(
            "ix_memberships_status",
            "audience_id",
            "state",
            "desired",
            "synced",
            "desired_at",
            sqlite_where=text(UNSETTLED),
            postgresql_where=text(UNSETTLED),
        ),
        Index("ix_memberships_desired", "audience_id", "desired", "desired_at"),
        Index(
            "ix_memberships_failed",
            "audience_id",
            "id",
            sqlite_where=text("state = 'failed'"),
            postgresql_where=text("state = 'failed'"),
        ),
        {"comment": "Desired and last-synced list membership per audience and subscriber."},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    audience_id: Mapped[int] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), comment="audience"
    )
    user_id: Mapped[str] = mapped_column(
        String(255), default="", comment="Segment userId, exactly; '' if none"
    )
    email: Mapped[str] = mapped_column(String(320), default="", comment="lower-cased email; '' if none")
    desired: Mapped[Desired] = mapped_column(
        text_enum(Desired, "desired"), comment="in / out per the latest event; unknown: no flag seen yet"
    )
    desired_at: Mapped[datetime] = mapped_column(comment="timestamp of the event that set `desired` (UTC)")
    desired_message_id: Mapped[str] = mapped_column(String(255), comment="messageId of that event")
    data_fields: Mapped[dict[str, Any] | None] = mapped_column(comment="dataFields sent on subscribe")
    synced: Mapped[Synced | None] = mapped_column(
        text_enum(Synced, "synced"), comment="in / out as last confirmed by Iterable; NULL: never sent"
    )
    synced_email: Mapped[str | None] = mapped_column(String(320), comment="email sent with the last change")
    synced_user_id: Mapped[str | None] = mapped_column(
        String(255), comment="userId sent with the last change"
    )
    synced_at: Mapped[datetime | None] = mapped_column(comment="when Iterable confirmed `synced` (UTC)")
    state: Mapped[MemberState] = mapped_column(
        text_enum(MemberState, "member_state"),
        default=MemberState.PENDING,
        comment="pending: to send; synced; failed: refused for good until desired changes",
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, comment="sends of the current change")
    next_attempt_at: Mapped[datetime | None] = mapped_column(comment="not retried before this UTC time")
    last_error: Mapped[str | None] = mapped_column(Text, comment="last failure, redacted")
    email_at: Mapped[datetime | None] = mapped_column(
        comment="timestamp of the identify that last changed `email` (UTC); an older one is ignored"
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow, comment="UTC")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, comment="UTC")


class InboxEvent(Base):
    __tablename__ = "inbox"
    __table_args__ = (
        Index(
            "ix_inbox_unapplied",
            "id",
            sqlite_where=text("applied_at IS NULL"),
            postgresql_where=text("applied_at IS NULL"),
        ),
        Index(
            "ix_inbox_unrouted",
            "id",
            sqlite_where=text("routed_at IS NULL"),
            postgresql_where=text("routed_at IS NULL"),
        ),
        Index("ix_inbox_received_at", "received_at"),
        {"comment": "Accepted raw events, committed before the receiver answers 200."},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[str] = mapped_column(String(255), unique=True, comment="Segment messageId; dedupe key")
    type: Mapped[str] = mapped_column(String(16), comment="identify / track / page / screen / group / alias")
    event: Mapped[str | None] = mapped_column(String(255), comment="track event name")
    user_id: Mapped[str | None] = mapped_column(String(255), comment="Segment userId")
    anonymous_id: Mapped[str | None] = mapped_column(String(255), comment="Segment anonymousId")
    email: Mapped[str | None] = mapped_column(String(320), comment="normalised email, when present")
    timestamp: Mapped[datetime] = mapped_column(comment="the event's own timestamp (UTC)")
    received_at: Mapped[datetime] = mapped_column(default=utcnow, comment="when listsync stored it (UTC)")
    source: Mapped[str] = mapped_column(String(255), comment="receiver, file:<name>, sql")
    payload: Mapped[dict[str, Any]] = mapped_column(comment="the event as received, secrets removed")
    is_audience: Mapped[bool] = mapped_column(comment="true when it carried audience membership")
    applied_at: Mapped[datetime | None] = mapped_column(comment="when its deltas reached memberships")
    routed_at: Mapped[datetime | None] = mapped_column(
        comment="when its per-event actions were recorded in event_deliveries"
    )
    rules: Mapped[str | None] = mapped_column(
        String(16), comment="fingerprint of the validation rules that accepted it; NULL: unknown, validated again"
    )


class EventDelivery(Base):
    __tablename__ = "event_deliveries"
    __table_args__ = (
        UniqueConstraint("inbox_id", "mapping", name="uq_event_deliveries_event_mapping"),
        Index(
            "ix_event_deliveries_pending",
            "id",
            sqlite_where=text("state = 'pending'"),
            postgresql_where=text("state = 'pending'"),
        ),
        Index("ix_event_deliveries_user_id", "user_id"),
        Index("ix_event_deliveries_action_state", "action", "state"),
        {"comment": "One row per (inbox event, mapping): the Iterable request it makes and its outcome."},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    inbox_id: Mapped[int] = mapped_column(ForeignKey("inbox.id", ondelete="CASCADE"), comment="inbox event")
    message_id: Mapped[str] = mapped_column(String(255), comment="Segment messageId of the event")
    event_type: Mapped[str] = mapped_column(String(16), comment="identify / track / page / screen / ...")
    event_name: Mapped[str | None] = mapped_column(String(255), comment="track event name, page name")
    mapping: Mapped[str] = mapped_column(String(255), comment="name of the mapping that took the event")
    action: Mapped[ActionKind] = mapped_column(
        text_enum(ActionKind, "action_kind"),
        comment="upsert_user / custom_event / track_purchase / cart_updates",
    )
    endpoint: Mapped[str | None] = mapped_column(String(64), comment="e.g. events/track; NULL if not sent")
    body: Mapped[dict[str, Any] | None] = mapped_column(
        comment="request body (one item for bulk endpoints), the same on every attempt"
    )
    user_key: Mapped[str] = mapped_column(
        String(320), comment="userId, else email: one user's deliveries go in this order"
    )
    user_id: Mapped[str | None] = mapped_column(String(255), comment="userId sent")
    email: Mapped[str | None] = mapped_column(String(320), comment="email sent")
    iterable_id: Mapped[str | None] = mapped_column(
        String(512), comment="event or purchase id sent; Iterable updates rather than duplicates it"
    )
    state: Mapped[DeliveryState] = mapped_column(
        text_enum(DeliveryState, "delivery_state"),
        comment="pending / delivered / failed / skipped (no email or userId)",
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, comment="sends that failed so far")
    next_attempt_at: Mapped[datetime | None] = mapped_column(comment="not retried before this UTC time")
    last_error: Mapped[str | None] = mapped_column(Text, comment="why it failed or was skipped, redacted")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, comment="UTC")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, comment="UTC")
    delivered_at: Mapped[datetime | None] = mapped_column(comment="when Iterable accepted it (UTC)")


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    __table_args__ = (
        Index("ix_dead_letters_received_at", "received_at"),
        {"comment": "Events and bodies that could not be accepted, with the reason."},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, comment="UTC")
    source: Mapped[str] = mapped_column(String(255), comment="receiver, file:<name>, sql")
    reason: Mapped[str] = mapped_column(Text, comment="code: explanation")
    payload: Mapped[str] = mapped_column(Text, comment="the raw event or body, secrets removed")


class SyncRun(Base):
    __tablename__ = "sync_runs"
    __table_args__ = (
        Index("ix_sync_runs_started_at", "started_at"),
        {"comment": "Ledger of sync runs (daemon ticks, one-shot syncs, reconciles)."},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    trigger: Mapped[str] = mapped_column(String(32), comment="daemon / sync / reconcile / recovery")
    owner: Mapped[str] = mapped_column(String(255), comment="replica that ran it")
    status: Mapped[RunStatus] = mapped_column(
        text_enum(RunStatus, "run_status"),
        default=RunStatus.RUNNING,
        comment="running / ok / failed / aborted",
    )
    started_at: Mapped[datetime] = mapped_column(default=utcnow, comment="UTC")
    finished_at: Mapped[datetime | None] = mapped_column(comment="UTC")
    requests: Mapped[int] = mapped_column(Integer, default=0, comment="requests sent to Iterable")
    subscribed: Mapped[int] = mapped_column(Integer, default=0, comment="members confirmed in")
    unsubscribed: Mapped[int] = mapped_column(Integer, default=0, comment="members confirmed out")
    failed: Mapped[int] = mapped_column(Integer, default=0, comment="members that failed for good")
    summary: Mapped[str | None] = mapped_column(Text, comment="human summary or the error that ended it")
    held: Mapped[str | None] = mapped_column(
        Text, comment="audiences held by the mass-unsubscribe guard in this run, comma-separated"
    )
    events_delivered: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", comment="event deliveries Iterable accepted"
    )
    events_failed: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", comment="event deliveries that failed for good"
    )
    retrying: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", comment="members and events waiting for a retry at the end"
    )


class ApiRequest(Base):
    __tablename__ = "api_requests"
    __table_args__ = (
        Index(
            "ix_api_requests_in_flight",
            "audience_id",
            sqlite_where=text("status = 'in_flight'"),
            postgresql_where=text("status = 'in_flight'"),
        ),
        Index("ix_api_requests_audience_id", "audience_id", "id"),
        {"comment": "Every request sent to Iterable, written before the call and completed after."},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("sync_runs.id", ondelete="SET NULL"), comment="run")
    audience_id: Mapped[int | None] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), comment="audience, for list calls"
    )
    endpoint: Mapped[str] = mapped_column(String(64), comment="e.g. lists/subscribe")
    item_count: Mapped[int] = mapped_column(Integer, comment="subscribers / users / events in the body")
    status: Mapped[RequestStatus] = mapped_column(
        text_enum(RequestStatus, "request_status"), comment="in_flight / ok / partial / failed / resolved"
    )
    http_status: Mapped[int | None] = mapped_column(Integer, comment="HTTP status; NULL if none arrived")
    iterable_code: Mapped[str | None] = mapped_column(String(64), comment="Iterable's code, e.g. BadParams")
    success_count: Mapped[int | None] = mapped_column(Integer, comment="Iterable's successCount")
    fail_count: Mapped[int | None] = mapped_column(Integer, comment="Iterable's failCount")
    error: Mapped[str | None] = mapped_column(Text, comment="error text, redacted")
    owner: Mapped[str] = mapped_column(String(255), comment="replica that sent it")
    member_ids: Mapped[str | None] = mapped_column(
        Text, comment="list calls: the membership ids sent, a JSON array in body order (NULL before 0010)"
    )
    started_at: Mapped[datetime] = mapped_column(default=utcnow, comment="UTC")
    finished_at: Mapped[datetime | None] = mapped_column(comment="UTC")
    elapsed_ms: Mapped[int | None] = mapped_column(
        Integer, comment="time spent on the call, retries included"
    )


class RequestItem(Base):
    __tablename__ = "api_request_items"
    __table_args__ = (
        Index("ix_api_request_items_membership_id", "membership_id"),
        {
            "comment": "Members of a list request whose outcome is not the request's own (refused"
            " items; every member of a resolved request). A member without a row had the request's:"
            " ok for ok/partial, error for failed."
        },
    )

    request_id: Mapped[int] = mapped_column(
        ForeignKey("api_requests.id", ondelete="CASCADE"), primary_key=True, comment="request"
    )
    membership_id: Mapped[int] = mapped_column(
        ForeignKey("memberships.id", ondelete="CASCADE"), primary_key=True, comment="member"
    )
    outcome: Mapped[str | None] = mapped_column(
        String(32), comment="ok / not_found / invalid / forgotten / ..."
    )
    error: Mapped[str | None] = mapped_column(Text, comment="why it failed, when it did")
    sent_email: Mapped[str | None] = mapped_column(String(320), comment="email the request carried")
    sent_user_id: Mapped[str | None] = mapped_column(String(255), comment="userId the request carried")


class SourceFile(Base):
    __tablename__ = "source_files"
    __table_args__ = {"comment": "Files read from the drop folder, with how far each was read."}

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), unique=True, comment="absolute path")
    lines_read: Mapped[int] = mapped_column(Integer, default=0, comment="lines committed so far")
    completed_at: Mapped[datetime | None] = mapped_column(comment="UTC; NULL while being read")
    size: Mapped[int | None] = mapped_column(BigInteger, comment="bytes when read")
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger, comment="modification time when read (ns)")
    error: Mapped[str | None] = mapped_column(Text, comment="why the file was quarantined; NULL if not")


class Lease(Base):
    __tablename__ = "leases"
    __table_args__ = {"comment": "Named leases: one replica at a time runs each periodic job."}

    name: Mapped[str] = mapped_column(String(255), primary_key=True, comment="job or lock name")
    owner: Mapped[str] = mapped_column(String(255), comment="replica holding it")
    until: Mapped[datetime] = mapped_column(comment="expiry, UTC")


metadata = Base.metadata
