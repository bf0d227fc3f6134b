"""run history and backlog views; sync_runs outcome columns; inbox received_at index for retention

sync_runs gains held, events_delivered, events_failed and retrying, so a run's row says what a
person asks of it; run_history shows them with the run's duration, and sync_backlog the work
accepted but not done yet (inbox, event deliveries). ix_inbox_received_at lets `listsync db prune`
find old inbox rows without reading the whole table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

Rules for every revision: see 0001. Additive only: the previous release ignores the new columns
(they have server defaults), the index and the views.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from listsync.db.views import operator_views

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTS = {
    "events_delivered": "event deliveries Iterable accepted",
    "events_failed": "event deliveries that failed for good",
    "retrying": "members and events waiting for a retry at the end",
}


def upgrade() -> None:
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "held",
                sa.Text(),
                nullable=True,
                comment="audiences held by the mass-unsubscribe guard in this run, comma-separated",
            )
        )
        for name, comment in _COUNTS.items():
            batch_op.add_column(
                sa.Column(name, sa.Integer(), server_default="0", nullable=False, comment=comment)
            )
    with op.batch_alter_table("inbox", schema=None) as batch_op:
        batch_op.create_index("ix_inbox_received_at", ["received_at"], unique=False)
    for ddl in operator_views(op.get_bind().dialect.name).values():
        op.execute(ddl)


def downgrade() -> None:
    for name in operator_views(op.get_bind().dialect.name):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    with op.batch_alter_table("inbox", schema=None) as batch_op:
        batch_op.drop_index("ix_inbox_received_at")
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        for name in (*reversed(_COUNTS), "held"):
            batch_op.drop_column(name)
