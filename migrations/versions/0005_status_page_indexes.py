"""Indexes for the status page's queries

Every query of the status page (listsync/db/dashboard.py) is paged or bounded by a window, and
each has an index here so it costs the same with millions of members:

- ix_memberships_status (audience_id, state, desired, synced, desired_at): the per-audience counts,
  newest change and oldest pending change, from the index alone;
- ix_memberships_failed (audience_id, id) WHERE state = 'failed': failed members paged by id;
- ix_api_requests_audience_id (audience_id, id): one audience's ledger, newest first;
- ix_sync_runs_started_at, ix_dead_letters_received_at: the chart's and the rejected events' window;
- ix_event_deliveries_action_state: deliveries counted by action and state.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Rules for every revision: see 0001. Additive only: the previous release ignores the indexes.
No view reads a changed column, so none is recreated.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FAILED = sa.text("state = 'failed'")


def upgrade() -> None:
    op.create_index(
        "ix_memberships_status", "memberships", ["audience_id", "state", "desired", "synced", "desired_at"]
    )
    op.create_index(
        "ix_memberships_failed",
        "memberships",
        ["audience_id", "id"],
        sqlite_where=_FAILED,
        postgresql_where=_FAILED,
    )
    op.create_index("ix_api_requests_audience_id", "api_requests", ["audience_id", "id"])
    op.create_index("ix_sync_runs_started_at", "sync_runs", ["started_at"])
    op.create_index("ix_dead_letters_received_at", "dead_letters", ["received_at"])
    op.create_index("ix_event_deliveries_action_state", "event_deliveries", ["action", "state"])


def downgrade() -> None:
    op.drop_index("ix_event_deliveries_action_state", table_name="event_deliveries")
    op.drop_index("ix_dead_letters_received_at", table_name="dead_letters")
    op.drop_index("ix_sync_runs_started_at", table_name="sync_runs")
    op.drop_index("ix_api_requests_audience_id", table_name="api_requests")
    op.drop_index("ix_memberships_failed", table_name="memberships")
    op.drop_index("ix_memberships_status", table_name="memberships")
