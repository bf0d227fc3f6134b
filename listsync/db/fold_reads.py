"""The statements of the set-based fold that read Engage deltas out of stored payloads, in SQL
(SQLite's JSON functions, PostgreSQL's jsonb operators), exactly as `ingest.audience` reads a
stored event; `db.fold_stage` runs them into its staging table.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from sqlalchemy import Text, TextClause, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY

from listsync.json_text import dumps as json_text

_INSERT = "INSERT INTO fold_stage (pos, kind, audience_key, user_id, email, desired, ts, msg, has_settings)\n"
_SETTING_NAMES = ("updateExistingUsersOnly", "globalUnsubscribe", "channelUnsubscribe", "campaignId")
_STRING_FLAGS = {"in": ("true", "True", "TRUE"), "out": ("false", "False", "FALSE")}


def _quoted_flags(*desired: str) -> str:
    """The flags spelled as JSON strings that `audience` reads as booleans, as SQL literals."""
    return ", ".join(f"'\"{flag}\"'" for d in desired for flag in _STRING_FLAGS[d])


def _settings_sqlite() -> str:
    base = "'$.context.personas.audience_settings"
    return " OR ".join(f"COALESCE(json_type(payload, {base}.{name}'), 'null') <> 'null'" for name in _SETTING_NAMES)


# Every JSON call of a row reads the same payload text, which SQLite parses once: its JSON
# functions share a cache of recently parsed texts across the statement. Each level is a subquery
# with a LIMIT, which SQLite neither flattens into the next nor materializes: it runs it as a
# co-routine, each column computed once however often the next level uses it (the key, then the
# flag under it). An event with nothing for lists touches no JSON function. The payloads are
# standard JSON of bounded depth (written by json_text.dumps from events these rules accepted);
# a key that a JSON path cannot quote is left to Python (`fold_stage.to_python`,
# `fast_fold.path_safe`).
STAGE_SQLITE = text(f"""
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
  timestamp, message_id,
  CASE WHEN kind0 = 'audience' AND json_type(payload, '$.context.personas.audience_settings') = 'object'
       THEN {_settings_sqlite()} ELSE 0 END
FROM (
  SELECT b.*, CASE WHEN k IS NOT NULL THEN payload ->
      (CASE WHEN type = 'track' THEN '$.properties."' ELSE '$.traits."' END || k || '"') END AS flag
  FROM (
    SELECT id, type, event, user_id, email, timestamp, message_id, payload,
      CASE WHEN rules IS NOT :rules THEN 'check'
           WHEN NOT is_audience THEN
             CASE WHEN type = 'identify' AND user_id IS NOT NULL AND email IS NOT NULL THEN 'change' ELSE 'none' END
           ELSE 'audience' END AS kind0,
      CASE WHEN rules IS :rules AND is_audience THEN COALESCE(
        CASE WHEN type = 'track' AND json_type(payload, '$.properties.audience_key') = 'text'
             THEN NULLIF(payload ->> '$.properties.audience_key', '') END,
        CASE WHEN json_type(payload, '$.context.personas.computation_key') = 'text'
             THEN NULLIF(payload ->> '$.context.personas.computation_key', '') END) END AS k
    FROM inbox WHERE applied_at IS NULL ORDER BY id LIMIT :limit
  ) b LIMIT :limit
) LIMIT :limit
""")

STAGE_PG = text(f"""
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


FIELDS_PG = text("""
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
def fields_sqlite(keys: int) -> TextClause:
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


def json_list(names: Sequence[str]) -> str:
    return json_text(list(names))


def key_params(keys: Sequence[str]) -> dict[str, str]:
    return {f"k{i}": key for i, key in enumerate(keys)}
