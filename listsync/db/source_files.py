"""Drop-folder files: how far each version of a file (name, size, modification time) was read."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import (
    select,
    update,
)
from sqlalchemy.orm import Session

from listsync.db import models as m
from listsync.db.session import rows_affected
from listsync.domain import FileVersion

logger = logging.getLogger(__name__)

NowFn = Callable[[], datetime]


def file_progress(session: Session, entry: FileVersion) -> tuple[int, int, bool]:
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


def _first_sight(row: m.SourceFile, entry: FileVersion) -> bool:
    """A row from before sizes were recorded: take the file as it is now as the one read."""
    if row.size is not None:
        return False
    row.size, row.mtime_ns = entry.size, entry.mtime_ns
    return True


def mark_quarantined(session: Session, entry: FileVersion, reason: str, now: datetime) -> bool:
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


def advance(session: Session, file_id: int, expected: int, lines_read: int) -> bool:
    """Move the committed-lines mark, only from where this reader believes it is."""
    result = session.execute(
        update(m.SourceFile)
        .where(m.SourceFile.id == file_id, m.SourceFile.lines_read == expected)
        .values(lines_read=lines_read)
    )
    return rows_affected(result) == 1


def complete(session: Session, file_id: int, now: datetime) -> None:
    session.execute(
        update(m.SourceFile)
        .where(m.SourceFile.id == file_id, m.SourceFile.completed_at.is_(None))
        .values(completed_at=now)
    )
