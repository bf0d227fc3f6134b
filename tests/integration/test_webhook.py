"""`POST /v1/webhook` with exactly what Segment's Webhooks (Actions) destination sends, on SQLite and
PostgreSQL, over a real socket; then a sync against the Iterable emulator.

What the destination sends is rebuilt from its code (segmentio/action-destinations,
`destinations/webhook`): `perform` posts `json: data` (the whole event under the default mapping
`$.`), `performBatch` posts `json: payload.map(({ data }) => data)`, and the request client writes
`json` with `JSON.stringify`. `extendRequest` signs `JSON.stringify(payload.length ? payload[0].data
: payload.data)` as hex HMAC-SHA1 in `X-Signature`: the body for one event, the first event alone for
a batch.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from listsync import context, sync
from listsync.config import load_settings
from listsync.errors import ConfigError
from listsync.ingest import webhook
from listsync.ingest.receiver import ReceiverServer, build_app
from listsync.ingest.webhook_route import WEBHOOK_PATH
from tests.emulator import IterableEmulator
from tests.helpers import audience_event, make_settings, sync_context

SECRET = "whsec-engage-3b9d"
OLD_SECRET = "whsec-rotated-out-17"
WRITE_KEY = "wk-engage-77"
SPACE = "spa_engage1"
T0 = "2026-03-01T09:00:00.000Z"


# --- what Segment's Webhooks (Actions) sends ---------------------------------------------------


def js_stringify(value: Any) -> str:
    """`JSON.stringify(value)` for the values these tests build.

    Python's compact, non-ASCII-preserving dump writes the same text as JavaScript for strings,
    integers, booleans, null, nested objects and arrays, and for floats such as 30.5. It differs for
    integral or exponent floats and for integer-like object keys (JavaScript orders those first),
    so those are refused rather than silently mis-signed.
    """
    _assert_js_safe(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _assert_js_safe(value: Any) -> None:
    if isinstance(value, float):
        assert not value.is_integer() and "e" not in repr(value), value
    elif isinstance(value, dict):
        for key, item in value.items():
            assert not key.isdigit(), key
            _assert_js_safe(item)
    elif isinstance(value, list):
        for item in value:
            _assert_js_safe(item)


def segment_request(
    events: list[dict[str, Any]],
    *,
    batched: bool,
    secret: str | None = SECRET,
    headers: dict[str, str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of one delivery, as `perform` / `performBatch` and `extendRequest` make them."""
    if batched:
        body = js_stringify(events)
        signed = js_stringify(events[0])  # payload[0].data
    else:
        (event,) = events
        body = signed = js_stringify(event)  # payload.data
    sent = {"content-type": "application/json", **(headers or {})}
    if secret is not None:
        sent["X-Signature"] = webhook.sign(secret.encode(), signed.encode("utf-8"))
    return body.encode("utf-8"), sent


def platform(event: dict[str, Any], message_id: str) -> dict[str, Any]:
    """The event as Segment's platform hands it to a destination: the fields it adds around it."""
    context = {"library": {"name": "unknown", "version": "unknown"}, **event.get("context", {})}
    if "personas" in context:
        context["personas"] = {**context["personas"], "namespace": SPACE, "space_id": SPACE}
    return {
        "channel": "server",
        **event,
        "context": context,
        "integrations": {"All": False, "Webhooks (Actions)": True},
        "messageId": message_id,
        "originalTimestamp": event.get("timestamp", T0),
        "receivedAt": T0,
        "sentAt": T0,
        "timestamp": event.get("timestamp", T0),
        "version": 2,
    }


def engage(audience: str, message_id: str, **kwargs: Any) -> dict[str, Any]:
    """An Engage audience event (identify, or Audience Entered/Exited track) as delivered."""
    return platform(audience_event(audience, **kwargs), message_id)


def every_type() -> list[dict[str, Any]]:
    """One event of each Segment type, audience events among them, in delivery order."""
    return [
        engage("vip", "personas_a1", inside=True, user_id="u1", email="a@x.com", at=1),
        engage("vip", "personas_a2", inside=True, user_id="u2", email="b@x.com", at=1, kind="track"),
        engage("vip", "personas_a3", inside=True, user_id="u3", email="c@x.com", at=1, kind="track"),
        engage("vip", "personas_a4", inside=False, user_id="u3", email="c@x.com", at=5, kind="track"),
        platform({"type": "identify", "userId": "u4", "traits": {"email": "d@x.com", "name": "Zoë"}}, "m-identify"),
        platform({"type": "track", "userId": "u4", "event": "Clicked", "properties": {"email": "d@x.com"}}, "m-track"),
        platform({"type": "track", "userId": "u4", "event": "Order Completed", "properties": {
            "email": "d@x.com", "order_id": "o1", "total": 30.5,
            "products": [{"product_id": "p1", "name": "Uno", "price": 3, "quantity": 2}]}}, "m-order"),
        platform({"type": "page", "userId": "u4", "name": "Home", "properties": {"path": "/"}}, "m-page"),
        platform({"type": "screen", "userId": "u4", "name": "Settings"}, "m-screen"),
        platform({"type": "group", "userId": "u4", "groupId": "g1", "traits": {"plan": "pro"}}, "m-group"),
        platform({"type": "alias", "userId": "u4", "previousId": "anon-4"}, "m-alias"),
    ]


# --- fixtures and readers ----------------------------------------------------------------------


@pytest.fixture
def ctx(database_url: str, emulator: tuple[IterableEmulator, str]) -> Iterator[context.SyncContext]:
    receiver = {"write_keys": [WRITE_KEY], "webhook_secrets": [OLD_SECRET, SECRET]}
    with sync_context(make_settings(database_url, emulator[1], receiver=receiver)) as context:
        yield context


@pytest.fixture
def http(ctx: context.SyncContext) -> Iterator[httpx.Client]:
    server = ReceiverServer(build_app(ctx.settings, ctx.factory), port=0)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield client
    finally:
        server.stop()


def post(http: httpx.Client, request: tuple[bytes, dict[str, str]], path: str = WEBHOOK_PATH) -> httpx.Response:
    body, headers = request
    return http.post(path, content=body, headers=headers)


def rows(ctx: context.SyncContext, sql: str) -> list[dict[str, Any]]:
    with ctx.factory() as session:
        return [dict(r) for r in session.execute(text(sql)).mappings()]


def stored(ctx: context.SyncContext) -> tuple[int, int]:
    """(inbox events, rejected events)."""
    counts = rows(ctx, "SELECT (SELECT count(*) FROM inbox) AS inbox, (SELECT count(*) FROM rejected_events) AS bad")
    return int(counts[0]["inbox"]), int(counts[0]["bad"])


def deliveries(ctx: context.SyncContext) -> list[tuple[str, str, str]]:
    return [(r["event"], r["action"], r["state"]) for r in rows(ctx, "SELECT * FROM event_status ORDER BY event")]


def vip_members(emu: IterableEmulator) -> set[str]:
    (list_id,) = emu.lists_named("vip")
    return emu.list_member_emails(list_id)


EXPECTED_DELIVERIES = [
    ("m-identify", "upsert_user", "delivered"),
    ("m-order", "track_purchase", "delivered"),
    ("m-track", "custom_event", "delivered"),
]


# --- deliveries that get in ----------------------------------------------------------------------


def test_single_events_of_every_type_signed_as_segment_signs(
    ctx: context.SyncContext, http: httpx.Client, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, _ = emulator
    events = every_type()
    for event in events:
        response = post(http, segment_request([event], batched=False))
        assert response.status_code == 200, response.text
        assert response.json() == {"success": True, "accepted": 1, "duplicates": 0, "rejected": 0}
    assert stored(ctx) == (len(events), 0)

    report = sync.run_once(ctx)
    assert report.exit_code == 0, report.summary()
    assert vip_members(emu) == {"a@x.com", "b@x.com"}  # u3 entered, then exited
    assert deliveries(ctx) == EXPECTED_DELIVERIES  # page/screen/group/alias: no preset maps them
    user = emu.user_by_user_id("u4")
    assert user is not None and user.data_fields["name"] == "Zoë"
    assert emu.purchases["o1"]["total"] == 30.5

    # Segment retries a delivery it did not see answered: the same bytes change nothing.
    sent_before = len(emu.requests)
    for event in events:
        response = post(http, segment_request([event], batched=False))
        assert response.json() == {"success": True, "accepted": 0, "duplicates": 1, "rejected": 0}
    again = sync.run_once(ctx)
    assert again.exit_code == 0 and again.requests == 0 and again.events_delivered == 0
    assert len(emu.requests) == sent_before
    assert stored(ctx) == (len(events), 0) and deliveries(ctx) == EXPECTED_DELIVERIES
    assert vip_members(emu) == {"a@x.com", "b@x.com"}


def test_a_batched_array_signed_on_its_first_event_stores_each_event_alone(
    ctx: context.SyncContext, http: httpx.Client, emulator: tuple[IterableEmulator, str]
) -> None:
    emu, _ = emulator
    events = every_type()
    bad = platform({"type": "track", "userId": "u9", "properties": {"password": "hunter2"}}, "m-bad")  # no event name
    array = [*events[:5], bad, *events[5:]]
    response = post(http, segment_request(array, batched=True))
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True, "accepted": len(events), "duplicates": 0, "rejected": 1}
    rejected = rows(ctx, "SELECT reason, payload FROM rejected_events")
    assert len(rejected) == 1 and rejected[0]["reason"].startswith("missing_event:")
    assert "m-bad" in rejected[0]["payload"] and "hunter2" not in rejected[0]["payload"]

    report = sync.run_once(ctx)
    assert report.exit_code == 0, report.summary()
    assert vip_members(emu) == {"a@x.com", "b@x.com"}
    assert deliveries(ctx) == EXPECTED_DELIVERIES

    # The replayed batch changes nothing; a later batch moves the list on.
    assert post(http, segment_request(array, batched=True)).json() == {
        "success": True, "accepted": 0, "duplicates": len(events), "rejected": 1
    }
    exit_b = engage("vip", "personas_b1", inside=False, user_id="u2", email="b@x.com", at=9)
    enter_d = engage("vip", "personas_b2", inside=True, user_id="u4", email="d@x.com", at=9, kind="track")
    assert post(http, segment_request([exit_b, enter_d], batched=True)).json()["accepted"] == 2
    report = sync.run_once(ctx)
    assert report.exit_code == 0, report.summary()
    assert vip_members(emu) == {"a@x.com", "d@x.com"}
    assert deliveries(ctx) == EXPECTED_DELIVERIES


def test_other_credentials_and_signature_forms(ctx: context.SyncContext, http: httpx.Client) -> None:
    events = every_type()[:4]
    whole = js_stringify(events).encode()
    accepted = [
        # no shared secret, a write key in a custom header instead
        segment_request(events[:1], batched=False, secret=None, headers={"Authorization": f"Bearer {WRITE_KEY}"}),
        (whole, {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:any".encode()).decode()}),
        # the header and the signature together, both right
        segment_request(events[1:2], batched=True, headers={"Authorization": f"Bearer {WRITE_KEY}"}),
        # an older secret still listed, during a rotation
        segment_request(events[2:3], batched=False, secret=OLD_SECRET),
        # releases that sign the whole array, and the opt-in X-Segment-Signature
        (whole, {"X-Signature": webhook.sign(SECRET.encode(), whole)}),
        (whole, {"X-Segment-Signature": webhook.sign(SECRET.encode(), whole)}),
    ]
    for request in accepted:
        assert post(http, request).status_code == 200, request[1]
    assert stored(ctx) == (4, 0)
    # Bearer with a write key is accepted on the Tracking API routes as well.
    batch = json.dumps({"batch": [every_type()[4]]}).encode()
    response = http.post("/v1/batch", content=batch, headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert response.status_code == 200 and stored(ctx) == (5, 0)


def test_what_a_batched_signature_does_not_cover(ctx: context.SyncContext, http: httpx.Client) -> None:
    """Only the first event is signed: an array whose later events changed after signing still
    passes (the README says so and recommends a header secret as well)."""
    events = every_type()[:3]
    body, headers = segment_request(events, batched=True)
    tampered = body.replace(b'"u3"', b'"u666"')
    assert tampered != body
    assert post(http, (tampered, headers)).status_code == 200
    assert rows(ctx, "SELECT user_id FROM inbox ORDER BY id")[-1]["user_id"] == "u666"


# --- deliveries that are refused ---------------------------------------------------------------


def test_wrong_or_missing_signatures_are_refused_and_leave_nothing(
    ctx: context.SyncContext, http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    events = every_type()
    single_body, single_headers = segment_request(events[:1], batched=False)
    array_body, array_headers = segment_request(events[:3], batched=True)
    second_only = webhook.sign(SECRET.encode(), js_stringify(events[1]).encode())
    first_only = webhook.sign(SECRET.encode(), js_stringify(events[0]).encode())
    refused = [
        segment_request(events[:1], batched=False, secret=None),  # nothing at all
        segment_request(events[:1], batched=False, secret="not-the-secret"),
        segment_request(events[:3], batched=True, secret="not-the-secret"),
        (single_body.replace(b"a@x.com", b"z@x.com"), single_headers),  # body changed after signing
        (array_body.replace(b"a@x.com", b"z@x.com", 1), array_headers),  # first event changed
        (array_body, {**array_headers, "X-Signature": second_only}),
        (array_body, {"X-Signature": "zz" + first_only[2:]}),
        (array_body, {"X-Signature": ""}),
        (array_body, {"X-Segment-Signature": first_only}),  # covers the whole body only
        # a right signature does not excuse a wrong key, nor a right key a wrong signature
        segment_request(events[:1], batched=False, headers={"Authorization": "Bearer wrong-key"}),
        segment_request(events[:1], batched=False, secret="nope", headers={"Authorization": f"Bearer {WRITE_KEY}"}),
        (single_body, {"Authorization": "Basic !!notbase64", **single_headers}),
    ]
    with caplog.at_level(logging.DEBUG):
        for request in refused:
            response = post(http, request)
            assert response.status_code == 401, request[1]
            assert response.json() == {"success": False, "error": "invalid signature or write key"}
    assert stored(ctx) == (0, 0)
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "receiver refused a webhook request" in logged
    for secret in (SECRET, OLD_SECRET, WRITE_KEY, first_only, single_headers["X-Signature"]):
        assert secret not in logged


def test_no_secrets_configured_refuses_every_signature(database_url: str) -> None:
    settings = make_settings(database_url, receiver={"write_keys": [WRITE_KEY]})
    with sync_context(settings) as context:
        server = ReceiverServer(build_app(settings, context.factory), port=0)
        server.start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                assert post(client, segment_request(every_type()[:1], batched=False)).status_code == 401
        finally:
            server.stop()
        assert stored(context) == (0, 0)


# --- Segment's size limits and unusable bodies ---------------------------------------------------


def test_size_limits_and_unusable_bodies(ctx: context.SyncContext, http: httpx.Client) -> None:
    big = platform({"type": "track", "userId": "u5", "event": "Big", "properties": {"blob": "ab " * 11_000}}, "m-big")
    response = post(http, segment_request([big], batched=False))
    assert response.status_code == 400 and response.json()["error"].startswith("event_too_large:")
    assert stored(ctx) == (0, 1)

    # An array of 32 KB events passes its first event's signature check but not the body limit.
    small = platform({"type": "track", "userId": "u5", "event": "Big", "properties": {"blob": "ab " * 10_000}}, "m")
    too_many = [{**small, "messageId": f"m-{i}"} for i in range(18)]
    body, headers = segment_request(too_many, batched=True)
    assert len(body) > 500 * 1024
    response = post(http, (body, headers))
    # signed only: the signature cannot be checked on a body that was not read whole, so nothing is stored
    assert response.status_code == 400 and response.json()["error"].startswith("body_too_large:")
    assert stored(ctx) == (0, 1)
    response = post(http, (body, {**headers, "Authorization": f"Bearer {WRITE_KEY}"}))
    assert response.status_code == 400 and stored(ctx) == (0, 2)

    for text_body, code in ((b"42", "not_an_object:"), (b'{"type": "track",', "malformed_json:")):
        signed = {"X-Signature": webhook.sign(SECRET.encode(), text_body)}
        response = http.post(WEBHOOK_PATH, content=text_body, headers=signed)
        assert response.status_code == 400 and response.json()["error"].startswith(code)
    assert stored(ctx) == (0, 4)

    empty = b"[]"
    response = http.post(WEBHOOK_PATH, content=empty, headers={"X-Signature": webhook.sign(SECRET.encode(), empty)})
    assert response.json() == {"success": True, "accepted": 0, "duplicates": 0, "rejected": 0}


# --- the signed text of a batch, read from the body as sent --------------------------------------


@pytest.mark.parametrize(
    ("body", "first"),
    [
        (b'[{"a":1},{"b":2}]', b'{"a":1}'),
        (b' \n[ {"a":[1,{"c":"]"}]} , 2]', b'{"a":[1,{"c":"]"}]}'),
        ('[{"name":"Zoë"}]'.encode(), '{"name":"Zoë"}'.encode()),
        (b'[1e-7]', b"1e-7"),  # as JavaScript wrote it, not as Python would re-write it
        (b'{"a":1}', None),
        (b"[]", None),
        (b"[{", None),
        (b"\xff[", None),
    ],
)
def test_first_element_is_taken_as_sent(body: bytes, first: bytes | None) -> None:
    assert webhook.first_element(body) == first


# --- configuration -----------------------------------------------------------------------------


def test_webhook_secrets_from_the_environment_are_never_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "listsync.toml"
    path.write_text('[receiver]\nwebhook_secrets = ["from-file-secret"]\n')
    assert [s.get_secret_value() for s in load_settings(path).receiver.webhook_secrets] == ["from-file-secret"]
    monkeypatch.setenv("LISTSYNC_RECEIVER__WEBHOOK_SECRETS", f'["{SECRET}", "{OLD_SECRET}"]')
    settings = load_settings(path)
    assert [s.get_secret_value() for s in settings.receiver.webhook_secrets] == [SECRET, OLD_SECRET]
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    monkeypatch.setenv("LISTSYNC_RECEIVER__WEBHOOK_SECRETS", '[{"s": "leaky-value"}]')
    with pytest.raises(ConfigError) as refused:
        load_settings(path)
    assert "receiver.webhook_secrets" in str(refused.value) and "leaky-value" not in str(refused.value)
