"""Receive -> **store** on two cores: `listsync ingest` reads, parses and validates its lines in a
forked worker process while this process stores the chunks the worker has made.

The worker sends each chunk in the inbox's stored form (`accept.Prepared`: a few strings per
event, cheap to pass through a pipe); this process only inserts and commits, in read order, one
transaction per chunk. So the rules are the ones of a stream read in one process: an event is
accepted once its chunk is committed, a failure of either side loses at most the chunks in
flight (the worker is at most about one chunk ahead, held back by the pipe), and a rerun stores
nothing twice (events dedupe on messageId). Nothing the worker had not sent is counted.

* An input that cannot be read (a corrupt or truncated gzip, an I/O error) is raised here as the
  `OSError` a read in this process would raise; a worker that fails otherwise, or dies, raises
  `WorkerFailed` (a `ListsyncError`: one line on stderr, exit status 1).
* The worker ends with this process: on Linux the kernel kills it when its parent dies
  (PR_SET_PDEATHSIG), so a killed `listsync ingest -` leaves nobody reading its stdin.
* The fork copies the process: start the worker (`forked`) before opening any database connection
  or starting any thread (the progress display), or the worker holds copies of them.

Only on Linux (`can_fork`); elsewhere the stream is read in this process (`files.stream_reader`).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from sqlalchemy.orm import Session, sessionmaker

from listsync.db.session import transaction
from listsync.errors import WorkerFailed
from listsync.ingest.accept import IngestCounts, Prepared, check_items, counted, prepare, store_prepared
from listsync.ingest.scrub import scrub_text

ChunkParser = Callable[[list[Any]], list[Any]]
Store = Callable[[], IngestCounts]

# The worker's messages, each a (tag, value) pair.
_CHUNK = "chunk"  # value: a Prepared chunk
_DONE = "done"  # value: None; everything was read and sent
_UNREADABLE = "unreadable"  # value: (errno, strerror, text) of the OSError reading the input
_FAILED = "failed"  # value: "Type: message", scrubbed (it may quote a value)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def can_fork() -> bool:
    """The worker needs fork, and the parent-death signal that ends it with its parent (Linux)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


@contextlib.contextmanager
def forked(
    factory: sessionmaker[Session],
    batches: Iterable[list[Any]],
    parse: ChunkParser,
    *,
    source: str,
    now_fn: Callable[[], datetime],
    postgres: bool,
) -> Iterator[Store]:
    """Start the worker that makes chunks of `batches` (each parsed into body items by `parse`);
    the store it yields stores them all in `factory`'s database and returns the counts. Leaving
    the block ends the worker, killing it if it has not sent everything.

    A bare fork, not `multiprocessing.Process`, which would close the worker's stdin: `listsync
    ingest -` reads it there."""
    receiving, sending = multiprocessing.Pipe(duplex=False)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _work(receiving, sending, parent, batches, parse, source, now_fn, postgres)
    sending.close()
    worker = _Worker(pid, receiving)
    try:
        yield lambda: worker.store(factory, source)
    finally:
        worker.close()


class _Worker:
    """This process's side: the pipe's reading end and the worker's pid."""

    def __init__(self, pid: int, receiving: Connection) -> None:
        self._pid = pid
        self._receiving = receiving
        self._done = False  # the worker sent everything: it is ending by itself
        self._reaped = False

    def store(self, factory: sessionmaker[Session], source: str) -> IngestCounts:
        total = IngestCounts()
        while (prepared := self._next_chunk()) is not None:
            with transaction(factory) as session:
                counts = store_prepared(session, prepared)
            total.add(counted(counts, source=source))
        return total

    def _next_chunk(self) -> Prepared | None:
        """The worker's next chunk; None when it has read and sent everything."""
        try:
            tag, value = self._receiving.recv()
        except (OSError, EOFError, pickle.UnpicklingError) as exc:  # the pipe ended mid-message
            raise self._died() from exc
        if tag == _CHUNK and isinstance(value, Prepared):
            return value
        if tag == _DONE:
            self._done = True
            return None
        if tag == _UNREADABLE:
            errno, strerror, text = value
            raise OSError(errno, strerror) if strerror else OSError(text)
        raise WorkerFailed(f"the ingest worker failed: {value}")

    def _died(self) -> WorkerFailed:
        # Killed first in case it lives on: once its end of the pipe is closed, it is exiting,
        # and a kill no longer changes how it ended.
        return WorkerFailed(
            f"the ingest worker died ({self._reap(stop=True)}) before reading its whole input; "
            "the events stored so far stay, and reading the same input again stores the rest"
        )

    def close(self) -> None:
        self._receiving.close()
        if not self._reaped:
            self._reap(stop=not self._done)

    def _reap(self, *, stop: bool) -> str:
        """Wait for the worker to end (`stop`: kill it first); how it ended."""
        self._reaped = True
        try:
            if stop:
                os.kill(self._pid, signal.SIGKILL)
            _pid, status = os.waitpid(self._pid, 0)
        except ChildProcessError:
            return "its exit status is unknown"
        code = os.waitstatus_to_exitcode(status)
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def _work(
    receiving: Connection,
    sending: Connection,
    parent: int,
    batches: Iterable[list[Any]],
    parse: ChunkParser,
    source: str,
    now_fn: Callable[[], datetime],
    postgres: bool,
) -> NoReturn:
    """The worker process: never returns into the caller's code."""
    status = 1
    try:
        receiving.close()
        _end_with_parent(parent)
        status = _produce(_Sender(sending), parent, batches, parse, source, now_fn, postgres)
    finally:
        os._exit(status)


def _end_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when its parent ends. The parent-death signal is sent when
    the *thread* that forked ends, so fork from the main thread. If the parent ended before the
    call, this process was already reparented: end now. (`_produce` also checks between chunks.)"""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class _Sender:
    """The worker's end of the pipe. A send that did not complete (an exception raised by a
    signal's handler, a broken pipe) may have written part of a message; nothing is sent after
    it, as the parent would read the rest of the stream as garbage."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.intact = True

    def send(self, tag: str, value: Any) -> None:
        if not self.intact:
            raise BrokenPipeError("an earlier message was not sent whole")
        self.intact = False
        self._connection.send((tag, value))
        self.intact = True


def _produce(
    sender: _Sender,
    parent: int,
    batches: Iterable[list[Any]],
    parse: ChunkParser,
    source: str,
    now_fn: Callable[[], datetime],
    postgres: bool,
) -> int:
    """Each chunk parsed, validated and prepared, sent in order; then `_DONE`, or why it stopped
    (`_UNREADABLE`, `_FAILED`). Returns the exit status."""
    value: Any
    try:
        chunks = iter(batches)
        while (batch := _next_batch(chunks)) is not None:
            items = parse(batch)
            if items:
                now = now_fn()
                sender.send(_CHUNK, prepare(check_items(items, now=now), source=source, now=now, postgres=postgres))
            if os.getppid() != parent:  # reparented: the storing side is gone
                return 1
        sender.send(_DONE, None)
        return 0
    except _Unreadable as exc:
        cause = exc.cause
        tag, value = _UNREADABLE, (cause.errno, cause.strerror, scrub_text(str(cause)))
    except BaseException as exc:
        tag, value = _FAILED, scrub_text(f"{type(exc).__name__}: {exc}")
    if sender.intact:  # else the storing side stopped first, or the stream is cut: it says why
        with contextlib.suppress(OSError):
            sender.send(tag, value)
    return 1


class _Unreadable(Exception):
    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _next_batch(chunks: Iterator[list[Any]]) -> list[Any] | None:
    """The next batch read from the input; an OSError reading it becomes `_Unreadable`, so it is
    told apart from one of the pipe."""
    try:
        return next(chunks, None)
    except OSError as exc:
        raise _Unreadable(exc) from exc
