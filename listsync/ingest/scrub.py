"""Secrets out of what listsync keeps for diagnosis: rejected payloads and unparsable bodies.

One detector for the whole package: a key is secret when its name, folded to lower-case letters
and digits, contains one of `SECRET_MARKERS`. `redact` applies it to decoded JSON; `scrub_text`
to text that may not be JSON at all (a malformed body, an excerpt), where it also blanks HTTP
Basic/Bearer credentials found inside values.

`scrub_text` is written to run in time linear in its input, whatever the input: it is applied
to bodies an attacker chooses, in the receiver's process. Every regular expression below either
matches literals or uses possessive quantifiers, and each scan resumes after what the previous
one consumed, so no character is examined more than a bounded number of times.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

SECRET_MARKERS = ("writekey", "apikey", "password", "passwd", "secret", "token", "authorization")
MAX_KEPT_CHARS = 64 * 1024
REDACTED = "[redacted]"
# Beyond this depth a kept payload is cut rather than walked (the event was refused for it).
MAX_REDACT_DEPTH = 64

NOT_ALNUM = re.compile(r"[^a-z0-9]")  # what key comparisons ignore
_MARKER = re.compile(r"write[_-]?key|api[_-]?key|password|passwd|secret|token|authorization", re.IGNORECASE)
# The rest of the key after its marker, an optional closing quote, and the separator.
_KEY_TAIL = re.compile(r"""[\w-]*+["']?+\s*+[:=]\s*+""")
_WORD_TAIL = re.compile(r"[\w-]*+")
_DOUBLE_QUOTED = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_SINGLE_QUOTED = re.compile(r"'(?:[^'\\]++|\\.)*+'", re.DOTALL)
_BARE_VALUE = re.compile(r"[^\s,}\]]++")
# Inside a bracketed value: strings (escapes consumed, so a stray \" never opens one) or brackets.
_BRACKET_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|\\.|[\[\]{}]', re.DOTALL)
_ESCAPED_WORD_CHAR = re.compile(r"\\u00(4[1-9a-fA-F]|5[0-9aAfF]|6[1-9a-fA-F]|7[0-9aA]|3[0-9]|2[dD])")
_SCHEME_CREDENTIAL = re.compile(r"[ \t]++(?:\[redacted\]|[^\s,}\]\"']++)")
_CREDENTIALS = re.compile(r"\b(basic|bearer)\s++([A-Za-z0-9+/=._~-]++)", re.IGNORECASE)


def is_secret_key(key: Any) -> bool:
    folded = NOT_ALNUM.sub("", str(key).lower())
    return any(marker in folded for marker in SECRET_MARKERS)


def redact(raw: Mapping[str, Any], *, depth: int = 0) -> dict[str, Any]:
    """A copy of a decoded JSON object without secret keys, at any depth (lists included).

    This errs on the side of dropping (a device push token goes too): the copy is for diagnosis,
    not replay. Objects nested deeper than MAX_REDACT_DEPTH are replaced by a marker.
    """
    return {k: _redact_value(v, depth + 1) for k, v in raw.items() if not is_secret_key(k)}


def redact_value(value: Any) -> Any:
    return _redact_value(value, 0)


def _redact_value(value: Any, depth: int) -> Any:
    if depth > MAX_REDACT_DEPTH and isinstance(value, Mapping | list):
        return "[nested too deep]"
    if isinstance(value, Mapping):
        return redact(value, depth=depth)
    if isinstance(value, list):
        return [_redact_value(v, depth + 1) for v in value]
    return value


def scrub_text(text: str) -> str:
    """At most MAX_KEPT_CHARS of `text`, with secret values and credentials blanked.

    Handles `key: value`, `"key": "value"` (escaped quotes inside), `key=value`, arrays and
    objects as values, JSON-escaped letters in key names (`write\\u004bey`), and `Basic ...` /
    `Bearer ...` credentials anywhere. NUL characters are escaped, as PostgreSQL text cannot
    hold them; lone surrogates are replaced, as no database encoding can.
    """
    kept = text[:MAX_KEPT_CHARS]
    if "\\u00" in kept:
        kept = _ESCAPED_WORD_CHAR.sub(lambda m: chr(int(m.group(1), 16)), kept)
    scrubbed = _blank_secret_values(_CREDENTIALS.sub(_blank_credentials, kept))
    return _storable(scrubbed.replace("\x00", "\\u0000"))


def _storable(text: str) -> str:
    """`text` without lone surrogates (which no UTF-8 database can store)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "replace").decode("utf-8") if _has_surrogate(text) else text


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _blank_secret_values(text: str) -> str:
    parts: list[str] = []
    done = 0
    position = 0
    while (marker := _MARKER.search(text, position)) is not None:
        tail = _KEY_TAIL.match(text, marker.end())
        if tail is None:
            # Not a key: skip the rest of this word so a long run is scanned once, not per marker.
            position = _WORD_TAIL.match(text, marker.end()).end()  # type: ignore[union-attr]
            continue
        value_start = tail.end()
        value_end = _value_end(text, value_start)
        if value_end > value_start:
            parts.append(text[done:value_start])
            parts.append(f'"{REDACTED}"')
            done = value_end
        position = max(value_end, tail.end(), marker.end())
    parts.append(text[done:])
    return "".join(parts)


def _value_end(text: str, start: int) -> int:
    """Where the value starting at `start` ends; the end of `text` when it is never closed."""
    if start >= len(text):
        return start
    opener = text[start]
    if opener in "[{":
        return _bracket_end(text, start)
    pattern = {'"': _DOUBLE_QUOTED, "'": _SINGLE_QUOTED}.get(opener)
    if pattern is not None:
        quoted = pattern.match(text, start)
        return quoted.end() if quoted is not None else len(text)
    bare = _BARE_VALUE.match(text, start)
    if bare is None:
        return start
    if bare.group().lower() in ("basic", "bearer"):  # `Authorization: Basic <credential>`
        credential = _SCHEME_CREDENTIAL.match(text, bare.end())
        return credential.end() if credential is not None else bare.end()
    return bare.end()


def _bracket_end(text: str, start: int) -> int:
    depth = 0
    for token in _BRACKET_TOKENS.finditer(text, start):
        symbol = token.group()
        if symbol in "[{":
            depth += 1
        elif symbol in "]}":
            depth -= 1
            if depth == 0:
                return token.end()
    return len(text)


def _blank_credentials(match: re.Match[str]) -> str:
    scheme, credential = match.group(1), match.group(2)
    if scheme.lower() == "bearer":
        return f"{scheme} {REDACTED}" if len(credential) >= 8 else match.group()
    return f"{scheme} {REDACTED}" if _is_basic_credential(credential) else match.group()


def _is_basic_credential(candidate: str) -> bool:
    """Base64 of `user:password`, as an HTTP Basic Authorization header carries it."""
    if len(candidate) > 1024:
        return True
    try:
        decoded = base64.b64decode(candidate, validate=True)
    except (binascii.Error, ValueError):
        return False
    return b":" in decoded


def kept_payload(raw: Any) -> str:
    """An event as kept in rejected_events: secrets removed, bounded, storable."""
    return scrub_text(json.dumps(redact(raw), default=str))
