"""`listsync ingest` on two processes (ingest/stream_worker.py): a worker that fails or dies stops the
ingest with a one-line error and keeps every chunk committed before; an unreadable input is said as
before the fork; stdin is read by the worker too, which ends with its parent and holds none of its
database connections."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from listsync import cli
from listsync.db import models as m
from listsync.db.session import is_postgres, make_engine, session_factory
from listsync.errors import ListsyncError, WorkerFailed
from listsync.ingest import files, stream_worker

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not stream_worker.can_fork(), reason="the worker needs fork")


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


def line(n: int) -> bytes:
    event = {"type": "track", "event": "Clicked", "userId": f"u{n}", "messageId": f"m{n}"}
    return json.dumps(event).encode() + b"\n"


def stored(factory: sessionmaker[Session]) -> set[str]:
    with factory() as session:
        return set(session.scalars(select(m.InboxEvent.message_id)))


def chunks(count: int, size: int) -> list[list[bytes]]:
    return [[line(c * size + i) for i in range(size)] for c in range(count)]


def failing_on(chunk: int, *, die: bool) -> stream_worker.ChunkParser:
    """`files._parse_lines` that fails (or ends the process) on the `chunk`-th chunk."""
    seen = [0]

    def parse(batch: list[Any]) -> list[Any]:
        seen[0] += 1
        if seen[0] == chunk:
            if die:
                os._exit(3)
            raise ValueError("unexpected")
        return files._parse_lines(batch)

    return parse


def ingest(factory: sessionmaker[Session], parse: stream_worker.ChunkParser) -> Any:
    with factory() as session:
        postgres = is_postgres(session)
    with stream_worker.forked(
        factory, chunks(4, 3), parse, source="file:test", now_fn=lambda: NOW, postgres=postgres
    ) as store:
        return store()


def test_all_chunks_are_stored_in_order(factory: sessionmaker[Session]) -> None:
    counts = ingest(factory, files._parse_lines)
    assert (counts.accepted, counts.duplicates, counts.rejected) == (12, 0, 0)
    with factory() as session:
        ids = list(session.scalars(select(m.InboxEvent.message_id).order_by(m.InboxEvent.id)))
    assert ids == [f"m{n}" for n in range(12)]


@pytest.mark.parametrize("die", [False, True], ids=["fails", "dies"])
def test_a_worker_that_stops_keeps_what_was_committed(factory: sessionmaker[Session], die: bool) -> None:
    match = r"worker died \(exit status 3\)" if die else "worker failed: ValueError: unexpected"
    with pytest.raises(WorkerFailed, match=match) as failed:
        ingest(factory, failing_on(3, die=die))
    assert isinstance(failed.value, ListsyncError)
    assert stored(factory) == {f"m{n}" for n in range(6)}
    counts = ingest(factory, files._parse_lines)  # a rerun stores the rest, nothing twice
    assert (counts.accepted, counts.duplicates) == (6, 6)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(m.InboxEvent)) == 12


def test_listsync_ingest_reads_stdin(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'listsync.db'}"
    env = {**os.environ, "LISTSYNC_DATABASE_URL": url, "PYTHONPATH": str(REPO)}
    env.pop("LISTSYNC_CONFIG", None)
    body = b"".join(line(n) for n in range(250)) + b"not json\n"
    subprocess.run(
        [sys.executable, "-m", "listsync", "ingest", "-", "--no-progress"],
        input=body, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(m.InboxEvent)) == 250
            assert conn.scalar(select(func.count()).select_from(m.DeadLetter)) == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("forked", [True, False], ids=["worker", "in-process"])
def test_both_ways_of_reading_a_stream_store_the_same(
    factory: sessionmaker[Session], forked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream_worker, "can_fork", lambda: forked)
    body = [line(n) for n in range(7)] + [b"\n", b"[1]\n", line(3)]
    counts = files.ingest_stream(factory, body, source="file:test", now_fn=lambda: NOW, chunk=4)
    assert (counts.accepted, counts.duplicates, counts.rejected) == (7, 1, 1)
    assert stored(factory) == {f"m{n}" for n in range(7)}


def test_only_linux_forks_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not stream_worker.can_fork()


# --- what `listsync ingest` says ---------------------------------------------------------------


def run_ingest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTSYNC_")}
    env.update(LISTSYNC_DATABASE_URL=f"sqlite:///{tmp_path / 'listsync.db'}", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "listsync", "ingest", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("progress", [True, False], ids=["progress", "no-progress"])
def test_a_file_that_is_not_gzip_is_one_line_and_exit_2(tmp_path: Path, progress: bool) -> None:
    (tmp_path / "bad.ndjson.gz").write_bytes(b"this is not gzip\n")
    done = run_ingest(tmp_path, "bad.ndjson.gz", *([] if progress else ["--no-progress"]))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "listsync: cannot read bad.ndjson.gz: Not a gzipped file (b'th')"
    assert "Traceback" not in done.stderr


def test_a_truncated_gzip_is_one_line_and_keeps_the_chunks_read(tmp_path: Path) -> None:
    whole = gzip.compress(b"".join(line(n) for n in range(12_000)))
    (tmp_path / "cut.ndjson.gz").write_bytes(whole[: len(whole) * 3 // 4])
    done = run_ingest(tmp_path, "cut.ndjson.gz", "--no-progress")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "listsync: cannot read cut.ndjson.gz: Compressed file ended before the end-of-stream marker was reached"
    ]
    engine = make_engine(f"sqlite:///{tmp_path / 'listsync.db'}")
    try:
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(m.InboxEvent)) == 5000  # the first chunk
    finally:
        engine.dispose()


def test_a_worker_that_dies_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in os.environ if n.startswith("LISTSYNC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LISTSYNC_DATABASE_URL", f"sqlite:///{tmp_path / 'listsync.db'}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(files, "_parse_lines", failing_on(2, die=True))
    (tmp_path / "events.ndjson").write_bytes(b"".join(line(n) for n in range(10)))
    capsys.readouterr()
    # The traceback goes to the debug log only: a level an earlier test in this process left on
    # the listsync logger would print it, so the logger takes the configured level here.
    listsync_logger = logging.getLogger("listsync")
    before = listsync_logger.level
    listsync_logger.setLevel(logging.NOTSET)
    try:
        assert cli.main(["ingest", "events.ndjson", "--no-progress", "--log-level", "INFO"]) == 1
    finally:
        listsync_logger.setLevel(before)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("listsync: the ingest worker died (exit status 3)"), err


# --- an interrupted send -----------------------------------------------------------------------


def test_a_send_cut_by_a_signal_is_the_last_thing_the_worker_writes() -> None:
    """A chunk bigger than the pipe blocks in `send` (nobody reads); a signal's exception cuts it.
    Whatever the worker does next, no byte may follow the partial message in the pipe."""
    receiving, sending = stream_worker.multiprocessing.Pipe(duplex=False)
    sender = stream_worker._Sender(sending)
    in_pipe_when_cut: list[int] = []
    cut = threading.Event()

    def interrupt(_signum: int, _frame: Any) -> None:
        if sender.intact:  # not in the send yet: try again later
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        in_pipe_when_cut.append(_bytes_in_pipe(receiving.fileno()))
        cut.set()
        raise KeyboardInterrupt

    received = bytearray()

    def drain() -> None:  # only after the cut, so that the send blocked until then
        cut.wait()
        while data := os.read(receiving.fileno(), 1 << 16):
            received.extend(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        status = stream_worker._produce(
            sender, os.getppid(), chunks(1, 3000), files._parse_lines, "file:test", lambda: NOW, False
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    sending.close()
    reader.join(timeout=60)
    receiving.close()
    assert status == 1
    assert in_pipe_when_cut and len(received) == in_pipe_when_cut[0]


def _bytes_in_pipe(fd: int) -> int:
    size = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, size)
    return int.from_bytes(size, sys.byteorder)


# --- the worker as a process -------------------------------------------------------------------


class _Running:
    """`listsync ingest -` fed through a pipe kept open, once its worker has sent a first chunk."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.db = tmp_path / "listsync.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTSYNC_")}
        env.update(LISTSYNC_DATABASE_URL=f"sqlite:///{self.db}", PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "listsync", "ingest", "-", *args],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert self.proc.stdin is not None
        self.stdin = self.proc.stdin
        self.stdin.write(b"".join(line(n) for n in range(files.STREAM_CHUNK)))
        self.stdin.flush()
        _until(lambda: self._stored() == files.STREAM_CHUNK, "the first chunk stored")
        workers = _children(self.proc.pid)
        assert len(workers) == 1, workers
        self.worker = workers[0]

    def _stored(self) -> int:
        if not self.db.exists():
            return 0
        engine = make_engine(f"sqlite:///{self.db}")
        try:
            with engine.connect() as conn:
                return int(conn.scalar(select(func.count()).select_from(m.InboxEvent)) or 0)
        except Exception:  # not migrated yet
            return 0
        finally:
            engine.dispose()

    def database_files_open(self, pid: int) -> list[str]:
        names = []
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # went away meanwhile
                target = os.readlink(fd)
                if target.startswith(str(self.db)):
                    names.append(target)
        return names


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # went away meanwhile
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _until(condition: Any, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc")
def test_the_worker_holds_no_database_connection(tmp_path: Path) -> None:
    running = _Running(tmp_path)  # with progress: its monitor has a connection open, and a thread
    try:
        assert running.database_files_open(running.proc.pid)  # the parent has the database open
        assert running.database_files_open(running.worker) == []
    finally:
        running.stdin.close()
        assert running.proc.wait(timeout=120) == 0


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc")
def test_the_worker_ends_with_a_killed_parent(tmp_path: Path) -> None:
    running = _Running(tmp_path, "--no-progress")
    running.proc.send_signal(signal.SIGTERM)
    running.proc.wait(timeout=60)

    def nobody_reads_stdin() -> bool:
        try:
            running.stdin.write(line(0))
            running.stdin.flush()
        except BrokenPipeError:
            return True
        return False

    _until(nobody_reads_stdin, "the worker to end and release stdin")
    with contextlib.suppress(BrokenPipeError):
        running.stdin.close()
