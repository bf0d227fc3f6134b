"""Table-driven tests for listsync.ingest.extract: bodies, validation, audience deltas, redaction."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from listsync.domain import Desired, EmailChange, InboundEvent, Rejection
from listsync.ingest import audience, extract, validate

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TS = "2024-04-30T10:00:00Z"
AUD = "first_time_shopper"


def personas(key: str = AUD, **extra: Any) -> dict[str, Any]:
    return {"personas": {"computation_class": "audience", "computation_key": key, **extra}}


def audience_identify(flag: Any = True, **over: Any) -> dict[str, Any]:
    traits = {"email": "A@X.com", "plan": "pro"} if flag is ... else {"email": "A@X.com", AUD: flag}
    event = {
        "type": "identify",
        "userId": "User-1",
        "messageId": "m1",
        "timestamp": TS,
        "traits": traits,
        "context": personas(),
    }
    return {**event, **over}


def audience_track(name: str = "Audience Entered", flag: Any = ..., **over: Any) -> dict[str, Any]:
    props: dict[str, Any] = {"audience_key": AUD, "email": "b@x.com", "source": "engage"}
    if flag is not ...:
        props[AUD] = flag
    event = {
        "type": "track",
        "event": name,
        "userId": "u2",
        "messageId": "m2",
        "timestamp": TS,
        "properties": props,
        "context": personas(),
    }
    return {**event, **over}


def valid(raw: dict[str, Any], **kw: Any) -> InboundEvent:
    result = validate.validate_event(raw, received_at=NOW, **kw)
    assert isinstance(result, InboundEvent), result
    return result


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def base(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Clicked", "userId": "u1", **fields}


# ---------------------------------------------------------------------------------------------
# Rejections


BAD_BODIES = [
    pytest.param(b"{not json", "identify", "malformed_json:", id="malformed-json"),
    pytest.param(b"", None, "malformed_json:", id="empty-body"),
    pytest.param(b'{"batch": [NaN]}', None, "malformed_json:", id="nan-constant"),
    pytest.param(b"\xff\xfe\x00garbage", "track", "malformed_json:", id="not-utf8"),
    pytest.param(body([{"type": "track"}]), None, "not_an_object:", id="array-body"),
    pytest.param(body("identify"), "identify", "not_an_object:", id="string-body"),
    pytest.param(body({"batch": {"type": "track"}}), None, "invalid_batch:", id="batch-object"),
    pytest.param(body({"events": []}), None, "invalid_batch:", id="batch-missing"),
    pytest.param(body({"batch": [], "context": []}), None, "wrong_type:", id="batch-context-list"),
    pytest.param(b"{" + b" " * extract.MAX_BATCH_BYTES + b"}", None, "body_too_large:", id="body-too-big"),
]


@pytest.mark.parametrize(("raw_body", "path_type", "code"), BAD_BODIES)
def test_whole_body_rejections(raw_body: bytes, path_type: str | None, code: str) -> None:
    result = extract.parse_body(raw_body, path_type=path_type)
    assert isinstance(result, Rejection)
    assert result.reason.startswith(code)


BAD_ITEMS = [
    pytest.param(
        body({"type": "track", "event": "x", "userId": "u"}),
        "identify",
        "type_mismatch:",
        id="type-mismatch-with-path",
    ),
    pytest.param(body({"batch": [42]}), None, "not_an_object:", id="batch-item-number"),
    pytest.param(body({"batch": [["identify"]]}), None, "not_an_object:", id="batch-item-list"),
]


@pytest.mark.parametrize(("raw_body", "path_type", "code"), BAD_ITEMS)
def test_item_rejections_in_parse(raw_body: bytes, path_type: str | None, code: str) -> None:
    items = extract.parse_body(raw_body, path_type=path_type)
    assert isinstance(items, list)
    [item] = items
    assert isinstance(item, extract.RejectedItem)
    assert item.rejection.reason.startswith(code)


BAD_EVENTS = [
    pytest.param({"event": "x", "userId": "u"}, "missing_type:", id="no-type"),
    pytest.param(base(type="foo"), "unknown_type: 'foo' is not one of alias, group,", id="unknown-type"),
    pytest.param(base(type=["track"]), "unknown_type:", id="type-list"),
    pytest.param(base(type="Track"), "unknown_type:", id="type-wrong-case"),
    pytest.param(base(userId=None), "missing_identifier: event has neither", id="no-ids"),
    pytest.param(base(userId="", anonymousId=""), "missing_identifier:", id="empty-ids"),
    pytest.param(base(userId=" u1"), "invalid_user_id: userId has leading or trailing", id="user-id-leading"),
    pytest.param(base(userId="u1\n"), "invalid_user_id: userId has leading", id="user-id-newline"),
    pytest.param(base(userId="   "), "invalid_user_id:", id="user-id-blank"),
    pytest.param(base(userId="x" * 53), "invalid_user_id: userId is longer than 52", id="user-id-53"),
    pytest.param(
        base(userId=["u1"]), "invalid_user_id: userId must be a string, got list", id="user-id-list"
    ),
    pytest.param(base(userId={"id": 1}), "invalid_user_id:", id="user-id-object"),
    pytest.param(
        base(userId=True), "invalid_user_id: userId must be a string, got boolean", id="user-id-bool"
    ),
    pytest.param(base(userId=1.5), "invalid_user_id:", id="user-id-float"),
    pytest.param(base(userId=None, anonymousId=["a"]), "invalid_anonymous_id:", id="anon-id-list"),
    pytest.param(base(traits=["a"]), "wrong_type: traits must be an object, got list", id="traits-list"),
    pytest.param(
        base(properties="x"), "wrong_type: properties must be an object, got string", id="properties-string"
    ),
    pytest.param(base(context=7), "wrong_type: context must be an object, got number", id="context-number"),
    pytest.param(base(event=None), "missing_event: track without event name", id="track-no-event"),
    pytest.param(base(event=""), "missing_event:", id="track-empty-event"),
    pytest.param(base(event=12), "wrong_type: event must be a string, got number", id="event-number"),
    pytest.param({"type": "page", "userId": "u", "name": 3}, "wrong_type: name", id="page-name-number"),
    pytest.param({"type": "group", "userId": "u"}, "missing_group_id:", id="group-no-group-id"),
    pytest.param({"type": "alias", "userId": "u"}, "missing_previous_id:", id="alias-no-previous-id"),
    pytest.param(base(timestamp="yesterday"), "invalid_timestamp: timestamp 'yesterday'", id="bad-timestamp"),
    pytest.param(base(timestamp="2024-13-01T00:00:00Z"), "invalid_timestamp:", id="month-13"),
    pytest.param(
        base(timestamp=1714557600),
        "invalid_timestamp: timestamp must be an ISO-8601 string",
        id="timestamp-number",
    ),
    pytest.param(base(originalTimestamp="soon"), "invalid_timestamp: originalTimestamp", id="bad-original"),
    pytest.param(
        base(messageId=17), "invalid_message_id: messageId must be a string", id="message-id-number"
    ),
    pytest.param(
        base(properties={"blob": "x" * extract.MAX_EVENT_BYTES}), "event_too_large:", id="oversized-event"
    ),
    pytest.param(
        audience_identify(userId=None, traits={AUD: True}),
        "missing_identifier: event has neither",
        id="audience-identify-no-ids-at-all",
    ),
    pytest.param(
        audience_identify(userId=None, anonymousId="a", traits={AUD: True}),
        "missing_identifier: audience event",
        id="audience-identify-anonymous-only",
    ),
    pytest.param(
        audience_identify(userId=None, anonymousId="a", traits={AUD: True, "email": "nope"}),
        "invalid_email: traits.email 'nope' is not an email address",
        id="audience-bad-email",
    ),
    pytest.param(
        audience_track(userId=None, anonymousId="a", properties={"audience_key": AUD, "email": 5}),
        "invalid_email: properties.email must be a string",
        id="audience-email-number",
    ),
    pytest.param(
        audience_track(properties={"email": "b@x.com"}, context={}),
        "missing_audience_key:",
        id="audience-track-without-key",
    ),
    pytest.param(
        audience_identify(context={"personas": {"computation_class": "audience"}}),
        "missing_audience_key:",
        id="audience-identify-without-key",
    ),
]


@pytest.mark.parametrize(("raw", "reason_prefix"), BAD_EVENTS)
def test_event_rejections(raw: dict[str, Any], reason_prefix: str) -> None:
    result = validate.validate_event(raw, received_at=NOW)
    assert isinstance(result, Rejection), result
    assert result.reason.startswith(reason_prefix), result.reason


def test_encoded_size_from_the_body_is_what_counts() -> None:
    result = validate.validate_event(base(), received_at=NOW, encoded_size=40123)
    assert result == Rejection("event_too_large: 40123 bytes > 32768")


def test_oversized_single_event_body_is_rejected_per_event() -> None:
    raw_body = body(base(properties={"blob": "x" * 40_000}))
    [item] = extract.parse_body(raw_body, path_type="track")  # type: ignore[misc]
    assert isinstance(item, extract.RawEvent) and item.size == len(raw_body)
    result = validate.validate_event(item.raw, received_at=NOW, encoded_size=item.size)
    assert isinstance(result, Rejection) and result.reason.startswith("event_too_large:")


def test_naive_received_at_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        validate.validate_event(base(), received_at=datetime(2024, 1, 1))


# ---------------------------------------------------------------------------------------------
# Bodies


def test_single_endpoint_defaults_the_type() -> None:
    [item] = extract.parse_body(body({"userId": "u", "traits": {}}), path_type="identify")  # type: ignore[misc]
    assert isinstance(item, extract.RawEvent)
    assert valid(item.raw).type == "identify"


def test_batch_with_mixed_items_keeps_the_good_ones() -> None:
    batch = [base(messageId="ok1"), base(userId=" bad"), 7, {"type": "page", "anonymousId": "a"}]
    items = extract.parse_body(body({"batch": batch}), path_type=None)
    assert isinstance(items, list) and len(items) == 4
    results = [
        validate.validate_event(i.raw, received_at=NOW, encoded_size=i.size)
        if isinstance(i, extract.RawEvent)
        else i.rejection
        for i in items
    ]
    assert [type(r).__name__ for r in results] == ["InboundEvent", "Rejection", "Rejection", "InboundEvent"]
    assert results[1].reason.startswith("invalid_user_id:")  # type: ignore[union-attr]
    assert results[2].reason.startswith("not_an_object:")  # type: ignore[union-attr]


def test_batch_context_and_integrations_are_merged_with_the_event_winning() -> None:
    payload = {
        "batch": [base(context={"ip": "10.0.0.1"}), base(integrations={"All": False})],
        "context": {"ip": "1.1.1.1", "library": {"name": "analytics-python"}},
        "integrations": {"All": True},
    }
    first, second = extract.parse_body(body(payload), path_type=None)  # type: ignore[misc]
    assert first.raw["context"] == {"ip": "10.0.0.1", "library": {"name": "analytics-python"}}
    assert first.raw["integrations"] == {"All": True}
    assert second.raw["context"]["ip"] == "1.1.1.1"
    assert second.raw["integrations"] == {"All": False}


def test_rejected_items_carry_redacted_payloads() -> None:
    raw_body = body({"type": "track", "userId": "u", "writeKey": "wk", "context": {"apiKey": "k"}})
    [item] = extract.parse_body(raw_body, path_type="identify")  # type: ignore[misc]
    assert isinstance(item, extract.RejectedItem)
    assert json.loads(item.payload) == {"type": "track", "userId": "u", "context": {}}


def test_parse_line_reads_type_from_the_event() -> None:
    item = extract.parse_line(json.dumps(base()) + "\n")
    assert isinstance(item, extract.RawEvent) and item.raw["type"] == "track"
    bad = extract.parse_line("[1, 2]")
    assert isinstance(bad, extract.RejectedItem) and bad.rejection.reason.startswith("not_an_object:")


# ---------------------------------------------------------------------------------------------
# Normalisation


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"timestamp": "2024-04-30T10:00:00Z"}, datetime(2024, 4, 30, 10, tzinfo=UTC), id="zulu"),
        pytest.param(
            {"timestamp": "2024-04-30T12:00:00+02:00"}, datetime(2024, 4, 30, 10, tzinfo=UTC), id="offset"
        ),
        pytest.param({"timestamp": "2024-04-30T10:00:00"}, datetime(2024, 4, 30, 10, tzinfo=UTC), id="naive"),
        pytest.param(
            {"originalTimestamp": "2024-04-30T10:00:00.5Z"},
            datetime(2024, 4, 30, 10, 0, 0, 500000, tzinfo=UTC),
            id="original",
        ),
        pytest.param(
            {"timestamp": TS, "originalTimestamp": "2020-01-01T00:00:00Z"},
            datetime(2024, 4, 30, 10, tzinfo=UTC),
            id="timestamp-first",
        ),
        pytest.param({}, NOW, id="received-at"),
        pytest.param({"timestamp": None}, NOW, id="null-timestamp"),
    ],
)
def test_timestamps_become_aware_utc(fields: dict[str, Any], expected: datetime) -> None:
    stamp = valid(base(**fields)).timestamp
    assert stamp == expected and stamp.utcoffset() == timedelta(0)


def test_received_at_in_another_zone_is_converted() -> None:
    local = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    result = validate.validate_event(base(), received_at=local)
    assert isinstance(result, InboundEvent) and result.timestamp == NOW and result.timestamp.tzinfo == UTC


@pytest.mark.parametrize(
    ("fields", "email"),
    [
        pytest.param(
            {"type": "identify", "traits": {"email": "  Ann@Example.COM "}}, "ann@example.com", id="traits"
        ),
        pytest.param({"properties": {"email": "B@x.io"}}, "b@x.io", id="properties"),
        pytest.param({"context": {"traits": {"email": "C@x.io"}}}, "c@x.io", id="context-traits"),
        pytest.param(
            {"type": "identify", "traits": {"email": "t@x.io"}, "context": {"traits": {"email": "c@x.io"}}},
            "t@x.io",
            id="traits-before-context",
        ),
        pytest.param(
            {"type": "identify", "traits": {"email": ""}, "context": {"traits": {"email": "c@x.io"}}},
            "c@x.io",
            id="empty-falls-through",
        ),
        pytest.param({"properties": {"email": "not-an-address"}}, None, id="invalid-dropped"),
        pytest.param({"properties": {"email": ["a@x.io"]}}, None, id="non-string-dropped"),
        pytest.param({}, None, id="none"),
    ],
)
def test_email_sources(fields: dict[str, Any], email: str | None) -> None:
    assert valid(base(**fields)).email == email


@pytest.mark.parametrize(
    ("fields", "user_id", "anonymous_id"),
    [
        pytest.param({"userId": "MixedCase-ID"}, "MixedCase-ID", None, id="case-kept"),
        pytest.param({"userId": "x" * 52}, "x" * 52, None, id="52-chars"),
        pytest.param({"userId": 12345}, "12345", None, id="int-user-id"),
        pytest.param({"userId": None, "anonymousId": "anon-1"}, None, "anon-1", id="anonymous-only"),
        pytest.param({"userId": "", "anonymousId": 9}, None, "9", id="empty-user-int-anon"),
    ],
)
def test_identifiers(fields: dict[str, Any], user_id: str | None, anonymous_id: str | None) -> None:
    event = valid(base(**fields))
    assert (event.user_id, event.anonymous_id) == (user_id, anonymous_id)


def test_derived_message_id_is_deterministic_and_ignores_transport_fields() -> None:
    first = valid(base(timestamp=TS, sentAt="2024-04-30T10:00:01Z"))
    replay = valid(dict(reversed(list(base(timestamp=TS, sentAt="2024-04-30T11:00:00Z").items()))))
    other = valid(base(timestamp=TS, event="Other"))
    assert first.message_id == replay.message_id
    assert first.message_id.startswith("ls-") and len(first.message_id) == 35
    assert other.message_id != first.message_id


def test_given_message_id_is_kept_and_write_key_not_stored() -> None:
    event = valid(base(messageId="abc", writeKey="secret-key"))
    assert event.message_id == "abc" and "writeKey" not in event.raw


# ---------------------------------------------------------------------------------------------
# Audience deltas


@pytest.mark.parametrize(
    ("raw", "desired"),
    [
        pytest.param(audience_identify(True), Desired.IN, id="identify-enter"),
        pytest.param(audience_identify(False), Desired.OUT, id="identify-exit"),
        pytest.param(audience_identify(...), Desired.UNKNOWN, id="identify-missing-flag"),
        pytest.param(audience_identify("TRUE"), Desired.IN, id="identify-string-true"),
        pytest.param(audience_identify("false"), Desired.OUT, id="identify-string-false"),
        pytest.param(audience_identify(1), Desired.UNKNOWN, id="identify-number-flag"),
        pytest.param(audience_identify(None), Desired.UNKNOWN, id="identify-null-flag"),
        pytest.param(audience_track("Audience Entered"), Desired.IN, id="track-entered-no-flag"),
        pytest.param(audience_track("Audience Exited"), Desired.OUT, id="track-exited-no-flag"),
        pytest.param(audience_track("Audience Entered", True), Desired.IN, id="track-entered-true"),
        pytest.param(audience_track("Audience Exited", False), Desired.OUT, id="track-exited-false"),
        pytest.param(audience_track("Audience Entered", False), Desired.OUT, id="track-flag-wins"),
        pytest.param(audience_track("Audience Exited", "maybe"), Desired.OUT, id="track-odd-flag-uses-name"),
    ],
)
def test_audience_desired_state(raw: dict[str, Any], desired: Desired) -> None:
    [delta] = audience.extract_deltas(valid(raw))
    assert delta.audience_key == AUD and delta.desired == desired


def test_identify_delta_fields() -> None:
    raw = audience_identify(
        True,
        context={**personas(audience_settings={"campaignId": 5}), "traits": {"plan": "free", "city": "Oslo"}},
    )
    raw["traits"]["plan"] = "pro"
    [delta] = audience.extract_deltas(valid(raw))
    assert (delta.user_id, delta.email, delta.message_id) == ("User-1", "a@x.com", "m1")
    assert delta.timestamp == datetime(2024, 4, 30, 10, tzinfo=UTC)
    assert delta.traits == {"email": "A@X.com", "plan": "pro", "city": "Oslo"}
    assert delta.audience_settings == {"campaign_id": 5}


def test_track_delta_fields() -> None:
    [delta] = audience.extract_deltas(valid(audience_track("Audience Entered", True)))
    assert (delta.user_id, delta.email) == ("u2", "b@x.com")
    assert delta.traits == {"email": "b@x.com", "source": "engage"}
    assert delta.audience_settings is None


def test_track_audience_key_falls_back_to_personas() -> None:
    raw = audience_track(properties={"email": "b@x.com"}, context=personas("vip"))
    [delta] = audience.extract_deltas(valid(raw))
    assert delta.audience_key == "vip" and delta.desired == Desired.IN


def test_audience_event_identified_by_email_alone() -> None:
    raw = audience_track(userId=None, anonymousId="anon")
    [delta] = audience.extract_deltas(valid(raw))
    assert (delta.user_id, delta.email) == (None, "b@x.com")


def test_several_emails_for_one_profile_give_separate_deltas() -> None:
    emails = ["one@x.com", "two@x.com", "three@x.com"]
    events = [
        valid(audience_identify(True, messageId=f"m{i}", traits={"email": e, AUD: True}))
        for i, e in enumerate(emails)
    ]
    deltas = [d for e in events for d in audience.extract_deltas(e)]
    assert [d.email for d in deltas] == emails
    assert {d.user_id for d in deltas} == {"User-1"}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            {"type": "identify", "userId": "u", "traits": {"newsletter": True, AUD: True}},
            id="identify-boolean-traits-without-personas",
        ),
        pytest.param(
            {
                "type": "identify",
                "userId": "u",
                "traits": {AUD: True},
                "context": {"personas": {"computation_class": "trait", "computation_key": AUD}},
            },
            id="computed-trait-not-audience",
        ),
        pytest.param(base(properties={"audience_key": AUD, AUD: True}), id="ordinary-track"),
        pytest.param({"type": "page", "userId": "u", "name": "Home"}, id="page"),
        pytest.param({"type": "screen", "anonymousId": "a"}, id="screen"),
    ],
)
def test_non_audience_events_give_no_deltas(raw: dict[str, Any]) -> None:
    event = valid(raw)
    assert not audience.is_audience_event(event)
    assert audience.extract_deltas(event) == []


# ---------------------------------------------------------------------------------------------
# Email changes


@pytest.mark.parametrize(
    ("raw", "change"),
    [
        pytest.param(
            {
                "type": "identify",
                "userId": "u1",
                "messageId": "m",
                "timestamp": TS,
                "traits": {"email": " New@X.com"},
            },
            EmailChange("u1", "new@x.com", datetime(2024, 4, 30, 10, tzinfo=UTC), "m"),
            id="plain",
        ),
        pytest.param({"type": "identify", "userId": "u1", "traits": {"name": "n"}}, None, id="no-email"),
        pytest.param(
            {"type": "identify", "anonymousId": "a", "traits": {"email": "a@x.com"}}, None, id="no-user-id"
        ),
        pytest.param(
            {"type": "identify", "userId": "u1", "traits": {"email": "broken"}}, None, id="invalid-email"
        ),
        pytest.param(audience_identify(True), None, id="audience-identify"),
        pytest.param(base(properties={"email": "a@x.com"}), None, id="track"),
    ],
)
def test_email_change(raw: dict[str, Any], change: EmailChange | None) -> None:
    assert audience.extract_email_change(valid(raw)) == change


# ---------------------------------------------------------------------------------------------
# Redaction


def test_redact_removes_secrets_at_any_depth_without_touching_the_input() -> None:
    raw = {
        "writeKey": "wk",
        "userId": "u",
        "context": {"Authorization": "Basic x", "device": {"token": "t", "model": "m"}},
        "properties": {"api_key": "k", "items": [{"client-secret": "s", "sku": 1}], "Password": "p"},
        "traits": {"refreshToken": "r", "name": "n"},
    }
    assert extract.redact(raw) == {
        "userId": "u",
        "context": {"device": {"model": "m"}},
        "properties": {"items": [{"sku": 1}]},
        "traits": {"name": "n"},
    }
    assert raw["context"]["device"]["token"] == "t"
