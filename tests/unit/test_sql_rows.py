"""The SQL source validates each row once, where it enters the snapshot (`validate.validate_member`),
and stores the events it builds without validating them again: both are only sound if the row
check says exactly what `validate_event` says of the event built from the row."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from listsync.domain import InboundEvent, Rejection
from listsync.ingest import sql_rows, validate
from listsync.ingest.audience import extract_deltas

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"k": value}
    return value


ROWS: list[tuple[Any, str | None, str | None, dict[str, Any]]] = [
    ("gold", "u1", "a@example.com", {"plan": "pro"}),
    ("gold", None, "  Mixed.Case@Example.COM ", {}),
    ("gold", "u1", None, {"n": 3, "ratio": 0.5, "ok": True, "none": None}),
    ("gold", "u1", "not-an-email", {}),  # the email is dropped, the userId carries the member
    ("gold", None, "not-an-email", {}),
    ("gold", None, None, {"plan": "pro"}),
    ("gold", " u1", None, {}),
    ("gold", "u" * 53, None, {}),
    ("gold", "u\x001", None, {}),
    ("gold", None, "a\x00b@example.com", {}),
    ("gold", "u1", None, {"plan": "p\x00ro"}),
    ("gold", "u1", None, {"plan": "\ud800"}),
    ("gold", "u1", None, {"pl\udc00an": "pro"}),
    ("gold", "u1", None, {"score": float("inf")}),
    ("gold", "u1", None, {"score": float("nan")}),
    ("gold", "u1", None, {"deep": nested(70)}),
    ("gold", "u1", None, {"fine": nested(50)}),
    ("gold", "u1", None, {"writeKey": "s3cret", "plan": "pro"}),
    ("gold", "u1", None, {"meta": {"write_key": "s3cret"}}),
    ("gold", "u1", None, {"name": "Zoë 🎉"}),
    ("gold", "u1", None, {"blob": "x" * 40_000}),
    ("g" * 256, "u1", None, {}),
    ("", "u1", None, {}),
    (5, "u1", None, {}),
    ("go\x00ld", "u1", None, {}),
    ("gold", None, "a" * 240 + "@example.com", {}),  # fits the email column, not the anonymousId
    ("gold", "u1", "a" * 320 + "@example.com", {}),
    ("gold", "u1", "TAB\t@example.com", {}),
]


def properties(traits_json: str) -> str:
    """Traits' JSON as the leading members of an event's properties (sql_rows.SnapshotRow's)."""
    inner = traits_json[1:-1]
    return f"{inner}," if inner else ""


def reference(audience: Any, user_id: str | None, email: str | None, traits: dict[str, Any]) -> Any:
    """validate_event's verdict on the Audience Entered track the SQL source would build."""
    if not isinstance(audience, str) or not audience:
        return "missing_audience_key"
    traits_json = json.dumps(traits, ensure_ascii=False, separators=(",", ":"))
    built = sql_rows.Events(NOW, "snap").entered(audience, user_id, email, properties(traits_json))
    checked = validate.validate_event(json.loads(built[-1]), received_at=NOW)
    if isinstance(checked, Rejection):
        return checked.reason.split(":", 1)[0]
    return checked


@pytest.mark.parametrize("row", ROWS, ids=[str(i) for i in range(len(ROWS))])
def test_validate_member_says_what_validate_event_says(row: tuple[Any, ...]) -> None:
    audience, user_id, email, traits = row
    expected = reference(audience, user_id, email, traits)
    try:
        encoded: str | None = json.dumps(traits, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        encoded = None
    for traits_json in {encoded, None}:
        checked = validate.validate_member(audience, user_id, email, traits, traits_json=traits_json)
        if expected == "event_too_large":  # the caller's to bound (see _RowReader)
            assert not isinstance(checked, Rejection)
            continue
        if isinstance(expected, str):
            assert isinstance(checked, Rejection) and checked.reason.startswith(expected + ":"), checked
            continue
        assert isinstance(expected, InboundEvent) and not isinstance(checked, Rejection), checked
        assert (checked.user_id, checked.email) == (expected.user_id, expected.email)
        kept = {k: v for k, v in expected.raw["properties"].items() if k in traits}
        assert dict(checked.traits) == kept


@pytest.mark.parametrize("row", ROWS, ids=[str(i) for i in range(len(ROWS))])
def test_the_row_reader_keeps_what_the_receiver_would_accept(row: tuple[Any, ...]) -> None:
    audience, user_id, email, traits = row
    expected = reference(audience, user_id, email, traits)
    reader = sql_rows.RowReader(["audience_key", "user_id", "email", *traits], sql_rows.Events(NOW, "snap"))
    member = reader.member((audience, user_id, email, *traits.values()))
    if isinstance(expected, str):
        assert isinstance(member, Rejection) and member.reason.startswith(expected + ":"), member
        return
    assert not isinstance(member, Rejection), member
    assert member[:3] == (audience, expected.user_id or "", expected.email or "")
    # The event built from the snapshot row is one validate_event accepts, with the same meaning.
    built = sql_rows.Events(NOW, "snap").entered(audience, expected.user_id, expected.email, member[3])
    event = validate.validate_event(json.loads(built[-1]), received_at=NOW)
    assert isinstance(event, InboundEvent), event
    assert built[:4] == (event.message_id, event.user_id, event.anonymous_id, event.email)
    [ours], [theirs] = extract_deltas(event), extract_deltas(expected)
    assert (ours.audience_key, ours.user_id, ours.email, ours.desired) == (
        theirs.audience_key,
        theirs.user_id,
        theirs.email,
        theirs.desired,
    )
    # The same traits, but for the raw email (the snapshot keeps it normalised) and write keys.
    assert "s3cret" not in built[-1]
    kept = {k: v for k, v in validate._drop_write_keys(theirs.traits).items() if k != "email"}
    assert {k: v for k, v in ours.traits.items() if k != "email"} == kept


def test_one_reader_reads_every_row_as_a_fresh_reader_would() -> None:
    """The reader remembers the traits it encoded (per audience, by value and type, so 1, 1.0 and
    True stay apart, and by repr where equal values encode apart: Decimal 1.0 and 1.00): rows that share them read exactly as each would alone, whatever their
    identities; and a snapshot row's messageId is the one its events get."""
    columns = ["audience_key", "user_id", "email", "plan", "n"]
    events = sql_rows.Events(NOW, "snap")
    identities = [("u1", None), (None, "a@example.com"), ("u\x00", None), ("u2", "x" * 250 + "@example.com")]
    traits = [("pro", 1), ("pro", 1.0), ("pro", True), (None, {"a": [1]}), ("p\x00", 1), ("pro", float("nan")),
              ("pro", Decimal("1.0")), ("pro", Decimal("1.00")), ("pro", -0.0), ("pro", 0.0)]
    rows = [(aud, *who, *values) for aud in ("gold", "plan") for who in identities for values in traits]
    shared = sql_rows.RowReader(columns, events)
    for row in rows + rows[::-1]:
        got = shared.member(row)
        assert got == sql_rows.RowReader(columns, events).member(row), row
        if not isinstance(got, Rejection):
            audience, user_id, email, properties, message_id = got
            built = events.entered(audience, user_id or None, email or None, properties)
            assert (message_id or f"sql:{audience}:{user_id}:{email}:snap") == built[0]
            n = json.loads(built[-1])["properties"]["n"]
            assert n == (str(row[-1]) if isinstance(row[-1], Decimal) else row[-1])


def test_built_events_match_the_documented_shape() -> None:
    events = sql_rows.Events(NOW, "snap")
    entered = json.loads(events.entered("gold", "u1", "a@example.com", '"plan":"pro",')[-1])
    assert entered == {
        "type": "track",
        "event": "Audience Entered",
        "messageId": "sql:gold:u1:a@example.com:snap",
        "timestamp": NOW.isoformat(),
        "properties": {"plan": "pro", "audience_key": "gold", "gold": True, "email": "a@example.com"},
        "context": {
            "personas": {"computation_class": "audience", "computation_key": "gold"},
            "library": {"name": "listsync-sql"},
        },
        "userId": "u1",
    }
    message_id, user_id, anonymous_id, email, payload = events.exited("gold", None, "a@example.com")
    exited = json.loads(payload)
    assert (message_id, user_id, anonymous_id, email) == (
        "sql:gold::a@example.com:snap",
        None,
        "email:a@example.com",
        "a@example.com",
    )
    assert exited["event"] == "Audience Exited" and exited["properties"]["gold"] is False
    assert exited["anonymousId"] == "email:a@example.com" and "userId" not in exited
    long_key = events.entered("g" * 255, "u1", None, "")[0]
    assert long_key.startswith("sql:") and len(long_key) == 4 + 64  # digest: fits the column


def test_identifier_columns_of_other_types_are_refused_as_the_receiver_refuses_them() -> None:
    reader = sql_rows.RowReader(["audience_key", "user_id", "email"], sql_rows.Events(NOW, "snap"))
    assert reader.member(("gold", 42, None))[:3] == ("gold", "42", "")  # an integer key column reads as text
    for odd, kind in ((True, "boolean"), (1.5, "number")):
        refused = reader.member(("gold", odd, None))
        assert isinstance(refused, Rejection) and refused.reason.startswith("invalid_user_id:") and kind in refused.reason


USER_IDS: list[Any] = ["u1", "U-1.x:y@z+w_9", "u" * 52, "u" * 53, " u1", "u1 ", "u 1", "u\t1", "ü1", "u\x001", None]
EMAILS: list[Any] = [
    "a@example.com",
    "a.b+c_d-e@ex-ample.co.uk",
    "A@Example.COM",
    "\u212a@example.com",  # the Kelvin sign: lower-cased, a plain "k"
    "\u0130@example.com",  # İ: lower-cased, "i" and a combining dot
    " a@example.com",
    "a@example.com\n",
    "a@b",
    "a@b.",
    "a@.b",
    "a@@b.c",
    "a@b@c.d",
    "a b@c.d",
    "é@example.com",
    "a" * 244 + "@b.cd",  # 249: the anonymousId `email:<email>` is 255
    "a" * 245 + "@b.cd",
    "a\x00@b.cd",
    None,
]


def test_plain_identifiers_are_ones_validate_member_keeps_as_they_are() -> None:
    """The reader accepts a row of plain identifiers without validate_member: every pair it calls
    plain must be one validate_member accepts unchanged; the others take validate_member."""
    plain = 0
    for user_id in USER_IDS:
        for email in EMAILS:
            read = sql_rows._plain(user_id, email)
            if read is None:
                continue
            plain += 1
            checked = validate.validate_member("gold", user_id, email, {"plan": "pro"})
            assert not isinstance(checked, Rejection), (user_id, email, checked)
            assert (checked.user_id or "", checked.email or "") == read
    assert plain == 4 * 6 - 1  # 3 plain userIds or none, by 5 plain emails or none, less (None, None)
    odd_types = (True, 1.5, 42, b"u")
    assert all(sql_rows._plain(odd, None) is None and sql_rows._plain(None, odd) is None for odd in odd_types)


def test_a_row_of_plain_identifiers_reads_as_validate_member_reads_it() -> None:
    """The same snapshot row by either way, for traits that may take the plain way and ones that
    may not (a write key dropped, a NUL, a large value)."""
    columns = ["audience_key", "user_id", "email", "plan", "writeKey"]
    events = sql_rows.Events(NOW, "snap")
    for aud in ("gold", "g" * 250, "", "go\x00ld"):
        for values in (("pro", None), ("pro", "s3cret"), ("p\x00", None), ("x" * 31_000, None)):
            traits = dict(zip(columns[3:], values, strict=True))
            for user_id, email in (("u1", None), (None, "a@example.com"), ("u1", "a@example.com")):
                got = sql_rows.RowReader(columns, events).member((aud, user_id, email, *values))
                expected = reference(aud, user_id, email, traits)
                if isinstance(expected, str):
                    assert isinstance(got, Rejection) and got.reason.startswith(expected + ":"), got
                    continue
                assert not isinstance(got, Rejection), got
                assert got[:3] == (aud, user_id or "", email or "")
                assert "s3cret" not in got[3]
