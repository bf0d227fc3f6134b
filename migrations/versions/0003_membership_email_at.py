"""memberships.email_at; the pending index keyed for keyset paging

memberships.email_at: when the member's email last changed. ix_memberships_pending becomes
(audience_id, id) WHERE state = 'pending': the sender reads pending members in id order page by
page, and with (audience_id, next_attempt_at) each page had to sort every pending member again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

Rules for every revision: see 0001. Additive only: the previous release ignores the column.
A NULL email_at (every existing row) means "no email change recorded yet", so the first change
after the upgrade applies as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from listsync.db.views import VIEWS

# SQLite rebuilds a table to drop a column, which breaks views that read it: drop and recreate.
_READERS = ("audience_status", "member_status")
_PENDING = sa.text("state = 'pending'")

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    _drop_readers()
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "email_at",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="timestamp of the identify that last changed `email` (UTC); an older one is ignored",
            )
        )
        batch_op.drop_index("ix_memberships_pending", sqlite_where=_PENDING, postgresql_where=_PENDING)
        batch_op.create_index(
            "ix_memberships_pending",
            ["audience_id", "id"],
            unique=False,
            sqlite_where=_PENDING,
            postgresql_where=_PENDING,
        )
    _create_readers()


def downgrade() -> None:
    _drop_readers()
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.drop_index("ix_memberships_pending", sqlite_where=_PENDING, postgresql_where=_PENDING)
        batch_op.create_index(
            "ix_memberships_pending",
            ["audience_id", "next_attempt_at"],
            unique=False,
            sqlite_where=_PENDING,
            postgresql_where=_PENDING,
        )
        batch_op.drop_column("email_at")
    _create_readers()


def _drop_readers() -> None:
    for name in _READERS:
        op.execute(f"DROP VIEW IF EXISTS {name}")


def _create_readers() -> None:
    for name in _READERS:
        op.execute(VIEWS[name])
