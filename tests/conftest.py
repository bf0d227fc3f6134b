"""Shared fixtures. `database_url` is parametrised over SQLite and PostgreSQL: every test of the
state layer runs on both. Each test gets a fresh, migrated database (a PostgreSQL database is
cloned from a migrated template, which takes milliseconds)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from listsync.db import session as db_session
from tests import pg

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    if os.environ.get("LISTSYNC_TEST_SKIP_PG") == "1":
        pytest.skip("LISTSYNC_TEST_SKIP_PG=1")
    with pg.postgres_url() as url:
        yield url


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str) -> str:
    """A migrated template database that per-test databases are cloned from."""
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS listsync_template"))
        conn.execute(text("CREATE DATABASE listsync_template"))
    admin.dispose()
    template_url = make_url(pg_server_url).set(database="listsync_template").render_as_string(hide_password=False)
    db_session.upgrade(template_url)
    return "listsync_template"


def _fresh_pg_database(server_url: str, template: str | None) -> str:
    name = f"listsync_test_{os.getpid()}_{next(_counter)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        suffix = f" TEMPLATE {template}" if template else ""
        conn.execute(text(f"CREATE DATABASE {name}{suffix}"))
    admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, migrated database: SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'listsync.db'}"
        db_session.upgrade(url)
        return url
    server = request.getfixturevalue("pg_server_url")
    template = request.getfixturevalue("pg_template")
    return _fresh_pg_database(server, template)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database with no schema at all, for migration tests."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return _fresh_pg_database(request.getfixturevalue("pg_server_url"), None)
