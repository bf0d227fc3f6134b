"""The lists engine end to end: real database (SQLite and PostgreSQL), real HTTP to the emulator."""

from __future__ import annotations

import math
import random

import pytest
from sqlalchemy import text

from listsync import context, sync
from tests.emulator import EmulatorServer, FaultRule, IterableEmulator
from tests.helpers import API_KEY, audience_event, ingest, make_settings, sync_context


def _rows(ctx: context.SyncContext, sql: str) -> list[dict[str, object]]:
    with ctx.factory() as session:
        return [dict(r) for r in session.execute(text(sql)).mappings()]


def test_enter_exit_and_replays_end_with_exact_list(database_url: str, emulator: tuple[IterableEmulator, str]) -> None:
    emu, url = emulator
    settings = make_settings(database_url, url)
    with sync_context(settings) as ctx:
        events = [
            audience_event("vip", inside=True, user_id="u1", email="A@X.com", at=1),
            audience_event("vip", inside=True, user_id="u2", email="b@x.com", at=1),
            audience_event("vip", inside=True, user_id="u3", email="c@x.com", at=1, kind="track"),
            # u2 leaves later; the older enter replayed after it must not bring u2 back
            audience_event("vip", inside=False, user_id="u2", email="b@x.com", at=5),
            audience_event("vip", inside=True, user_id="u2", email="b@x.com", at=3),
            audience_event("vip", inside=None, user_id="u3", email="c@x.com", at=9),
        ]
        ingest(ctx, events)
        ingest(ctx, events[:2])  # duplicate messageIds change nothing
        report = sync.run_once(ctx)
        assert report.exit_code == 0, report.summary()
        list_id = emu.lists_named("vip")
        assert len(list_id) == 1
        assert emu.list_member_emails(list_id[0]) == {"a@x.com", "c@x.com"}
        assert len(emu.requests_to("lists/subscribe")) == 1
        assert emu.requests_to("lists/unsubscribe") == []
        status = _rows(ctx, "SELECT * FROM audience_status")
        assert status[0]["members"] == 2 and status[0]["synced_members"] == 2
        assert status[0]["pending_subscribe"] == 0 and status[0]["list_id"] == list_id[0]

        ingest(ctx, [audience_event("vip", inside=False, user_id="u1", email="a@x.com", at=20)])
        report = sync.run_once(ctx)
        assert emu.list_member_emails(list_id[0]) == {"c@x.com"}
        assert len(emu.requests_to("lists/unsubscribe")) == 1
        again = sync.run_once(ctx)
        assert again.requests == 0


def _random_phase(
    rng: random.Random,
    audiences: list[str],
    users: list[tuple[str | None, str | None]],
    start: float,
    touch: float,
) -> list[dict[str, object]]:
    """Random enters/exits for a fraction of users, shuffled, with duplicates and flagless events."""
    events = []
    for audience in audiences:
        for user_id, email in users:
            if rng.random() > touch:
                continue
            for _ in range(rng.randint(1, 3)):
                inside = rng.random() < 0.6 if rng.random() > 0.05 else None
                kind = rng.choice(["identify", "track"]) if inside is not None else "identify"
                at = start + rng.uniform(0, 1000)
                events.append(
                    audience_event(audience, inside=inside, user_id=user_id, email=email, at=at, kind=kind)
                )
    events += rng.sample(events, len(events) // 10)  # replays of the same messageIds
    rng.shuffle(events)
    return events


def _expected(
    events: list[dict[str, object]], previous: dict[tuple[str, object], bool]
) -> dict[tuple[str, object], bool]:
    latest: dict[tuple[str, object], tuple[str, bool]] = {}
    for event in events:
        context = event["context"]
        audience = context["personas"]["computation_key"]  # type: ignore[index]
        bag = event["traits"] if "traits" in event else event["properties"]
        flag = bag.get(audience)  # type: ignore[union-attr]
        if flag is None:
            continue
        key = (audience, (event.get("userId"), bag.get("email")))  # type: ignore[union-attr]
        stamp = str(event["timestamp"])
        if key not in latest or (stamp, event["messageId"]) > (latest[key][0], ""):
            latest[key] = (stamp, bool(flag))
    result = dict(previous)
    result.update({key: flag for key, (_, flag) in latest.items()})
    return result


def _members(emu: IterableEmulator, list_id: int, project_type: str) -> set[tuple[str | None, str | None]]:
    if project_type == "userId":
        return {(None, u) for u in emu.list_member_user_ids(list_id)}
    return emu.list_members(list_id)


def _wanted(
    expected: dict[tuple[str, object], bool], audience: str, project_type: str
) -> set[tuple[object, object]]:
    out = set()
    for (aud, (user_id, email)), inside in expected.items():  # type: ignore[misc]
        if aud == audience and inside:
            out.add((None, user_id) if project_type == "userId" else (email, user_id))
    return out


SIZES = [pytest.param(5_000, id="5k"), pytest.param(20_000, id="20k", marks=pytest.mark.slow)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("project_type", ["hybrid", "userId"])
@pytest.mark.parametrize("faults", [False, True], ids=["clean", "faults20"])
def test_three_audiences_random_deltas_end_exact_with_minimum_calls(
    database_url: str, project_type: str, faults: bool, n: int
) -> None:
    """3 audiences x n members, random enters and exits delivered out of order and duplicated;
    the default run uses 5,000 members each, `-m slow` the full 20,000."""
    rng = random.Random(f"{project_type}{faults}{n}")
    audiences = ["high_value", "churn_risk", "newsletter_fans"]
    users: list[tuple[str | None, str | None]] = []
    for i in range(n):
        has_email = project_type == "userId" or i % 10 != 0
        has_user_id = project_type == "userId" or i % 10 != 1
        users.append((f"user-{i}" if has_user_id else None, f"person{i}@example.com" if has_email else None))
    emu = IterableEmulator(
        project_type="userId" if project_type == "userId" else "hybrid", api_keys=API_KEY, seed=7
    )
    emu.disable_rate_limits()
    if faults:
        for rule in (
            FaultRule("lists/subscribe", "status", probability=0.10, status=503),
            FaultRule("lists/unsubscribe", "status", probability=0.10, status=502),
            FaultRule("*", "rate_limit", probability=0.05),
            FaultRule("lists/subscribe", "drop_before", probability=0.025),
            FaultRule("lists/subscribe", "drop_after", probability=0.025),
            FaultRule("lists/unsubscribe", "drop_after", probability=0.025),
        ):
            emu.add_fault(rule)
    with EmulatorServer(emu) as server:
        settings = make_settings(database_url, server.url, iterable={"project_type": project_type})
        with sync_context(settings) as ctx:
            expected: dict[tuple[str, object], bool] = {}
            for phase, touch in ((0, 1.0), (1, 0.3)):
                before = {
                    a: _members(emu, emu.lists_named(a)[0], project_type) if emu.lists_named(a) else set()
                    for a in audiences
                }
                calls_before = {
                    ep: len(emu.requests_to(ep)) for ep in ("lists/subscribe", "lists/unsubscribe")
                }
                events = _random_phase(rng, audiences, users, start=phase * 10_000.0, touch=touch)
                expected = _expected(events, expected)
                ingest(ctx, events)
                report = sync.run_once(ctx, context.RunOptions(allow_mass_unsubscribe=False))
                assert report.exit_code == 0, report.summary()
                minimum = 0
                for audience in audiences:
                    lists = emu.lists_named(audience)
                    assert len(lists) == 1
                    want = _wanted(expected, audience, project_type)
                    assert _members(emu, lists[0], project_type) == want
                    minimum += math.ceil(len(want - before[audience]) / 1000)
                    minimum += math.ceil(len(before[audience] - want) / 1000)
                sent = sum(len(emu.requests_to(ep)) - calls_before[ep] for ep in calls_before)
                if faults:
                    assert sent >= minimum
                else:
                    assert sent == minimum, (phase, sent, minimum)
            status = {r["audience_key"]: r for r in _rows(ctx, "SELECT * FROM audience_status")}
            for audience in audiences:
                want = _wanted(expected, audience, project_type)
                assert status[audience]["members"] == len(want) == status[audience]["synced_members"]
                assert status[audience]["pending_subscribe"] == status[audience]["pending_unsubscribe"] == 0
