"""Receive -> **store**: validate inbound events and append them to the inbox.

Only validation and an append, so the receiver can answer 200 as soon as the inbox commit is
durable. Folding the inbox into memberships is the lists pipeline's first step
(`listsync.lists.apply`), in its own transactions, so a crash between the two loses nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from listsync import metrics
from listsync.db import inbox
from listsync.db.session import describe_refusal, is_postgres, refused_by_data
from listsync.domain import Rejection
from listsync.ingest import extract, stored, validate
from listsync.ingest.fast_path import InboxRow, accepted_row, row_of
from listsync.ingest.scrub import kept_payload, scrub_text


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
        inbox.store_rejections(
            session, [(parsed.reason, scrub_text(body.decode("utf-8", "replace")))], source=source, now=now
        )
        return IngestCounts(rejected=1)
    return accept_items(session, parsed, source=source, now=now)


def accept_items(
    session: Session, items: Iterable[extract.BodyItem], *, source: str, now: datetime
) -> IngestCounts:
    """Validate and store body items in `session`; rejected ones are dead-lettered and counted."""
    return counted(store_checked(session, check_items(items, now=now), source=source, now=now), source=source)


def counted(counts: IngestCounts, *, source: str) -> IngestCounts:
    """`counts` added to the Prometheus counters: once per stored body, so after its commit
    where the work may run again (a group commit reruns its requests alone when one fails)."""
    metrics.count_events(source.split(":")[0], counts.accepted, counts.duplicates, counts.rejected)
    return counts


@dataclass
class Checked:
    """Items validated and ready to store: the events' inbox rows, and (reason, kept payload)
    rejections."""

    events: list[InboxRow]
    rejections: list[tuple[str, str]]


def check_items(items: Iterable[extract.BodyItem], *, now: datetime) -> Checked:
    """Validate items without the database (the receiver does it outside the shared commit).

    An event of the usual shape is proved acceptable by `fast_path`; the others, and whatever it
    cannot vouch for, by `validate_event`, which also says why one is rejected."""
    if now.tzinfo is None:
        raise ValueError("received_at must be timezone-aware")
    received_at = now.astimezone(UTC)
    events: list[InboxRow] = []
    rejections: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, extract.RejectedItem):
            rejections.append((item.rejection.reason, scrub_text(item.payload)))
            continue
        row = accepted_row(item.raw, item.size, item.text, received_at)
        if row is None:
            checked = validate.validate_event(item.raw, received_at=received_at, encoded_size=item.size)
            if isinstance(checked, Rejection):
                rejections.append((checked.reason, kept_payload(item.raw)))
                continue
            row = row_of(checked)
        events.append(row)
    return Checked(events, rejections)


def store_checked(
    session: Session, checked: Checked, *, source: str, now: datetime, isolate: bool = True
) -> IngestCounts:
    """Append checked events to the inbox and dead-letter the rejections, in `session` (not
    counted in the metrics: see `counted`).

    `isolate`: should the database refuse an event, store the others and dead-letter it (in
    savepoints); False lets the refusal raise, for a caller that runs the work again isolated."""
    prepared = prepare(checked, source=source, now=now, postgres=is_postgres(session))
    return store_prepared(session, prepared, isolate=isolate)


@dataclass
class Prepared:
    """Checked events in the inbox's stored form, unique by messageId, made without a session
    (`listsync ingest` makes them in a worker process), and the chunk's rejections."""

    rows: list[inbox.StoredRow]
    events: int  # accepted events, duplicates within the chunk included
    rejections: list[tuple[str, str]]
    source: str
    now: datetime


def prepare(checked: Checked, *, source: str, now: datetime, postgres: bool) -> Prepared:
    """`checked` as the inbox stores it (`postgres`: for which database)."""
    unique = _unique_by_message_id(checked.events)
    rows = inbox.stored_rows(unique, source=source, now=now, rules=stored.RULES, postgres=postgres)
    return Prepared(rows, len(checked.events), checked.rejections, source, now)


def store_prepared(session: Session, prepared: Prepared, *, isolate: bool = True) -> IngestCounts:
    """`store_checked` of a prepared chunk."""
    if isolate:
        new, refused = _store_isolated(session, prepared.rows)
    else:
        new, refused = inbox.insert_stored(session, prepared.rows), []
    rejections = prepared.rejections + refused
    inbox.store_rejections(session, rejections, source=prepared.source, now=prepared.now)
    return IngestCounts(accepted=new, duplicates=prepared.events - new - len(refused), rejected=len(rejections))


def _store_isolated(session: Session, rows: Sequence[inbox.StoredRow]) -> tuple[int, list[tuple[str, str]]]:
    """Store the rows in one statement; should the database refuse one, store them one by one so
    that only the refused events become rejections. Returns (new events, rejections)."""
    try:
        with session.begin_nested():
            return inbox.insert_stored(session, rows), []
    except Exception as exc:
        if not refused_by_data(exc):
            raise
    new = 0
    refused: list[tuple[str, str]] = []
    for row in rows:
        try:
            with session.begin_nested():
                new += inbox.insert_stored(session, [row])
        except Exception as exc:
            if not refused_by_data(exc):
                raise
            payload = json.loads(inbox.stored_payload(row))
            refused.append((f"storage_refused: {describe_refusal(exc)}", kept_payload(payload)))
    return new, refused


def _unique_by_message_id(events: Sequence[InboxRow]) -> list[InboxRow]:
    seen: set[str] = set()
    unique = []
    for event in events:
        if event.message_id not in seen:
            seen.add(event.message_id)
            unique.append(event)
    return unique
