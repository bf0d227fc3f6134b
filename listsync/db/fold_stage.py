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
from functools import cache
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
    TextClause,
    bindparam,
    delete,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex, CreateTable

from listsync.db.models import BigId, UTCDateTime
from listsync.db.session import is_postgres, rows_affected
from listsync.domain import Member
from listsync.json_text import dumps as json_text

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
        staged = rows_affected(session.execute(_STAGE_PG, params))
        # Autovacuum never analyzes a temporary table: without statistics the planner guesses its
        # size and may join it to memberships and the inbox by scanning them whole.
        session.execute(text("ANALYZE fold_stage"))
        # A few index look-ups per staged row: compiling them (JIT) costs more than running them.
        session.execute(text("SET LOCAL jit = off"))
        return staged
    try:
        with session.begin_nested():
            return rows_affected(session.execute(_STAGE_SQLITE, params))
    except DBAPIError as exc:
        if "JSON" not in str(exc.orig):
            raise
    # A payload SQLite's JSON functions refuse (none is expected): Python reads the batch.
    return rows_affected(session.execute(_STAGE_CHECK, params))


_STAGE_CHECK = text(
    "INSERT INTO fold_stage (pos, kind) SELECT id, 'check' FROM inbox WHERE applied_at IS NULL ORDER BY id LIMIT :limit"
)


def _quoted_flags(*desired: str) -> str:
    """The flags spelled as JSON strings that `audience` reads as booleans, as SQL literals."""
    return ", ".join(f"'\"{flag}\"'" for d in desired for flag in _STRING_FLAGS[d])


_INSERT = "INSERT INTO fold_stage (pos, kind, audience_key, user_id, email, desired, ts, msg, has_settings)\n"
_SETTING_NAMES = ("updateExistingUsersOnly", "globalUnsubscribe", "channelUnsubscribe", "campaignId")
_STRING_FLAGS = {"in": ("true", "True", "TRUE"), "out": ("false", "False", "FALSE")}

# SQLite parses the whole payload on every JSON call, so each row gets two: one json_extract of the
# three fixed paths (one small JSON array), then the flag under the key read from it. Each level is
# a subquery with a LIMIT, which SQLite neither flattens into the next nor materializes: it runs it
# as a co-routine, each column computed once however often the next level uses it. The payloads are
# standard JSON of bounded depth (written by json_text.dumps from events these rules accepted); a
# key that a JSON path cannot quote is left to Python (`fold_stage.to_python`, `fast_fold.path_safe`).
_STAGE_SQLITE = text(f"""
{_INSERT}SELECT id,
  CASE WHEN kind0 <> 'audience' THEN kind0
       WHEN k IS NULL THEN 'none'
       WHEN substr(flag, 1, 1) = '"' AND flag NOT IN ({_quoted_flags("in", "out")}) THEN 'event'
       ELSE 'delta' END,
  k, NULLIF(user_id, ''), NULLIF(email, ''),
  CASE WHEN flag IN ('true', {_quoted_flags("in")}) THEN 'in'
       WHEN flag IN ('false', {_quoted_flags("out")}) THEN 'out'
       WHEN type = 'track' THEN CASE WHEN event = 'Audience Entered' THEN 'in' ELSE 'out' END
       ELSE 'unknown' END,
  timestamp, message_id, has_settings
FROM (
  SELECT b.*, CASE WHEN k IS NOT NULL THEN i.payload ->
      (CASE WHEN b.type = 'track' THEN '$.properties."' ELSE '$.traits."' END || k || '"') END AS flag
  FROM (
    SELECT id, type, event, user_id, email, timestamp, message_id, kind0,
      COALESCE(CASE WHEN type = 'track' AND json_type(found, '$[0]') = 'text' THEN NULLIF(found ->> '$[0]', '') END,
               CASE WHEN json_type(found, '$[1]') = 'text' THEN NULLIF(found ->> '$[1]', '') END) AS k,
      CASE WHEN substr(found, -6) <> ',null]' AND json_type(found, '$[2]') = 'object' THEN {" OR ".join(
          f"COALESCE(json_type(found, '$[2].{name}'), 'null') <> 'null'" for name in _SETTING_NAMES)}
           ELSE 0 END AS has_settings
    FROM (
      SELECT id, type, event, user_id, email, timestamp, message_id,
        CASE WHEN rules IS NOT :rules THEN 'check'
             WHEN NOT is_audience THEN
               CASE WHEN type = 'identify' AND user_id IS NOT NULL AND email IS NOT NULL THEN 'change' ELSE 'none' END
             ELSE 'audience' END AS kind0,
        CASE WHEN rules IS :rules AND is_audience THEN json_extract(payload, '$.properties.audience_key',
             '$.context.personas.computation_key', '$.context.personas.audience_settings') END AS found
      FROM inbox WHERE applied_at IS NULL ORDER BY id LIMIT :limit
    ) LIMIT :limit
  ) b JOIN inbox i ON i.id = b.id LIMIT :limit
) LIMIT :limit
""")

_STAGE_PG = text(f"""
{_INSERT}WITH batch AS MATERIALIZED (
  SELECT id, type, event, user_id, email, timestamp, message_id, payload, rules,
         CASE WHEN type = 'track' THEN payload -> 'properties' ELSE payload -> 'traits' END AS src,
         CASE WHEN rules IS DISTINCT FROM :rules THEN 'check'
              WHEN NOT is_audience THEN
                CASE WHEN type = 'identify' AND user_id IS NOT NULL AND email IS NOT NULL
                     THEN 'change' ELSE 'none' END
              ELSE 'audience' END AS kind0
  FROM inbox WHERE applied_at IS NULL ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
), keyed AS MATERIALIZED (
  SELECT b.*, CASE WHEN kind0 = 'audience' THEN COALESCE(
      CASE WHEN type = 'track' AND jsonb_typeof(payload -> 'properties' -> 'audience_key') = 'string'
           THEN NULLIF(payload -> 'properties' ->> 'audience_key', '') END,
      CASE WHEN jsonb_typeof(payload -> 'context' -> 'personas' -> 'computation_key') = 'string'
           THEN NULLIF(payload -> 'context' -> 'personas' ->> 'computation_key', '') END) END AS k
  FROM batch b
), flagged AS MATERIALIZED (
  SELECT k.*, jsonb_typeof(src -> k) AS flag_type, src -> k #>> '{{}}' AS flag,
    COALESCE(k IS NOT NULL AND jsonb_typeof(payload -> 'context' -> 'personas' -> 'audience_settings') = 'object'
      AND EXISTS (SELECT 1 FROM jsonb_each(payload -> 'context' -> 'personas' -> 'audience_settings') s
                  WHERE s.key IN ('updateExistingUsersOnly', 'globalUnsubscribe', 'channelUnsubscribe', 'campaignId')
                    AND jsonb_typeof(s.value) <> 'null'), false) AS has_settings
  FROM keyed k
)
SELECT id,
  CASE WHEN kind0 <> 'audience' THEN kind0
       WHEN k IS NULL THEN 'none'
       WHEN flag_type = 'string' AND flag NOT IN ('true', 'false', 'True', 'False', 'TRUE', 'FALSE') THEN 'event'
       ELSE 'delta' END,
  k, NULLIF(user_id, ''), NULLIF(email, ''),
  CASE WHEN flag_type IN ('boolean', 'string') AND lower(flag) = 'true' THEN 'in'
       WHEN flag_type IN ('boolean', 'string') AND lower(flag) = 'false' THEN 'out'
       WHEN type = 'track' THEN CASE WHEN event = 'Audience Entered' THEN 'in' ELSE 'out' END
       ELSE 'unknown' END,
  timestamp, message_id, has_settings
FROM flagged ORDER BY id
""")


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
        session.execute(_FIELDS_PG, {"names": list(names), "keys": list(keys)})
    else:
        session.execute(_fields_sqlite(len(keys)), {"names": _json_list(names), **_key_params(keys)})


_FIELDS_PG = text("""
UPDATE fold_stage s SET data_fields = (
  SELECT jsonb_object_agg(n, CASE WHEN jsonb_typeof(j.src) = 'object' AND j.src ? n THEN j.src -> n
                                  ELSE j.ctx -> n END)
  FROM inbox i
  CROSS JOIN LATERAL (SELECT
      CASE WHEN i.type = 'track' THEN i.payload -> 'properties' ELSE i.payload -> 'traits' END AS src,
      CASE WHEN jsonb_typeof(i.payload -> 'context' -> 'traits') = 'object'
           THEN i.payload -> 'context' -> 'traits' END AS ctx) j
  CROSS JOIN unnest(CAST(:names AS text[])) AS n
  WHERE i.id = s.pos AND n <> s.audience_key AND NOT (i.type = 'track' AND n = 'audience_key')
    AND ((jsonb_typeof(j.src) = 'object' AND j.src ? n) OR (j.ctx IS NOT NULL AND j.ctx ? n)))
WHERE s.kind = 'delta' AND s.audience_key = ANY(CAST(:keys AS text[]))
""").bindparams(bindparam("names", type_=ARRAY(Text)), bindparam("keys", type_=ARRAY(Text)))


@cache
def _fields_sqlite(keys: int) -> TextClause:
    src = "CASE WHEN i.type = 'track' THEN '$.properties' ELSE '$.traits' END"
    own = f"({src} || '.\"' || n.value || '\"')"
    ctx = "('$.context.traits.\"' || n.value || '\"')"
    in_keys = ", ".join(f":k{i}" for i in range(keys))
    return text(f"""
UPDATE fold_stage SET data_fields = (
  SELECT NULLIF(json_group_object(n.value, CASE WHEN json_type(i.payload, {own}) IS NOT NULL
                                                THEN i.payload -> {own} ELSE i.payload -> {ctx} END), '{{}}')
  FROM inbox i, json_each(:names) n
  WHERE i.id = fold_stage.pos AND n.value <> fold_stage.audience_key
    AND NOT (i.type = 'track' AND n.value = 'audience_key')
    AND (json_type(i.payload, {own}) IS NOT NULL OR json_type(i.payload, {ctx}) IS NOT NULL))
WHERE kind = 'delta' AND audience_key IN ({in_keys})
""")


def _json_list(names: Sequence[str]) -> str:
    return json_text(list(names))


def _key_params(keys: Sequence[str]) -> dict[str, str]:
    return {f"k{i}": key for i, key in enumerate(keys)}


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
