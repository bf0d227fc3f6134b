"""The migrations build exactly the models' schema, on both databases, and can be walked back."""

from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from listsync.db.models import metadata
from listsync.db.session import downgrade, make_engine, upgrade
from listsync.db.views import VIEWS


def _drift(url: str) -> list[object]:
    engine = make_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, metadata)
    engine.dispose()
    return diff


def _views(url: str) -> set[str]:
    engine = make_engine(url)
    names = set(inspect(engine).get_view_names())
    engine.dispose()
    return names


def test_models_and_migrations_agree(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    assert _drift(empty_database_url) == []
    assert set(VIEWS) <= _views(empty_database_url)


def test_upgrade_downgrade_upgrade(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    downgrade(empty_database_url, "base")
    engine = make_engine(empty_database_url)
    leftover = set(inspect(engine).get_table_names()) - {"alembic_version"}
    engine.dispose()
    assert leftover == set()
    assert _views(empty_database_url) == set()
    upgrade(empty_database_url)
    assert _drift(empty_database_url) == []


def test_views_answer_with_the_contract_columns(database_url: str) -> None:
    engine = make_engine(database_url)
    expected = {
        "audience_status": ["audience_key", "list_id", "members", "synced_members", "pending_subscribe",
                            "pending_unsubscribe", "failed", "last_synced_at"],
        "member_status": ["audience_key", "user_id", "email", "desired", "synced", "state", "last_error",
                          "updated_at"],
        "rejected_events": ["received_at", "reason", "payload"],
    }
    with engine.connect() as conn:
        for view, columns in expected.items():
            result = conn.execute(text(f"SELECT * FROM {view}"))
            assert list(result.keys())[: len(columns)] == columns
            assert result.fetchall() == []
    engine.dispose()


def test_the_shipped_head_is_alembics_head() -> None:
    from alembic.script import ScriptDirectory

    from listsync.db.session import alembic_config, shipped_head

    assert shipped_head() == ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_a_database_at_head_is_recognised_without_alembic(empty_database_url: str) -> None:
    """A command on a migrated database skips Alembic; one a revision behind is still upgraded."""
    upgrade(empty_database_url)
    script = (
        "import sys\n"
        "from listsync.db.session import upgrade\n"
        f"upgrade({empty_database_url!r})\n"
        "print('alembic' in sys.modules)\n"
    )
    at_head = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert at_head.stdout.strip() == "False"
    downgrade(empty_database_url, "-1")
    behind = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert behind.stdout.strip() == "True"
    assert _drift(empty_database_url) == []
