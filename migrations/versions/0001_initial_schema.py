"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-25

Rules for every revision:
- it runs on SQLite and PostgreSQL (batch_alter_table for SQLite ALTERs);
- the previous release of listsync keeps working against the upgraded schema (split breaking
  changes into an additive step and a later cleanup step);
- downgrade() undoes upgrade() exactly; constraints are named by the metadata's convention;
- views that read a changed table are dropped and re-created in the same revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from listsync.db.views import VIEWS

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audiences",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "audience_key",
            sa.String(length=255),
            nullable=False,
            comment="Engage audience key; also the Iterable list name",
        ),
        sa.Column(
            "list_id", sa.BigInteger(), nullable=True, comment="Iterable list id, once found or created"
        ),
        sa.Column(
            "list_state",
            sa.Enum(
                "pending",
                "ready",
                "missing",
                name="list_state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
            comment="pending: no list yet; ready; missing: Iterable refused the list id",
        ),
        sa.Column(
            "settings",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
            comment="effective per-audience settings (config over event-supplied settings)",
        ),
        sa.Column(
            "hold_reason",
            sa.Text(),
            nullable=True,
            comment="why sending is held (mass-unsubscribe guard); NULL when not held",
        ),
        sa.Column(
            "lease_owner", sa.String(length=255), nullable=True, comment="replica currently syncing it"
        ),
        sa.Column(
            "lease_until",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="the claim expires at this UTC time",
        ),
        sa.Column(
            "last_synced_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="end of the last run that sent to it",
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, comment="UTC"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, comment="UTC"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audiences")),
        sa.UniqueConstraint("audience_key", name=op.f("uq_audiences_audience_key")),
        comment="One row per audience key; each maps to one Iterable list.",
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, comment="UTC"),
        sa.Column("source", sa.String(length=255), nullable=False, comment="receiver, file:<name>, sql"),
        sa.Column("reason", sa.Text(), nullable=False, comment="code: explanation"),
        sa.Column("payload", sa.Text(), nullable=False, comment="the raw event or body, secrets removed"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        comment="Events and bodies that could not be accepted, with the reason.",
    )
    op.create_table(
        "inbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "message_id", sa.String(length=255), nullable=False, comment="Segment messageId; dedupe key"
        ),
        sa.Column(
            "type",
            sa.String(length=16),
            nullable=False,
            comment="identify / track / page / screen / group / alias",
        ),
        sa.Column("event", sa.String(length=255), nullable=True, comment="track event name"),
        sa.Column("user_id", sa.String(length=255), nullable=True, comment="Segment userId"),
        sa.Column("anonymous_id", sa.String(length=255), nullable=True, comment="Segment anonymousId"),
        sa.Column("email", sa.String(length=320), nullable=True, comment="normalised email, when present"),
        sa.Column(
            "timestamp", sa.DateTime(timezone=True), nullable=False, comment="the event's own timestamp (UTC)"
        ),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), nullable=False, comment="when listsync stored it (UTC)"
        ),
        sa.Column("source", sa.String(length=255), nullable=False, comment="receiver, file:<name>, sql"),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
            comment="the event as received, secrets removed",
        ),
        sa.Column(
            "is_audience", sa.Boolean(), nullable=False, comment="true when it carried audience membership"
        ),
        sa.Column(
            "applied_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="when its deltas reached memberships",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbox")),
        sa.UniqueConstraint("message_id", name=op.f("uq_inbox_message_id")),
        comment="Accepted raw events, committed before the receiver answers 200.",
    )
    with op.batch_alter_table("inbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_inbox_unapplied",
            ["id"],
            unique=False,
            sqlite_where=sa.text("applied_at IS NULL"),
            postgresql_where=sa.text("applied_at IS NULL"),
        )

    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=255), nullable=False, comment="job or lock name"),
        sa.Column("owner", sa.String(length=255), nullable=False, comment="replica holding it"),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False, comment="expiry, UTC"),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
        comment="Named leases: one replica at a time runs each periodic job.",
    )
    op.create_table(
        "source_files",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False, comment="absolute path"),
        sa.Column("lines_read", sa.Integer(), nullable=False, comment="lines committed so far"),
        sa.Column(
            "completed_at", sa.DateTime(timezone=True), nullable=True, comment="UTC; NULL while being read"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_source_files")),
        sa.UniqueConstraint("path", name=op.f("uq_source_files_path")),
        comment="Files read from the drop folder, with how far each was read.",
    )
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "trigger", sa.String(length=32), nullable=False, comment="daemon / sync / reconcile / recovery"
        ),
        sa.Column("owner", sa.String(length=255), nullable=False, comment="replica that ran it"),
        sa.Column(
            "status",
            sa.Enum(
                "running",
                "ok",
                "failed",
                "aborted",
                name="run_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
            comment="running / ok / failed / aborted",
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, comment="UTC"),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True, comment="UTC"),
        sa.Column("requests", sa.Integer(), nullable=False, comment="requests sent to Iterable"),
        sa.Column("subscribed", sa.Integer(), nullable=False, comment="members confirmed in"),
        sa.Column("unsubscribed", sa.Integer(), nullable=False, comment="members confirmed out"),
        sa.Column("failed", sa.Integer(), nullable=False, comment="members that failed for good"),
        sa.Column("summary", sa.Text(), nullable=True, comment="human summary or the error that ended it"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_runs")),
        comment="Ledger of sync runs (daemon ticks, one-shot syncs, reconciles).",
    )
    op.create_table(
        "api_requests",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True, comment="run"
        ),
        sa.Column(
            "audience_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
            comment="audience, for list calls",
        ),
        sa.Column("endpoint", sa.String(length=64), nullable=False, comment="e.g. lists/subscribe"),
        sa.Column(
            "item_count", sa.Integer(), nullable=False, comment="subscribers / users / events in the body"
        ),
        sa.Column(
            "status",
            sa.Enum(
                "in_flight",
                "ok",
                "partial",
                "failed",
                "resolved",
                name="request_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
            comment="in_flight / ok / partial / failed / resolved",
        ),
        sa.Column("http_status", sa.Integer(), nullable=True, comment="HTTP status; NULL if none arrived"),
        sa.Column(
            "iterable_code", sa.String(length=64), nullable=True, comment="Iterable's code, e.g. BadParams"
        ),
        sa.Column("success_count", sa.Integer(), nullable=True, comment="Iterable's successCount"),
        sa.Column("fail_count", sa.Integer(), nullable=True, comment="Iterable's failCount"),
        sa.Column("error", sa.Text(), nullable=True, comment="error text, redacted"),
        sa.Column("owner", sa.String(length=255), nullable=False, comment="replica that sent it"),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, comment="UTC"),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True, comment="UTC"),
        sa.Column(
            "elapsed_ms", sa.Integer(), nullable=True, comment="time spent on the call, retries included"
        ),
        sa.ForeignKeyConstraint(
            ["audience_id"],
            ["audiences.id"],
            name=op.f("fk_api_requests_audience_id_audiences"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name=op.f("fk_api_requests_run_id_sync_runs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_requests")),
        comment="Every request sent to Iterable, written before the call and completed after.",
    )
    with op.batch_alter_table("api_requests", schema=None) as batch_op:
        batch_op.create_index(
            "ix_api_requests_in_flight",
            ["audience_id"],
            unique=False,
            sqlite_where=sa.text("status = 'in_flight'"),
            postgresql_where=sa.text("status = 'in_flight'"),
        )

    op.create_table(
        "memberships",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "audience_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
            comment="audience",
        ),
        sa.Column(
            "user_id", sa.String(length=255), nullable=False, comment="Segment userId, exactly; '' if none"
        ),
        sa.Column("email", sa.String(length=320), nullable=False, comment="lower-cased email; '' if none"),
        sa.Column(
            "desired",
            sa.Enum(
                "in", "out", "unknown", name="desired", native_enum=False, create_constraint=True, length=16
            ),
            nullable=False,
            comment="in / out per the latest event; unknown: no flag seen yet",
        ),
        sa.Column(
            "desired_at",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="timestamp of the event that set `desired` (UTC)",
        ),
        sa.Column(
            "desired_message_id", sa.String(length=255), nullable=False, comment="messageId of that event"
        ),
        sa.Column(
            "data_fields",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
            comment="dataFields sent on subscribe",
        ),
        sa.Column(
            "synced",
            sa.Enum("in", "out", name="synced", native_enum=False, create_constraint=True, length=16),
            nullable=True,
            comment="in / out as last confirmed by Iterable; NULL: never sent",
        ),
        sa.Column(
            "synced_email", sa.String(length=320), nullable=True, comment="email sent with the last change"
        ),
        sa.Column(
            "synced_user_id", sa.String(length=255), nullable=True, comment="userId sent with the last change"
        ),
        sa.Column(
            "synced_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="when Iterable confirmed `synced` (UTC)",
        ),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "synced",
                "failed",
                name="member_state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
            comment="pending: to send; synced; failed: refused for good until desired changes",
        ),
        sa.Column("attempts", sa.Integer(), nullable=False, comment="sends of the current change"),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="not retried before this UTC time",
        ),
        sa.Column("last_error", sa.Text(), nullable=True, comment="last failure, redacted"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, comment="UTC"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, comment="UTC"),
        sa.ForeignKeyConstraint(
            ["audience_id"],
            ["audiences.id"],
            name=op.f("fk_memberships_audience_id_audiences"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_memberships")),
        sa.UniqueConstraint("audience_id", "user_id", "email", name="uq_memberships_identity"),
        comment="Desired and last-synced list membership per audience and subscriber.",
    )
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.create_index(
            "ix_memberships_pending",
            ["audience_id", "next_attempt_at"],
            unique=False,
            sqlite_where=sa.text("state = 'pending'"),
            postgresql_where=sa.text("state = 'pending'"),
        )
        batch_op.create_index("ix_memberships_user_id", ["user_id"], unique=False)

    op.create_table(
        "api_request_items",
        sa.Column(
            "request_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
            comment="request",
        ),
        sa.Column(
            "membership_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
            comment="member",
        ),
        sa.Column(
            "outcome",
            sa.String(length=32),
            nullable=True,
            comment="ok / not_found / invalid / forgotten / ...",
        ),
        sa.Column("error", sa.Text(), nullable=True, comment="why it failed, when it did"),
        sa.ForeignKeyConstraint(
            ["membership_id"],
            ["memberships.id"],
            name=op.f("fk_api_request_items_membership_id_memberships"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["api_requests.id"],
            name=op.f("fk_api_request_items_request_id_api_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("request_id", "membership_id", name=op.f("pk_api_request_items")),
        comment="Per-member outcome of each list request.",
    )
    with op.batch_alter_table("api_request_items", schema=None) as batch_op:
        batch_op.create_index("ix_api_request_items_membership_id", ["membership_id"], unique=False)

    for ddl in VIEWS.values():
        op.execute(ddl)


def downgrade() -> None:
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    with op.batch_alter_table("api_request_items", schema=None) as batch_op:
        batch_op.drop_index("ix_api_request_items_membership_id")

    op.drop_table("api_request_items")
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.drop_index("ix_memberships_user_id")
        batch_op.drop_index(
            "ix_memberships_pending",
            sqlite_where=sa.text("state = 'pending'"),
            postgresql_where=sa.text("state = 'pending'"),
        )

    op.drop_table("memberships")
    with op.batch_alter_table("api_requests", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_api_requests_in_flight",
            sqlite_where=sa.text("status = 'in_flight'"),
            postgresql_where=sa.text("status = 'in_flight'"),
        )

    op.drop_table("api_requests")
    op.drop_table("sync_runs")
    op.drop_table("source_files")
    op.drop_table("leases")
    with op.batch_alter_table("inbox", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_inbox_unapplied",
            sqlite_where=sa.text("applied_at IS NULL"),
            postgresql_where=sa.text("applied_at IS NULL"),
        )

    op.drop_table("inbox")
    op.drop_table("dead_letters")
    op.drop_table("audiences")
