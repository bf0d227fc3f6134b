"""inbox.rules: which validation rules accepted each event, so the fold re-validates only the rest

The fold re-validates an inbox event only when a release with other rules accepted it (a stricter
release must still refuse what an older one let in); an event the running rules accepted is read
back as it was stored. NULL (every existing row) means "unknown rules": validated again, as before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

Rules for every revision: see 0001. Additive only: the previous release ignores the column.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from listsync.db.views import operator_views

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("inbox", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "rules",
                sa.String(length=16),
                nullable=True,
                comment="fingerprint of the validation rules that accepted it; NULL: unknown, validated again",
            )
        )


def downgrade() -> None:
    # SQLite rebuilds the table to drop a column, which breaks the view that reads it.
    op.execute("DROP VIEW IF EXISTS sync_backlog")
    with op.batch_alter_table("inbox", schema=None) as batch_op:
        batch_op.drop_column("rules")
    op.execute(operator_views(op.get_bind().dialect.name)["sync_backlog"])
