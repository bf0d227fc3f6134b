"""The SQL views of the user-facing contract. Plain SQL that gives the same rows on SQLite and
PostgreSQL; the migrations create them, and `status` reads audience_status. event_status shows
one row per (event, action) of the per-event actions."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, text
from sqlalchemy.orm import Session

AUDIENCE_STATUS = """
CREATE VIEW audience_status AS
SELECT a.audience_key AS audience_key,
       a.list_id AS list_id,
       COALESCE(SUM(CASE WHEN m.desired = 'in' THEN 1 ELSE 0 END), 0) AS members,
       COALESCE(SUM(CASE WHEN m.synced = 'in' THEN 1 ELSE 0 END), 0) AS synced_members,
       COALESCE(SUM(CASE WHEN m.state = 'pending' AND m.desired = 'in' THEN 1 ELSE 0 END), 0)
           AS pending_subscribe,
       COALESCE(SUM(CASE WHEN m.state = 'pending' AND m.desired <> 'in' THEN 1 ELSE 0 END), 0)
           AS pending_unsubscribe,
       COALESCE(SUM(CASE WHEN m.state = 'failed' THEN 1 ELSE 0 END), 0) AS failed,
       a.last_synced_at AS last_synced_at,
       a.list_state AS list_state,
       a.hold_reason AS hold_reason
FROM audiences a
LEFT JOIN memberships m ON m.audience_id = a.id
GROUP BY a.id, a.audience_key, a.list_id, a.last_synced_at, a.list_state, a.hold_reason
"""

MEMBER_STATUS = """
CREATE VIEW member_status AS
SELECT a.audience_key AS audience_key,
       NULLIF(m.user_id, '') AS user_id,
       NULLIF(m.email, '') AS email,
       m.desired AS desired,
       m.synced AS synced,
       m.state AS state,
       m.last_error AS last_error,
       m.updated_at AS updated_at,
       m.attempts AS attempts,
       m.next_attempt_at AS next_attempt_at
FROM memberships m
JOIN audiences a ON a.id = m.audience_id
"""

REJECTED_EVENTS = """
CREATE VIEW rejected_events AS
SELECT d.received_at AS received_at,
       d.reason AS reason,
       d.payload AS payload,
       d.source AS source,
       d.id AS id
FROM dead_letters d
"""

VIEWS = {
    "audience_status": AUDIENCE_STATUS,
    "member_status": MEMBER_STATUS,
    "rejected_events": REJECTED_EVENTS,
}

EVENT_STATUS = """
CREATE VIEW event_status AS
SELECT d.message_id AS event,
       d.event_type AS type,
       d.event_name AS event_name,
       d.action AS action,
       d.mapping AS mapping,
       d.state AS state,
       d.attempts AS attempts,
       d.last_error AS last_error,
       d.updated_at AS updated_at,
       d.user_id AS user_id,
       d.email AS email,
       d.endpoint AS endpoint,
       d.iterable_id AS iterable_id,
       d.next_attempt_at AS next_attempt_at,
       d.delivered_at AS delivered_at,
       d.id AS id
FROM event_deliveries d
"""

# Created by revision 0002, apart from VIEWS (which revision 0001 creates from this module).
DELIVERY_VIEWS = {"event_status": EVENT_STATUS}

# Created by revision 0004. One row: work accepted but not done yet, beside the audiences.
SYNC_BACKLOG = """
CREATE VIEW sync_backlog AS
SELECT (SELECT count(*) FROM inbox WHERE applied_at IS NULL) AS inbox_unapplied,
       (SELECT min(received_at) FROM inbox WHERE applied_at IS NULL) AS oldest_unapplied_at,
       (SELECT count(*) FROM inbox WHERE routed_at IS NULL) AS inbox_unrouted,
       (SELECT count(*) FROM event_deliveries WHERE state = 'pending') AS deliveries_pending,
       (SELECT count(*) FROM event_deliveries WHERE state = 'pending' AND next_attempt_at IS NOT NULL)
           AS deliveries_waiting_retry,
       (SELECT count(*) FROM event_deliveries WHERE state = 'failed') AS deliveries_failed
"""

# Seconds between two UTC timestamps, in each database's own date arithmetic.
_DURATION = {
    "sqlite": "ROUND((julianday(r.finished_at) - julianday(r.started_at)) * 86400.0, 3)",
    "postgresql": "ROUND(CAST(EXTRACT(EPOCH FROM (r.finished_at - r.started_at)) AS numeric), 3)",
}

RUN_HISTORY = """
CREATE VIEW run_history AS
SELECT r.id AS run_id,
       r.started_at AS started_at,
       {duration} AS duration_seconds,
       r.trigger AS trigger,
       r.status AS status,
       r.requests AS requests,
       r.subscribed + r.unsubscribed AS members_changed,
       r.failed AS failures,
       r.held AS held,
       r.events_delivered AS events_delivered,
       r.events_failed AS events_failed,
       r.retrying AS retrying,
       r.subscribed AS subscribed,
       r.unsubscribed AS unsubscribed,
       r.finished_at AS finished_at,
       r.owner AS owner,
       r.summary AS summary
FROM sync_runs r
"""


def operator_views(dialect: str) -> dict[str, str]:
    """The views of revision 0004, in the given dialect's SQL."""
    return {"sync_backlog": SYNC_BACKLOG, "run_history": RUN_HISTORY.format(duration=_DURATION[dialect])}


def audience_status(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(text("SELECT * FROM audience_status ORDER BY audience_key")).mappings()
    return [_jsonable_row(row) for row in rows]


def _jsonable_row(row: RowMapping) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        out[str(key)] = value.isoformat() if isinstance(value, datetime) else value
    decoded: dict[str, Any] = json.loads(json.dumps(out, default=str))
    return decoded


def event_status(session: Session) -> list[dict[str, Any]]:
    """The event_status view's rows, oldest first (for status commands and tests)."""
    rows = session.execute(text("SELECT * FROM event_status ORDER BY id")).mappings()
    return [dict(row) for row in rows]
