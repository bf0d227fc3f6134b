"""Alembic environment: the URL comes from the Alembic config (set by listsync.db.session) or,
when run through the plain `alembic` command, from listsync's own configuration."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from listsync.db.models import metadata
from listsync.db.session import make_engine

config = context.config


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from listsync.config import load_settings

    return load_settings().database_url


MIGRATION_LOCK_KEY = 0x6C73_6462  # "lsdb"


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,
        compare_type=True,
    )


def run_migrations_offline() -> None:
    context.configure(url=_database_url(), target_metadata=metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _migrate(connectable)
        return
    engine = make_engine(_database_url())
    with engine.connect() as connection:
        _migrate(connection)
    engine.dispose()


def _migrate(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas starting together all run `upgrade`; the first takes this lock and migrates,
            # the others wait, then find the schema at head. Released at commit.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
