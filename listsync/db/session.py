"""Engines and sessions: the one place that knows how to connect, and how to migrate."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, CursorResult, Engine, Result, any_, bindparam, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig


def make_engine(database_url: str, *, read_only: bool = False, **kwargs: Any) -> Engine:
    """An engine with the pragmas listsync relies on; SQLite gets WAL and a busy timeout.

    `read_only` (the status page): SQLite transactions begin deferred, so a long read never holds
    the write lock, and PostgreSQL refuses any write.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_deferred if read_only else _sqlite_begin_immediate)
        return engine
    if read_only:
        kwargs["execution_options"] = {**kwargs.get("execution_options", {}), "postgresql_readonly": True}
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling is off so that BEGIN IMMEDIATE below is ours.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before the receiver answers 200 (NORMAL may lose it on power loss).
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    # Take the write lock at BEGIN: a deferred transaction that reads then writes can fail with
    # "database is locked" when another writer got in between, and SQLite cannot retry it for us.
    # The safety level can only change outside a transaction, so `transaction(durable=False)`
    # passes its wish as an execution option and it is applied here, just before BEGIN.
    level = "FULL" if connection.get_execution_options().get(_DURABLE, True) else "NORMAL"
    if connection.info.get(_DURABLE) != level:
        connection.exec_driver_sql(f"PRAGMA synchronous={level}")
        connection.info[_DURABLE] = level
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin_deferred(connection: Any) -> None:
    # In WAL mode a deferred reader sees one snapshot and never blocks the writer.
    connection.exec_driver_sql("BEGIN")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


_DURABLE = "listsync_durable"


@contextmanager
def transaction(factory: sessionmaker[Session], *, durable: bool = True) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on any error.

    `durable=False`: the commit does not wait for the disk (SQLite's synchronous=NORMAL under WAL,
    PostgreSQL's synchronous_commit off). The database stays consistent and a crash of the process
    loses nothing; a power loss may lose the last such commits, as if they had never run, and the
    next durable commit makes them durable too (both logs are written in order). Only for work
    whose loss the caller can recover from, e.g. an answer recorded after a durable ledger row."""
    with factory() as session, session.begin():
        if not durable:
            connection = session.connection(execution_options={_DURABLE: False})
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
        yield session


def alembic_config(database_url: str) -> AlembicConfig:
    """Alembic pointed at the revisions shipped inside the package (works from a wheel too)."""
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(resources.files("listsync.migrations")))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database to `revision`.

    Every command starts here, so a database already at the shipped head is recognised without
    loading Alembic (its import alone is about a tenth of a command's start-up).
    """
    if revision == "head" and _stored_revision(database_url) == shipped_head():
        return
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(database_url), revision)


_REVISION_LINE = re.compile(r"""^(down_revision|revision)\s*(?::[^=]+)?=\s*["']([^"']+)["']""", re.MULTILINE)


def shipped_head() -> str | None:
    """The one revision of the shipped migrations that no other revision builds on, read from
    the files' `revision = "..."` lines; None when that is not a single one (Alembic decides)."""
    revisions: set[str] = set()
    bases: set[str] = set()
    for script in (resources.files("listsync.migrations") / "versions").iterdir():
        if script.name.endswith(".py"):
            for name, value in _REVISION_LINE.findall(script.read_text(encoding="utf-8")):
                (revisions if name == "revision" else bases).add(value)
    heads = revisions - bases
    return heads.pop() if len(heads) == 1 else None


def _stored_revision(database_url: str) -> str | None:
    """The revision recorded in the database, or None (no database yet, no table, several heads)."""
    engine = create_engine(make_url(database_url))
    try:
        with engine.connect() as connection:
            rows = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    except DBAPIError:
        return None
    finally:
        engine.dispose()
    return str(rows[0][0]) if len(rows) == 1 else None


def rows_affected(result: Result[Any]) -> int:
    """Rows an INSERT, UPDATE or DELETE touched (the rowcount of the cursor result it returns).

    An unknown count raises: SQLAlchemy reports -1 for an `insert()` run through a session unless it
    is executed with `preserve_rowcount`, and a -1 read as "some rows" once let every replica take
    the same lease. Count such inserts with RETURNING or that option."""
    count = cast(CursorResult[Any], result).rowcount
    if count is None or count < 0:
        raise RuntimeError("the database driver did not report how many rows the statement touched")
    return int(count)


def refused_by_data(exc: BaseException) -> bool:
    """Whether `exc` says the data of a statement was refused (too long, out of range, not
    encodable), which no retry can fix, as opposed to the database being unavailable or busy.

    The caller isolates such data (dead-letters it) and goes on; anything else propagates, so
    that an outage is retried instead of turning good events into dead letters.
    """
    if isinstance(exc, DataError | IntegrityError):
        return True
    if isinstance(exc, DBAPIError):
        return False
    if isinstance(exc, StatementError):  # raised while binding parameters, before the database
        return True
    return isinstance(exc, ValueError | TypeError | LookupError | ArithmeticError | RecursionError)


def describe_refusal(exc: BaseException) -> str:
    """One line saying why, without the statement or its parameters (they may hold personal data)."""
    cause = getattr(exc, "orig", None) or exc
    first_line = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first_line[:200]}"


KEY_CHUNK = 400  # bound parameters per IN (...) list: well inside both databases' limits


def is_postgres(session: Session | Connection) -> bool:
    bind = session if isinstance(session, Connection) else session.get_bind()
    return bind.dialect.name == "postgresql"


def insert_for(session: Session | Connection, table: Any) -> Any:
    """INSERT with the dialect's ON CONFLICT support (both databases spell it the same way)."""
    return (postgresql.insert if is_postgres(session) else sqlite.insert)(table)


def chunks(items: Sequence[Any], size: int = KEY_CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def key_filters(session: Session, column: Any, values: Sequence[Any]) -> Iterable[Any]:
    """Conditions that together select the rows whose `column` is one of `values`: one
    `column = ANY(array)` on PostgreSQL (one short statement, parsed and planned once, however
    many values), IN lists of KEY_CHUNK values on SQLite."""
    if not values:
        return []
    if is_postgres(session):
        return [column == any_(bindparam("key_values", list(values), type_=postgresql.ARRAY(column.type)))]
    return [column.in_(chunk) for chunk in chunks(values)]
