"""Per-event actions end to end: inbox -> event_deliveries -> the Iterable emulator over HTTP, on
SQLite and PostgreSQL. Request bodies are asserted exactly as the emulator received them."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import text

from listsync import context, sync
from listsync.db import session as dbs
from listsync.db import views
from listsync.events import delivery
from listsync.ingest import accept
from listsync.iterable.client import EU_BASE_URL, base_url_for, client_from_settings
from tests.emulator import FaultRule, IterableEmulator, make_mock_transport
from tests.helpers import API_KEY, audience_event, ingest, make_settings, sync_context

T0 = "2026-02-01T10:00:00Z"
T0_S = 1769940000


def _status(ctx: context.SyncContext) -> list[dict[str, Any]]:
    with ctx.factory() as session:
        return views.event_status(session)


def _bodies(emu: IterableEmulator, endpoint: str) -> list[Any]:
    return [r.body for r in emu.requests_to(endpoint) if r.status == 200]


def _event(kind: str, message_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "messageId": message_id, "timestamp": T0, **fields}


def test_presets_send_exact_bodies(database_url: str, emulator: tuple[IterableEmulator, str]) -> None:
    emu, url = emulator
    with sync_context(make_settings(database_url, url, actions={"batching": False})) as ctx:
        ingest(ctx, [
            _event("identify", "m1", userId="u1", traits={"email": "A@x.com", "phone": "+14155550100",
                                                          "born": "1990-01-02T03:04:05+02:00", "day": "2020-05-06"},
                   integrations={"Iterable": {"mergeNestedObjects": True}}),
            _event("track", "m2", userId="u1", event="Clicked",
                   properties={"email": "a@x.com", "campaignId": 11, "templateId": "22", "at": "2026-01-01T00:00:00Z"}),
            _event("track", "m3", userId="u1", event="Order Completed", context={"traits": {"email": "a@x.com"}},
                   properties={"order_id": "o1", "total": 30.5, "products": [
                       {"product_id": "p1", "name": "Uno", "price": 3, "quantity": 2, "category": "games",
                        "image_url": "http://img", "color": "red"}]}),
            _event("track", "m4", userId="u1", event="Cart Updated",
                   properties={"products": [{"product_id": 9, "name": "Dice", "price": 1.25, "quantity": 4}]}),
            _event("identify", "m5", userId="u1", traits={"email": "b@x.com"}),
        ])
        report = sync.run_once(ctx)
        assert report.exit_code == 0, report.summary()
        assert report.events_delivered == 5
    assert _bodies(emu, "users/update") == [
        {"email": "a@x.com", "userId": "u1", "mergeNestedObjects": True,
         "dataFields": {"email": "A@x.com", "phone": "+14155550100", "born": "1990-01-02 01:04:05 +00:00",
                        "day": "2020-05-06", "phoneNumber": "+14155550100"}},
        {"email": "b@x.com", "userId": "u1", "mergeNestedObjects": False, "dataFields": {"email": "b@x.com"}},
    ]
    assert _bodies(emu, "events/track") == [
        {"email": "a@x.com", "userId": "u1", "eventName": "Clicked", "id": "m2", "createdAt": T0_S,
         "dataFields": {"email": "a@x.com", "campaignId": 11, "templateId": "22", "at": "2026-01-01 00:00:00 +00:00"},
         "campaignId": 11, "templateId": 22},
    ]
    assert _bodies(emu, "commerce/trackPurchase") == [
        {"id": "o1", "user": {"email": "a@x.com", "userId": "u1", "dataFields": {"email": "a@x.com"},
                              "mergeNestedObjects": False},
         "items": [{"id": "p1", "name": "Uno", "price": 3, "quantity": 2, "categories": ["games"],
                    "imageUrl": "http://img", "dataFields": {"color": "red"}}],
         "total": 30.5, "createdAt": T0_S, "dataFields": {"order_id": "o1", "total": 30.5}},
    ]
    assert _bodies(emu, "commerce/updateCart") == [
        {"user": {"userId": "u1", "dataFields": {}, "mergeNestedObjects": False},
         "items": [{"id": "9", "name": "Dice", "price": 1.25, "quantity": 4}]},
    ]
    # a known user's new email: in a hybrid project users/update by userId changes it
    assert _bodies(emu, "users/updateEmail") == []
    user = emu.user_by_user_id("u1")
    assert user is not None and user.email == "b@x.com" and user.data_fields["phoneNumber"] == "+14155550100"
    assert emu.events["m2"]["campaignId"] == 11 and emu.purchases["o1"]["total"] == 30.5
    assert [s["state"] for s in _status(ctx)] == ["delivered"] * 5


def test_eu_data_center_host() -> None:
    emu = IterableEmulator(api_keys=API_KEY)
    inner = make_mock_transport(emu)
    hosts: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return inner.handle_request(request)

    settings = make_settings("sqlite://", "", iterable={"data_center": "EU", "base_url": ""})
    assert base_url_for("EU") == EU_BASE_URL == "https://api.eu.iterable.com"
    with client_from_settings(settings.iterable, transport=httpx.MockTransport(handle)) as client:
        client.track_event({"eventName": "E", "userId": "u1", "id": "e1"})
    assert hosts == ["api.eu.iterable.com"] and "e1" in emu.events


def test_custom_mapping_through_the_receiver_path(database_url: str, emulator: tuple[IterableEmulator, str]) -> None:
    emu, url = emulator
    signed_up = {"name": "Signed Up", "trigger": 'type = "track" and event = "Signed Up"', "action": "upsert_user",
                 "fields": {"email": {"@path": "$.properties.email"},
                            "dataFields": {"plan": {"@path": "$.properties.plan"},
                                           "greeting": {"@template": "Hi {{properties.first}}"},
                                           "source": "signup"}}}
    settings = make_settings(database_url, url, actions={"presets": False, "mappings": [signed_up]})
    body = json.dumps({"batch": [
        {"type": "track", "event": "Signed Up", "userId": "u7", "messageId": "s1",
         "properties": {"email": "new@x.com", "plan": "pro", "first": "Ada"}},
        {"type": "track", "event": "Other", "userId": "u7", "messageId": "s2"},
    ]}).encode()
    with sync_context(settings) as ctx:
        with dbs.transaction(ctx.factory) as session:
            counts = accept.accept_body(session, body, path_type=None, source="receiver", now=datetime.now(UTC))
        assert counts.accepted == 2
        report = sync.run_once(ctx)
        assert report.exit_code == 0 and report.events_delivered == 1
        user = emu.user_by_email("new@x.com")
        assert user is not None and user.user_id == "u7"
        assert user.data_fields == {"plan": "pro", "greeting": "Hi Ada", "source": "signup"}
        assert [(s["event"], s["mapping"], s["state"]) for s in _status(ctx)] == [("s1", "Signed Up", "delivered")]


def test_refusals_and_unsendable_events_are_recorded(database_url: str, emulator: tuple[IterableEmulator, str]) -> None:
    emu, url = emulator
    emu.invalid_emails.add("bad@example.com")
    with sync_context(make_settings(database_url, url, actions={"batching": False})) as ctx:
        ingest(ctx, [
            _event("identify", "r1", userId="u1", traits={"email": "bad@example.com"}),
            _event("track", "r2", anonymousId="anon", event="Viewed"),
            _event("track", "r3", userId="u2", event="Order Completed", properties={"products": []}),
            _event("track", "r4", userId="u2", event="Viewed"),
        ])
        report = sync.run_once(ctx)
        assert report.exit_code == 1 and report.events_failed == 2 and report.events_delivered == 1
        rows = {s["event"]: s for s in _status(ctx)}
    assert rows["r1"]["state"] == "failed" and "InvalidEmailAddressError" in rows["r1"]["last_error"]
    assert rows["r2"]["state"] == "skipped" and rows["r2"]["last_error"].startswith("missing_identifier")
    assert rows["r3"]["state"] == "failed" and rows["r3"]["last_error"].startswith("missing_field: total")
    assert rows["r4"]["state"] == "delivered"


def test_refused_key_stops_and_keeps_events_pending(database_url: str, emulator: tuple[IterableEmulator, str]) -> None:
    emu, url = emulator
    with sync_context(make_settings(database_url, url, api_key="wrong-key")) as ctx:
        ingest(ctx, [_event("track", f"k{i}", userId=f"u{i}", event="E") for i in range(3)])
        report = sync.run_once(ctx)
        assert report.exit_code == 2 and report.fatal and "refused" in report.fatal
        assert {s["state"] for s in _status(ctx)} == {"pending"} and {s["attempts"] for s in _status(ctx)} == {0}
    with sync_context(make_settings(database_url, url)) as ctx:
        assert sync.run_once(ctx).exit_code == 0
        assert {s["state"] for s in _status(ctx)} == {"delivered"}
    assert set(emu.events) == {"k0", "k1", "k2"}


def test_a_retrying_event_holds_later_events_of_the_same_user(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    emu.add_fault(FaultRule(endpoint="events/track", kind="status", status=503, count=2))
    settings = make_settings(database_url, url, iterable={"max_attempts": 1}, actions={"batching": False})
    with sync_context(settings) as ctx:
        ingest(ctx, [_event("track", f"o{i}", userId="u1" if i % 2 == 0 else "u2", event=f"E{i}") for i in range(6)])
        first = delivery.deliver_pending(ctx)
        assert first.delivered == 6 and first.retrying == 0
        rows = {s["event"]: s for s in _status(ctx)}
    assert rows["o0"]["attempts"] == 1 and rows["o1"]["attempts"] == 1  # each user's first event failed once
    sent = [r.body["id"] for r in emu.requests_to("events/track") if r.status == 200]
    for user_events in (["o0", "o2", "o4"], ["o1", "o3", "o5"]):
        assert [e for e in sent if e in user_events] == user_events


def test_batching_and_per_item_failures(database_url: str, emulator: tuple[IterableEmulator, str]) -> None:
    emu, url = emulator
    emu.add_fault(FaultRule(endpoint="events/trackBulk", kind="partial", partial_fraction=0.25, count=1))
    settings = make_settings(database_url, url, actions={"batching": True})
    with sync_context(settings) as ctx:
        ingest(ctx, [_event("identify", f"b{i}", userId=f"u{i}", traits={"email": f"u{i}@x.com", "n": i})
                     for i in range(8)])
        ingest(ctx, [_event("track", f"t{i}", userId=f"u{i}", event="Bulk") for i in range(8)])
        report = sync.run_once(ctx)
        rows = _status(ctx)
    assert len(emu.requests_to("users/bulkUpdate")) == 1 and len(emu.requests_to("events/trackBulk")) == 1
    assert emu.requests_to("users/update") == [] and emu.requests_to("events/track") == []
    failed = [r for r in rows if r["state"] == "failed"]
    assert report.events_failed == len(failed) == 2 and report.events_delivered == 14
    assert all(r["action"] == "custom_event" and r["last_error"].startswith("invalid_data") for r in failed)
    assert len(emu.events) == 6 and emu.user_by_user_id("u3") is not None


def test_audience_events_reach_profiles_only_through_a_configured_mapping(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    events = [audience_event("vip", inside=True, user_id="u1", email="a@x.com", message_id="a1"),
              audience_event("vip", inside=True, user_id="u2", email="b@x.com", kind="track", message_id="a2")]
    with sync_context(make_settings(database_url, url)) as ctx:
        ingest(ctx, events)
        sync.run_once(ctx)
        assert _status(ctx) == []
    assert emu.requests_to("users/update") == [] and emu.requests_to("events/track") == []
    as_traits = {"name": "Audiences as traits", "action": "upsert_user",
                 "trigger": 'type = "identify" and context.personas.computation_class = "audience"'}
    as_events = {"name": "Audience events", "action": "custom_event", "trigger": 'event = "Audience Entered"'}
    settings = make_settings(database_url, url, actions={"mappings": [as_traits, as_events]})
    with sync_context(settings) as ctx:
        ingest(ctx, [{**e, "messageId": f"{e['messageId']}-again"} for e in events])
        sync.run_once(ctx)
    user = emu.user_by_user_id("u1")
    assert user is not None and user.data_fields["vip"] is True
    assert [e["eventName"] for e in emu.events.values()] == ["Audience Entered"]


def test_audience_events_no_mapping_takes_are_routed_unread_in_batches(
    database_url: str, emulator: tuple[IterableEmulator, str], monkeypatch: Any
) -> None:
    """With only the presets (none takes audience events) those events are marked routed in SQL,
    never read; small batches make every loop turn: the rest of the inbox is still routed, in id
    order."""
    from listsync.events import route

    monkeypatch.setattr(route, "AUDIENCE_BATCH", 3)
    monkeypatch.setattr(route, "ROUTE_BATCH", 2)
    read: list[str] = []
    read_unrouted = route.deliveries_db.unrouted

    def reading(*args: Any, **kwargs: Any) -> Any:
        rows = read_unrouted(*args, **kwargs)
        read.extend(row.message_id for row in rows)
        return rows

    monkeypatch.setattr(route.deliveries_db, "unrouted", reading)
    emu, url = emulator
    events: list[dict[str, Any]] = []
    for i in range(5):
        events += [audience_event("vip", inside=True, user_id=f"a{i}-{j}", message_id=f"a{i}-{j}") for j in range(2)]
        events.append(_event("identify", f"i{i}", userId=f"u{i}", traits={"email": f"u{i}@x.com"}))
    with sync_context(make_settings(database_url, url, actions={"batching": False})) as ctx:
        ingest(ctx, events)
        report = sync.run_once(ctx)
        assert report.exit_code == 0, report.summary()
        with ctx.factory() as session:
            unrouted = session.execute(text("SELECT count(*) FROM inbox WHERE routed_at IS NULL")).scalar_one()
            routed = session.execute(text("SELECT count(*) FROM inbox WHERE routed_at IS NOT NULL")).scalar_one()
        assert (unrouted, routed) == (0, 15)
        assert read == [f"i{i}" for i in range(5)]  # no audience event was read
        assert [row["event"] for row in _status(ctx)] == [f"i{i}" for i in range(5)]
    assert [body["userId"] for body in _bodies(emu, "users/update")] == [f"u{i}" for i in range(5)]


def _mixed_events(count: int, rng: random.Random) -> list[dict[str, Any]]:
    events = []
    for i in range(count):
        user = f"user{rng.randrange(400)}"
        roll = rng.random()
        base = {"messageId": f"mix-{i}", "userId": user, "timestamp": T0}
        if roll < 0.3:
            events.append({**base, "type": "identify", "traits": {"email": f"{user}@x.com", "n": i}})
        elif roll < 0.7:
            events.append({**base, "type": "track", "event": "Viewed", "properties": {"n": i}})
        elif roll < 0.85:
            events.append({**base, "type": "track", "event": "Order Completed", "properties": {
                "order_id": f"ord-{i}", "total": 5, "products": [{"product_id": "p", "name": "P", "price": 5, "quantity": 1}]}})
        else:
            events.append({**base, "type": "track", "event": "Cart Updated", "properties": {
                "products": [{"product_id": f"p{i}", "name": "P", "price": 1, "quantity": 1}]}})
    return events


def test_ten_thousand_mixed_events_with_faults_are_delivered_once(
    database_url: str, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, url = emulator
    # About one request in five fails: answered 5xx, dropped unanswered, or applied then dropped
    # (the case only a stable event id makes harmless).
    for kind, probability in (("status", 0.10), ("drop_after", 0.06), ("drop_before", 0.05)):
        emu.add_fault(FaultRule(kind=kind, probability=probability))  # type: ignore[arg-type]
    events = _mixed_events(10_000, random.Random(6))
    # The emulator has no limits here; the client's own pacing (100/s for commerce calls) would
    # make this a test of patience.
    fast = {f"POST /api/{path}": 10_000.0 for path in ("commerce/trackPurchase", "commerce/updateCart",
                                                       "users/bulkUpdate", "events/trackBulk")}
    settings = make_settings(database_url, url, iterable={"max_attempts": 2, "rate_limits": fast},
                             actions={"batching": True})
    with sync_context(settings) as ctx:
        ingest(ctx, events)
        reports = [sync.run_once(ctx) for _ in range(3)]
        assert reports[0].events_delivered == 10_000, reports[0].summary()
        assert reports[-1].events_delivered == 0
        with ctx.factory() as session:
            states = dict(session.execute(text("SELECT state, count(*) FROM event_status GROUP BY state")).all())
            retried = session.scalar(text("SELECT count(*) FROM event_status WHERE attempts > 0"))
    tracks = {e["messageId"] for e in events if e["type"] == "track" and e["event"] == "Viewed"}
    orders = {e["properties"]["order_id"] for e in events if e.get("event") == "Order Completed"}
    assert set(emu.events) == tracks and set(emu.purchases) == orders
    assert states == {"delivered": 10_000}
    assert sum(emu.faults_injected.values()) > 0 and retried
