"""Builders shared by tests: Engage-style audience events, settings pointed at an emulator, and a
sync context over a real database."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from listsync import context
from listsync.config import Settings
from listsync.db import session as dbs
from listsync.ingest import accept, extract
from listsync.iterable.client import client_from_settings

API_KEY = "test-api-key-5f1c"
BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
_ids = itertools.count(1)


def audience_event(
    audience: str,
    *,
    inside: bool | None,
    user_id: str | None = None,
    email: str | None = None,
    at: float = 0.0,
    kind: str = "identify",
    message_id: str | None = None,
    traits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An Engage audience event: identify with the audience trait, or Audience Entered/Exited track.
    `at` is seconds after BASE_TIME; `inside=None` leaves the membership flag out."""
    stamp = (BASE_TIME + timedelta(seconds=at)).isoformat().replace("+00:00", "Z")
    personas = {
        "computation_class": "audience",
        "computation_key": audience,
        "computation_id": f"aud_{audience}",
    }
    event: dict[str, Any] = {
        "messageId": message_id or f"msg-{next(_ids)}",
        "timestamp": stamp,
        "context": {"personas": personas},
    }
    if user_id is not None:
        event["userId"] = user_id
    flags = {} if inside is None else {audience: inside}
    extra = dict(traits or {})
    if email is not None:
        extra["email"] = email
    if kind == "identify":
        event.update(type="identify", traits={**extra, **flags})
    else:
        name = "Audience Entered" if inside in (True, None) else "Audience Exited"
        event.update(type="track", event=name, properties={"audience_key": audience, **extra, **flags})
    if user_id is None:
        event["anonymousId"] = f"anon-{email}"
    return event


def make_settings(
    database_url: str, base_url: str = "", *, api_key: str = API_KEY, **sections: Any
) -> Settings:
    data: dict[str, Any] = {
        "database_url": database_url,
        "iterable": {
            "api_key": api_key,
            "base_url": base_url,
            "max_attempts": 6,
            "retry_base_seconds": 0.01,
            "retry_max_seconds": 0.05,
        },
        "sync": {"retry_base_seconds": 0, "retry_max_seconds": 0},
        "receiver": {"port": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return Settings(**data)


def ingest(ctx: context.SyncContext, events: Iterable[dict[str, Any]]) -> accept.IngestCounts:
    items = [extract.RawEvent(raw=dict(e), size=len(str(e))) for e in events]
    with dbs.transaction(ctx.factory) as session:
        return accept.accept_items(session, items, source="test", now=datetime.now(UTC))


@contextmanager
def sync_context(settings: Settings) -> Iterator[context.SyncContext]:
    engine = dbs.make_engine(settings.database_url)
    try:
        with client_from_settings(settings.iterable) as client:
            yield context.SyncContext(settings=settings, factory=dbs.session_factory(engine), client=client)
    finally:
        engine.dispose()


class FakeClock:
    """A monotonic clock that moves only when something sleeps on it; records every sleep."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
