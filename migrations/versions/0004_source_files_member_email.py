"""source_files: the size and mtime a file was read at, and why a file was quarantined;
memberships by (audience, email)

A drop-folder file is now known by its name *and* its size and modification time: a file rewritten or
rotated under a name already read is read again (events dedupe on messageId), instead of being
ignored forever. `error` holds why a file was quarantined (corrupt, a link out of the folder, not a
regular file); a quarantined file is not read again until it changes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

ix_memberships_email serves the SQL source's match of snapshot rows to members by email (with
the unique (audience_id, user_id, email) key serving the match by userId), so a poll costs index
lookups per row instead of a scan of the audience per row.

Rules for every revision: see 0001. Additive only: the previous release ignores the columns. NULL
size and mtime (every existing row) mean "as first seen": such a row is matched by name alone once,
then records what it sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("source_files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("size", sa.BigInteger(), nullable=True, comment="bytes when read"))
        batch_op.add_column(
            sa.Column("mtime_ns", sa.BigInteger(), nullable=True, comment="modification time when read (ns)")
        )
        batch_op.add_column(
            sa.Column("error", sa.Text(), nullable=True, comment="why the file was quarantined; NULL if not")
        )
    op.create_index("ix_memberships_email", "memberships", ["audience_id", "email"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_memberships_email", table_name="memberships")
    with op.batch_alter_table("source_files", schema=None) as batch_op:
        batch_op.drop_column("error")
        batch_op.drop_column("mtime_ns")
        batch_op.drop_column("size")
