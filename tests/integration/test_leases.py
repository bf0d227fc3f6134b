"""Named leases (db/leases.py) on both databases: one owner at a time, renewed by its owner, taken
over only once lapsed. They elect the replica that delivers events and the one that runs each
daemon job."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from listsync.db import leases
from listsync.db.session import make_engine, session_factory, transaction

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(minutes=5)


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


def take(factory: sessionmaker[Session], owner: str, now: datetime) -> bool:
    with transaction(factory) as session:
        return leases.try_lease(session, "job:x", owner, now, TTL)


def test_a_lease_has_one_owner_until_it_lapses(factory: sessionmaker[Session]) -> None:
    assert take(factory, "a", NOW)
    assert not take(factory, "b", NOW + timedelta(minutes=1))  # held by a
    assert take(factory, "a", NOW + timedelta(minutes=4))  # renewed by its owner
    assert not take(factory, "b", NOW + timedelta(minutes=8))  # the renewal counts from minute 4
    assert take(factory, "b", NOW + timedelta(minutes=10))  # lapsed: taken over
    assert not take(factory, "a", NOW + timedelta(minutes=11))
