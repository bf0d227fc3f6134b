"""api_request_items: the identifiers each member was sent with

A subscribe's answer is recorded for the whole request in one statement: a member whose row still
carries the identifiers it was sent with is confirmed in SQL, and only the rows that changed while
the request was on the wire are read back into Python. sent_email and sent_user_id are what the
request carried for the member (NULL: not sent).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

Rules for every revision: see 0001. Additive only: the previous release ignores the new, nullable
columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_request_items", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("sent_email", sa.String(length=320), nullable=True, comment="email the request carried")
        )
        batch_op.add_column(
            sa.Column("sent_user_id", sa.String(length=255), nullable=True, comment="userId the request carried")
        )


def downgrade() -> None:
    with op.batch_alter_table("api_request_items", schema=None) as batch_op:
        batch_op.drop_column("sent_user_id")
        batch_op.drop_column("sent_email")
