"""Hostile Segment events for the property-based suite (tests/integration/test_hostile_input.py).

A `Mutation` is a plain, printable description (hypothesis shows it when an example fails);
`build` turns it into a `Case`: the raw JSON bytes of one event, whether listsync must refuse it,
whether it can share a request body with other events, the member it adds when it is tolerated,
and the secrets planted in it. Raw bytes, not dicts, because the interesting inputs (`\\ud800`
escapes, `1e999`, `NaN`, 5000-digit numbers, invalid UTF-8) cannot be produced by json.dumps.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from tests.helpers import audience_event

RAW = "@@raw@@"
_RAW_TOKEN = json.dumps(RAW).encode()
AUDIENCE_ID = "aud"  # flag and computation key are the audience name itself


@dataclass(frozen=True)
class Mutation:
    """What is wrong with one audience enter event. `where` and `value` depend on `kind`."""

    kind: str
    where: str
    value: Any
    track: bool = False


@dataclass(frozen=True)
class Case:
    """One built hostile event.

    Attributes:
        text: the event as raw JSON bytes (no newline).
        refused: listsync must refuse it (and record it in rejected_events); otherwise it is a
            valid, if odd, event that must be applied and synced like any other.
        alone: the bytes make a whole receiver body unreadable (not JSON, not UTF-8), so the event
            is sent in a body of its own.
        member: (audience, email, userId) the event puts on a list when it is tolerated.
        secrets: strings that must never be stored (rejected_events; the inbox for write keys).
    """

    mutation: Mutation
    text: bytes
    refused: bool
    alone: bool = False
    member: tuple[str, str, str] | None = None
    secrets: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------
# Strategies


def _digits(count: int, uid: str) -> str:
    """An integer of `count` digits (more when needed) that no other member's can equal."""
    serial = "".join(c for c in uid if c.isdigit())
    count = max(count, len(serial) + 1)
    return "1" + "0" * (count - 1 - len(serial)) + serial


_SURROGATES = st.sampled_from([r"\ud800", r"a\udfffb", r"\udc00\ud800", r"x\udbff"])
_SURROGATE_SPOTS = st.sampled_from(["property", "property_key", "user_id", "trait_context", "no_message_id"])
_BAD_NUMBERS = st.sampled_from(["1e999", "-1e999", "1E400", "123e4567"])
_FINE_NUMBERS = st.sampled_from(["-0", "-0.0", "1e308", "5e-324", "0.1e-999", "-1.7976931348623157e308"])
_BAD_DATES = st.one_of(
    st.sampled_from(
        [
            "9999-12-31T23:59:59-14:00",
            "9999-12-31T23:59:59.999999-00:01",
            "0001-01-01T00:00:00+14:00",
            "0001-01-01T00:00:00.000001+00:01",
            "2024-02-30T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "",
            12345,
            True,
            None,  # stands for: timestamp is an object
        ]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz :-+", min_size=1, max_size=40),
)
_FINE_DATES = st.sampled_from(
    [
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59.999999+00:00",
        "9999-12-31T09:59:59-14:00",
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00-14:00",
        "2024-01-01",
        "  2024-05-01T10:00:00+05:30  ",
    ]
)
_INVALID_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\x80"])
SECRET_SPOTS = [
    "basic_in_value",
        "password",
        "nested_api_key",
        "token_in_list",
        "write_key_list",
        "escaped_write_key",
        "quote_in_write_key",
        "bearer_in_value",
        "key_equals_value",
        "deep_password",
    ]
_SECRET_SPOTS = st.sampled_from(SECRET_SPOTS)
_WRITE_KEY_SPOTS = st.sampled_from(["top", "context", "nested", "escaped", "dashed"])


def mutations() -> st.SearchStrategy[Mutation]:
    track = st.booleans()
    return st.one_of(
        st.builds(Mutation, st.just("surrogate"), _SURROGATE_SPOTS, _SURROGATES, track),
        st.builds(Mutation, st.just("emoji"), _SURROGATE_SPOTS, st.just(r"\ud83d\ude00"), track),
        st.builds(
            Mutation, st.just("nesting"), st.sampled_from(["list", "object", "secret"]),
            st.integers(55, 1000), track,
        ),
        st.builds(Mutation, st.just("bad_number"), st.sampled_from(["n", "context"]), _BAD_NUMBERS, track),
        st.builds(Mutation, st.just("fine_number"), st.sampled_from(["n", "context"]), _FINE_NUMBERS, track),
        st.builds(Mutation, st.just("big_int"), st.sampled_from(["n", "user_id"]), st.integers(1, 4000), track),
        st.builds(Mutation, st.just("huge_int"), st.sampled_from(["n", "user_id"]), st.integers(4301, 6000), track),
        st.builds(
            Mutation, st.just("non_finite_literal"), st.just("n"),
            st.sampled_from(["NaN", "Infinity", "-Infinity"]), track,
        ),
        st.builds(
            Mutation, st.just("bad_date"), st.sampled_from(["timestamp", "originalTimestamp"]), _BAD_DATES, track
        ),
        st.builds(
            Mutation, st.just("fine_date"), st.sampled_from(["timestamp", "originalTimestamp"]), _FINE_DATES, track
        ),
        st.builds(
            Mutation, st.just("long"),
            st.sampled_from(["user_id", "message_id", "event", "audience", "anonymous_id", "property_key"]),
            st.integers(1, 1200), track,
        ),
        st.builds(Mutation, st.just("invalid_utf8"), st.just("property"), _INVALID_UTF8, track),
        st.builds(Mutation, st.just("raw_control"), st.just("property"), st.sampled_from([b"\x00", b"\x01", b"\x1f"]), track),
        st.builds(Mutation, st.just("nul_escape"), st.sampled_from(["property", "property_key", "user_id"]),
                  st.just(r"\u0000"), track),
        st.builds(Mutation, st.just("secret"), _SECRET_SPOTS, st.just(None), track),
        st.builds(Mutation, st.just("write_key"), _WRITE_KEY_SPOTS, st.just(None), track),
        st.builds(Mutation, st.just("truncated"), _SECRET_SPOTS, st.integers(5, 95), track),
    )


# ---------------------------------------------------------------------------------------------
# Building


def secret_for(uid: str) -> str:
    """A planted secret: distinctive, so finding it anywhere means it leaked."""
    return f"zq{uid}SeCrEt"


def build(mutation: Mutation, audience: str, uid: str) -> Case:
    """The hostile enter event of member `uid` (email `<uid>@x.com`) in `audience`."""
    builder = _BUILDERS[mutation.kind]
    return builder(mutation, audience, uid)


def _base(mutation: Mutation, audience: str, uid: str, *, user_id: str | None = None) -> dict[str, Any]:
    kind = "track" if mutation.track else "identify"
    return audience_event(
        audience, inside=True, user_id=user_id or uid, email=f"{uid}@x.com", kind=kind, message_id=f"m-{uid}"
    )


def _bag(event: dict[str, Any]) -> dict[str, Any]:
    return event["traits"] if "traits" in event else event["properties"]  # type: ignore[no-any-return]


def _dump(event: dict[str, Any], raw: bytes | None = None) -> bytes:
    text = json.dumps(event).encode()
    if raw is not None:
        assert text.count(_RAW_TOKEN) == 1
        text = text.replace(_RAW_TOKEN, raw)
    return text


def _tolerated(mutation: Mutation, text: bytes, audience: str, uid: str, user_id: str | None = None, **kw: Any) -> Case:
    return Case(mutation, text, refused=False, member=(audience, f"{uid}@x.com", user_id or uid), **kw)


def _text_case(mutation: Mutation, audience: str, uid: str) -> Case:
    """A string (or key) holding raw JSON escapes: lone surrogates, an emoji pair, NUL."""
    event = _base(mutation, audience, uid)
    raw = f'"{mutation.value}"'.encode()
    spot = mutation.where
    if spot in ("property", "no_message_id"):
        _bag(event)["note"] = RAW
        if spot == "no_message_id":
            del event["messageId"]
    elif spot == "property_key":
        _bag(event)[RAW] = "v"
    elif spot == "trait_context":
        event["context"]["traits"] = {"nickname": RAW}
    else:  # user_id, kept unique: the escapes follow the member's own id
        event["userId"] = RAW
        raw = f'"{uid}{mutation.value}"'.encode()
    text = _dump(event, raw)
    if mutation.kind == "emoji":
        if spot == "user_id":
            return _tolerated(mutation, text, audience, uid, user_id=uid + "\U0001f600")
        return _tolerated(mutation, text, audience, uid)
    return Case(mutation, text, refused=True)


def _nesting(mutation: Mutation, audience: str, uid: str) -> Case:
    levels = int(mutation.value)
    event = _base(mutation, audience, uid)
    _bag(event)["blob"] = RAW
    if mutation.where == "list":
        raw = b"[" * levels + b"1" + b"]" * levels
    else:
        # A write key at the bottom: dropped from the inbox when tolerated, from rejected_events when not.
        inner = b'{"writeKey":"' + secret_for(uid).encode() + b'"}' if mutation.where == "secret" else b"{}"
        raw = b'{"a":' * (levels - 1) + inner + b"}" * (levels - 1)
    secrets = (secret_for(uid),) if mutation.where == "secret" else ()
    # The event is depth 1, properties 2, the outermost blob container 3: `levels` containers reach
    # depth levels + 2; extract refuses beyond 64. Past ~700 levels json itself may give up on a
    # whole receiver body (RecursionError), so such events are sent alone.
    if levels + 2 <= 64:
        return _tolerated(mutation, _dump(event, raw), audience, uid, secrets=secrets)
    return Case(mutation, _dump(event, raw), refused=True, alone=levels > 700, secrets=secrets)


def _number(mutation: Mutation, audience: str, uid: str) -> Case:
    event = _base(mutation, audience, uid)
    if mutation.where == "context":
        event["context"]["n"] = RAW
    else:
        _bag(event)["n"] = RAW
    text = _dump(event, str(mutation.value).encode())
    if mutation.kind == "fine_number":
        return _tolerated(mutation, text, audience, uid)
    return Case(mutation, text, refused=True, alone=mutation.kind == "non_finite_literal")


def _integer(mutation: Mutation, audience: str, uid: str) -> Case:
    digits = _digits(int(mutation.value), uid)
    event = _base(mutation, audience, uid)
    if mutation.where == "user_id":
        event["userId"] = RAW
    else:
        _bag(event)["n"] = RAW
    text = _dump(event, digits.encode())
    if mutation.kind == "huge_int":  # Python's json refuses integers over 4300 digits: the body is unreadable
        return Case(mutation, text, refused=True, alone=True)
    if mutation.where == "user_id":
        if len(digits) > 52:
            return Case(mutation, text, refused=True)
        return _tolerated(mutation, text, audience, uid, user_id=digits)
    return _tolerated(mutation, text, audience, uid)


def _date(mutation: Mutation, audience: str, uid: str) -> Case:
    event = _base(mutation, audience, uid)
    del event["timestamp"]
    event[mutation.where] = {"iso": "2024-01-01"} if mutation.value is None else mutation.value
    text = _dump(event)
    if mutation.kind == "fine_date":
        return _tolerated(mutation, text, audience, uid)
    return Case(mutation, text, refused=True)


def _long(mutation: Mutation, audience: str, uid: str) -> Case:
    """A field of `value` characters: refused past what the database and Iterable can hold."""
    length = int(mutation.value)
    pad = "L" * length
    spot = mutation.where
    if spot == "audience":
        key = (audience + "-" + pad)[:length] if length > len(audience) else audience
        event = _base(mutation, key, uid)
        text = _dump(event)
        if len(key) > 255:
            return Case(mutation, text, refused=True)
        return Case(mutation, text, refused=False, member=(key, f"{uid}@x.com", uid))
    if spot == "user_id":
        user_id = (uid + "-" + pad)[:length] if length > len(uid) else uid
        text = _dump(_base(mutation, audience, uid, user_id=user_id))
        if len(user_id) > 52:
            return Case(mutation, text, refused=True)
        return _tolerated(mutation, text, audience, uid, user_id=user_id)
    event = _base(mutation, audience, uid)
    if spot == "message_id":
        event["messageId"] = (f"m-{uid}-" + pad)[: max(length, len(uid) + 3)]
        refused = len(event["messageId"]) > 255
    elif spot == "anonymous_id":
        event["anonymousId"] = pad
        refused = length > 255
    elif spot == "property_key":
        _bag(event)[pad] = 1
        refused = False
    else:  # event name: a track named anything but Audience Entered/Exited is not an audience event
        event.update(type="track", event=pad)
        event.pop("traits", None)
        event.setdefault("properties", {})
        if length > 255:
            return Case(mutation, _dump(event), refused=True)
        return Case(mutation, _dump(event), refused=False)
    if refused:
        return Case(mutation, _dump(event), refused=True)
    return _tolerated(mutation, _dump(event), audience, uid)


def _bytes(mutation: Mutation, audience: str, uid: str) -> Case:
    """Bytes that are not JSON text: invalid UTF-8, raw control characters inside a string."""
    event = _base(mutation, audience, uid)
    _bag(event)["note"] = RAW
    return Case(mutation, _dump(event, b'"a' + mutation.value + b'b"'), refused=True, alone=True)


def _secret_case(mutation: Mutation, audience: str, uid: str) -> Case:
    """A secret in an odd place of an event refused for its timestamp: redaction must find it."""
    event = _base(mutation, audience, uid)
    event["timestamp"] = "not a date"
    text, secrets = _with_secret(event, mutation.where, secret_for(uid))
    return Case(mutation, text, refused=True, secrets=secrets)


def _with_secret(event: dict[str, Any], spot: str, secret: str) -> tuple[bytes, tuple[str, ...]]:
    bag = _bag(event)
    raw: bytes | None = None
    secrets: tuple[str, ...] = (secret,)
    if spot == "password":
        bag["password"] = secret
    elif spot == "nested_api_key":
        event["context"]["device"] = {"apiKey": secret}
    elif spot == "token_in_list":
        bag["list"] = [1, {"token": secret}, [{"Secret": [secret]}]]
    elif spot == "write_key_list":
        bag["writeKey"] = [secret]
    elif spot == "escaped_write_key":
        bag["x"] = RAW
        raw = b'{"write\\u004bey":"' + secret.encode() + b'"}'
    elif spot == "quote_in_write_key":
        bag["writeKey"] = f'a"{secret}'
    elif spot == "basic_in_value":
        token = base64.b64encode(f"{secret}:".encode()).decode()
        bag["note"] = f"Authorization: Basic {token}"
        secrets = (token,)
    elif spot == "bearer_in_value":
        bag["note"] = f"sent with Bearer {secret} by the app"
    elif spot == "key_equals_value":
        bag["note"] = f"password={secret}"
    else:  # deep_password
        bag["deep"] = {"a": [{"b": {"c": [{"PASSWORD": secret}]}}]}
    return _dump(event, raw), secrets


def _write_key_case(mutation: Mutation, audience: str, uid: str) -> Case:
    """A valid event carrying write keys: accepted, but no key may reach the inbox."""
    event = _base(mutation, audience, uid)
    secret = secret_for(uid)
    raw = None
    if mutation.where == "top":
        event["writeKey"] = secret
    elif mutation.where == "context":
        event["context"]["writeKey"] = secret
    elif mutation.where == "nested":
        _bag(event)["nested"] = {"list": [{"write_key": secret}]}
    elif mutation.where == "dashed":
        _bag(event)["Write-Key"] = secret
    else:
        _bag(event)["x"] = RAW
        raw = b'{"write\\u004bey":"' + secret.encode() + b'"}'
    return _tolerated(mutation, _dump(event, raw), audience, uid, secrets=(secret,))


def _truncated(mutation: Mutation, audience: str, uid: str) -> Case:
    """An event with a secret, cut at `value` percent: not JSON; the excerpt kept must be scrubbed."""
    event = _base(mutation, audience, uid)
    text, secrets = _with_secret(event, mutation.where, secret_for(uid))
    cut = max(1, len(text) * int(mutation.value) // 100)
    return Case(mutation, text[:cut], refused=True, alone=True, secrets=secrets)


_BUILDERS = {
    "surrogate": _text_case,
    "emoji": _text_case,
    "nul_escape": _text_case,
    "nesting": _nesting,
    "bad_number": _number,
    "fine_number": _number,
    "non_finite_literal": _number,
    "big_int": _integer,
    "huge_int": _integer,
    "bad_date": _date,
    "fine_date": _date,
    "long": _long,
    "invalid_utf8": _bytes,
    "raw_control": _bytes,
    "secret": _secret_case,
    "write_key": _write_key_case,
    "truncated": _truncated,
}
