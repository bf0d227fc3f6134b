"""The set-based fold's staging table: one batch of inbox events (or of deltas), read by the
database itself, one row each.

`stage_inbox` copies a batch of unapplied inbox rows into the temporary table `fold_stage` with
one INSERT ... SELECT, extracting an Engage audience delta from the stored payload in SQL
(SQLite's JSON functions, PostgreSQL's jsonb operators) exactly as `ingest.audience.extract_deltas`
reads a stored event: the audience key (a track's properties.audience_key, else
context.personas.computation_key), the flag (traits[key] of an identify, properties[key] of a
track: a boolean, or "true"/"false"; else a track's name, else unknown), the userId, email,
timestamp and messageId (the inbox's own normalised columns) and whether the event carries
Engage audience settings. Each row gets a kind:

* `delta`: an audience delta the database read;
* `change`: a plain identify with a userId and an email (a possible email change);
* `event`: an audience event the database does not read alone (a flag spelled otherwise, or, on
  SQLite, a key or a data-field name that a JSON path cannot quote): Python reads its payload;
* `check`: stored under other validation rules (or, on SQLite, not JSON it can read): the batch
  is folded in Python, validated again;
* `none`: nothing for memberships (the event is only marked applied).

`db.fold` classifies and applies the staged deltas; `lists.set_fold` drives it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    bindparam,
    delete,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex, CreateTable

from listsync.db import fold_reads
from listsync.db.models import BigId, UTCDateTime
from listsync.db.session import is_postgres, rows_affected
from listsync.domain import Member

# Not part of the schema (no migration, no model): a connection's own scratch table.
_META = MetaData()
STAGE = Table(
    "fold_stage",
    _META,
    Column("pos", BigId, primary_key=True, comment="inbox id (or the delta's index in its batch)"),
    Column("kind", Text, nullable=False),
    Column("audience_key", Text),
    Column("audience_id", BigInteger),
    Column("user_id", Text),
    Column("email", Text),
    Column("desired", Text),
    Column("ts", UTCDateTime),
    Column("msg", Text),
    Column("data_fields", JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")),
    Column("has_settings", Boolean),
    Column("cls", Text, comment="set: the set-based path; rules: folded in Python; made: created by it"),
    Column("member_id", BigInteger, comment="the stored member with the delta's identifiers"),
    # A member the rules created (cls 'made'): the rest of its state, inserted with the others.
    Column("synced", Text),
    Column("synced_email", Text),
    Column("synced_user_id", Text),
    Column("state", Text),
    Column("attempts", Integer),
    Column("last_error", Text),
    Index("ix_fold_stage_user_id", "user_id"),
    Index("ix_fold_stage_email", "email"),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DELETE ROWS",
)


def open_stage(session: Session) -> None:
    """The empty staging table of this connection (created on first use in a transaction)."""
    connection = session.connection()
    connection.execute(CreateTable(STAGE, if_not_exists=True))
    for index in sorted(STAGE.indexes, key=lambda i: str(i.name)):
        connection.execute(CreateIndex(index, if_not_exists=True))
    connection.execute(delete(STAGE))


def stage_inbox(session: Session, limit: int, rules: str) -> int:
    """Stage the oldest `limit` unapplied inbox events (locked on PostgreSQL); returns how many."""
    open_stage(session)
    params = {"limit": limit, "rules": rules}
    if is_postgres(session):
        staged = rows_affected(session.execute(fold_reads.STAGE_PG, params))
        # Autovacuum never analyzes a temporary table: without statistics the planner guesses its
        # size and may join it to memberships and the inbox by scanning them whole.
        session.execute(text("ANALYZE fold_stage"))
        # A few index look-ups per staged row: compiling them (JIT) costs more than running them.
        session.execute(text("SET LOCAL jit = off"))
        return staged
    try:
        with session.begin_nested():
            return rows_affected(session.execute(fold_reads.STAGE_SQLITE, params))
    except DBAPIError as exc:
        if "JSON" not in str(exc.orig):
            raise
    # A payload SQLite's JSON functions refuse (none is expected): Python reads the batch.
    return rows_affected(session.execute(_STAGE_CHECK, params))


_STAGE_CHECK = text(
    "INSERT INTO fold_stage (pos, kind) SELECT id, 'check' FROM inbox WHERE applied_at IS NULL ORDER BY id LIMIT :limit"
)


def stage_deltas(session: Session, rows: Sequence[tuple[int, int, Any, dict[str, Any] | None]]) -> None:
    """Stage (position, audience_id, delta, data fields) rows: deltas already read in Python."""
    open_stage(session)
    if not rows:
        return
    session.execute(
        STAGE.insert(),
        [
            {"pos": pos, "kind": "delta", "audience_key": delta.audience_key, "audience_id": audience_id,
             "user_id": delta.user_id or None, "email": delta.email or None, "desired": delta.desired.value,
             "ts": delta.timestamp, "msg": delta.message_id, "data_fields": fields, "has_settings": False}
            for pos, audience_id, delta, fields in rows
        ],
    )


def drop_idle_changes(session: Session) -> None:
    """Staged email changes of users the fold cannot touch become `none`: no membership has their
    userId and no delta of the batch names it, so the change moves nothing (`identity.email_change`
    acts on the user's memberships only). Profile updates arrive by the thousand; each would
    otherwise be read in Python and look its user up alone."""
    session.execute(_DROP_IDLE_CHANGES)


_DROP_IDLE_CHANGES = text("""
UPDATE fold_stage SET kind = 'none'
WHERE kind = 'change'
  AND user_id NOT IN (SELECT user_id FROM fold_stage WHERE kind IN ('delta', 'event') AND user_id IS NOT NULL)
  AND NOT EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = fold_stage.user_id)
""")


def staged_kinds(session: Session) -> set[str]:
    return set(session.scalars(select(STAGE.c.kind).distinct()))


def positions(session: Session) -> list[int]:
    return list(session.scalars(select(STAGE.c.pos).order_by(STAGE.c.pos)))


def delta_keys(session: Session) -> list[str]:
    """The audience keys of the staged deltas."""
    stmt = select(STAGE.c.audience_key).where(STAGE.c.kind == "delta").distinct()
    return sorted(key for key in session.scalars(stmt) if key is not None)


def set_audience_ids(session: Session, ids: Mapping[str, int]) -> None:
    if ids:
        session.execute(
            update(STAGE)
            .where(STAGE.c.kind == "delta", STAGE.c.audience_key == bindparam("b_key"))
            .values(audience_id=bindparam("b_id")),
            [{"b_key": key, "b_id": audience_id} for key, audience_id in ids.items()],
        )


def to_python(session: Session, keys: Sequence[str]) -> None:
    """Let Python read the staged deltas of these audiences from their payloads (kind `event`)."""
    if keys:
        session.execute(
            update(STAGE).where(STAGE.c.kind == "delta", STAGE.c.audience_key.in_(list(keys))).values(kind="event")
        )


def select_data_fields(session: Session, names: Sequence[str], keys: Sequence[str]) -> None:
    """Set the staged deltas' data fields for audiences whose configured trait names are `names`:
    `planner.select_data_fields` of the event's own traits/properties over context.traits, the
    flag (and a track's audience_key) left out; NULL when none is there."""
    if is_postgres(session):
        session.execute(fold_reads.FIELDS_PG, {"names": list(names), "keys": list(keys)})
    else:
        session.execute(
            fold_reads.fields_sqlite(len(keys)), {"names": fold_reads.json_list(names), **fold_reads.key_params(keys)}
        )


@dataclass(frozen=True)
class StagedRow:
    """A staged row that Python folds: a delta for the rules, or an event to read in Python."""

    pos: int
    kind: str
    audience_id: int | None
    audience_key: str | None
    user_id: str | None
    email: str | None
    desired: str | None
    ts: datetime | None
    msg: str | None
    data_fields: dict[str, Any] | None


_ROW_COLUMNS = tuple(STAGE.c[name] for name in StagedRow.__dataclass_fields__)


def python_rows(session: Session) -> list[StagedRow]:
    """The rows Python folds, in batch order: deltas classified `rules`, and events to read."""
    stmt = (
        select(*_ROW_COLUMNS)
        .where((STAGE.c.cls == "rules") | STAGE.c.kind.in_(["event", "change"]))
        .order_by(STAGE.c.pos)
    )
    return [StagedRow(*row) for row in session.execute(stmt)]


def stage_created(session: Session, created: Sequence[tuple[int, int, Member]]) -> None:
    """Members the rules created ((position, audience_id, member)), to be inserted in batch order
    with the set-based path's new members (`fold.insert_new`)."""
    if created:
        session.execute(_STAGE_CREATED, [_created_values(pos, audience_id, member) for pos, audience_id, member in created])


_MEMBER_COLUMNS = ("user_id", "email", "synced_email", "synced_user_id", "state", "attempts", "last_error")
_STAGE_CREATED = (
    update(STAGE)
    .where(STAGE.c.pos == bindparam("b_pos"))
    .values(
        cls="made",
        member_id=None,
        audience_id=bindparam("b_audience_id"),
        desired=bindparam("b_desired"),
        ts=bindparam("b_ts"),
        msg=bindparam("b_msg"),
        data_fields=bindparam("b_data_fields"),
        synced=bindparam("b_synced"),
        **{name: bindparam(f"b_{name}") for name in _MEMBER_COLUMNS},
    )
)


def _created_values(pos: int, audience_id: int, member: Member) -> dict[str, Any]:
    return {
        "b_pos": pos,
        "b_audience_id": audience_id,
        "b_desired": member.desired.value,
        "b_ts": member.desired_at,
        "b_msg": member.desired_message_id,
        "b_data_fields": member.data_fields,
        "b_synced": member.synced.value if member.synced else None,
        **{f"b_{name}": getattr(member, name) for name in _MEMBER_COLUMNS},
    }


def latest_settings(session: Session) -> list[tuple[str, Any]]:
    """(audience key, context.personas.audience_settings) of the batch's latest event per audience
    that carried Engage settings."""
    statement = _SETTINGS_PG if is_postgres(session) else _SETTINGS_SQLITE
    return [(key, value) for key, value in session.execute(statement)]


_LATEST = (
    "SELECT s.audience_key, {value} FROM fold_stage s JOIN inbox i ON i.id = s.pos"
    " WHERE s.pos IN (SELECT max(pos) FROM fold_stage WHERE has_settings AND kind IN ('delta', 'event')"
    " GROUP BY audience_key)"
)
_SETTINGS_SQLITE = text(
    _LATEST.format(value="json_extract(i.payload, '$.context.personas.audience_settings') AS value")
).columns(audience_key=Text, value=JSON)
_SETTINGS_PG = text(
    _LATEST.format(value="i.payload -> 'context' -> 'personas' -> 'audience_settings' AS value")
).columns(audience_key=Text, value=JSONB)


def mark_applied(session: Session, now: datetime) -> None:
    """Every staged inbox event is applied (in the transaction that folded it)."""
    session.execute(_MARK_APPLIED, {"now": now})


_MARK_APPLIED = text(
    "UPDATE inbox SET applied_at = :now WHERE id IN (SELECT pos FROM fold_stage)"
).bindparams(bindparam("now", type_=UTCDateTime()))
