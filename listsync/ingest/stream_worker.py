"""Receive -> **store** on two cores: `listsync ingest` reads, parses and validates its lines in a
forked worker process while this process stores the chunks the worker has made.

The worker sends each chunk in the inbox's stored form (`accept.Prepared`: a few strings per
event, cheap to pass through a pipe); this process only inserts and commits, in read order, one
transaction per chunk. So the rules are the ones of a stream read in one process: an event is
accepted once its chunk is committed, a failure of either side loses at most the chunks in
flight (the worker is at most about one chunk ahead, held back by the pipe), and a rerun stores
nothing twice (events dedupe on messageId). A worker that dies or fails stops the ingest with an
error; nothing it had not sent is counted.

Where `fork` is not available the stream is read in this process (`files.ingest_stream` decides).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from listsync.db.session import transaction
from listsync.ingest.accept import IngestCounts, Prepared, check_items, counted, prepare, store_prepared
from listsync.ingest.scrub import scrub_text

ChunkParser = Callable[[list[Any]], list[Any]]


class WorkerFailed(RuntimeError):
    """The worker process that reads the stream failed or died; chunks stored before stay."""


def can_fork() -> bool:
    return hasattr(os, "fork")


def ingest_forked(
    factory: sessionmaker[Session],
    batches: Iterable[list[Any]],
    parse: ChunkParser,
    *,
    source: str,
    now_fn: Callable[[], datetime],
    postgres: bool,
) -> IngestCounts:
    """Store the chunks a forked worker makes of `batches` (each parsed into body items by `parse`).

    A bare fork, not `multiprocessing.Process`, which would close the worker's stdin: `listsync
    ingest -` reads it there."""
    receiving, sending = multiprocessing.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:  # the worker: never returns into the caller's code
        status = 1
        try:
            receiving.close()
            status = _produce(sending, batches, parse, source, now_fn, postgres)
        finally:
            os._exit(status)
    sending.close()
    total = IngestCounts()
    finished = False
    try:
        while (prepared := _next_chunk(receiving)) is not None:
            with transaction(factory) as session:
                counts = store_prepared(session, prepared)
            total.add(counted(counts, source=source))
        finished = True
    finally:
        receiving.close()
        _reap(pid, stop=not finished)
    return total


def _reap(pid: int, *, stop: bool) -> None:
    """Wait for the worker to end (it does once it has sent everything); `stop`: end it first."""
    with contextlib.suppress(ChildProcessError):
        if stop:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _next_chunk(receiving: Connection) -> Prepared | None:
    """The worker's next chunk; None when it has read everything."""
    try:
        message = receiving.recv()
    except EOFError:
        raise WorkerFailed("the ingest reader process died before reading its whole input") from None
    if isinstance(message, str):
        raise WorkerFailed(f"the ingest reader process failed: {message}")
    return message if isinstance(message, Prepared) else None


def _produce(
    sending: Connection,
    batches: Iterable[list[Any]],
    parse: ChunkParser,
    source: str,
    now_fn: Callable[[], datetime],
    postgres: bool,
) -> int:
    """The worker: each chunk parsed, validated and prepared, sent in order; then `True` (done),
    or a string saying what failed (scrubbed: it may quote a value). Returns the exit status."""
    try:
        for batch in batches:
            items = parse(batch)
            if not items:
                continue
            now = now_fn()
            sending.send(prepare(check_items(items, now=now), source=source, now=now, postgres=postgres))
        sending.send(True)
        return 0
    except BrokenPipeError:  # the storing side stopped first, and says why
        return 1
    except BaseException as exc:
        with contextlib.suppress(OSError):
            sending.send(scrub_text(f"{type(exc).__name__}: {exc}"))
        return 1
    finally:
        sending.close()
