"""Requests in flight and the set-based record, against a real database and the emulator over HTTP.

Overlap is shown without a stopwatch: the emulator holds the first subscribes until as many have
arrived as may be in flight, so a sender that waits for each answer would never get past the gate
(the test fails on the gate's long timeout instead of passing on a lucky schedule)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, text

from listsync import context, sync
from listsync.db import ledger, memberships
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.domain import Desired, Direction, Member, MemberState, ProjectType, Synced
from listsync.errors import RetryableError
from listsync.iterable.payloads import BulkResult, Subscriber
from listsync.lists import membership as rules
from listsync.lists import planner, record
from tests.emulator import EmulatorServer, IterableEmulator
from tests.emulator.replies import Reply
from tests.helpers import API_KEY, audience_event, ingest, make_settings, sync_context

IN_FLIGHT = 4
GATE_TIMEOUT = 60.0


class GatedEmulator(IterableEmulator):
    """Holds the first `gate` subscribes until all of them have arrived; counts how many list
    requests are inside the emulator at once; optionally revokes the API key at the Nth subscribe."""

    def __init__(self, *, gate: int, revoke_at: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate, self.revoke_at = gate, revoke_at
        self.cond = threading.Condition()
        self.arrived = self.active = self.peak = 0
        self.gate_timed_out = False

    def handle(
        self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str], body: bytes
    ) -> Reply:
        if not path.startswith("/api/lists/") or path.endswith("getUsers"):
            return super().handle(method, path, query, headers, body)
        with self.cond:
            self.arrived += 1
            if self.revoke_at is not None and self.arrived == self.revoke_at:
                self.api_keys.clear()
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.cond.notify_all()
            if self.arrived <= self.gate and not self.cond.wait_for(
                lambda: self.arrived >= self.gate, timeout=GATE_TIMEOUT
            ):
                self.gate_timed_out = True
        try:
            return super().handle(method, path, query, headers, body)
        finally:
            with self.cond:
                self.active -= 1


@pytest.fixture
def gated() -> Iterator[tuple[GatedEmulator, str]]:
    emu = GatedEmulator(gate=IN_FLIGHT, project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server:
        yield emu, server.url


def _members(n: int, audience: str = "in_flight") -> list[dict[str, Any]]:
    return [
        audience_event(audience, inside=True, user_id=f"u{i}", email=f"u{i}@example.com", at=i, kind="track")
        for i in range(n)
    ]


def _scalar(ctx: context.SyncContext, sql: str) -> Any:
    with ctx.factory() as session:
        return session.execute(text(sql)).scalar()


def test_requests_overlap_and_the_list_ends_exact(
    database_url: str, gated: tuple[GatedEmulator, str]
) -> None:
    emu, url = gated
    settings = make_settings(database_url, url, sync={"batch_size": 50, "max_in_flight": IN_FLIGHT})
    with sync_context(settings) as ctx:
        ingest(ctx, _members(600))
        report = sync.run_once(ctx)
        assert report.exit_code == 0, report.summary()
        assert not emu.gate_timed_out, "the first subscribes never overlapped"
        assert emu.peak == IN_FLIGHT  # several on the wire at once, never more than the setting
        (list_id,) = emu.lists_named("in_flight")
        assert emu.list_member_emails(list_id) == {f"u{i}@example.com" for i in range(600)}
        assert len(emu.requests_to("lists/subscribe")) == 600 // 50 == report.requests
        assert _scalar(ctx, "SELECT count(*) FROM memberships WHERE state = 'synced'") == 600
        assert _scalar(ctx, "SELECT count(*) FROM memberships WHERE synced_email IS NULL") == 0
        assert _scalar(ctx, "SELECT count(*) FROM api_requests WHERE status != 'ok'") == 0
        assert _scalar(ctx, "SELECT count(*) FROM api_request_items WHERE outcome != 'ok'") == 0


def test_a_refused_key_mid_run_stops_cleanly_with_requests_in_flight(database_url: str) -> None:
    emu = GatedEmulator(gate=IN_FLIGHT, revoke_at=7, project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server:
        settings = make_settings(
            database_url, server.url, sync={"batch_size": 50, "max_in_flight": IN_FLIGHT}
        )
        with sync_context(settings) as ctx:
            ingest(ctx, _members(1000))
            report = sync.run_once(ctx)
            assert report.exit_code == 2 and report.fatal and "refused" in report.fatal
            subscribes = emu.requests_to("lists/subscribe")
            first_refused = next(i for i, r in enumerate(subscribes) if r.status == 401)
            # Nothing is launched once the refusal is recorded: at most the others already in flight.
            assert len(subscribes) <= first_refused + IN_FLIGHT
            assert len(subscribes) < 1000 // 50
            (list_id,) = emu.lists_named("in_flight")
            in_list = emu.list_member_emails(list_id)
            synced = _scalar(ctx, "SELECT count(*) FROM memberships WHERE state = 'synced'")
            assert synced == len(in_list) == 50 * sum(r.status == 200 for r in subscribes)
            # Every request sent was recorded; the refused ones' members wait, untouched.
            assert _scalar(ctx, "SELECT count(*) FROM api_requests WHERE status = 'in_flight'") == 0
            assert _scalar(ctx, "SELECT count(*) FROM memberships WHERE state = 'pending'") == 1000 - synced
            assert _scalar(ctx, "SELECT max(attempts) FROM memberships") == 0


# --- the set-based record gives what membership.confirm / fail give, row for row -------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _row(i: int, **changes: Any) -> Member:
    base = Member(
        user_id=f"u{i}",
        email=f"u{i}@example.com",
        desired=Desired.IN,
        desired_at=T0,
        desired_message_id=f"m{i}",
        data_fields=None,
        synced=None,
        synced_email=None,
        synced_user_id=None,
        state=MemberState.PENDING,
        attempts=2,
        last_error="earlier",
    )
    return replace(base, **changes)


# What may happen to a row while its request is on the wire.
MEANWHILE = [
    lambda s: s,
    lambda s: replace(s, desired=Desired.OUT),
    lambda s: replace(s, email="moved@example.com"),
    lambda s: replace(s, user_id="linked-later") if not s.user_id else replace(s, email=""),
    lambda s: replace(s, desired=Desired.UNKNOWN),
]


def _store(ctx: context.SyncContext, audience_id: int, states: list[Member]) -> list[int]:
    with transaction(ctx.factory) as session:
        memberships.write_members(
            session, removed=(), created=[(audience_id, s) for s in states], changed={}, now=T0
        )
        return list(
            session.scalars(
                text("SELECT id FROM memberships WHERE audience_id = :a ORDER BY id"), {"a": audience_id}
            )
        )


@pytest.mark.parametrize("project_type", list(ProjectType))
@pytest.mark.parametrize("direction", list(Direction))
def test_set_based_record_equals_the_pure_rules(
    database_url: str, project_type: ProjectType, direction: Direction
) -> None:
    subscribing = direction is Direction.SUBSCRIBE
    settings = make_settings(
        database_url, "http://127.0.0.1:9", iterable={"project_type": project_type.value}
    )
    initial = [
        _row(i, user_id="" if i % 7 == 3 else f"u{i}")
        if subscribing
        else _row(
            i, desired=Desired.OUT, synced=Synced.IN, synced_email=f"u{i}@example.com", synced_user_id=f"u{i}"
        )
        for i in range(40)
    ]
    with sync_context(settings) as ctx:
        with transaction(ctx.factory) as session:
            session.add(
                m.Audience(
                    audience_key="rules",
                    list_state=m.ListState.PENDING,
                    settings={},
                    created_at=T0,
                    updated_at=T0,
                )
            )
        audience_id = int(_scalar(ctx, "SELECT id FROM audiences"))
        ids = _store(ctx, audience_id, initial)
        subscribers = tuple(
            Subscriber(email=s.email or None, user_id=s.user_id or None)
            if subscribing
            else Subscriber(user_id=s.synced_user_id)
            for s in initial
        )
        batch = planner.Batch(direction, tuple(ids), subscribers)
        with transaction(ctx.factory) as session:
            request_id = ledger.begin_request(
                session,
                run_id=None,
                audience_id=audience_id,
                endpoint=f"lists/{direction.value}",
                member_ids=batch.member_ids,
                owner="test",
                now=T0,
            )
        changed = {
            i: MEANWHILE[n % len(MEANWHILE)](s) for n, (i, s) in enumerate(zip(ids, initial, strict=True))
        }
        with transaction(ctx.factory) as session:
            memberships.write_members(session, removed=(), created=[], changed=changed, now=T0)
        refused = {f"u{i}@example.com" for i in range(0, 40, 9)}
        result = BulkResult(
            success_count=40 - len(refused),
            fail_count=len(refused),
            failed={"invalidEmails": frozenset(refused)} if subscribing else {},
        )
        answer = record.judge(batch, result, update_only=False)
        record.record_success(ctx, request_id, batch, answer, context.RunReport())
        with ctx.factory() as session:
            stored = memberships.member_states(session, ids)
        for n, member_id in enumerate(ids):
            before, sent = changed[member_id], subscribers[n]
            if member_id in answer.refused:
                want = rules.fail(
                    before,
                    answer.refused[member_id][1] or "",
                    subscribing=subscribing,
                    project_type=project_type,
                )
            else:
                want = record.confirm(before, sent, subscribing, project_type)
            assert stored[member_id] == want, (n, before)


def test_a_transient_failure_counts_one_more_attempt_for_each_member(database_url: str) -> None:
    """Members of one request that had failed different numbers of times each count exactly one
    more attempt, and the backoff of each follows its own count (`membership.retry_later`)."""
    settings = make_settings(database_url, "http://127.0.0.1:9", sync={"retry_base_seconds": 100, "retry_max_seconds": 10_000})
    initial = [_row(i, attempts=i % 3) for i in range(9)]
    with sync_context(settings) as ctx:
        with transaction(ctx.factory) as session:
            session.add(m.Audience(audience_key="retry", list_state=m.ListState.PENDING, settings={},
                                   created_at=T0, updated_at=T0))
        ids = _store(ctx, int(_scalar(ctx, "SELECT id FROM audiences")), initial)
        subscribers = tuple(Subscriber(email=s.email, user_id=s.user_id) for s in initial)
        batch = planner.Batch(Direction.SUBSCRIBE, tuple(ids), subscribers)
        with transaction(ctx.factory) as session:
            request_id = ledger.begin_request(
                session, run_id=None, audience_id=None, endpoint="lists/subscribe", member_ids=batch.member_ids,
                owner="test", now=T0,
            )
        now = ctx.clock()
        record.record_failure(
            ctx, request_id, batch, RetryableError("503", status=503), context.RunReport(), retry=True, keep_pending=True
        )
        with ctx.factory() as session:
            rows = {r.id: r for r in session.scalars(select(m.Membership).where(m.Membership.id.in_(ids)))}
    for member_id, before in zip(ids, initial, strict=True):
        row = rows[member_id]
        assert row.attempts == before.attempts + 1, (before.attempts, row.attempts)
        delay = rules.retry_delay(before.attempts + 1, 100, 10_000)  # 100, 200 or 400 s
        assert row.next_attempt_at is not None
        assert abs((row.next_attempt_at - now).total_seconds() - delay) < 50


def test_the_ledger_names_members_in_the_request_row_and_reads_requests_written_before(
    database_url: str,
) -> None:
    """A request's row names its members and only refused members get an item; a request left in
    flight by a release before revision 0010 (an item per member, member_ids NULL) is read from
    its items, and settling it replaces them."""
    settings = make_settings(database_url, "http://127.0.0.1:9")
    with sync_context(settings) as ctx:
        with transaction(ctx.factory) as session:
            session.add(m.Audience(audience_key="ledger", list_state=m.ListState.PENDING, settings={},
                                   created_at=T0, updated_at=T0))
        ids = _store(ctx, int(_scalar(ctx, "SELECT id FROM audiences")), [_row(i) for i in range(4)])
        with transaction(ctx.factory) as session:
            compact = ledger.begin_request(session, run_id=None, audience_id=None, endpoint="lists/subscribe",
                                           member_ids=ids, owner="test", now=T0)
            legacy = ledger.begin_request(session, run_id=None, audience_id=None, endpoint="lists/subscribe",
                                          member_ids=ids[:2], owner="test", now=T0)
            session.execute(text("UPDATE api_requests SET member_ids = NULL WHERE id = :r"), {"r": legacy})
            for i in ids[:2]:
                session.execute(text("INSERT INTO api_request_items (request_id, membership_id) VALUES (:r, :i)"),
                                {"r": legacy, "i": i})
        with transaction(ctx.factory) as session:
            assert ledger.request_member_ids(session, compact) == ids
            assert ledger.request_member_ids(session, legacy) == ids[:2]
            done = ledger.RequestRecord(status=m.RequestStatus.PARTIAL)
            ledger.finish_request(session, compact, done, T0, {ids[1]: ("invalid", "why")}, common=("ok", None),
                                  sent={ids[1]: ("u1@example.com", "u1")})
            settled = {ids[0]: ("applied", None), ids[1]: ("not_applied", None)}
            ledger.finish_request(session, legacy, ledger.RequestRecord(status=m.RequestStatus.RESOLVED), T0, settled)
        with ctx.factory() as session:
            items = session.execute(text(
                "SELECT request_id, membership_id, outcome, sent_email FROM api_request_items ORDER BY 1, 2")).all()
        assert [tuple(r) for r in items] == [
            (compact, ids[1], "invalid", "u1@example.com"),
            (legacy, ids[0], "applied", None),
            (legacy, ids[1], "not_applied", None),
        ]


def test_a_member_deleted_while_its_request_is_in_flight_leaves_the_request(database_url: str) -> None:
    """The highest membership deleted (a fold's merge) while its request is out: SQLite hands its id
    to the next member stored, which must not become one the request carried; and recording a
    refusal for the deleted member writes no item for it, nor fails the record."""
    settings = make_settings(database_url, "http://127.0.0.1:9")
    with sync_context(settings) as ctx:
        with transaction(ctx.factory) as session:
            session.add(m.Audience(audience_key="gone", list_state=m.ListState.PENDING, settings={},
                                   created_at=T0, updated_at=T0))
        audience_id = int(_scalar(ctx, "SELECT id FROM audiences"))
        ids = _store(ctx, audience_id, [_row(i) for i in range(3)])
        with transaction(ctx.factory) as session:
            request = ledger.begin_request(session, run_id=None, audience_id=audience_id, endpoint="lists/subscribe",
                                           member_ids=ids, owner="test", now=T0)
        with transaction(ctx.factory) as session:
            memberships.delete_members(session, [ids[-1]])
        newcomer = [i for i in _store(ctx, audience_id, [_row(9)]) if i not in ids[:-1]]
        with transaction(ctx.factory) as session:
            carried = ledger.request_member_ids(session, request)
            assert newcomer[0] not in carried and [i for i in carried if i != ids[-1]] == ids[:-1]
            refused = {ids[0]: ("invalid", "why"), ids[-1]: ("invalid", "why")}
            ledger.finish_request(session, request, ledger.RequestRecord(status=m.RequestStatus.PARTIAL), T0,
                                  refused, common=("ok", None))
        with ctx.factory() as session:
            items = session.execute(text("SELECT membership_id FROM api_request_items ORDER BY 1")).scalars().all()
        assert list(items) == [ids[0]] and len(newcomer) == 1
