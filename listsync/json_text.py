"""JSON in and out of ingest, fast where it is safe to be: orjson when it gives exactly what the
standard library would, the standard library otherwise.

orjson parses and encodes about ten times faster, but it differs from Python's json in ways the
hostile-input rules depend on: it refuses a whole body for one lone surrogate, NaN, an
out-of-range number or very deep nesting (where listsync rejects the one event, naming why), it
reads integers beyond 64 bits as floats, and it encodes NaN/Infinity as null. So `loads` uses it
only for text without long digit runs and falls back to `json.loads` on any refusal, and
`dumps` falls back for what orjson will not encode (integers beyond 64 bits, depth). The
fallback reproduces the stdlib's result and its error messages exactly.

Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the stdlib still does the job
    orjson = None  # type: ignore[assignment]

# 19 digits in a row may be an integer beyond 64 bits, which orjson would turn into a float.
# Mapping every digit to "0" and looking for a run is one C pass (a regex tries each position).
_LONG_RUN = 19
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_DIGITS_TO_ZERO_TEXT = str.maketrans("123456789", "000000000")


def fast_loads(text: bytes | str, *, digits_checked: bool = False) -> Any:
    """orjson's result when it is the stdlib's too; raises ValueError when the caller must use
    the stdlib (which may still accept the text, or refuse it with its own message).

    `digits_checked`: the caller has seen `has_long_digits` false for a text containing this one
    (one check for a whole batch of lines is cheaper than one per line)."""
    if orjson is None:
        raise ValueError("orjson is not installed")
    if not digits_checked and has_long_digits(text):
        raise ValueError("long digit runs are parsed by the stdlib")
    return orjson.loads(text)  # JSONDecodeError is a ValueError


def has_long_digits(text: bytes | str) -> bool:
    """Whether `text` has a run of digits long enough to be an integer beyond 64 bits."""
    if isinstance(text, bytes):
        return b"0" * _LONG_RUN in text.translate(_DIGITS_TO_ZERO)
    return "0" * _LONG_RUN in text.translate(_DIGITS_TO_ZERO_TEXT)


def dumps(value: Any) -> str:
    """Compact JSON text, non-ASCII kept as is (what `json.dumps(separators=(",", ":"),
    ensure_ascii=False, default=str)` gives, up to the spelling of floats)."""
    encoded = dumps_bytes(value)
    return encoded.decode("utf-8") if encoded is not None else _stdlib_dumps(value)


def dumps_bytes(value: Any) -> bytes | None:
    """orjson's encoding of `value`, or None when orjson cannot encode it exactly (a lone
    surrogate, an integer beyond 64 bits, a non-finite float, nesting past its limit)."""
    if orjson is None:
        return None
    try:
        return orjson.dumps(value, default=str)
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        return None


def finite_dumps(value: Any) -> str:
    """JSON text that `json.loads` reads back as `value`, for a value made of JSON types (what a
    request body holds): refusing what `json.dumps(value, allow_nan=False)` refuses (ValueError
    for NaN or Infinity). orjson writes non-finite floats as null, so text with a null in it, and
    whatever orjson will not encode, is encoded again by the stdlib, which raises or gives its own
    text. (orjson also encodes dates, UUIDs and enums, which bodies never hold.)"""
    if orjson is not None:
        try:
            fast = orjson.dumps(value)
        except TypeError:  # a lone surrogate, an integer beyond 64 bits, depth, a non-JSON type
            fast = None
        if fast is not None and b"null" not in fast:
            return fast.decode("utf-8")
    return json.dumps(value, allow_nan=False)


def _stdlib_dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages a sender can act on."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    names: dict[type, str] = {str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def canonical(value: Any) -> str:
    """Sorted keys, compact: the text a messageId is derived from (stdlib, so it never changes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stdlib_dump(value: Any) -> str:
    """The stdlib's compact encoding, which sizes and dead letters are measured in."""
    return _stdlib_dumps(value)


def encoded_size(value: Any, *, exact_above: int = 0) -> int | None:
    """UTF-8 bytes of `value` as compact stdlib JSON; None when nested too deep to encode.

    orjson measures first; only sizes above `exact_above` (where a few bytes could cross a
    limit: orjson spells some floats shorter) are measured again the stdlib's way.
    """
    fast = dumps_bytes(value)
    if fast is not None and len(fast) <= exact_above:
        return len(fast)
    try:
        return len(_stdlib_dumps(value).encode("utf-8", "surrogatepass"))
    except RecursionError:
        return None

