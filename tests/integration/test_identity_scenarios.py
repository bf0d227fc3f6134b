"""Issue 12: identity exactly as Iterable defines it, per project type, on SQLite and PostgreSQL.

After every sync the emulator's list must equal the desired membership as Iterable identifies
profiles in that project type (by userId in hybrid and userId projects, by email in email
projects), and `member_status` must agree with it.
"""

from __future__ import annotations

from typing import Any

from listsync import context, sync
from listsync.config import Settings
from tests.emulator import IterableEmulator
from tests.helpers import audience_event, ingest, sync_context
from tests.integration.test_cli import (
    _restore_logging,  # noqa: F401  (autouse fixture)
    config_data,
    view_rows,
)


def settings(database_url: str, url: str, project_type: str, **sections: Any) -> Settings:
    iterable = {"project_type": project_type, **sections.pop("iterable", {})}
    return Settings(**config_data(database_url, url, iterable=iterable, **sections))


def run(ctx: context.SyncContext) -> context.RunReport:
    report = sync.run_once(ctx)
    assert report.exit_code == 0, report.summary()
    return report


def listed_user_ids(emu: IterableEmulator, key: str) -> set[str | None]:
    (list_id,) = emu.lists_named(key)
    return {user_id for _, user_id in emu.list_members(list_id)}


def members(ctx: context.SyncContext, key: str) -> list[dict[str, Any]]:
    rows = view_rows(ctx, "SELECT * FROM member_status ORDER BY user_id, email")
    return [r for r in rows if r["audience_key"] == key]


def test_leaver_after_email_change_leaves_the_list_hybrid(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    """The headline bug: enter with one email, identify with a new one, exit: l5 must be gone."""
    emu, url = emulator
    with sync_context(settings(database_url, url, "hybrid")) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id="l5", email="l5@example.com", at=1)])
        run(ctx)
        ingest(ctx, [audience_event("vip", inside=True, user_id="l5", email="l5-new@example.com", at=2)])
        run(ctx)
        ingest(ctx, [audience_event("vip", inside=False, user_id="l5", email="l5-new@example.com", at=3)])
        run(ctx)
        assert listed_user_ids(emu, "vip") == set()
        rows = members(ctx, "vip")
        assert [(r["user_id"], r["desired"], r["synced"]) for r in rows] == [("l5", "out", "out")], rows


# --- every project type: the list equals the desired membership as Iterable identifies profiles --


def profile_key(project_type: str, user_id: str | None, email: str | None) -> str | None:
    """What names a profile: the email in email projects, the userId in userId projects, the
    userId (else the email) in hybrid projects."""
    if project_type == "email":
        return email
    if project_type == "userId":
        return user_id
    return user_id or email


def check(ctx: context.SyncContext, emu: IterableEmulator, key: str, want: set[str], failed: int = 0) -> None:
    """The emulator's list holds exactly the profiles `want`, and member_status agrees."""
    kind = emu.project_type
    (list_id,) = emu.lists_named(key)
    listed = {profile_key(kind, user_id, email) for email, user_id in emu.list_members(list_id)}
    assert listed == want, (listed, want)
    rows = members(ctx, key)
    synced_in = {profile_key(kind, r["user_id"], r["email"]) for r in rows if r["synced"] == "in"}
    desired_in = {profile_key(kind, r["user_id"], r["email"]) for r in rows if r["desired"] == "in"}
    assert synced_in == want, rows
    assert len(desired_in) == len(want) + failed, rows
    assert [r for r in rows if r["state"] == "pending"] == [], rows
    assert len([r for r in rows if r["state"] == "failed"]) == failed, rows


def per_type(emu: IterableEmulator, email: set[str], hybrid: set[str], user_id: set[str]) -> set[str]:
    return {"email": email, "hybrid": hybrid, "userId": user_id}[emu.project_type]


def enter(user_id: str | None, email: str | None, at: float, **extra: Any) -> dict[str, Any]:
    return audience_event("vip", inside=True, user_id=user_id, email=email, at=at, **extra)


def leave(user_id: str | None, email: str | None, at: float, **extra: Any) -> dict[str, Any]:
    return audience_event("vip", inside=False, user_id=user_id, email=email, at=at, **extra)


def plain_identify(user_id: str, email: str, at: float) -> dict[str, Any]:
    event = audience_event("vip", inside=None, user_id=user_id, email=email, at=at)
    del event["context"]
    return event


def test_enter_exit_re_enter(database_url: str, project: tuple[IterableEmulator, str]) -> None:
    emu, url = project
    with sync_context(settings(database_url, url, emu.project_type)) as ctx:
        ingest(ctx, [enter("u1", "u1@x.com", 1), enter("u2", "u2@x.com", 1)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"u1@x.com", "u2@x.com"}, {"u1", "u2"}, {"u1", "u2"}))
        ingest(ctx, [leave("u1", "u1@x.com", 2)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"u2@x.com"}, {"u2"}, {"u2"}))
        ingest(ctx, [enter("u1", "u1@x.com", 3)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"u1@x.com", "u2@x.com"}, {"u1", "u2"}, {"u1", "u2"}))
        unsubscribed = [s for r in emu.requests_to("lists/unsubscribe") for s in r.body["subscribers"]]
        assert unsubscribed == [{"email": "u1@x.com"} if emu.project_type == "email" else {"userId": "u1"}]


def test_email_change_by_identify_while_in_then_exit(
    database_url: str, project: tuple[IterableEmulator, str]
) -> None:
    """A plain identify gives u1 a new email while u1 is in the audience, then u1 leaves."""
    emu, url = project
    with sync_context(settings(database_url, url, emu.project_type)) as ctx:
        ingest(ctx, [enter("u1", "old@x.com", 1), enter("u2", "u2@x.com", 1)])
        run(ctx)
        ingest(ctx, [plain_identify("u1", "new@x.com", 2)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"new@x.com", "u2@x.com"}, {"u1", "u2"}, {"u1", "u2"}))
        ingest(ctx, [leave("u1", "new@x.com", 3)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"u2@x.com"}, {"u2"}, {"u2"}))
        assert emu.user_by_user_id("u1") is not None
        assert emu.user_by_user_id("u1").email == "new@x.com"  # type: ignore[union-attr]


def test_email_change_by_audience_event_while_in_then_exit(
    database_url: str, project: tuple[IterableEmulator, str]
) -> None:
    """The headline scenario for every type. In an email project the new email is another profile
    (Engage sends one event per email); in the others the userId names the one profile."""
    emu, url = project
    with sync_context(settings(database_url, url, emu.project_type)) as ctx:
        ingest(ctx, [enter("u1", "old@x.com", 1)])
        run(ctx)
        ingest(ctx, [enter("u1", "new@x.com", 2)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"old@x.com", "new@x.com"}, {"u1"}, {"u1"}))
        ingest(ctx, [leave("u1", "new@x.com", 3)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"old@x.com"}, set(), set()))
        assert len(members(ctx, "vip")) == (2 if emu.project_type == "email" else 1)


def test_second_email_for_the_same_person(database_url: str, project: tuple[IterableEmulator, str]) -> None:
    emu, url = project
    with sync_context(settings(database_url, url, emu.project_type)) as ctx:
        ingest(ctx, [enter("u1", "a@x.com", 1), enter("u1", "b@x.com", 1)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"a@x.com", "b@x.com"}, {"u1"}, {"u1"}))
        ingest(ctx, [leave("u1", "b@x.com", 2)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"a@x.com"}, set(), set()))
        ingest(ctx, [leave("u1", "a@x.com", 3)])
        run(ctx)
        check(ctx, emu, "vip", set())


def test_email_only_member_later_identified_with_a_user_id(
    database_url: str, project: tuple[IterableEmulator, str]
) -> None:
    emu, url = project
    user_id_project = emu.project_type == "userId"
    with sync_context(settings(database_url, url, emu.project_type)) as ctx:
        ingest(ctx, [enter(None, "e@x.com", 1)])
        report = sync.run_once(ctx)
        assert report.exit_code == (1 if user_id_project else 0), report.summary()
        check(ctx, emu, "vip", per_type(emu, {"e@x.com"}, {"e@x.com"}, set()), failed=int(user_id_project))
        ingest(ctx, [enter("u1", "e@x.com", 2)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"e@x.com"}, {"u1"}, {"u1"}))
        assert len(members(ctx, "vip")) == 1
        ingest(ctx, [leave("u1", "e@x.com", 3)])
        run(ctx)
        check(ctx, emu, "vip", set())


def test_events_out_of_order_and_replayed(database_url: str, project: tuple[IterableEmulator, str]) -> None:
    emu, url = project
    with sync_context(settings(database_url, url, emu.project_type)) as ctx:
        exit_5 = leave("u1", "u1@x.com", 5, message_id="exit-5")
        enter_3 = enter("u1", "u1@x.com", 3, message_id="enter-3")
        ingest(ctx, [exit_5, enter_3, enter("u2", "u2@x.com", 1)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"u2@x.com"}, {"u2"}, {"u2"}))
        ingest(ctx, [enter_3, exit_5])  # replays change nothing
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"u2@x.com"}, {"u2"}, {"u2"}))
        # a newer enter, then an older exit and a replay of it, in one batch
        ingest(ctx, [enter("u1", "u1@x.com", 7, message_id="enter-7"), leave("u1", "u1@x.com", 6), exit_5])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"u1@x.com", "u2@x.com"}, {"u1", "u2"}, {"u1", "u2"}))
        # an older event with another email neither leaves nor moves the profile (userId types)
        ingest(ctx, [enter("u2", "old-u2@x.com", 0.5), leave("u2", "old-u2@x.com", 0.7)])
        run(ctx)
        check(ctx, emu, "vip", per_type(emu, {"u1@x.com", "u2@x.com"}, {"u1", "u2"}, {"u1", "u2"}))
        if emu.project_type != "email":
            assert {r["email"] for r in members(ctx, "vip")} == {"u1@x.com", "u2@x.com"}


def test_rows_left_by_earlier_releases_for_one_user_id_are_merged(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    """Two memberships for one userId (what the headline bug left behind; here made by running as
    an email project) become one when the next event about that userId arrives, and the exit
    then removes the profile."""
    emu, url = emulator
    with sync_context(settings(database_url, url, "email")) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id="l5", email="l5@example.com", at=1)])
        run(ctx)
        ingest(ctx, [audience_event("vip", inside=True, user_id="l5", email="l5-new@example.com", at=2)])
        run(ctx)
        assert len(members(ctx, "vip")) == 2
    with sync_context(settings(database_url, url, "hybrid")) as ctx:
        ingest(ctx, [audience_event("vip", inside=False, user_id="l5", email="l5-new@example.com", at=3)])
        run(ctx)
        assert listed_user_ids(emu, "vip") == set()
        rows = members(ctx, "vip")
        assert [(r["user_id"], r["email"], r["desired"], r["synced"]) for r in rows] == [
            ("l5", "l5-new@example.com", "out", "out")], rows
        (unsub,) = emu.requests_to("lists/unsubscribe")
        assert unsub.body["subscribers"] == [{"userId": "l5"}]
