"""Receive -> **store**: accept inbound events into the inbox, then fold the inbox into memberships.

Two steps on purpose. `accept_*` only validates and appends (fast, so the receiver can answer 200
as soon as the inbox commit is durable). `apply_inbox` turns committed events into membership
changes in inbox order, marking each event applied in the same transaction, so a crash between
the steps loses nothing and repeats nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from listsync import metrics
from listsync.config import Settings
from listsync.db import repo
from listsync.domain import InboundEvent, MembershipDelta, Rejection
from listsync.ingest import extract
from listsync.planner import select_data_fields

MAX_DEAD_LETTER_CHARS = 64 * 1024
_SECRET_PAIR = re.compile(
    r"""(["']?[\w-]*(?:write_?key|api_?key|password|passwd|secret|token|authorization)[\w-]*["']?\s*[:=]\s*)"""
    r"""(?:"[^"]*"|'[^']*'|[^\s,}\]]+)""",
    re.IGNORECASE,
)

# Engage's per-audience settings (context.personas.audience_settings) in listsync's own names.
_EVENT_SETTING_NAMES = {
    "updateExistingUsersOnly": "update_existing_users_only",
    "globalUnsubscribe": "channel_unsubscribe",
    "channelUnsubscribe": "channel_unsubscribe",
    "campaignId": "campaign_id",
}


@dataclass
class IngestCounts:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0

    def add(self, other: IngestCounts) -> None:
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.rejected += other.rejected


NUL_REASON = "invalid_text: the event contains a NUL character (\\u0000), which cannot be stored"


def scrub_text(text: str) -> str:
    """Secrets out of a body that could not be parsed (so `extract.redact` cannot walk it); NUL
    characters escaped, as PostgreSQL text cannot hold them."""
    return _SECRET_PAIR.sub(r'\1"[redacted]"', text[:MAX_DEAD_LETTER_CHARS]).replace("\x00", "\\u0000")


def _has_nul(raw: Any) -> bool:
    """PostgreSQL's text and jsonb refuse U+0000; such an event is rejected on both databases alike."""
    return "\\u0000" in json.dumps(raw)


def accept_body(
    session: Session, body: bytes, *, path_type: str | None, source: str, now: datetime
) -> IngestCounts:
    """Validate and store one request body; the whole body may be rejected, or items one by one."""
    parsed = extract.parse_body(body, path_type=path_type)
    if isinstance(parsed, Rejection):
        repo.store_rejections(
            session, [(parsed.reason, scrub_text(body.decode("utf-8", "replace")))], source=source, now=now
        )
        return IngestCounts(rejected=1)
    return accept_items(session, parsed, source=source, now=now)


def accept_items(
    session: Session, items: Iterable[extract.BodyItem], *, source: str, now: datetime
) -> IngestCounts:
    events: list[InboundEvent] = []
    rejections: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, extract.RejectedItem):
            rejections.append((item.rejection.reason, scrub_text(item.payload)))
            continue
        checked = extract.validate_event(item.raw, received_at=now, encoded_size=item.size)
        if not isinstance(checked, Rejection) and _has_nul(item.raw):
            checked = Rejection(NUL_REASON)
        if isinstance(checked, Rejection):
            rejections.append((checked.reason, scrub_text(json.dumps(extract.redact(item.raw), default=str))))
        else:
            events.append(checked)
    unique = _unique_by_message_id(events)
    new = repo.store_events(
        session, unique, source=source, now=now, audience_flags=[extract.is_audience_event(e) for e in unique]
    )
    repo.store_rejections(session, rejections, source=source, now=now)
    counts = IngestCounts(accepted=new, duplicates=len(events) - new, rejected=len(rejections))
    metrics.count_events(source.split(":")[0], counts.accepted, counts.duplicates, counts.rejected)
    return counts


def _unique_by_message_id(events: Sequence[InboundEvent]) -> list[InboundEvent]:
    seen: set[str] = set()
    unique = []
    for event in events:
        if event.message_id not in seen:
            seen.add(event.message_id)
            unique.append(event)
    return unique


def apply_inbox(session: Session, settings: Settings, now: datetime, *, limit: int = 2000) -> int:
    """Fold up to `limit` unapplied inbox events into memberships; returns how many were applied."""
    repo.serialize_inbox_apply(session)
    rows = repo.unapplied_events(session, limit)
    pending: list[MembershipDelta] = []
    refused: list[tuple[str, str]] = []
    for row in rows:
        event = extract.validate_event(row.payload, received_at=row.received_at)
        if isinstance(event, Rejection):
            # It passed this check when accepted; a later, stricter release refuses it. It stays in
            # the inbox and is recorded, not silently ignored.
            refused.append(
                (
                    f"{event.reason} (inbox event {row.id}, refused when applied)",
                    scrub_text(json.dumps(row.payload, default=str)),
                )
            )
            continue
        pending.extend(extract.extract_deltas(event))
        change = extract.extract_email_change(event)
        if change is not None:
            _apply_deltas(session, settings, pending, now)
            pending = []
            repo.apply_email_change(session, change, settings.iterable.project_type, now)
    _apply_deltas(session, settings, pending, now)
    repo.store_rejections(session, refused, source="inbox", now=now)
    repo.mark_applied(session, [row.id for row in rows], now)
    return len(rows)


def _apply_deltas(
    session: Session, settings: Settings, deltas: Sequence[MembershipDelta], now: datetime
) -> None:
    if not deltas:
        return
    audience_ids = repo.ensure_audiences(session, (d.audience_key for d in deltas), now)
    rows = []
    for delta in deltas:
        names = settings.audience(delta.audience_key).data_fields
        rows.append((audience_ids[delta.audience_key], delta, select_data_fields(delta.traits, names)))
    repo.apply_deltas(session, rows, settings.iterable.project_type, now)
    for key, event_settings in _latest_event_settings(deltas).items():
        repo.record_audience_settings(session, audience_ids[key], event_settings)


def _latest_event_settings(deltas: Sequence[MembershipDelta]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for delta in deltas:
        if delta.audience_settings:
            mapped = {
                _EVENT_SETTING_NAMES[k]: v
                for k, v in delta.audience_settings.items()
                if k in _EVENT_SETTING_NAMES
            }
            if mapped:
                latest[delta.audience_key] = mapped
    return latest
