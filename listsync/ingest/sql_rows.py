"""The SQL source's rows, pure: a warehouse row read as the receiver would read the audience event
built from it (`RowReader`), and the shape of the events a poll builds (`EVENT_SHAPE`, filled by
`Events` here for exits and by `listsync.db.snapshot` in SQL for enters).

Each row is validated once, where it enters the snapshot (`validate.validate_member`: the rules
`validate_event` applies, field by field); the events built from validated rows are stored
without being validated again, and marked with the rules that accepted them (`stored.RULES`).
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from listsync.domain import Rejection
from listsync.ingest import extract, validate
from listsync.ingest.audience import AUDIENCE_ENTERED, AUDIENCE_EXITED

SQL_MESSAGE_PREFIX = "sql:"

SQL_IDENTITY_COLUMNS = ("audience_key", "user_id", "email")

_MAX_MESSAGE_ID = 255  # inbox.message_id is VARCHAR(255)

# What an event adds to its traits' JSON, beyond 6 bytes (the longest JSON escape) per character
# of the audience key (4 times in it), the email (twice), the userId and the messageId: the fixed
# keys and names, the timestamp. A row whose bound exceeds MAX_EVENT_BYTES is checked exactly.
_EVENT_OVERHEAD = 512

_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})

# Traits as the snapshot keeps them and events carry them (`validate_member`'s traits_json).
_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
STRING = json.encoder.encode_basestring  # a str as JSON text, at C speed

# Distinct trait values remembered per poll: a column such as a plan or a country repeats, and its
# encoding is then done once; values that never repeat only cost the lookup.
_TRAITS_CACHE_SIZE = 4096

# The holes of EVENT_SHAPE: JSON text each (see `Events._event` for what goes in them).
MESSAGE_ID, PROPERTIES, KEY, FLAG, EMAIL, WHO = "message_id", "properties", "key", "flag", "email", "who"
EMAIL_FIELD = ',"email":'  # EMAIL: this and the email as a JSON string, or nothing without an email
USER_ID_FIELD = '"userId":'  # WHO: this and the userId, else ANONYMOUS_ID_FIELD and the stand-in
ANONYMOUS_ID_FIELD = '"anonymousId":'
ANONYMOUS_PREFIX = "email:"  # an email-only member's anonymousId is this and the email

# An Engage-style track as text, literal parts and holes: `Audience Entered` / `Audience Exited`
# with properties {**traits, audience_key, <audience>: true/false, email} and the audience as the
# computation key. PROPERTIES: the traits' members, each followed by a comma.
EVENT_SHAPE: tuple[str, ...] = (
    '{"type":"track","event":', "event", ',"messageId":', MESSAGE_ID, ',"timestamp":', "timestamp",
    ',"properties":{', PROPERTIES, '"audience_key":', KEY, ",", KEY, ":", FLAG, EMAIL,
    '},"context":{"personas":{"computation_class":"audience","computation_key":', KEY,
    '},"library":{"name":"listsync-sql"}},', WHO, "}",
)  # fmt: skip
HOLES = frozenset({MESSAGE_ID, PROPERTIES, KEY, FLAG, EMAIL, WHO})  # per event; the others per poll

# Identifiers of a shape `validate_member` keeps as they are, whatever goes with them: a userId of
# these characters (no space to strip, ASCII, at most 52), an email with nothing to trim that has
# its "name@domain.tld" shape once lower-cased, short enough for the anonymousId `email:<email>` (255). A
# row of such identifiers, whose audience and traits passed once (`_Traits.plain`), is accepted
# without `validate_member`; any other row takes it.
_PLAIN_USER_ID = re.compile(r"[A-Za-z0-9._:@+\-]{1,52}").fullmatch
_PLAIN_EMAIL = re.compile(r"[a-z0-9._+\-]+@[a-z0-9\-]+(?:\.[a-z0-9\-]+)+").fullmatch
_PLAIN_USER_ID_LENGTH, _PLAIN_EMAIL_LENGTH = 52, 255 - len("email:")

# What RowReader.member makes of a valid row: the snapshot's (audience_key, user_id, email,
# properties, message_id) values; '' for a missing identifier, message_id only when the readable
# one does not fit (else None: it is `sql:<audience>:<user>:<email>:<snapshot>`).
SnapshotRow = tuple[str, str, str, str, str | None]


def event_parts(event: str, timestamp: datetime) -> list[str]:
    """EVENT_SHAPE with what one poll's events of one name share filled in (the event name and
    timestamp, as JSON text): every part is then literal JSON text or one of HOLES."""
    fixed = {"event": STRING(event), "timestamp": STRING(timestamp.isoformat())}
    return [fixed.get(part, part) for part in EVENT_SHAPE]


def check_columns(columns: Sequence[str]) -> None:
    if "audience_key" not in columns or not {"user_id", "email"} & set(columns):
        raise ValueError(
            "the SQL source query must return an audience_key column and a user_id and/or email "
            f"column; it returned {', '.join(columns) or 'no columns'}"
        )


@dataclass(frozen=True)
class _Traits:
    """One row's traits: as validate_member takes them, as JSON (None: not encodable, let
    validate_member say why), as the leading members of the event's properties, and the
    byte size of the JSON. `plain`: with their audience, they pass validate_member unchanged
    whatever plain identifiers go with them, and the event of the longest such fits
    MAX_EVENT_BYTES (see _PLAIN_USER_ID)."""

    values: Mapping[str, Any]
    encoded: str | None
    properties: str
    size: int
    plain: bool = False


class RowReader:
    """Source rows -> SnapshotRow values, normalised as the receiver would normalise the event, or
    the Rejection the receiver would give it; so a member's key here is the key its membership
    row gets when the event is applied, and the diff compares like with like."""

    def __init__(self, columns: Sequence[str], events: Events) -> None:
        check_columns(columns)
        where = {name: i for i, name in enumerate(columns)}  # a repeated name: the last one counts
        self._audience = where["audience_key"]
        self._user_id = where.get("user_id")
        self._email = where.get("email")
        traits = [(name, i) for name, i in where.items() if name not in SQL_IDENTITY_COLUMNS]
        self._names = tuple(name for name, _ in traits)
        self._values = _picker([i for _, i in traits])
        self._events = events
        self._cache: dict[Any, _Traits] = {}

    def member(self, row: Sequence[Any]) -> SnapshotRow | Rejection:
        audience = row[self._audience]
        user_id = None if self._user_id is None else _text(row[self._user_id])
        email = None if self._email is None else _text(row[self._email])
        traits = self._traits(audience, self._values(row))
        plain = _plain(user_id, email) if traits.plain else None
        if plain is not None:
            long_id = self._events.long_message_id(audience, *plain)
            return audience, *plain, traits.properties, long_id
        checked = validate.validate_member(
            audience, user_id, email, traits.values, traits_json=traits.encoded
        )
        if isinstance(checked, Rejection):
            return checked
        if traits.encoded is None or checked.traits is not traits.values:  # write keys were dropped
            traits = _traits_of(checked.traits)
        if _size_bound(audience, checked, traits.size) > extract.MAX_EVENT_BYTES:
            built = self._events.entered(audience, checked.user_id, checked.email, traits.properties)
            exact = validate.validate_event(json.loads(built[-1]), received_at=self._events.now)
            if isinstance(exact, Rejection):
                return exact
        user_id, email = checked.user_id or "", checked.email or ""
        return (
            audience,
            user_id,
            email,
            traits.properties,
            self._events.long_message_id(audience, user_id, email),
        )

    def _traits(self, audience: Any, values: tuple[Any, ...]) -> _Traits:
        # Typed key: 1, 1.0 and True are equal keys, but not the same JSON; and values whose
        # equal ones may encode differently (Decimal 1.0 and 1.00, -0.0 and 0.0, datetimes in
        # two offsets) are keyed by their repr.
        exact = tuple(value if type(value) in _EXACT_KEYS else repr(value) for value in values)
        key = (audience, exact, tuple(map(type, values)))
        try:
            cached = self._cache.get(key)
        except TypeError:  # a value that is not hashable (a JSON column): not remembered
            return self._read_traits(audience, values)
        if cached is None:
            if len(self._cache) >= _TRAITS_CACHE_SIZE:
                self._cache.clear()
            cached = self._cache[key] = _with_plain(audience, self._read_traits(audience, values))
        return cached

    def _read_traits(self, audience: Any, values: tuple[Any, ...]) -> _Traits:
        traits = {name: _json_value(value) for name, value in zip(self._names, values, strict=True)}
        if isinstance(audience, str):
            traits.pop(audience, None)  # the event's own flag of that name overrides it
        return _traits_of(traits)


_EXACT_KEYS = frozenset({str, int, bool, type(None)})


def _with_plain(audience: Any, traits: _Traits) -> _Traits:
    """`traits`, marked plain when they are (see _Traits); checked once per audience and traits."""
    if traits.encoded is None:
        return traits
    checked = validate.validate_member(audience, "u", None, traits.values, traits_json=traits.encoded)
    if isinstance(checked, Rejection) or checked.traits is not traits.values:
        return traits
    longest = validate.CheckedMember("u" * _PLAIN_USER_ID_LENGTH, "e" * _PLAIN_EMAIL_LENGTH, traits.values)
    if _size_bound(audience, longest, traits.size) > extract.MAX_EVENT_BYTES:
        return traits
    return _Traits(traits.values, traits.encoded, traits.properties, traits.size, plain=True)


def _plain(user_id: Any, email: Any) -> tuple[str, str] | None:
    """The (userId, email) of the snapshot row when validate_member would keep these identifiers
    as they are but for lower-casing the email (see _PLAIN_USER_ID), else None."""
    if user_id is not None and not (type(user_id) is str and _PLAIN_USER_ID(user_id)):
        return None
    if email is None:
        return None if user_id is None else (user_id, "")
    if type(email) is not str or len(email) > _PLAIN_EMAIL_LENGTH:
        return None
    email = email.lower()  # as validate_member has it; a space to strip is not plain
    return (user_id or "", email) if _PLAIN_EMAIL(email) else None


def _picker(indexes: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """The values at `indexes` of a row, as a tuple (itemgetter gives a bare value for one)."""
    if not indexes:
        return lambda _row: ()
    if len(indexes) == 1:
        only = indexes[0]
        return lambda row: (row[only],)
    return operator.itemgetter(*indexes)


def _traits_of(traits: Mapping[str, Any]) -> _Traits:
    try:
        encoded = _ENCODE(traits)
    except ValueError:  # a non-finite number: validate_member says where
        return _Traits(traits, None, "", 0)
    properties = f"{encoded[1:-1]}," if len(encoded) > 2 else ""
    return _Traits(traits, encoded, properties, len(encoded.encode("utf-8", "surrogatepass")))


def _text(value: Any) -> Any:
    """An identifier column as text: integer and UUID columns are common keys and read as their
    text; anything else (a boolean, a float) is passed on as it is, for validation to refuse as
    the receiver refuses it."""
    if type(value) is str:
        return value or None
    if value is None:
        return None
    if isinstance(value, int | uuid.UUID) and not isinstance(value, bool):
        return str(value)
    return value


def _json_value(value: Any) -> Any:
    """A column's value as JSON carries it (Decimal, dates and the like become strings)."""
    if type(value) in _JSON_SCALARS:
        return value
    return json.loads(json.dumps(value, default=str))


def _size_bound(audience: str, member: validate.CheckedMember, traits_size: int) -> int:
    """More bytes than the largest event built for this member can take (see _EVENT_OVERHEAD)."""
    chars = 4 * len(audience) + 2 * len(member.email or "") + len(member.user_id or "") + _MAX_MESSAGE_ID
    return traits_size + 6 * chars + _EVENT_OVERHEAD


class Events:
    """The synthetic events of one poll (one timestamp, one snapshot id), each built as a row of
    `snapshot.STAGED`: (messageId, userId, anonymousId, email, the event as JSON text), in the
    shape of EVENT_SHAPE; userId, or for an email-only member the stable stand-in anonymousId
    `email:<email>` (Segment requires one of the two). Built as text: the parts are JSON already
    (the traits as the snapshot keeps them), and a member's traits never hold the audience's own
    name."""

    def __init__(self, now: datetime, snapshot_id: str) -> None:
        self.now = now
        self.snapshot_id = snapshot_id
        self._parts = {name: event_parts(name, now) for name in (AUDIENCE_ENTERED, AUDIENCE_EXITED)}

    def entered(
        self, audience: str, user_id: str | None, email: str | None, properties: str
    ) -> tuple[Any, ...]:
        """`properties`: the traits' members, each followed by a comma (SnapshotRow's)."""
        return self._event(AUDIENCE_ENTERED, "true", audience, user_id, email, properties)

    def exited(self, audience: str, user_id: str | None, email: str | None) -> tuple[Any, ...]:
        return self._event(AUDIENCE_EXITED, "false", audience, user_id, email, "")

    def long_message_id(self, audience: str, user_id: str, email: str) -> str | None:
        """The messageId of this member's events when it is not the readable one, else None."""
        if len(audience) + len(user_id) + len(email) + len(self.snapshot_id) + 7 <= _MAX_MESSAGE_ID:
            return None
        return message_id(audience, user_id, email, self.snapshot_id)

    def _event(
        self, name: str, flag: str, audience: str, user_id: str | None, email: str | None, properties: str
    ) -> tuple[Any, ...]:
        message = message_id(audience, user_id, email, self.snapshot_id)
        anonymous_id = None if user_id else f"{ANONYMOUS_PREFIX}{email}"
        who = (
            f"{USER_ID_FIELD}{STRING(user_id)}"
            if user_id
            else f"{ANONYMOUS_ID_FIELD}{STRING(anonymous_id or '')}"
        )
        holes = {
            MESSAGE_ID: STRING(message),
            PROPERTIES: properties,
            KEY: STRING(audience),
            FLAG: flag,
            EMAIL: f"{EMAIL_FIELD}{STRING(email)}" if email else "",
            WHO: who,
        }
        payload = "".join(holes.get(part, part) for part in self._parts[name])
        return message, user_id, anonymous_id, email, payload


def message_id(audience: str, user_id: str | None, email: str | None, snapshot_id: str) -> str:
    """`sql:<audience>:<user>:<email>:<snapshot>`, or a digest of it when that is too long."""
    readable = f"{SQL_MESSAGE_PREFIX}{audience}:{user_id or ''}:{email or ''}:{snapshot_id}"
    if len(readable) <= _MAX_MESSAGE_ID:
        return readable
    # Long audience keys and emails do not fit the column; a digest keeps it deterministic.
    return SQL_MESSAGE_PREFIX + hashlib.sha256(readable.encode("utf-8")).hexdigest()
