"""event deliveries: per-event actions and the event_status view

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Rules for every revision: see 0001. Additive only: the previous release ignores the new column,
table and view.

Events already in the inbox are marked routed: a database upgraded from a lists-only release must
not send its whole history of events to Iterable as new ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from listsync.db.views import DELIVERY_VIEWS

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    with op.batch_alter_table("inbox", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "routed_at",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="when its per-event actions were recorded in event_deliveries",
            )
        )
    op.execute("UPDATE inbox SET routed_at = received_at")
    with op.batch_alter_table("inbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_inbox_unrouted",
            ["id"],
            unique=False,
            sqlite_where=sa.text("routed_at IS NULL"),
            postgresql_where=sa.text("routed_at IS NULL"),
        )
    _create_event_deliveries()
    for ddl in DELIVERY_VIEWS.values():
        op.execute(ddl)


def _create_event_deliveries() -> None:
    op.create_table(
        "event_deliveries",
        sa.Column("id", _BIG_ID, nullable=False),
        sa.Column("inbox_id", _BIG_ID, nullable=False, comment="inbox event"),
        sa.Column("message_id", sa.String(length=255), nullable=False, comment="Segment messageId of the event"),
        sa.Column(
            "event_type", sa.String(length=16), nullable=False, comment="identify / track / page / screen / ..."
        ),
        sa.Column("event_name", sa.String(length=255), nullable=True, comment="track event name, page name"),
        sa.Column(
            "mapping", sa.String(length=255), nullable=False, comment="name of the mapping that took the event"
        ),
        sa.Column(
            "action",
            _enum("action_kind", "upsert_user", "custom_event", "track_purchase", "cart_updates"),
            nullable=False,
            comment="upsert_user / custom_event / track_purchase / cart_updates",
        ),
        sa.Column("endpoint", sa.String(length=64), nullable=True, comment="e.g. events/track; NULL if not sent"),
        sa.Column(
            "body",
            _JSON,
            nullable=True,
            comment="request body (one item for bulk endpoints), the same on every attempt",
        ),
        sa.Column(
            "user_key",
            sa.String(length=320),
            nullable=False,
            comment="userId, else email: one user's deliveries go in this order",
        ),
        sa.Column("user_id", sa.String(length=255), nullable=True, comment="userId sent"),
        sa.Column("email", sa.String(length=320), nullable=True, comment="email sent"),
        sa.Column(
            "iterable_id",
            sa.String(length=512),
            nullable=True,
            comment="event or purchase id sent; Iterable updates rather than duplicates it",
        ),
        sa.Column(
            "state",
            _enum("delivery_state", "pending", "delivered", "failed", "skipped"),
            nullable=False,
            comment="pending / delivered / failed / skipped (no email or userId)",
        ),
        sa.Column("attempts", sa.Integer(), nullable=False, comment="sends that failed so far"),
        sa.Column(
            "next_attempt_at", sa.DateTime(timezone=True), nullable=True, comment="not retried before this UTC time"
        ),
        sa.Column("last_error", sa.Text(), nullable=True, comment="why it failed or was skipped, redacted"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, comment="UTC"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, comment="UTC"),
        sa.Column(
            "delivered_at", sa.DateTime(timezone=True), nullable=True, comment="when Iterable accepted it (UTC)"
        ),
        sa.ForeignKeyConstraint(
            ["inbox_id"], ["inbox.id"], name=op.f("fk_event_deliveries_inbox_id_inbox"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_deliveries")),
        sa.UniqueConstraint("inbox_id", "mapping", name="uq_event_deliveries_event_mapping"),
        comment="One row per (inbox event, mapping): the Iterable request it makes and its outcome.",
    )
    with op.batch_alter_table("event_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_event_deliveries_pending",
            ["id"],
            unique=False,
            sqlite_where=sa.text("state = 'pending'"),
            postgresql_where=sa.text("state = 'pending'"),
        )
        batch_op.create_index("ix_event_deliveries_user_id", ["user_id"], unique=False)


def downgrade() -> None:
    for name in reversed(list(DELIVERY_VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    with op.batch_alter_table("event_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_event_deliveries_user_id")
        batch_op.drop_index(
            "ix_event_deliveries_pending",
            sqlite_where=sa.text("state = 'pending'"),
            postgresql_where=sa.text("state = 'pending'"),
        )
    op.drop_table("event_deliveries")
    with op.batch_alter_table("inbox", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_inbox_unrouted",
            sqlite_where=sa.text("routed_at IS NULL"),
            postgresql_where=sa.text("routed_at IS NULL"),
        )
        batch_op.drop_column("routed_at")
