"""api_requests.member_ids: the members of a list request in its own row

A list request used to write one api_request_items row per member before the call and update each
with its outcome after: two of the three writes per member of a sync. The request row now carries
its membership ids (a JSON array, in body order), written durably before the call as before, and
api_request_items holds only the members whose outcome is not the request's own (refused items,
and every member of a request resolved after a crash). A member without an item row had the
request's outcome: ok for an ok or partial request, error for a failed one. Requests written
before this revision have member_ids NULL and an item row per member, and are read as before.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01

Rules for every revision: see 0001. Additive: one nullable column (and, on SQLite, a trigger that takes
a deleted member out of the requests in flight). The previous release ignores
it; it would resolve a request left in flight by this one as having no members (they are still
pending, so they are simply sent again).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ITEMS_COMMENT = (
    "Members of a list request whose outcome is not the request's own (refused items; every member"
    " of a resolved request). A member without a row had the request's: ok for ok/partial, error"
    " for failed."
)
_ITEMS_COMMENT_BEFORE = "Per-member outcome of each list request."

# SQLite gives a deleted row's id to the next insert when it was the highest (PostgreSQL's
# sequences never do). A member a fold deletes while its request is in flight must leave the
# request, as its item row did by the foreign key's cascade: else recovery would read the new
# member that took its id as one the request carried.
_LEAVE_TRIGGER = "memberships_leave_in_flight_requests"
_LEAVE_SQLITE = f"""
CREATE TRIGGER {_LEAVE_TRIGGER} AFTER DELETE ON memberships
FOR EACH ROW WHEN EXISTS (
    SELECT 1 FROM api_requests WHERE status = 'in_flight' AND audience_id = OLD.audience_id
)
BEGIN
    UPDATE api_requests SET member_ids = (
        SELECT json_group_array(value) FROM (
            SELECT j.value AS value FROM json_each(api_requests.member_ids) AS j
            WHERE j.value <> OLD.id ORDER BY j.key
        )
    )
    WHERE status = 'in_flight' AND audience_id = OLD.audience_id AND member_ids IS NOT NULL;
END
"""


def upgrade() -> None:
    with op.batch_alter_table("api_requests", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "member_ids",
                sa.Text(),
                nullable=True,
                comment="list calls: the membership ids sent, a JSON array in body order (NULL before 0010)",
            )
        )
    if op.get_bind().dialect.name == "postgresql":
        op.create_table_comment("api_request_items", _ITEMS_COMMENT, existing_comment=_ITEMS_COMMENT_BEFORE)
    else:
        op.execute(_LEAVE_SQLITE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_table_comment("api_request_items", _ITEMS_COMMENT_BEFORE, existing_comment=_ITEMS_COMMENT)
    else:
        op.execute(f"DROP TRIGGER IF EXISTS {_LEAVE_TRIGGER}")
    with op.batch_alter_table("api_requests", schema=None) as batch_op:
        batch_op.drop_column("member_ids")
