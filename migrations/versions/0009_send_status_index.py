"""ix_memberships_status without the settled rows; ix_memberships_desired

Confirming a subscribe moved each member's entry of ix_memberships_status (state and synced are
in its key), most of the cost of recording an answer. The index now holds only the rows other
than the common settled one (synced, wanted in, in the list): a confirmed subscribe deletes its
entry, nothing is inserted. The status page counts the settled rows as the members wanted in
(ix_memberships_desired, whose key no answer from Iterable changes) less the other rows wanted in.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

Rules for every revision: see 0001. Indexes only: the previous release reads the same rows (its
status page counts the settled rows from the table instead of an index).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNSETTLED = sa.text("NOT (state = 'synced' AND desired = 'in' AND COALESCE(synced, '') = 'in')")
_STATUS_COLUMNS = ["audience_id", "state", "desired", "synced", "desired_at"]


def upgrade() -> None:
    op.drop_index("ix_memberships_status", table_name="memberships")
    op.create_index(
        "ix_memberships_status",
        "memberships",
        _STATUS_COLUMNS,
        sqlite_where=_UNSETTLED,
        postgresql_where=_UNSETTLED,
    )
    op.create_index("ix_memberships_desired", "memberships", ["audience_id", "desired", "desired_at"])


def downgrade() -> None:
    op.drop_index("ix_memberships_desired", table_name="memberships")
    op.drop_index("ix_memberships_status", table_name="memberships")
    op.create_index("ix_memberships_status", "memberships", _STATUS_COLUMNS)
