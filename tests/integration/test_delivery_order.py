"""Per-event delivery order rules that only show across batches and pages: a user's earlier bulk
row of one endpoint is sent and answered before a later row of the user joins another batch of
that endpoint (updateOnly or not), and the email a pass has just moved a userId to outranks the
email recorded for it so far (SQLite and PostgreSQL, the emulator over HTTP)."""

from __future__ import annotations

from typing import Any

from listsync import sync
from listsync.events import delivery
from tests.emulator import EmulatorServer, IterableEmulator
from tests.helpers import API_KEY, ingest, make_settings, sync_context

T0 = "2026-02-01T10:00:00Z"


def _identify(message_id: str, user_id: str, traits: dict[str, Any], at: str = T0) -> dict[str, Any]:
    return {"type": "identify", "messageId": message_id, "userId": user_id, "timestamp": at, "traits": traits}


def _emulator(project_type: str) -> IterableEmulator:
    emu = IterableEmulator(project_type=project_type, api_keys=API_KEY)
    emu.disable_rate_limits()
    return emu


def _run(settings: Any, events: list[dict[str, Any]]) -> None:
    with sync_context(settings) as ctx:
        ingest(ctx, events)
        report = sync.run_once(ctx)
        assert report.exit_code == 0, report.summary()


def test_a_users_plain_bulk_update_is_answered_before_their_update_only_batch(database_url: str) -> None:
    """u2's updateOnly row opens that batch first; u1's plain row, then u1's updateOnly row. Without
    the rule the updateOnly batch (opened first) would be sent first, carrying u1's later update
    ahead of its earlier one."""
    emu = _emulator("hybrid")
    mappings = [
        {"name": "Existing only", "trigger": 'type = "identify" and traits.existing = true',
         "action": "upsert_user", "fields": {"updateOnly": True}},
        {"name": "Everyone else", "trigger": 'type = "identify" and traits.existing != true', "action": "upsert_user"},
    ]
    with EmulatorServer(emu) as server:
        settings = make_settings(database_url, server.url, actions={"presets": False, "mappings": mappings})
        _run(settings, [
            _identify("m1", "u2", {"email": "b@x.com", "existing": True}),
            _identify("m2", "u1", {"email": "a@x.com", "plan": "free"}),
            _identify("m3", "u1", {"email": "a@x.com", "existing": True, "plan": "pro"}, at="2026-02-01T11:00:00Z"),
        ])
    calls = [(r.body.get("updateOnly", False), [u["userId"] for u in r.body["users"]])
             for r in emu.requests_to("users/bulkUpdate")]
    assert calls == [(False, ["u1"]), (True, ["u2", "u1"])]
    user = emu.user_by_user_id("u1")
    assert user is not None and user.data_fields["plan"] == "pro"


def test_a_pass_own_email_move_outranks_the_recorded_email(database_url: str) -> None:
    """Email-based project: u1 was delivered with a@x.com. This pass moves u1 to b@x.com
    (users/updateEmail) while that row's bulk call is still unrecorded, and a page later u1 comes
    with c@x.com: the move starts from b@x.com, what Iterable now holds, not the recorded a@x.com
    (which would leave the profile at b@x.com and make a second one at c@x.com)."""
    emu = _emulator("email")
    with EmulatorServer(emu) as server:
        settings = make_settings(database_url, server.url, iterable={"project_type": "email"})
        _run(settings, [_identify("m1", "u1", {"email": "a@x.com"})])
        # m2 and the fillers fill the first page (and one full bulk call); m3 is on the next page.
        fillers = [_identify(f"f{i}", f"v{i}", {"email": f"v{i}@x.com"}) for i in range(delivery.PAGE_SIZE - 1)]
        _run(settings, [
            _identify("m2", "u1", {"email": "b@x.com"}, at="2026-02-01T11:00:00Z"),
            *fillers,
            _identify("m3", "u1", {"email": "c@x.com"}, at="2026-02-01T12:00:00Z"),
        ])
    moves = [r.body for r in emu.requests_to("users/updateEmail") if r.status == 200]
    assert moves == [{"currentEmail": "a@x.com", "newEmail": "b@x.com"},
                     {"currentEmail": "b@x.com", "newEmail": "c@x.com"}]
    profiles = [(u.email, u.user_id) for u in emu.users() if u.user_id == "u1" or u.email in ("a@x.com", "b@x.com")]
    assert profiles == [("c@x.com", "u1")]
