"""What one run carries: the context both pipelines work in, the options and report of a run, and
the signal that stops it."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from listsync.config import Settings
from listsync.domain import utcnow
from listsync.iterable.client import IterableClient

logger = logging.getLogger(__name__)


Progress = Callable[[str, int], None]


def replica_name() -> str:
    """Unique per process, so a restarted replica does not mistake its old claims for live ones."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class SyncContext:
    settings: Settings
    factory: sessionmaker[Session]
    client: IterableClient
    owner: str = field(default_factory=replica_name)
    clock: Callable[[], datetime] = utcnow
    should_stop: Callable[[], bool] = lambda: False


@dataclass(frozen=True)
class RunOptions:
    trigger: str = "sync"
    allow_mass_unsubscribe: bool = False
    recreate_missing_lists: bool = False
    reconcile: bool = False
    retry_failed: bool = False


@dataclass
class RunReport:
    run_id: int | None = None
    requests: int = 0
    subscribed: int = 0
    unsubscribed: int = 0
    failed: int = 0
    retrying: int = 0
    held: list[str] = field(default_factory=list)
    missing_lists: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    fatal: str | None = None
    reconciled: dict[str, dict[str, int]] = field(default_factory=dict)
    dry_run: bool = False
    events_delivered: int = 0
    events_failed: int = 0
    events_retrying: int = 0

    @property
    def exit_code(self) -> int:
        """0: all delivered; 1: some members or events failed, wait or are held; 2: configuration/connection."""
        if self.fatal:
            return 2
        if (
            self.failed
            or self.events_failed
            or self.retrying
            or self.held
            or self.missing_lists
            or self.errors
        ):
            return 1
        return 0

    def summary(self) -> str:
        parts = [
            f"{self.requests} requests",
            f"{self.subscribed} subscribed",
            f"{self.unsubscribed} unsubscribed",
            f"{self.failed} failed",
            f"{self.retrying} waiting to retry",
            f"{self.events_delivered} events delivered",
            f"{self.events_failed} events failed",
        ]
        if self.dry_run:
            parts.append("dry run: nothing sent, nothing marked synced")
        if self.held:
            parts.append("held: " + ", ".join(self.held))
        if self.missing_lists:
            parts.append("lists missing in Iterable: " + ", ".join(self.missing_lists))
        parts += [_reconciled_text(key, found) for key, found in self.reconciled.items()]
        parts += self.errors
        if self.fatal:
            parts.append(self.fatal)
        return "; ".join(parts)


def _reconciled_text(key: str, found: dict[str, int]) -> str:
    """What `--reconcile` found in one list, in the words of the repair it queued."""
    return (
        f"reconciled {key}: {found.get('missing', 0)} missing (resent), {found.get('extra', 0)} extra "
        f"(unsubscribed; {found.get('unknown_added', 0)} unknown to listsync), "
        f"{found.get('adopted', 0)} adopted"
    )
