"""The mass-unsubscribe guard's counts, counted only as far as the caller needs (SQLite and
PostgreSQL): exact below `enough`, at least `enough` from there."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import insert

from listsync.db import audiences, memberships
from listsync.db import models as m
from listsync.db.session import make_engine, session_factory, transaction

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def _member(audience_id: int, i: int, desired: str, synced: str | None, state: str) -> dict[str, object]:
    return {"audience_id": audience_id, "user_id": f"u{i}", "email": f"u{i}@x.io", "desired": desired,
            "desired_at": NOW, "desired_message_id": f"m{i}", "synced": synced, "state": state,
            "attempts": 0, "created_at": NOW, "updated_at": NOW}


@pytest.mark.parametrize("enough", [None, 0, 1, 30, 59, 60, 61, 500])
def test_guard_counts_stop_at_enough(database_url: str, enough: int | None) -> None:
    engine = make_engine(database_url)
    factory = session_factory(engine)
    try:
        with transaction(factory) as session:
            audience_id = audiences.ensure_audiences(session, ["vip"], NOW)["vip"]
            rows = [_member(audience_id, i, "in", "in", "synced") for i in range(50)]  # settled
            rows += [_member(audience_id, 50 + i, "out", "in", "pending") for i in range(7)]  # to unsubscribe
            rows += [_member(audience_id, 60 + i, "in", None, "pending") for i in range(5)]  # to subscribe
            rows += [_member(audience_id, 70 + i, "in", "in", "failed") for i in range(3)]  # listed, unsettled
            session.execute(insert(m.table(m.Membership)), rows)
        with transaction(factory) as session:
            exact = memberships.guard_counts(session, audience_id, NOW)
            bounded = memberships.guard_counts(session, audience_id, NOW, lambda n: enough)
    finally:
        engine.dispose()
    assert exact == (7, 60)  # the settled 50, the 7 still listed, the 3 failed ones in the list
    assert bounded[0] == 7
    if enough is None or enough > 60:
        assert bounded[1] == 60
    else:
        assert enough <= bounded[1] <= 60
