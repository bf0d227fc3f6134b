"""Group commit (listsync.ingest.group_commit): concurrent receiver requests share one durable
commit, each answered only after its own events are committed, and one request's failure is
only its own. Real database on both backends; the jobs are what the receiver runs."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from listsync import metrics
from listsync.db import models as m
from listsync.db.session import make_engine, session_factory
from listsync.ingest import accept, extract, receiver
from listsync.ingest.group_commit import GroupCommitter

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


def request_items(prefix: str, count: int) -> list[extract.BodyItem]:
    events = [{"type": "track", "event": "Viewed", "userId": f"{prefix}-{i}", "messageId": f"{prefix}-{i}"}
              for i in range(count)]
    parsed = extract.parse_body(json.dumps({"batch": events}).encode(), path_type=None)
    assert isinstance(parsed, list)
    return parsed


def store_job(prefix: str, count: int, seen: list[Session]) -> Callable[[Session], accept.IngestCounts]:
    checked = accept.check_items(request_items(prefix, count), now=NOW)

    def work(session: Session) -> accept.IngestCounts:
        seen.append(session)
        return accept.store_checked(session, checked, source="receiver", now=NOW)

    return work


def stored_ids(factory: sessionmaker[Session]) -> set[str]:
    with factory() as session:
        return set(session.scalars(select(m.InboxEvent.message_id)))


Work = Callable[[Session], Any]


def run_behind_blocker(committer: GroupCommitter, jobs: dict[str, Work | tuple[Work, Work]]) -> dict[str, Any]:
    """Run `jobs` from one thread each while the writer is busy, so they queue and form one group.
    A job is its work, or its work and its shared form.

    Returns each job's result, or the exception it raised."""
    release, entered = threading.Event(), threading.Event()

    def blocker(_session: Session) -> None:
        entered.set()
        assert release.wait(30)

    outcomes: dict[str, Any] = {}

    def call(name: str, job: Work | tuple[Work, Work]) -> None:
        work, shared = job if isinstance(job, tuple) else (job, None)
        try:
            outcomes[name] = committer.run(work, shared=shared)
        except Exception as exc:
            outcomes[name] = exc

    first = threading.Thread(target=call, args=("blocker", blocker))
    first.start()
    assert entered.wait(30)
    threads = [threading.Thread(target=call, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for _ in range(6000):  # every job waits behind the blocker (at most 60 s, then fail)
        if committer.queued() >= len(jobs):
            break
        threading.Event().wait(0.01)
    assert committer.queued() >= len(jobs), "the requests never queued behind the blocker"
    release.set()
    for thread in [first, *threads]:
        thread.join(60)
        assert not thread.is_alive(), "a request was never answered"
    return outcomes


def test_concurrent_requests_share_one_commit_and_each_is_answered_after_it(
    factory: sessionmaker[Session],
) -> None:
    committer = GroupCommitter(factory)
    seen: list[Session] = []
    outcomes = run_behind_blocker(committer, {"a": store_job("a", 3, seen), "b": store_job("b", 2, seen)})
    assert outcomes["a"].accepted == 3 and outcomes["b"].accepted == 2
    assert len(seen) == 2 and seen[0] is seen[1]  # one transaction for both requests
    # Both answers are back: a new connection sees both requests' events, so both were committed.
    assert stored_ids(factory) == {"a-0", "a-1", "a-2", "b-0", "b-1"}


def test_a_failing_request_in_a_group_loses_nothing_of_the_other(factory: sessionmaker[Session]) -> None:
    committer = GroupCommitter(factory)
    seen: list[Session] = []
    good = store_job("good", 2, seen)
    doomed = store_job("bad", 2, seen)

    def failing(session: Session) -> None:
        doomed(session)  # its events are written, then the request fails
        raise RuntimeError("a defect while storing this request")

    outcomes = run_behind_blocker(committer, {"bad": failing, "good": good})
    assert isinstance(outcomes["bad"], RuntimeError)
    assert outcomes["good"].accepted == 2
    assert seen[0] is seen[1]
    assert stored_ids(factory) == {"good-0", "good-1"}  # the failed request's rows were rolled back


def test_a_group_whose_commit_fails_is_retried_request_by_request(factory: sessionmaker[Session]) -> None:
    committer = GroupCommitter(factory)
    good = store_job("ok", 1, [])

    def poisons_the_commit(session: Session) -> None:
        session.connection().info["listsync_test_fail_commit"] = True

    def fail_commit(conn: Any) -> None:
        if conn.info.pop("listsync_test_fail_commit", False):
            raise RuntimeError("commit failed")

    engine = factory.kw["bind"]
    event.listen(engine, "commit", fail_commit)
    try:
        outcomes = run_behind_blocker(committer, {"poison": poisons_the_commit, "ok": good})
    finally:
        event.remove(engine, "commit", fail_commit)
    # The shared commit failed; run alone, the poisoned request fails and the other commits.
    assert isinstance(outcomes["poison"], RuntimeError)
    assert outcomes["ok"].accepted == 1
    assert stored_ids(factory) == {"ok-0"}



def test_a_shared_form_that_fails_sends_the_group_request_by_request(factory: sessionmaker[Session]) -> None:
    """Shared forms run without savepoints; one raising rolls the group back and each job runs alone."""
    committer = GroupCommitter(factory)
    seen: list[Session] = []
    first, second = store_job("one", 2, seen), store_job("two", 1, seen)

    def refused(session: Session) -> None:
        second(session)
        raise RuntimeError("the database refused an event")

    outcomes = run_behind_blocker(committer, {"one": (first, first), "two": (second, refused)})
    assert outcomes["one"].accepted == 2 and outcomes["two"].accepted == 1
    assert len(seen) == 4 and seen[0] is seen[1] and seen[2] is not seen[3]  # shared, then alone
    assert stored_ids(factory) == {"one-0", "one-1", "two-0"}


def test_a_request_run_again_alone_is_counted_once(factory: sessionmaker[Session]) -> None:
    """The Prometheus counters are bumped after the commit, so a rolled-back shared run adds nothing."""
    committer = GroupCommitter(factory)
    accepted = metrics.EVENTS_RECEIVED.labels("receiver", "accepted")
    before = accepted._value.get()
    other = store_job("two", 1, [])

    def refused(session: Session) -> None:
        other(session)
        raise RuntimeError("the database refused an event")

    release, entered = threading.Event(), threading.Event()
    answers: dict[str, Any] = {}

    def blocker(_session: Session) -> None:
        entered.set()
        assert release.wait(30)

    threads = [threading.Thread(target=committer.run, args=(blocker,))]
    threads[0].start()
    assert entered.wait(30)
    threads += [
        threading.Thread(target=lambda: answers.update(one=receiver._commit(committer, request_items("one", 3), NOW))),
        threading.Thread(target=lambda: answers.update(two=committer.run(other, shared=refused))),
    ]
    for thread in threads[1:]:
        thread.start()
    for _ in range(6000):
        if committer.queued() >= 2:
            break
        threading.Event().wait(0.01)
    assert committer.queued() >= 2, "the requests never queued behind the blocker"
    release.set()
    for thread in threads:
        thread.join(60)
    assert answers["one"].accepted == 3 and answers["two"].accepted == 1
    assert accepted._value.get() - before == 3  # the request's own 3, once; the other job is not the receiver's
