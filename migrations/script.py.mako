"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

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
${imports if imports else ""}

revision: str = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
