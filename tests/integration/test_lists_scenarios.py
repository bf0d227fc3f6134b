"""Issue 5, point by point, as a user would run it: Engage events in, `run_once` or the `listsync`
verbs, the emulator's lists and request bodies, the SQL views. Every test runs on SQLite and
PostgreSQL. After each scenario `audience_status` must agree with the list Iterable really has.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from listsync import context, sync
from listsync.config import Settings
from listsync.lists import identity
from listsync.lists.apply import apply_all
from tests.emulator import EmulatorServer, FaultRule, IterableEmulator
from tests.helpers import API_KEY, BASE_TIME, audience_event, ingest, sync_context
from tests.integration.test_cli import (
    _restore_logging,  # noqa: F401  (autouse fixture)
    audience_row,
    config_data,
    member_rows,
    run_cli,
    view_rows,
    write_config,
)


def enters(key: str, users: range | list[int], at: float = 1, **extra: Any) -> list[dict[str, Any]]:
    return [audience_event(key, inside=True, user_id=f"u{i}", email=f"u{i}@x.com", at=at, **extra) for i in users]


def exits(key: str, users: range | list[int], at: float = 2) -> list[dict[str, Any]]:
    return [audience_event(key, inside=False, user_id=f"u{i}", email=f"u{i}@x.com", at=at) for i in users]


def people(users: range | list[int]) -> set[tuple[str, str]]:
    """(email, userId) as the emulator lists them."""
    return {(f"u{i}@x.com", f"u{i}") for i in users}


def the_list(emu: IterableEmulator, key: str) -> int:
    lists = emu.lists_named(key)
    assert len(lists) == 1, f"{key}: {lists}"
    return lists[0]


def bodies(emu: IterableEmulator, endpoint: str, list_id: int | None = None, since: int = 0) -> list[Any]:
    found = [r.body for r in emu.requests[since:] if r.endpoint == endpoint]
    return [b for b in found if list_id is None or b["listId"] == list_id]


def assert_agrees(
    ctx: context.SyncContext, emu: IterableEmulator, key: str, want: set[tuple[Any, Any]], failed: int = 0
) -> None:
    """Point 8: the list is exactly `want`, and audience_status says so."""
    list_id = the_list(emu, key)
    assert emu.list_members(list_id) == want
    row = audience_row(ctx, key)
    assert row["list_id"] == list_id
    assert row["synced_members"] == len(want)
    assert row["members"] == len(want) + failed
    assert (row["pending_subscribe"], row["pending_unsubscribe"], row["failed"]) == (0, 0, failed)


def settings(database_url: str, url: str, **sections: Any) -> Settings:
    return Settings(**config_data(database_url, url, **sections))


# --- 1. a list per audience -----------------------------------------------------------------------


def test_one_list_per_audience_created_found_or_reused(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    fresh, existing, crashed = "High value: VIP (EU) ", "existing_list", "crashed_before_store"
    existing_id = emu.create_list(existing)
    with sync_context(settings(database_url, url)) as ctx:
        ingest(ctx, enters(fresh, range(3)) + enters(existing, range(2)) + enters(crashed, range(2)))
        # A crash between "create" and "store": Iterable has the list, the audience row no list_id.
        apply_all(ctx)
        crashed_id = emu.create_list(crashed)
        assert audience_row(ctx, crashed)["list_id"] is None
        report = sync.run_once(ctx)
        assert report.exit_code == 0, report.summary()

        creates = [r for r in emu.requests if r.endpoint == "lists" and r.method == "POST"]
        assert [r.body["name"] for r in creates] == [fresh]  # named exactly the key, whitespace and all
        assert emu.lists_named(existing) == [existing_id]
        assert emu.lists_named(crashed) == [crashed_id]
        assert bodies(emu, "lists/subscribe", existing_id) and bodies(emu, "lists/subscribe", crashed_id)
        assert_agrees(ctx, emu, fresh, people(range(3)))
        assert_agrees(ctx, emu, existing, people(range(2)))
        assert_agrees(ctx, emu, crashed, people(range(2)))
        assert {r["list_state"] for r in view_rows(ctx, "SELECT * FROM audience_status")} == {"ready"}


def test_lost_answer_to_list_create_does_not_duplicate_the_list(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    """Iterable created the list but the answer never arrived (connection dropped after applying)."""
    emu, url = emulator
    emu.add_fault(FaultRule("POST lists", "drop_after", count=1))
    with sync_context(settings(database_url, url)) as ctx:
        ingest(ctx, enters("vip", range(3)))
        report = sync.run_once(ctx)
        assert len(emu.lists_named("vip")) == 1, emu.lists_named("vip")
        if report.exit_code != 0:  # the run may wait for the next one rather than guess
            report = sync.run_once(ctx)
        assert report.exit_code == 0, report.summary()
        assert_agrees(ctx, emu, "vip", people(range(3)))


def test_list_deleted_in_iterable_is_marked_missing_until_recreated(
    database_url: str, emulator: tuple[IterableEmulator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emu, url = emulator
    data = config_data(database_url, url)
    config = write_config(tmp_path / "listsync.toml", data)
    with sync_context(Settings(**data)) as ctx:
        ingest(ctx, enters("vip", range(4)) + enters("other", range(2)))
        assert run_cli(capsys, config, "sync")[0] == 0
        old = the_list(emu, "vip")
        assert emu.delete_list(old)

        ingest(ctx, enters("vip", [4], at=5) + exits("vip", [0], at=5) + enters("other", [2], at=5))
        code, out, _ = run_cli(capsys, config, "sync")
        assert code == 1, out
        assert "lists missing in Iterable: vip" in out
        row = audience_row(ctx, "vip")
        assert (row["list_state"], row["list_id"]) == ("missing", old)
        assert row["pending_subscribe"] == 1 and row["pending_unsubscribe"] == 1
        assert_agrees(ctx, emu, "other", people(range(3)))  # other audiences go on

        # sending to it stopped: the next runs send nothing to the dead list and keep saying why
        seen = len(emu.requests)
        code, out, _ = run_cli(capsys, config, "sync")
        assert code == 1 and "lists missing in Iterable: vip" in out
        assert [r for r in emu.requests[seen:] if r.endpoint in ("lists/subscribe", "lists/unsubscribe")] == []
        code, out, _ = run_cli(capsys, config, "status")
        assert code == 0
        assert "missing" in next(line for line in out.splitlines() if line.startswith("vip"))
        code, out, _ = run_cli(capsys, config, "plan")
        assert "recreate-missing-lists" in next(line for line in out.splitlines() if line.startswith("vip"))

        code, out, _ = run_cli(capsys, config, "sync", "--recreate-missing-lists")
        assert code == 0, out
        new = the_list(emu, "vip")
        assert new != old
        # the whole desired membership went to the new list, not just the pending delta
        sent = {s["email"] for b in bodies(emu, "lists/subscribe", new) for s in b["subscribers"]}
        assert sent == {"u1@x.com", "u2@x.com", "u3@x.com", "u4@x.com"}
        assert bodies(emu, "lists/unsubscribe", new) == []
        assert audience_row(ctx, "vip")["list_state"] == "ready"
        assert_agrees(ctx, emu, "vip", people([1, 2, 3, 4]))
        assert run_cli(capsys, config, "sync")[0] == 0


def test_deleted_list_is_recognised_whatever_iterables_wording(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    """A 400 that does not say "does not exist" still leads to 'missing' when the list is gone."""
    emu, url = emulator
    with sync_context(settings(database_url, url)) as ctx:
        ingest(ctx, enters("vip", range(3)))
        assert sync.run_once(ctx).exit_code == 0
        assert emu.delete_list(the_list(emu, "vip"))
        emu.add_fault(FaultRule("lists/subscribe", "status", status=400, count=1))  # "Injected error"
        ingest(ctx, enters("vip", [3], at=5))
        report = sync.run_once(ctx)
        assert report.missing_lists == ["vip"] and report.exit_code == 1
        row = audience_row(ctx, "vip")
        assert row["list_state"] == "missing" and row["pending_subscribe"] == 1 and row["failed"] == 0


def test_deleted_list_found_by_reconcile_is_marked_missing(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    with sync_context(settings(database_url, url)) as ctx:
        ingest(ctx, enters("vip", range(3)))
        assert sync.run_once(ctx).exit_code == 0
        emu.delete_list(the_list(emu, "vip"))
        report = sync.run_once(ctx, context.RunOptions(reconcile=True))
        assert report.exit_code == 1 and report.missing_lists == ["vip"], report.summary()
        assert audience_row(ctx, "vip")["list_state"] == "missing"
        report = sync.run_once(ctx, context.RunOptions(recreate_missing_lists=True))
        assert report.exit_code == 0, report.summary()
        assert_agrees(ctx, emu, "vip", people(range(3)))


# --- 2. batches -----------------------------------------------------------------------------------


def test_enter_and_exit_in_one_window_cancel_out(database_url: str, emulator: tuple[IterableEmulator, str]) -> None:
    emu, url = emulator
    with sync_context(settings(database_url, url)) as ctx:
        ingest(ctx, enters("vip", [1]))
        assert sync.run_once(ctx).exit_code == 0
        seen = len(emu.requests)
        # u2 enters and leaves, u1 leaves and comes back, all before the next run
        ingest(ctx, enters("vip", [2], at=10) + exits("vip", [2], at=11)
               + exits("vip", [1], at=10) + enters("vip", [1], at=11))
        report = sync.run_once(ctx)
        assert (report.exit_code, report.requests) == (0, 0), report.summary()
        assert emu.requests[seen:] == []
        assert member_rows(ctx, "vip")["u2"]["state"] == "synced"
        assert_agrees(ctx, emu, "vip", people([1]))


def test_batch_size_and_nothing_in_sync_is_resent(database_url: str, emulator: tuple[IterableEmulator, str]) -> None:
    emu, url = emulator
    with sync_context(settings(database_url, url, sync={"batch_size": 7})) as ctx:
        ingest(ctx, enters("vip", range(23)))
        assert sync.run_once(ctx).exit_code == 0
        list_id = the_list(emu, "vip")
        subs = bodies(emu, "lists/subscribe")
        assert len(subs) == math.ceil(23 / 7) and all(len(b["subscribers"]) <= 7 for b in subs)
        assert sorted(s["userId"] for b in subs for s in b["subscribers"]) == sorted(f"u{i}" for i in range(23))

        # every request is in the ledger, with its members
        ledger = view_rows(ctx, "SELECT * FROM api_requests WHERE endpoint = 'lists/subscribe' ORDER BY id")
        assert [r["item_count"] for r in ledger] == [len(b["subscribers"]) for b in subs]
        assert {(r["status"], r["http_status"]) for r in ledger} == {("ok", 200)}
        # each request names its members in its own row; items only for members refused
        assert sorted(i for r in ledger for i in json.loads(r["member_ids"])) == sorted(
            int(i["id"]) for i in view_rows(ctx, "SELECT id FROM memberships")
        )
        assert view_rows(ctx, "SELECT * FROM api_request_items") == []

        seen = len(emu.requests)
        again = sync.run_once(ctx)
        assert (again.exit_code, again.requests) == (0, 0) and emu.requests[seen:] == []

        ingest(ctx, exits("vip", range(9)))
        assert sync.run_once(ctx).exit_code == 0
        unsubs = bodies(emu, "lists/unsubscribe")
        assert len(unsubs) == 2 and [len(b["subscribers"]) for b in unsubs] == [7, 2]
        assert bodies(emu, "lists/subscribe", since=seen) == []
        seen = len(emu.requests)
        assert sync.run_once(ctx).requests == 0 and emu.requests[seen:] == []
        assert emu.list_members(list_id) == people(range(9, 23))
        assert_agrees(ctx, emu, "vip", people(range(9, 23)))
        ledger = view_rows(ctx, "SELECT * FROM api_requests")
        assert len(ledger) == len(emu.requests_to("lists/subscribe")) + len(emu.requests_to("lists/unsubscribe"))


def test_unsubscribe_bodies_carry_campaign_and_channel_only_as_configured(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    audiences = {"attributed": {"campaign_id": 4242, "channel_unsubscribe": True}}
    with sync_context(settings(database_url, url, audiences=audiences)) as ctx:
        ingest(ctx, enters("plain", range(2)) + enters("attributed", range(2)))
        assert sync.run_once(ctx).exit_code == 0
        ingest(ctx, exits("plain", [0]) + exits("attributed", [1]))
        assert sync.run_once(ctx).exit_code == 0
        (plain,) = bodies(emu, "lists/unsubscribe", the_list(emu, "plain"))
        (attributed,) = bodies(emu, "lists/unsubscribe", the_list(emu, "attributed"))
        assert "campaignId" not in plain and plain["channelUnsubscribe"] is False
        assert attributed["campaignId"] == 4242 and attributed["channelUnsubscribe"] is True
        assert emu.channel_unsubscribes == {"u1"}
        assert_agrees(ctx, emu, "plain", people([1]))
        assert_agrees(ctx, emu, "attributed", people([0]))


def test_subscribe_bodies_carry_update_flag_and_configured_data_fields_only(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    emu.add_user(email="u0@x.com", user_id="u0")
    emu.add_user(email="u1@x.com", user_id="u1")
    config = {"audience_defaults": {"data_fields": ["plan", "first_name"]},
              "audiences": {"existing_only": {"update_existing_users_only": True, "data_fields": []}}}
    with sync_context(settings(database_url, url, **config)) as ctx:
        traits = {"plan": "gold", "first_name": "Ada", "secret": "do-not-send"}
        ingest(ctx, enters("vip", [0], traits=traits) + enters("vip", [1], traits={"secret": "x"})
               + enters("existing_only", [0, 1], traits=traits))
        assert sync.run_once(ctx).exit_code == 0
        (vip,) = bodies(emu, "lists/subscribe", the_list(emu, "vip"))
        (existing,) = bodies(emu, "lists/subscribe", the_list(emu, "existing_only"))
        assert vip["updateExistingUsersOnly"] is False
        assert existing["updateExistingUsersOnly"] is True
        by_user = {s["userId"]: s for s in vip["subscribers"]}
        assert by_user["u0"]["dataFields"] == {"plan": "gold", "first_name": "Ada"}
        assert "dataFields" not in by_user["u1"]
        assert all("dataFields" not in s for s in existing["subscribers"])
        assert emu.user_by_user_id("u0").data_fields == {"plan": "gold", "first_name": "Ada"}
        assert_agrees(ctx, emu, "vip", people([0, 1]))
        assert_agrees(ctx, emu, "existing_only", people([0, 1]))


def test_hybrid_identity_subscribe_with_what_is_known_unsubscribe_by_the_profiles_user_id(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    with sync_context(settings(database_url, url)) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id="both", email="both@x.com", at=1),
                     audience_event("vip", inside=True, email="mail@x.com", at=1),
                     audience_event("vip", inside=True, user_id="idonly", at=1)])
        assert sync.run_once(ctx).exit_code == 0
        (sub,) = bodies(emu, "lists/subscribe")
        assert sorted(sub["subscribers"], key=str) == sorted(
            [{"email": "both@x.com", "userId": "both"}, {"email": "mail@x.com"}, {"userId": "idonly"}], key=str)
        assert_agrees(ctx, emu, "vip", {("both@x.com", "both"), ("mail@x.com", None), (None, "idonly")})

        ingest(ctx, [audience_event("vip", inside=False, user_id="both", email="both@x.com", at=5),
                     audience_event("vip", inside=False, email="mail@x.com", at=5),
                     audience_event("vip", inside=False, user_id="idonly", at=5)])
        assert sync.run_once(ctx).exit_code == 0
        (unsub,) = bodies(emu, "lists/unsubscribe")
        assert sorted(unsub["subscribers"], key=str) == sorted(
            [{"userId": "both"}, {"email": "mail@x.com"}, {"userId": "idonly"}], key=str)
        assert_agrees(ctx, emu, "vip", set())


def test_user_id_project_requires_user_id_and_prefers_it(database_url: str) -> None:
    emu = IterableEmulator(project_type="userId", api_keys=API_KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server, \
            sync_context(settings(database_url, server.url, iterable={"project_type": "userId"})) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id="u1", email="u1@x.com", at=1),
                     audience_event("vip", inside=True, user_id="u2", at=1),
                     audience_event("vip", inside=True, email="nouid@x.com", at=1)])
        report = sync.run_once(ctx)
        assert report.exit_code == 1 and report.failed == 1, report.summary()
        (sub,) = bodies(emu, "lists/subscribe")
        assert sorted(sub["subscribers"], key=str) == sorted(
            [{"userId": "u1", "email": "u1@x.com", "preferUserId": True},
             {"userId": "u2", "preferUserId": True}], key=str)
        stuck = member_rows(ctx, "vip")["nouid@x.com"]
        assert (stuck["state"], stuck["synced"], stuck["last_error"]) == ("failed", None, identity.MISSING_USER_ID)
        assert_agrees(ctx, emu, "vip", {("u1@x.com", "u1"), (None, "u2")}, failed=1)

        ingest(ctx, [audience_event("vip", inside=False, user_id="u1", email="u1@x.com", at=5)])
        seen = len(emu.requests)
        assert sync.run_once(ctx).failed == 0
        (unsub,) = bodies(emu, "lists/unsubscribe", since=seen)
        assert unsub["subscribers"] == [{"userId": "u1"}]
        assert bodies(emu, "lists/subscribe", since=seen) == []  # the failed member is not resent
        assert_agrees(ctx, emu, "vip", {(None, "u2")}, failed=1)


# --- 3. outcomes ----------------------------------------------------------------------------------


def test_invalid_and_not_found_members_fail_visibly_the_rest_sync(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    emu.invalid_emails.add("u1@x.com")
    emu.add_user(email="u5@x.com", user_id="u5")
    audiences = {"existing_only": {"update_existing_users_only": True}}
    with sync_context(settings(database_url, url, audiences=audiences)) as ctx:
        ingest(ctx, enters("vip", range(3)) + enters("existing_only", [5, 6]))
        report = sync.run_once(ctx)
        assert (report.exit_code, report.failed, report.subscribed) == (1, 2, 3), report.summary()

        invalid = member_rows(ctx, "vip")["u1"]
        assert (invalid["state"], invalid["synced"]) == ("failed", None)
        assert invalid["last_error"].startswith("invalid")
        unknown = member_rows(ctx, "existing_only")["u6"]
        assert unknown["state"] == "failed"
        assert unknown["last_error"].startswith("not_found") and "update_existing_users_only" in unknown["last_error"]
        assert emu.user_by_user_id("u6") is None
        assert_agrees(ctx, emu, "vip", people([0, 2]), failed=1)
        assert_agrees(ctx, emu, "existing_only", people([5]), failed=1)

        ledger = view_rows(ctx, "SELECT * FROM api_requests WHERE endpoint = 'lists/subscribe'")
        assert sorted((r["status"], r["http_status"], r["item_count"], r["fail_count"]) for r in ledger) == [
            ("partial", 200, 2, 1), ("partial", 200, 3, 1)]
        items = view_rows(ctx, "SELECT outcome, error FROM api_request_items ORDER BY membership_id")
        assert sorted(i["outcome"] for i in items) == ["invalid", "not_found"]  # the rest: the request's ok
        assert all(i["error"] for i in items if i["outcome"] != "ok")

        seen = len(emu.requests)
        assert sync.run_once(ctx).requests == 0 and emu.requests[seen:] == []  # failures are not resent
        # leaving and entering again gives a failed member a fresh chance
        emu.invalid_emails.clear()
        ingest(ctx, exits("vip", [1], at=5) + enters("vip", [1], at=6))
        assert sync.run_once(ctx).exit_code == 0
        assert_agrees(ctx, emu, "vip", people(range(3)))


def test_transient_errors_retry_on_later_runs_and_end_synced(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    config = {"iterable": {"max_attempts": 2}, "sync": {"retry_base_seconds": 0.5, "retry_max_seconds": 5}}
    with sync_context(settings(database_url, url, **config)) as ctx:
        ingest(ctx, enters("vip", range(5)))
        emu.add_fault(FaultRule("lists/subscribe", "status", count=2, status=503))  # both client attempts
        report = sync.run_once(ctx)
        assert (report.exit_code, report.retrying) == (1, 5), report.summary()
        assert emu.list_members(the_list(emu, "vip")) == set()
        waiting = member_rows(ctx, "vip")
        assert {(r["state"], r["attempts"]) for r in waiting.values()} == {("pending", 1)}
        assert all("503" in r["last_error"] and r["next_attempt_at"] is not None for r in waiting.values())

        seen = len(emu.requests)
        assert sync.run_once(ctx).requests == 0 and emu.requests[seen:] == []  # not due yet
        time.sleep(0.6)
        report = sync.run_once(ctx)
        assert report.exit_code == 0, report.summary()
        assert {(r["state"], r["attempts"], r["last_error"]) for r in member_rows(ctx, "vip").values()} == {
            ("synced", 0, None)}
        ledger = view_rows(ctx, "SELECT * FROM api_requests WHERE endpoint = 'lists/subscribe' ORDER BY id")
        assert [(r["status"], r["http_status"], r["item_count"]) for r in ledger] == [
            ("failed", 503, 5), ("ok", 200, 5)]
        assert_agrees(ctx, emu, "vip", people(range(5)))


# --- 4. the mass-unsubscribe guard ----------------------------------------------------------------


def test_mass_unsubscribe_is_held_until_released(
    database_url: str, emulator: tuple[IterableEmulator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emu, url = emulator
    data = config_data(database_url, url, sync={"max_unsubscribe_fraction": 0.5})
    config = write_config(tmp_path / "listsync.toml", data)
    with sync_context(Settings(**data)) as ctx:
        ingest(ctx, enters("vip", range(20)) + enters("calm", range(12)))
        assert run_cli(capsys, config, "sync")[0] == 0
        vip, seen = the_list(emu, "vip"), len(emu.requests)

        ingest(ctx, exits("vip", range(15)) + enters("vip", [20, 21], at=2)
               + exits("calm", range(3)) + enters("calm", [12], at=2))
        code, out, _ = run_cli(capsys, config, "sync")
        assert code == 1, out
        assert "held: vip" in out
        assert bodies(emu, "lists/subscribe", vip, since=seen) == []  # nothing of the held audience
        assert bodies(emu, "lists/unsubscribe", vip, since=seen) == []
        assert emu.list_members(vip) == people(range(20))
        assert_agrees(ctx, emu, "calm", people(range(3, 13)))  # a calm audience is not held
        reason = audience_row(ctx, "vip")["hold_reason"]
        assert "15 of 20" in reason and "max_unsubscribe_fraction" in reason and "--allow-mass-unsubscribe" in reason
        assert audience_row(ctx, "calm")["hold_reason"] is None
        code, out, _ = run_cli(capsys, config, "status")
        assert "mass unsubscribe held" in next(line for line in out.splitlines() if line.startswith("vip"))
        code, out, _ = run_cli(capsys, config, "plan", "--json")
        plan = {row["audience_key"]: row for row in json.loads(out)["audiences"]}
        assert (plan["vip"]["subscribe"], plan["vip"]["unsubscribe"]) == (2, 15)
        assert plan["vip"]["note"].startswith("mass unsubscribe held")
        code, out, _ = run_cli(capsys, config, "sync")  # still held without the flag
        assert code == 1 and bodies(emu, "lists/unsubscribe", vip, since=seen) == []

        code, out, _ = run_cli(capsys, config, "sync", "--allow-mass-unsubscribe")
        assert code == 0, out
        assert audience_row(ctx, "vip")["hold_reason"] is None
        assert_agrees(ctx, emu, "vip", people([15, 16, 17, 18, 19, 20, 21]))
        assert run_cli(capsys, config, "sync")[0] == 0


# --- 5. email change (hybrid) ---------------------------------------------------------------------


def test_email_change_moves_the_subscriber_without_changing_the_list_size(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    with sync_context(settings(database_url, url)) as ctx:
        ingest(ctx, enters("vip", [1, 2]))
        assert sync.run_once(ctx).exit_code == 0
        before = audience_row(ctx, "vip")
        stamp = (BASE_TIME.replace(hour=1)).isoformat().replace("+00:00", "Z")
        ingest(ctx, [{"type": "identify", "messageId": "plain-identify-1", "timestamp": stamp,
                      "userId": "u1", "traits": {"email": "new-u1@x.com", "plan": "gold"}}])
        seen = len(emu.requests)
        report = sync.run_once(ctx)
        assert report.exit_code == 0, report.summary()
        (sub,) = bodies(emu, "lists/subscribe", since=seen)
        assert sub["subscribers"] == [{"email": "new-u1@x.com", "userId": "u1"}]
        assert bodies(emu, "lists/unsubscribe", since=seen) == []
        list_id = the_list(emu, "vip")
        assert "u1@x.com" not in emu.list_member_emails(list_id)
        assert_agrees(ctx, emu, "vip", {("new-u1@x.com", "u1"), ("u2@x.com", "u2")})
        after = audience_row(ctx, "vip")
        assert (after["members"], after["synced_members"]) == (before["members"], before["synced_members"]) == (2, 2)
        assert member_rows(ctx, "vip")["u1"]["email"] == "new-u1@x.com"

        # the user leaves later under the new email: the right subscriber goes
        ingest(ctx, [audience_event("vip", inside=False, user_id="u1", email="new-u1@x.com", at=7200)])
        assert sync.run_once(ctx).exit_code == 0
        assert_agrees(ctx, emu, "vip", {("u2@x.com", "u2")})


# --- 7. reconcile ---------------------------------------------------------------------------------


def test_reconcile_repairs_drift_in_both_directions(
    database_url: str, emulator: tuple[IterableEmulator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emu, url = emulator
    data = config_data(database_url, url)
    config = write_config(tmp_path / "listsync.toml", data)
    with sync_context(Settings(**data)) as ctx:
        ingest(ctx, enters("vip", range(6)))
        assert run_cli(capsys, config, "sync")[0] == 0
        ingest(ctx, exits("vip", [5]))
        assert run_cli(capsys, config, "sync")[0] == 0
        list_id = the_list(emu, "vip")
        # drift behind listsync's back
        emu.add_list_member(list_id, email="stranger@x.com")
        emu.add_list_member(list_id, email="u5@x.com", user_id="u5")  # a member who exited
        assert emu.remove_list_member(list_id, email="u0@x.com")  # a member who should be in
        assert run_cli(capsys, config, "sync")[0] == 0  # a plain sync trusts its state: no repair
        assert ("stranger@x.com", None) in emu.list_members(list_id)

        code, out, _ = run_cli(capsys, config, "sync", "--reconcile")
        assert code == 0, out
        # the reconcile table: audience, missing_resent, extra_unsubscribed, unknown_to_listsync, adopted
        assert _reconciled_row(out, "vip") == ["1", "2", "1", "0"], out
        assert_agrees(ctx, emu, "vip", people(range(5)))
        seen = len(emu.requests)
        code, out, _ = run_cli(capsys, config, "sync", "--reconcile")
        assert code == 0 and _reconciled_row(out, "vip")[:2] == ["0", "0"], out
        assert bodies(emu, "lists/subscribe", since=seen) == bodies(emu, "lists/unsubscribe", since=seen) == []
        assert_agrees(ctx, emu, "vip", people(range(5)))


def _reconciled_row(out: str, key: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index("reconciled (read back from Iterable):")
    return next(line.split()[1:] for line in lines[start + 2 :] if line.split()[0] == key)


def test_member_whose_email_becomes_known_later_stays_one_member(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    with sync_context(settings(database_url, url)) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id="u1", at=1)])
        assert sync.run_once(ctx).exit_code == 0
        ingest(ctx, [audience_event("vip", inside=True, user_id="u1", email="u1@x.com", at=2)])
        assert sync.run_once(ctx).exit_code == 0
        ingest(ctx, [audience_event("vip", inside=False, user_id="u1", email="u1@x.com", at=3)])
        assert sync.run_once(ctx).exit_code == 0
        sync.run_once(ctx, context.RunOptions(reconcile=True))
        assert_agrees(ctx, emu, "vip", set())
