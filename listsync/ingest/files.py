"""**Receive** -> store, for JSON-lines streams and files, and a drop folder. Every line takes the
HTTP receiver's path (`accept.accept_items`), so a file line becomes an inbox event exactly like a
posted one.

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
"""

from __future__ import annotations

import gc
import gzip
import itertools
import logging
import os
import stat
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from listsync.db import source_files
from listsync.db.inbox import store_rejections
from listsync.db.session import is_postgres, transaction
from listsync.domain import FileVersion, Rejection
from listsync.ingest import extract, stream_worker
from listsync.ingest.accept import IngestCounts, accept_items

logger = logging.getLogger(__name__)

NowFn = Callable[[], datetime]

FOLDER_SUFFIXES = (".ndjson", ".jsonl", ".json", ".gz")
# Lines per transaction of `listsync ingest`: one durable commit (an fsync) per 5,000 events keeps
# the commit a small share of the work, and a failure re-reads at most that many.
STREAM_CHUNK = 5000


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
    chunk: int = STREAM_CHUNK,
) -> IngestCounts:
    """Store Segment-format events, one JSON object per line; blank lines are skipped.

    Each chunk of lines is one transaction: a failure loses at most the chunks in flight, and a
    rerun of the same input stores nothing twice (events dedupe on messageId). A stream is read
    through `bounded_lines`. An input that cannot be read raises OSError (a corrupt or truncated
    gzip too).
    """
    with stream_reader(factory, lines, source=source, now_fn=now_fn, chunk=chunk) as store:
        return store()


@contextmanager
def stream_reader(
    factory: sessionmaker[Session],
    lines: Iterable[bytes | _LongLine] | BinaryIO | IO[bytes],
    *,
    source: str,
    now_fn: NowFn,
    chunk: int = STREAM_CHUNK,
) -> Iterator[stream_worker.Store]:
    """`ingest_stream` in two steps: where the system can fork, a worker process that reads,
    parses and validates starts here (`stream_worker`), and the store yielded stores what it makes.
    Enter this before opening a connection or starting a thread: the worker would inherit them."""
    if hasattr(lines, "readline"):
        lines = bounded_lines(cast(IO[bytes], lines))
    batches = _read(_batched(lines, chunk))
    with _rare_collections():
        if not stream_worker.can_fork():
            yield lambda: _store_here(factory, batches, source, now_fn)
            return
        with factory() as session:
            postgres = is_postgres(session)  # from the engine: no connection is opened
        with stream_worker.forked(
            factory, batches, _parse_lines, source=source, now_fn=now_fn, postgres=postgres
        ) as store:
            yield store


def _store_here(
    factory: sessionmaker[Session], batches: Iterable[list[Any]], source: str, now_fn: NowFn
) -> IngestCounts:
    total = IngestCounts()
    for batch in batches:
        items = _parse_lines(batch)
        if not items:
            continue
        with transaction(factory) as session:
            total.add(accept_items(session, items, source=source, now=now_fn()))
    return total


def _read(batches: Iterator[list[Any]]) -> Iterator[list[Any]]:
    """`batches`, where an input that is corrupt or ends mid-stream (gzip's zlib.error and
    EOFError) raises the OSError of any input that cannot be read."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (EOFError, zlib.error) as exc:
            raise OSError(str(exc)) from exc
        yield batch


@contextmanager
def _rare_collections() -> Iterator[None]:
    """Run the cyclic garbage collector rarely while a stream is stored.

    Parsed events hold no reference cycles, but a chunk allocates so many objects that the
    collector would run hundreds of times per chunk, each time promoting the chunk's events and,
    at the oldest generation, walking every object the process holds (a quarter of the CPU).
    What was loaded before is frozen out of the collections; thresholds are restored after."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _parse_lines(lines: Iterable[bytes | _LongLine]) -> list[extract.BodyItem]:
    """The batch's items in line order; JSON lines are parsed together (`extract.parse_lines`)."""
    too_long: dict[int, extract.BodyItem] = {}
    plain: list[bytes] = []
    for line in lines:
        if isinstance(line, _LongLine):
            reason = f"event_too_large: a line of {line.size} bytes > {extract.MAX_EVENT_BYTES}"
            too_long[len(plain) + len(too_long)] = extract.RejectedItem(
                Rejection(reason), line.start.decode("utf-8", "replace")
            )
            continue
        stripped = line.rstrip(b"\r\n")
        if stripped.strip():
            plain.append(stripped)
    parsed = iter(extract.parse_lines(plain))
    return [too_long[i] if i in too_long else next(parsed) for i in range(len(plain) + len(too_long))]


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    if size < 1:
        raise ValueError("chunk must be at least 1")
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


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
) -> list[FileVersion]:
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
            _quarantine(factory, FileVersion(root / path.name, -1, -1), str(exc), now_fn())
            continue
        if entry.mtime_ns / 1e9 <= cutoff:
            ready.append(entry)
    return ready


def _entry(root: Path, path: Path) -> FileVersion:
    real = path.resolve()
    if real.parent != root:
        raise _BadFile(f"link_outside_folder: {path.name} points outside the drop folder; not followed")
    info = real.stat()
    if not stat.S_ISREG(info.st_mode):
        raise _BadFile(f"not_a_file: {path.name} is not a regular file")
    return FileVersion(real, info.st_size, info.st_mtime_ns)


def _read_file(factory: sessionmaker[Session], entry: FileVersion, now_fn: NowFn, chunk: int) -> IngestCounts:
    path = entry.path
    with transaction(factory) as session:
        file_id, done_lines, completed = source_files.file_progress(session, entry)
    if completed:
        return IngestCounts()
    total = IngestCounts()
    source = _file_source(path)
    with _open_lines(path) as stream:
        lines = itertools.islice(bounded_lines(stream), done_lines, None)
        for batch in _batched(lines, chunk):
            with transaction(factory) as session:
                counts = accept_items(session, _parse_lines(batch), source=source, now=now_fn())
                if not source_files.advance(session, file_id, done_lines, done_lines + len(batch)):
                    raise _LostRace(path)
            done_lines += len(batch)
            total.add(counts)
    with transaction(factory) as session:
        source_files.complete(session, file_id, now_fn())
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


def _quarantine(factory: sessionmaker[Session], entry: FileVersion, reason: str, now: datetime) -> None:
    """Record once why a file is not read (source_files.error and a rejected_events row); it is not
    tried again until its size or modification time changes."""
    with transaction(factory) as session:
        if not source_files.mark_quarantined(session, entry, reason, now):
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
