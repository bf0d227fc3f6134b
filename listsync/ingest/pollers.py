"""**Receive** -> store, for sources that are pulled rather than pushed: JSON-lines streams and
files, a drop folder, and a SQL query (reverse ETL).

All three end in `accept.accept_items`, the path the HTTP receiver takes, so a file line or a SQL
row becomes an inbox event exactly like a posted one and `apply_inbox` folds it in later.

Drop folder rules:
* A file is known by its name, size and modification time. It is read once, start to end; a file
  rewritten, rotated or appended to under a name already read is read again from its first line,
  and its events dedupe on messageId (derived from the content when the sender left it out).
* Writers should write under another name (anything not ending in .ndjson/.jsonl/.json/.gz, e.g.
  `.tmp`) and rename when done. As a second line of defence, files modified less than
  `min_age_seconds` ago are left for the next poll.
* Only regular files of the folder itself are read. A symbolic link is followed only to a regular
  file in the same folder; a link out of it (or a FIFO, device, ...) is never opened.
* A file that cannot be read (corrupt gzip, a link out of the folder, not a regular file) is
  quarantined: `source_files.error` and a `bad_file:` row in `rejected_events` say why, and it is
  not tried again until it changes. Lines committed before the fault stay; other files go on.
* A line longer than one event may be (32 KB) is refused as `event_too_large` without being held
  in memory; a line that is not UTF-8 is refused as `malformed_json`, as the receiver refuses it.

SQL source: see `poll_sql`. The diff runs inside the listsync database against a temporary table,
so neither the snapshot nor the stored members are ever held in Python memory.

`source_files` queries live here for now (`_file_progress`, `_advance`, `_complete`); they belong
in `listsync.db.repo` and can move there unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import os
import stat
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Index,
    MetaData,
    Row,
    String,
    Table,
    Text,
    and_,
    create_engine,
    exists,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from listsync.config import Settings
from listsync.db import models as m
from listsync.db.repo import store_rejections
from listsync.db.session import rows_affected, transaction
from listsync.domain import Desired, ProjectType, Rejection
from listsync.ingest import extract
from listsync.ingest.accept import IngestCounts, accept_items, apply_inbox

logger = logging.getLogger(__name__)

NowFn = Callable[[], datetime]

FOLDER_SUFFIXES = (".ndjson", ".jsonl", ".json", ".gz")
SQL_SOURCE = "sql"
SQL_MESSAGE_PREFIX = "sql:"
SQL_IDENTITY_COLUMNS = ("audience_key", "user_id", "email")
_MAX_MESSAGE_ID = 255  # inbox.message_id is VARCHAR(255)


# ---------------------------------------------------------------------------------------------
# JSON lines


def open_ndjson(path: str) -> BinaryIO:
    """A binary stream of JSON lines: `-` is stdin, a `.gz` name is decompressed on the fly."""
    if path == "-":
        return sys.stdin.buffer
    if path.endswith(".gz"):
        return cast(BinaryIO, gzip.open(path, "rb"))
    return open(path, "rb")  # the caller owns and closes the stream


@dataclass(frozen=True)
class _LongLine:
    """A line longer than MAX_LINE_BYTES: only its start is kept, for the dead letter."""

    start: bytes
    size: int


# A line longer than one event may be (plus room for the newline) is refused without parsing it, so
# a 100 MB line costs a bounded buffer, not several copies of itself.
MAX_LINE_BYTES = extract.MAX_EVENT_BYTES + 2
_LINE_EXCERPT = 1024


def bounded_lines(stream: BinaryIO | IO[bytes]) -> Iterator[bytes | _LongLine]:
    """The lines of `stream`, each at most MAX_LINE_BYTES; a longer one becomes a `_LongLine`."""
    while line := stream.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        start, size = line[:_LINE_EXCERPT], len(line)
        while not line.endswith(b"\n") and (line := stream.readline(1 << 20)):
            size += len(line)
        yield _LongLine(start, size)


def ingest_stream(
    factory: sessionmaker[Session],
    lines: Iterable[bytes | _LongLine] | BinaryIO | IO[bytes],
    *,
    source: str,
    now_fn: NowFn,
    chunk: int = 1000,
) -> IngestCounts:
    """Store Segment-format events, one JSON object per line; blank lines are skipped.

    Each chunk of lines is one transaction: a failure loses at most the chunk in flight, and a
    rerun of the same input stores nothing twice (events dedupe on messageId). A stream is read
    through `bounded_lines`.
    """
    if hasattr(lines, "readline"):
        lines = bounded_lines(cast(IO[bytes], lines))
    total = IngestCounts()
    for batch in _batched(lines, chunk):
        items = _parse_lines(batch)
        if not items:
            continue
        with transaction(factory) as session:
            total.add(accept_items(session, items, source=source, now=now_fn()))
    return total


def _parse_lines(lines: Iterable[bytes | _LongLine]) -> list[extract.BodyItem]:
    items: list[extract.BodyItem] = []
    for line in lines:
        if isinstance(line, _LongLine):
            reason = f"event_too_large: a line of {line.size} bytes > {extract.MAX_EVENT_BYTES}"
            items.append(extract.RejectedItem(Rejection(reason), line.start.decode("utf-8", "replace")))
            continue
        stripped = line.rstrip(b"\r\n")
        if stripped.strip():
            items.append(extract.parse_line(stripped))
    return items


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    if size < 1:
        raise ValueError("chunk must be at least 1")
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# ---------------------------------------------------------------------------------------------
# Drop folder


@dataclass(frozen=True)
class _FolderEntry:
    """A file of the drop folder as seen by one poll: its real path and what identifies its content."""

    path: Path
    size: int
    mtime_ns: int


class _BadFile(Exception):
    """A file that will not become readable by waiting: it is quarantined with this reason."""


def poll_folder(
    factory: sessionmaker[Session],
    folder: Path,
    now_fn: NowFn,
    *,
    chunk: int = 1000,
    min_age_seconds: float = 1.0,
) -> IngestCounts:
    """Read every new or changed file of `folder`; resumes a file where the last committed chunk ended.

    The count of lines read is written in the same transaction as the chunk's events, so after a
    crash a file continues after its last committed line: no event is lost or stored twice, even
    for events without a messageId. A bad file is quarantined and the others go on.
    """
    total = IngestCounts()
    for entry in _ready_files(factory, folder, min_age_seconds, now_fn):
        try:
            total.add(_read_file(factory, entry, now_fn, chunk))
        except (_LostRace, FileNotFoundError, IntegrityError) as exc:
            # Taken by another replica, or renamed away: nothing to do this time.
            logger.info("skipped %s: %s", entry.path.name, exc, extra={"event": "source_file_skipped"})
        except (_BadFile, OSError, EOFError, zlib.error) as exc:
            _quarantine(factory, entry, f"{type(exc).__name__}: {exc}", now_fn())
    return total


def _ready_files(
    factory: sessionmaker[Session], folder: Path, min_age_seconds: float, now_fn: NowFn
) -> list[_FolderEntry]:
    """Matching regular files of the folder itself, oldest name first, untouched for `min_age_seconds`.

    A symbolic link is followed only when it points at a regular file inside the folder; any other
    link, and anything that is not a regular file (a FIFO would block the reader), is quarantined.
    """
    root = folder.resolve()
    cutoff = time.time() - min_age_seconds
    ready = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in FOLDER_SUFFIXES:
            continue
        try:
            entry = _entry(root, path)
        except FileNotFoundError:  # renamed away between listing and looking
            continue
        except _BadFile as exc:
            _quarantine(factory, _FolderEntry(root / path.name, -1, -1), str(exc), now_fn())
            continue
        if entry.mtime_ns / 1e9 <= cutoff:
            ready.append(entry)
    return ready


def _entry(root: Path, path: Path) -> _FolderEntry:
    real = path.resolve()
    if real.parent != root:
        raise _BadFile(f"link_outside_folder: {path.name} points outside the drop folder; not followed")
    info = real.stat()
    if not stat.S_ISREG(info.st_mode):
        raise _BadFile(f"not_a_file: {path.name} is not a regular file")
    return _FolderEntry(real, info.st_size, info.st_mtime_ns)


def _read_file(factory: sessionmaker[Session], entry: _FolderEntry, now_fn: NowFn, chunk: int) -> IngestCounts:
    path = entry.path
    with transaction(factory) as session:
        file_id, done_lines, completed = _file_progress(session, entry)
    if completed:
        return IngestCounts()
    total = IngestCounts()
    source = _file_source(path)
    with _open_lines(path) as stream:
        lines = itertools.islice(bounded_lines(stream), done_lines, None)
        for batch in _batched(lines, chunk):
            with transaction(factory) as session:
                counts = accept_items(session, _parse_lines(batch), source=source, now=now_fn())
                if not _advance(session, file_id, done_lines, done_lines + len(batch)):
                    raise _LostRace(path)
            done_lines += len(batch)
            total.add(counts)
    with transaction(factory) as session:
        _complete(session, file_id, now_fn())
    logger.info(
        "read %s: %d accepted, %d duplicates, %d rejected",
        path.name,
        total.accepted,
        total.duplicates,
        total.rejected,
        extra={"event": "source_file_read", "path": str(path), "lines": done_lines},
    )
    return total


def _file_source(path: Path) -> str:
    return f"file:{path.name}"[:255]


def _quarantine(factory: sessionmaker[Session], entry: _FolderEntry, reason: str, now: datetime) -> None:
    """Record once why a file is not read (source_files.error and a rejected_events row); it is not
    tried again until its size or modification time changes."""
    with transaction(factory) as session:
        if not _mark_quarantined(session, entry, reason, now):
            return
        store_rejections(session, [(f"bad_file: {reason}", "")], source=_file_source(entry.path), now=now)
    logger.warning(
        "quarantined %s: %s",
        entry.path.name,
        reason,
        extra={"event": "source_file_quarantined", "path": str(entry.path)},
    )


class _LostRace(Exception):
    """Another process advanced the same file meanwhile; it owns the file, this reader stops."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path.name} is being read by another process")


@contextmanager
def _open_lines(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed for `.gz`; never through a link swapped in since listing."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as raw:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise _BadFile(f"not_a_file: {path.name} is not a regular file")
        if not path.name.lower().endswith(".gz"):
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unpacked:
            yield cast(IO[bytes], unpacked)


def _file_progress(session: Session, entry: _FolderEntry) -> tuple[int, int, bool]:
    """(id, lines committed, completed) of a drop-folder file, registering it when new.

    A file whose size or modification time differs from what was recorded was rewritten, rotated
    or appended to: it is read again from its first line (events dedupe on messageId), and a
    quarantined file gets another chance.
    """
    row = session.scalars(select(m.SourceFile).where(m.SourceFile.path == str(entry.path))).one_or_none()
    if row is None:
        row = m.SourceFile(path=str(entry.path), lines_read=0, size=entry.size, mtime_ns=entry.mtime_ns)
        session.add(row)
        session.flush()
    elif (row.size, row.mtime_ns) != (entry.size, entry.mtime_ns) and not _first_sight(row, entry):
        logger.info(
            "%s changed since it was read; reading it again",
            entry.path.name,
            extra={"event": "source_file_changed", "path": str(entry.path)},
        )
        row.lines_read, row.completed_at, row.error = 0, None, None
        row.size, row.mtime_ns = entry.size, entry.mtime_ns
        session.flush()
    return row.id, row.lines_read, row.completed_at is not None


def _first_sight(row: m.SourceFile, entry: _FolderEntry) -> bool:
    """A row from before sizes were recorded: take the file as it is now as the one read."""
    if row.size is not None:
        return False
    row.size, row.mtime_ns = entry.size, entry.mtime_ns
    return True


def _mark_quarantined(session: Session, entry: _FolderEntry, reason: str, now: datetime) -> bool:
    """Record the quarantine of this version of the file; False if it was already recorded."""
    row = session.scalars(select(m.SourceFile).where(m.SourceFile.path == str(entry.path))).one_or_none()
    if row is None:
        row = m.SourceFile(path=str(entry.path), lines_read=0)
        session.add(row)
    elif row.error is not None and (row.size, row.mtime_ns) == (entry.size, entry.mtime_ns):
        return False
    row.size, row.mtime_ns, row.error, row.completed_at = entry.size, entry.mtime_ns, reason[:2000], now
    session.flush()
    return True


def _advance(session: Session, file_id: int, expected: int, lines_read: int) -> bool:
    """Move the committed-lines mark, only from where this reader believes it is."""
    result = session.execute(
        update(m.SourceFile)
        .where(m.SourceFile.id == file_id, m.SourceFile.lines_read == expected)
        .values(lines_read=lines_read)
    )
    return rows_affected(result) == 1


def _complete(session: Session, file_id: int, now: datetime) -> None:
    session.execute(
        update(m.SourceFile)
        .where(m.SourceFile.id == file_id, m.SourceFile.completed_at.is_(None))
        .values(completed_at=now)
    )



# ---------------------------------------------------------------------------------------------
# SQL source (reverse ETL)


@dataclass
class SqlSyncCounts:
    """What one poll of the SQL source found and produced.

    Attributes:
        snapshot_id: the poll's id, the last part of every messageId it produced.
        rows: rows the query returned. invalid: rows skipped (no audience key, no usable
            identity, ...); they are logged, not dead-lettered, since they would come back on
            every poll.
        entered / exited: deltas produced. held: audiences that were left alone because the
            query returned no row for them while they still have members.
        events: how the produced events fared in `accept_items`.
    """

    snapshot_id: str
    rows: int = 0
    invalid: int = 0
    entered: int = 0
    exited: int = 0
    held: list[str] = field(default_factory=list)
    events: IngestCounts = field(default_factory=IngestCounts)


# Temporary, so it exists only on the connection of one poll and never in a migration.
_snapshot_metadata = MetaData()
_snapshot = Table(
    "listsync_sql_snapshot",
    _snapshot_metadata,
    Column("seq", m.BigId, primary_key=True, autoincrement=False),
    Column("audience_key", String(255), nullable=False),
    Column("user_id", String(255), nullable=False),
    Column("email", String(320), nullable=False),
    Column("traits", Text, nullable=False),
    prefixes=["TEMPORARY"],
)
# Built after the table, so CREATE TABLE creates them too; the anti-joins probe one per identity rule.
Index("ix_listsync_sql_snapshot_key", _snapshot.c.audience_key, _snapshot.c.user_id, _snapshot.c.email)
Index("ix_listsync_sql_snapshot_email", _snapshot.c.audience_key, _snapshot.c.email)


def poll_sql(
    factory: sessionmaker[Session],
    source_url: str,
    query: str,
    settings: Settings,
    now_fn: NowFn,
    *,
    chunk: int = 5000,
) -> SqlSyncCounts:
    """Turn the current result of `query` into audience deltas against the stored memberships.

    The query returns one row per member: `audience_key`, `user_id` and/or `email`, and any other
    columns, which travel as traits in the event properties. Rules:

    * a row whose member is not desired-in yet becomes an `Audience Entered` track;
    * a desired-in member of an audience that is in the result but not its row becomes an
      `Audience Exited` track;
    * an audience that was fed by this source and has no row at all is held, not emptied: an
      empty result is more often a broken query or an unfinished load than a real mass exit.
      It is logged and returned in `held`; remove its members explicitly if that is meant.

    Events carry timestamp = now and messageId `sql:<audience>:<user>:<email>:<snapshot>` and go
    through `accept_items`, so they take the receiver's path. The inbox is applied first, so the
    diff sees the effect of earlier polls and a replayed snapshot yields nothing.

    The query runs as SQLAlchemy `text()` on its own engine, streamed in chunks of `chunk` rows;
    a literal `:name` in it would be read as a bind parameter and must be written `\\:name`.
    """
    now = now_fn().astimezone(UTC)
    counts = SqlSyncCounts(snapshot_id=now.strftime("%Y%m%dT%H%M%S%fZ"))
    _drain_inbox(factory, settings, now_fn)
    source = create_engine(source_url)
    target = _bind_of(factory)
    try:
        with target.connect() as conn:
            try:
                _create_snapshot(conn)
                _load_snapshot(conn, source, query, now, chunk, counts)
                present = _present_audiences(conn)
                by_user_id = settings.iterable.project_type is not ProjectType.EMAIL
                _emit_enters(conn, now, chunk, counts, by_user_id)
                _emit_exits(conn, present, now, chunk, counts, by_user_id)
                counts.held = _held_audiences(conn, present)
            finally:
                with conn.begin():
                    _snapshot.drop(conn, checkfirst=True)
    finally:
        source.dispose()
    _log_sql_poll(counts)
    return counts


def _drain_inbox(factory: sessionmaker[Session], settings: Settings, now_fn: NowFn) -> None:
    while True:
        with transaction(factory) as session:
            if apply_inbox(session, settings, now_fn()) == 0:
                return


def _bind_of(factory: sessionmaker[Session]) -> Engine:
    with factory() as session:
        bind = session.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine


def _create_snapshot(conn: Connection) -> None:
    with conn.begin():
        _snapshot.drop(conn, checkfirst=True)
        _snapshot.create(conn)


def _load_snapshot(
    conn: Connection, source: Engine, query: str, now: datetime, chunk: int, counts: SqlSyncCounts
) -> None:
    """Stream the query's rows into the snapshot table, normalised as the receiver would."""
    seq = itertools.count(1)
    with source.connect() as src:
        result = src.execution_options(stream_results=True, yield_per=chunk).execute(text(query))
        columns = list(result.keys())
        _check_columns(columns)
        for partition in result.partitions(chunk):
            rows = []
            for row in partition:
                counts.rows += 1
                member = _snapshot_row(row, columns, now, counts)
                if member is not None:
                    rows.append({"seq": next(seq), **member})
            if rows:
                with conn.begin():
                    conn.execute(_snapshot.insert(), rows)


def _check_columns(columns: Sequence[str]) -> None:
    if "audience_key" not in columns or not {"user_id", "email"} & set(columns):
        raise ValueError(
            "the SQL source query must return an audience_key column and a user_id and/or email "
            f"column; it returned {', '.join(columns) or 'no columns'}"
        )


def _snapshot_row(
    row: Row[Any], columns: Sequence[str], now: datetime, counts: SqlSyncCounts
) -> dict[str, str] | None:
    """The normalised key and traits of one source row, or None (counted) when it is unusable.

    Identity is normalised by `extract.validate_event` itself, so a member's key here is the key
    the membership row gets when the event is applied, and the diff compares like with like.
    """
    values = dict(zip(columns, row, strict=True))
    audience = values.pop("audience_key")
    user_id, email = values.pop("user_id", None), values.pop("email", None)
    traits = json.loads(json.dumps(values, default=str))  # Decimal, dates -> JSON values
    if not isinstance(audience, str) or not audience:
        return _invalid(counts, f"audience_key must be a non-empty string, got {audience!r}")
    raw = _sql_event(audience, _text(user_id), _text(email), Desired.IN, now, "check", traits)
    checked = extract.validate_event(raw, received_at=now)
    if isinstance(checked, Rejection):
        return _invalid(counts, checked.reason)
    return {
        "audience_key": audience,
        "user_id": checked.user_id or "",
        "email": checked.email or "",
        "traits": json.dumps(traits, separators=(",", ":")),
    }


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


def _invalid(counts: SqlSyncCounts, reason: str) -> dict[str, str] | None:
    counts.invalid += 1
    if counts.invalid <= 5:  # enough to diagnose; a bad column would otherwise log every row
        logger.warning(
            "SQL source row skipped: %s",
            reason[:200],
            extra={"event": "sql_source_row_invalid", "reason": reason.split(":", 1)[0]},
        )
    return None


def _present_audiences(conn: Connection) -> list[str]:
    with conn.begin():
        return list(conn.scalars(select(_snapshot.c.audience_key).distinct()))


def _same_member_rules(t: Any, member: Any, by_user_id: bool) -> list[Any]:
    """The ways a snapshot row and a membership are the same subscriber, by the rules
    `identity.resolve` folds deltas with: the same userId (whatever the emails when a userId names
    the profile, as in hybrid and userId projects; else an email missing on either side does not
    matter), or the same email where either side has no userId. Matching on the exact pair instead
    would make a query without an email column exit and re-enter members every poll.

    One condition per rule, each an equality an index serves (memberships by (audience, userId)
    and (audience, email); the snapshot likewise): callers probe them as separate EXISTS, so a
    poll costs a few index lookups per row, never a scan per row as an OR across them did.
    """
    same_user = and_(t.user_id != "", member.c.user_id == t.user_id)
    if not by_user_id:
        same_user = and_(same_user, or_(t.email == "", member.c.email == "", member.c.email == t.email))
    return [
        same_user,
        and_(t.email != "", member.c.email == t.email, or_(t.user_id == "", member.c.user_id == "")),
    ]


def _emit_enters(
    conn: Connection, now: datetime, chunk: int, counts: SqlSyncCounts, by_user_id: bool
) -> None:
    """Snapshot rows whose member is not desired-in, page by page (keyset on seq)."""
    member = m.Membership.__table__
    audience = m.Audience.__table__
    t = _snapshot.c
    already_in = or_(
        *(
            exists(
                select(member.c.id)
                .select_from(member.join(audience, audience.c.id == member.c.audience_id))
                .where(audience.c.audience_key == t.audience_key, member.c.desired == Desired.IN, rule)
            )
            for rule in _same_member_rules(t, member, by_user_id)
        )
    )
    after = 0
    while True:
        page = (
            select(t.seq, t.audience_key, t.user_id, t.email, t.traits)
            .where(t.seq > after, ~already_in)
            .order_by(t.seq)
            .limit(chunk)
        )
        rows = _emit_page(conn, page, Desired.IN, now, counts, lambda r: json.loads(r.traits))
        if not rows:
            return
        counts.entered += len(rows)
        after = rows[-1].seq


def _emit_exits(
    conn: Connection, present: Sequence[str], now: datetime, chunk: int, counts: SqlSyncCounts, by_user_id: bool
) -> None:
    """Desired-in members of audiences in the result that have no row in it (keyset on id)."""
    if not present:
        return
    member = m.Membership.__table__
    audience = m.Audience.__table__
    t = _snapshot.c
    in_snapshot = or_(
        *(
            exists().where(t.audience_key == audience.c.audience_key, rule)
            for rule in _same_member_rules(t, member, by_user_id)
        )
    )
    after = 0
    while True:
        page = (
            select(member.c.id, audience.c.audience_key, member.c.user_id, member.c.email)
            .select_from(member.join(audience, audience.c.id == member.c.audience_id))
            .where(
                member.c.id > after,
                member.c.desired == Desired.IN,
                audience.c.audience_key.in_(present),
                ~in_snapshot,
            )
            .order_by(member.c.id)
            .limit(chunk)
        )
        rows = _emit_page(conn, page, Desired.OUT, now, counts, lambda _r: {})
        if not rows:
            return
        counts.exited += len(rows)
        after = rows[-1].id


def _emit_page(
    conn: Connection,
    page: Any,
    desired: Desired,
    now: datetime,
    counts: SqlSyncCounts,
    traits_of: Callable[[Any], dict[str, Any]],
) -> list[Any]:
    """One page of members as synthetic Audience Entered/Exited events, accepted in one commit."""
    with Session(bind=conn) as session, session.begin():
        rows = session.execute(page).all()
        events = [
            _sql_event(
                r.audience_key,
                r.user_id or None,
                r.email or None,
                desired,
                now,
                counts.snapshot_id,
                traits_of(r),
            )
            for r in rows
        ]
        if events:
            counts.events.add(_accept_events(session, events, now))
    return list(rows)


def _held_audiences(conn: Connection, present: Sequence[str]) -> list[str]:
    """Audiences this source fed (a desired-in member set by a `sql:` event) that it now omits."""
    member = m.Membership.__table__
    audience = m.Audience.__table__
    query = (
        select(audience.c.audience_key)
        .distinct()
        .select_from(member.join(audience, audience.c.id == member.c.audience_id))
        .where(
            member.c.desired == Desired.IN,
            member.c.desired_message_id.like(f"{SQL_MESSAGE_PREFIX}%"),
            audience.c.audience_key.not_in(present),
        )
        .order_by(audience.c.audience_key)
    )
    with conn.begin():
        return list(conn.scalars(query))


def _accept_events(session: Session, events: Sequence[dict[str, Any]], now: datetime) -> IngestCounts:
    items = [extract.RawEvent(event, 0) for event in events]  # our own events: size is not the sender's
    return accept_items(session, items, source=SQL_SOURCE, now=now)


def _sql_event(
    audience: str,
    user_id: str | None,
    email: str | None,
    desired: Desired,
    now: datetime,
    snapshot_id: str,
    traits: dict[str, Any],
) -> dict[str, Any]:
    """A synthetic Engage-style track event for one delta."""
    entered = desired is Desired.IN
    properties: dict[str, Any] = {**traits, "audience_key": audience, audience: entered}
    if email:
        properties["email"] = email
    event: dict[str, Any] = {
        "type": "track",
        "event": extract.AUDIENCE_ENTERED if entered else extract.AUDIENCE_EXITED,
        "messageId": _message_id(audience, user_id, email, snapshot_id),
        "timestamp": now.isoformat(),
        "properties": properties,
        "context": {
            "personas": {"computation_class": "audience", "computation_key": audience},
            "library": {"name": "listsync-sql"},
        },
    }
    if user_id:
        event["userId"] = user_id
    else:
        # Segment requires userId or anonymousId; an email-only member gets a stable stand-in.
        event["anonymousId"] = f"email:{email}"
    return event


def _message_id(audience: str, user_id: str | None, email: str | None, snapshot_id: str) -> str:
    readable = f"{SQL_MESSAGE_PREFIX}{audience}:{user_id or ''}:{email or ''}:{snapshot_id}"
    if len(readable) <= _MAX_MESSAGE_ID:
        return readable
    # Long audience keys and emails do not fit the column; a digest keeps it deterministic.
    return SQL_MESSAGE_PREFIX + hashlib.sha256(readable.encode("utf-8")).hexdigest()


def _log_sql_poll(counts: SqlSyncCounts) -> None:
    for key in counts.held:
        logger.warning(
            "SQL source returned no rows for audience %s; its members are kept, not removed",
            key,
            extra={"event": "sql_source_audience_held", "audience_key": key},
        )
    logger.info(
        "SQL source: %d rows, %d invalid, %d entered, %d exited",
        counts.rows,
        counts.invalid,
        counts.entered,
        counts.exited,
        extra={
            "event": "sql_source_polled",
            "snapshot_id": counts.snapshot_id,
            "rows": counts.rows,
            "entered": counts.entered,
            "exited": counts.exited,
            "held": len(counts.held),
        },
    )


# ---------------------------------------------------------------------------------------------
# Entry points for the CLI and the daemon


def _utcnow() -> datetime:
    return datetime.now(UTC)


def ingest_path(factory: sessionmaker[Session], path: str) -> IngestCounts:
    """`listsync ingest FILE`: NDJSON from a file, a .gz file, or stdin for `-`."""
    source = "stdin" if path == "-" else f"file:{Path(path).name}"
    with open_ndjson(path) as handle:
        return ingest_stream(factory, handle, source=source, now_fn=_utcnow)


def poll_configured_sources(factory: sessionmaker[Session], settings: Settings) -> None:
    """One poll of every configured source (what `listsync sync` does before sending)."""
    for name, _interval, job in scheduled_jobs(factory, settings):
        logger.info("polling source %s", name, extra={"event": "source_poll", "source": name})
        job()


def scheduled_jobs(
    factory: sessionmaker[Session], settings: Settings
) -> list[tuple[str, float, Callable[[], Any]]]:
    """(name, interval in seconds, job) for each configured polled source."""
    jobs: list[tuple[str, float, Callable[[], Any]]] = []
    files = settings.sources.files
    if files.path:
        folder = Path(files.path)
        jobs.append(("files", files.interval_seconds, lambda: poll_folder(factory, folder, _utcnow)))
    sql = settings.sources.sql
    if sql.url.get_secret_value() and sql.query:
        url = sql.url.get_secret_value()
        jobs.append(
            ("sql", sql.interval_seconds, lambda: poll_sql(factory, url, sql.query, settings, _utcnow))
        )
    return jobs
