"""The SQL views of the user-facing contract. Plain SQL that gives the same rows on SQLite and
PostgreSQL; the migrations create them, and `status` reads audience_status. event_status shows
one row per (event, action) of the per-event actions."""

from __future__ import annotations

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
