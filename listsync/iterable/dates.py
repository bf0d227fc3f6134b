"""PURE: dates as Iterable takes them (`yyyy-MM-dd HH:mm:ss +00:00` in data fields, Unix seconds for
createdAt), from the ISO strings and numbers Segment events carry."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

_ISO = re.compile(
    r"(\d{4})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"(?:[T ](\d{2}):?(\d{2})(?::?(\d{2})(?:\.\d+)?)?\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?)?"
)


def iterable_date(text: str) -> str | None:
    """An ISO date-time as Iterable's `yyyy-MM-dd HH:mm:ss +00:00` in UTC; None if `text` is a
    plain date or not an ISO date-time (those are left alone)."""
    found = _ISO.fullmatch(text.strip())
    if found is None or found.group(4) is None:
        return None
    year, month, day, hour, minute, second, zone = found.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0), tzinfo=UTC)
    except ValueError:
        return None
    offset = _offset_minutes(zone)
    stamp = datetime.fromtimestamp(moment.timestamp() - offset * 60, tz=UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S +00:00")


def _offset_minutes(zone: str | None) -> int:
    # No zone: read as UTC, which is what Segment's servers (and listsync's inbox) use.
    if zone is None or zone in ("Z", "z"):
        return 0
    digits = zone[1:].replace(":", "")
    minutes = int(digits[:2]) * 60 + int(digits[2:4] or 0)
    return minutes if zone[0] == "+" else -minutes


def convert_dates(value: Any) -> Any:
    """A copy of `value` with every ISO date-time string inside it in Iterable's format."""
    if isinstance(value, str):
        return iterable_date(value) or value
    if isinstance(value, Mapping):
        return {key: convert_dates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [convert_dates(item) for item in value]
    return value


def unix_seconds(value: Any) -> int | None:
    """Whole Unix seconds from an ISO string or a number; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("z", "Z"))
        except ValueError:
            return None
        return int((parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp())
    return None
