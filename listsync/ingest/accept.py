"""Receive -> **store**: accept inbound events into the inbox, then fold the inbox into memberships.

Two steps on purpose. `accept_*` only validates and appends (fast, so the receiver can answer 200
as soon as the inbox commit is durable). `apply_inbox` turns committed events into membership
changes in inbox order, marking each event applied in the same transaction, so a crash between
the steps loses nothing and repeats nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from listsync import metrics
from listsync.config import Settings
from listsync.db import repo
from listsync.db.session import describe_refusal, refused_by_data
from listsync.domain import InboundEvent, MembershipDelta, Rejection
from listsync.ingest import extract
from listsync.ingest.scrub import redact, scrub_text
from listsync.planner import select_data_fields


@dataclass
class IngestCounts:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0

    def add(self, other: IngestCounts) -> None:
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.rejected += other.rejected


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
        if isinstance(checked, Rejection):
            rejections.append((checked.reason, _kept_payload(item.raw)))
        else:
            events.append(checked)
    unique = _unique_by_message_id(events)
    new, refused = _store_isolated(session, unique, source=source, now=now)
    rejections.extend(refused)
    repo.store_rejections(session, rejections, source=source, now=now)
    counts = IngestCounts(
        accepted=new, duplicates=len(events) - new - len(refused), rejected=len(rejections)
    )
    metrics.count_events(source.split(":")[0], counts.accepted, counts.duplicates, counts.rejected)
    return counts


def _store_isolated(
    session: Session, events: Sequence[InboundEvent], *, source: str, now: datetime
) -> tuple[int, list[tuple[str, str]]]:
    """Store the events in one statement; should the database refuse one, store them one by one so
    that only the refused events become rejections. Returns (new events, rejections)."""
    try:
        with session.begin_nested():
            return _store(session, events, source=source, now=now), []
    except Exception as exc:
        if not refused_by_data(exc):
            raise
    new = 0
    refused: list[tuple[str, str]] = []
    for event in events:
        try:
            with session.begin_nested():
                new += _store(session, [event], source=source, now=now)
        except Exception as exc:
            if not refused_by_data(exc):
                raise
            refused.append((f"storage_refused: {describe_refusal(exc)}", _kept_payload(event.raw)))
    return new, refused


def _store(session: Session, events: Sequence[InboundEvent], *, source: str, now: datetime) -> int:
    flags = [extract.is_audience_event(e) for e in events]
    return repo.store_events(session, events, source=source, now=now, audience_flags=flags)


def _kept_payload(raw: Any) -> str:
    """An event as kept in rejected_events: secrets removed, bounded, storable."""
    return scrub_text(json.dumps(redact(raw), default=str))


def _unique_by_message_id(events: Sequence[InboundEvent]) -> list[InboundEvent]:
    seen: set[str] = set()
    unique = []
    for event in events:
        if event.message_id not in seen:
            seen.add(event.message_id)
            unique.append(event)
    return unique


def apply_inbox(session: Session, settings: Settings, now: datetime, *, limit: int = 2000) -> int:
    """Fold up to `limit` unapplied inbox events into memberships; returns how many were applied.

    One event never blocks another: should folding the batch fail on an event's data, the batch
    is folded again event by event, each in a savepoint, and the events that still fail are
    recorded in rejected_events with the reason, marked applied, and left behind. A database
    that is unavailable is not an event's fault: that error propagates and the batch is retried.
    """
    repo.serialize_inbox_apply(session)
    rows = repo.unapplied_events(session, limit)
    try:
        with session.begin_nested():
            refused = _fold(session, settings, rows, now)
    except Exception as exc:
        if not refused_by_data(exc):
            raise
        refused = _fold_one_by_one(session, settings, rows, now)
    repo.store_rejections(session, refused, source="inbox", now=now)
    repo.mark_applied(session, [row.id for row in rows], now)
    return len(rows)


def _fold_one_by_one(
    session: Session, settings: Settings, rows: Sequence[repo.StoredEvent], now: datetime
) -> list[tuple[str, str]]:
    refused: list[tuple[str, str]] = []
    for row in rows:
        try:
            with session.begin_nested():
                refused.extend(_fold(session, settings, [row], now))
        except Exception as exc:
            if not refused_by_data(exc):
                raise
            reason = f"apply_failed: {describe_refusal(exc)} (inbox event {row.id}, refused when applied)"
            refused.append((reason, _kept_payload(row.payload)))
    return refused


def _fold(
    session: Session, settings: Settings, rows: Sequence[repo.StoredEvent], now: datetime
) -> list[tuple[str, str]]:
    """Fold inbox rows into memberships in inbox order; returns the rows refused by validation."""
    pending: list[MembershipDelta] = []
    refused: list[tuple[str, str]] = []
    for row in rows:
        event = extract.validate_event(row.payload, received_at=row.received_at)
        if isinstance(event, Rejection):
            # It passed this check when accepted; a later, stricter release refuses it. It is
            # recorded, not silently ignored.
            reason = f"{event.reason} (inbox event {row.id}, refused when applied)"
            refused.append((reason, _kept_payload(row.payload)))
            continue
        pending.extend(extract.extract_deltas(event))
        change = extract.extract_email_change(event)
        if change is not None:
            _apply_deltas(session, settings, pending, now)
            pending = []
            repo.apply_email_change(session, change, settings.iterable.project_type, now)
    _apply_deltas(session, settings, pending, now)
    return refused


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
    """The per-audience settings of the latest delta that carried any (already in our names)."""
    return {d.audience_key: dict(d.audience_settings) for d in deltas if d.audience_settings}
