"""Issue 12, per-event actions: a profile's email change per project type, and the Segment
(Actions) behaviours, asserted on the request bodies the emulator received (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest

from listsync import context, sync
from listsync.db import views
from tests.emulator import EmulatorServer, IterableEmulator
from tests.helpers import API_KEY, audience_event, ingest, make_settings, sync_context

T0 = "2026-02-01T10:00:00Z"


def for_project(emu: IterableEmulator, database_url: str, url: str, **sections: Any) -> Any:
    return make_settings(database_url, url, iterable={"project_type": emu.project_type}, **sections)


def identify(message_id: str, user_id: str | None, traits: dict[str, Any], at: str = T0) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "identify", "messageId": message_id, "timestamp": at, "traits": traits}
    if user_id is None:
        event["anonymousId"] = "anon-1"
    else:
        event["userId"] = user_id
    return event


def bodies(emu: IterableEmulator, endpoint: str) -> list[Any]:
    return [r.body for r in emu.requests_to(endpoint) if r.status == 200]


def users_sent(emu: IterableEmulator) -> list[dict[str, Any]]:
    return [u for b in bodies(emu, "users/bulkUpdate") for u in b["users"]] + bodies(emu, "users/update")


def states(ctx: context.SyncContext) -> list[str]:
    with ctx.factory() as session:
        return [row["state"] for row in views.event_status(session)]


def run(ctx: context.SyncContext) -> None:
    report = sync.run_once(ctx)
    assert report.exit_code == 0, report.summary()


@pytest.mark.parametrize("batching", [True, False])
def test_email_change_of_a_known_user_per_project_type(
    database_url: str, project: tuple[IterableEmulator, str], batching: bool
) -> None:
    """Email-based: users/updateEmail by currentEmail alone (not both), then the update lands on the
    renamed profile. Hybrid and userId: no updateEmail; the update by userId carries the new email."""
    emu, url = project
    with sync_context(for_project(emu, database_url, url, actions={"batching": batching})) as ctx:
        ingest(ctx, [identify("m1", "u1", {"email": "a@x.com", "plan": "free"})])
        run(ctx)
        ingest(ctx, [identify("m2", "u1", {"email": "b@x.com", "plan": "pro"}, at="2026-02-01T11:00:00Z")])
        run(ctx)
        assert states(ctx) == ["delivered", "delivered"]
    if emu.project_type == "email":
        assert bodies(emu, "users/updateEmail") == [{"currentEmail": "a@x.com", "newEmail": "b@x.com"}]
    else:
        assert bodies(emu, "users/updateEmail") == []
    assert [(u["email"], u["userId"]) for u in users_sent(emu)] == [("a@x.com", "u1"), ("b@x.com", "u1")]
    (user,) = emu.users()  # one profile, renamed: no profile is left behind under the old address
    assert (user.email, user.user_id, user.data_fields["plan"]) == ("b@x.com", "u1", "pro")


@pytest.mark.parametrize("batching", [True, False])
def test_explicit_new_email_per_project_type(
    database_url: str, project: tuple[IterableEmulator, str], batching: bool
) -> None:
    emu, url = project
    emu.add_user(email="a@x.com", user_id="u1")
    mapping = {"name": "Identify Calls", "fields": {"newEmail": {"@path": "$.traits.new_email"}}}
    settings = for_project(emu, database_url, url, actions={"batching": batching, "mappings": [mapping]})
    with sync_context(settings) as ctx:
        ingest(ctx, [identify("m1", "u1", {"email": "a@x.com", "new_email": "b@x.com"})])
        run(ctx)
        assert states(ctx) == ["delivered"]
    if emu.project_type == "email":
        assert bodies(emu, "users/updateEmail") == [{"currentEmail": "a@x.com", "newEmail": "b@x.com"}]
    else:
        assert bodies(emu, "users/updateEmail") == []
    assert [(u["email"], u["userId"]) for u in users_sent(emu)] == [("b@x.com", "u1")]
    (user,) = emu.users()
    assert (user.email, user.user_id) == ("b@x.com", "u1")


def test_upsert_user_passes_phone_number_null_and_null_traits(database_url: str) -> None:
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server, sync_context(make_settings(database_url, server.url)) as ctx:
        ingest(ctx, [identify("m1", "u1", {"email": "a@x.com", "phone": "+14155550100", "plan": "pro"})])
        run(ctx)
        ingest(ctx, [identify("m2", "u1", {"email": "a@x.com", "phone": None, "plan": None},
                              at="2026-02-01T11:00:00Z")])
        run(ctx)
        ingest(ctx, [identify("m3", "u1", {"email": "a@x.com"}, at="2026-02-01T12:00:00Z")])
        run(ctx)
    first, second, third = users_sent(emu)
    assert first["dataFields"]["phoneNumber"] == "+14155550100"
    assert second["dataFields"] == {"email": "a@x.com", "phone": None, "plan": None, "phoneNumber": None}
    assert third["dataFields"] == {"email": "a@x.com"}  # no phone trait: no phoneNumber key at all
    user = emu.user_by_user_id("u1")
    assert user is not None and user.data_fields["phoneNumber"] is None and user.data_fields["plan"] is None


def test_update_only_is_sent_on_bulk_update(database_url: str) -> None:
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    existing = {"name": "Existing only", "trigger": 'type = "identify" and traits.existing = true',
                "action": "upsert_user", "fields": {"updateOnly": True}}
    settings = make_settings(database_url, "", actions={"mappings": [existing], "presets": False})
    with EmulatorServer(emu) as server, \
            sync_context(settings.model_copy(update={"iterable": settings.iterable.model_copy(
                update={"base_url": server.url})})) as ctx:
        ingest(ctx, [identify("m1", "u1", {"email": "a@x.com", "existing": True})])
        run(ctx)
    assert bodies(emu, "users/bulkUpdate") == [
        {"updateOnly": True, "users": [{"email": "a@x.com", "userId": "u1", "mergeNestedObjects": False,
                                        "dataFields": {"email": "a@x.com", "existing": True}}]}]


def test_batching_is_on_by_default_with_per_event_outcomes(database_url: str) -> None:
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    emu.invalid_emails.add("bad@x.com")
    with EmulatorServer(emu) as server, sync_context(make_settings(database_url, server.url)) as ctx:
        ingest(ctx, [identify("m1", "u1", {"email": "a@x.com"}), identify("m2", "u2", {"email": "bad@x.com"}),
                     {"type": "track", "messageId": "t1", "timestamp": T0, "userId": "u1", "event": "Clicked"}])
        report = sync.run_once(ctx)
        assert report.events_delivered == 2 and report.events_failed == 1, report.summary()
        assert states(ctx) == ["delivered", "failed", "delivered"]
    assert len(bodies(emu, "users/bulkUpdate")) == 1 and len(bodies(emu, "events/trackBulk")) == 1
    assert emu.requests_to("users/update") == [] and emu.requests_to("events/track") == []


def test_subscribe_data_fields_carry_iterable_dates(database_url: str) -> None:
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    settings = make_settings(database_url, "", audience_defaults={"data_fields": ["since", "day"]})
    with EmulatorServer(emu) as server, \
            sync_context(settings.model_copy(update={"iterable": settings.iterable.model_copy(
                update={"base_url": server.url})})) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id="u1", email="a@x.com",
                                    traits={"since": "2026-01-05T10:00:00+02:00", "day": "2026-01-05"})])
        run(ctx)
    (sub,) = bodies(emu, "lists/subscribe")
    assert sub["subscribers"][0]["dataFields"] == {"since": "2026-01-05 08:00:00 +00:00", "day": "2026-01-05"}
