"""Progress of `listsync sync` and `listsync ingest`: one bar per stage on a terminal (rich), plain
periodic lines otherwise.

Stages: fold (inbox events applied), one per audience (member changes sent, fed by the engine's
progress callback), and event deliveries. Totals are taken from the database at the start; the
fold and delivery stages are followed by reading counts every POLL_SECONDS from a thread of their
own, so the engine needs no hooks beyond the one callback it already has. On a terminal, log
lines are drawn above the bars instead of breaking into them.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from sqlalchemy.orm import Session, sessionmaker

from listsync.db import backlog, health_queries

POLL_SECONDS = 0.5
PLAIN_EVERY_SECONDS = 10.0


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f}/s" if task.speed else "", style="progress.data.speed")


@dataclass
class _Stage:
    name: str
    total: int | None
    done: int = 0
    finished: bool = False


class _Plain:
    """Lines on stderr: every PLAIN_EVERY_SECONDS while something moves, and when a stage ends."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = time.monotonic()
        self._started = time.monotonic()

    def show(self, stages: list[_Stage], *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < PLAIN_EVERY_SECONDS:
            return
        self._last = now
        moving = [s for s in stages if s.done and not s.finished] or ([] if not force else stages[-1:])
        for stage in moving:
            total = f"/{stage.total}" if stage.total is not None else ""
            rate = stage.done / max(now - self._started, 1e-6)
            self._stream.write(f"progress: {stage.name}: {stage.done}{total} ({rate:,.0f}/s)\n")
        self._stream.flush()

    def finish(self, stage: _Stage) -> None:
        total = f"/{stage.total}" if stage.total is not None else ""
        self._stream.write(f"progress: {stage.name}: {stage.done}{total} done\n")
        self._stream.flush()


class Display:
    """Stages and how they are drawn; `advance` is the engine's progress callback."""

    def __init__(self, *, terminal: bool, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._stages: dict[str, _Stage] = {}
        self._tasks: dict[str, TaskID] = {}
        self._plain = None if terminal else _Plain(self._stream)
        self._bars = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(),
                TimeRemainingColumn(),
                console=Console(file=self._stream, force_terminal=True),
                transient=False,
            )
            if terminal
            else None
        )

    def add(self, name: str, total: int | None) -> None:
        """A stage; one with nothing to do is neither drawn nor reported."""
        with self._lock:
            self._stages[name] = _Stage(name, total, finished=total == 0)
            if self._bars is not None and total != 0:
                self._tasks[name] = self._bars.add_task(name, total=total)

    def set(self, name: str, done: int) -> None:
        with self._lock:
            stage = self._stages.get(name)
            if stage is None or stage.finished:
                return
            stage.done = max(stage.done, done)
            finished = stage.total is not None and stage.done >= stage.total
            self._draw(stage)
            if finished:
                self._finish(stage)

    def set_total(self, name: str, total: int) -> None:
        """The total of a stage that could not be known when it was added."""
        with self._lock:
            stage = self._stages.get(name)
            if stage is None or stage.total is not None:
                return
            stage.total = total
            stage.finished = total == 0
            if self._bars is not None:
                self._bars.update(self._tasks[name], total=total)
        self.set(name, stage.done)

    def advance(self, name: str, amount: int) -> None:
        """The engine's callback: `amount` more member changes of audience `name` were sent."""
        stage = self._stages.get(name)
        self.set(name, (stage.done if stage else 0) + amount)

    def _draw(self, stage: _Stage) -> None:
        if self._bars is not None:
            self._bars.update(self._tasks[stage.name], completed=stage.done)
        elif self._plain is not None:
            self._plain.show(list(self._stages.values()))

    def _finish(self, stage: _Stage) -> None:
        stage.finished = True
        if self._plain is not None:
            self._plain.finish(stage)

    def close(self) -> None:
        with self._lock:
            for stage in self._stages.values():
                if not stage.finished and stage.total is not None and stage.done >= stage.total:
                    self._finish(stage)
        if self._bars is not None:
            self._bars.stop()

    @contextmanager
    def shown(self) -> Iterator[Display]:
        """Draw while the block runs; on a terminal, log lines go above the bars."""
        if self._bars is None:
            try:
                yield self
            finally:
                self.close()
            return
        self._bars.start()
        handlers = _stream_handlers()
        saved = [h.setStream(_Above(self._bars.console)) for h in handlers]
        try:
            yield self
        finally:
            for handler, stream in zip(handlers, saved, strict=True):
                handler.setStream(stream)
            self.close()


class _Above:
    """A stream for log handlers that prints above rich's live bars."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def write(self, text: str) -> int:
        if text.strip():
            self._console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        """Printed at once; nothing to flush."""


def _stream_handlers() -> list[logging.StreamHandler[Any]]:
    return [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)
    ]


class SyncMonitor:
    """Follows one sync: the fold and deliveries by polling, the audiences by the callback."""

    def __init__(self, factory: sessionmaker[Session], display: Display) -> None:
        self._factory = factory
        self.display = display
        self._stop = threading.Event()
        with factory() as session:
            start = backlog.backlog(session)
            self._finished_before = health_queries.finished_deliveries(session)
        self._unapplied = int(start["inbox_unapplied"])
        self._audiences_added = False
        display.add("fold inbox", self._unapplied)
        self._thread = threading.Thread(target=self._poll, name="listsync-progress", daemon=True)

    def __enter__(self) -> SyncMonitor:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._read()

    def advance(self, audience_key: str, members: int) -> None:
        if not self._audiences_added:  # the first send can come before the next poll
            self._read()
        self.display.advance(audience_key, members)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._read()

    def _read(self) -> None:
        with self._factory() as session:
            now = backlog.backlog(session)
            unapplied = int(now["inbox_unapplied"])
            if unapplied == 0 and not self._audiences_added:
                self._add_audiences(session)
            finished = health_queries.finished_deliveries(session) - self._finished_before if self._audiences_added else 0
        self.display.set("fold inbox", self._unapplied - unapplied)
        if self._audiences_added:
            # The total is known once every event is routed to its actions (after the lists).
            if int(now["inbox_unrouted"]) == 0:
                self.display.set_total("event deliveries", finished + int(now["deliveries_pending"]))
            self.display.set("event deliveries", finished)

    def _add_audiences(self, session: Session) -> None:
        """Once the inbox is folded, each audience's total is what is pending now."""
        self._audiences_added = True
        for key, count in health_queries.pending_by_audience(session).items():
            self.display.add(key, count)
        self.display.add("event deliveries", None)


class IngestMonitor:
    """Follows `listsync ingest`: events stored so far (the total is not known before the end)."""

    def __init__(self, factory: sessionmaker[Session], display: Display) -> None:
        self._factory = factory
        self._display = display
        self._stop = threading.Event()
        self._start = self._stored()
        display.add("ingest", None)
        self._thread = threading.Thread(target=self._poll, name="listsync-progress", daemon=True)

    def _stored(self) -> int:
        with self._factory() as session:
            return health_queries.events_received(session)

    def __enter__(self) -> IngestMonitor:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._display.set("ingest", self._stored() - self._start)
