"""Receive: what Segment's Webhooks destinations sign, and checking it (pure, no I/O).

Webhooks (Actions) (segmentio/action-destinations, `destinations/webhook/index.ts`, `extendRequest`)
puts in `X-Signature` the hex HMAC-SHA1, keyed with the destination's shared secret, of
`JSON.stringify(payload.length ? payload[0].data : payload.data)`. Its request client writes the
body with `JSON.stringify` too, so:

* one event per request: the signed text is the body, byte for byte;
* batching on: the body is `JSON.stringify` of the array of events, but the signed text is the
  **first event alone**. `JSON.stringify` writes an array as `[`, each element's own text joined by
  `,`, then `]`, so that signed text is exactly the first element's bytes in the body. It is checked
  there, as sent, rather than by re-serialising the parsed event in Python, which could differ from
  JavaScript's output (number formats, the order of integer-like keys). Such a signature proves
  nothing about the other events of the array.

Some releases of the destination sign the whole array, and a newer opt-in setting sends
`X-Segment-Signature`, the HMAC of the whole body; both are the HMAC of the body, so the first case
covers them (`X-Segment-Signature` is checked against the whole body only).

Every candidate digest is compared with every secret through `hmac.compare_digest`, without stopping
at a match, so the time taken says nothing about which secret or which form matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence

SIGNATURE_HEADER = "x-signature"
BODY_SIGNATURE_HEADER = "x-segment-signature"

_JSON_SPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


def signature_matches(
    signature: str, body: bytes, secrets: Sequence[bytes], *, whole_body_only: bool = False
) -> bool:
    """Whether `signature` (hex) is the HMAC-SHA1 of `body`, or of its first array element, with a secret.

    `whole_body_only` leaves out the first-element form (for `X-Segment-Signature`).
    """
    given = signature.strip().lower().encode("ascii", "replace")
    signed = [body]
    first = None if whole_body_only else first_element(body)
    if first is not None:
        signed.append(first)
    match = False
    for secret in secrets:
        for text in signed:
            match |= hmac.compare_digest(given, sign(secret, text).encode("ascii"))
    return match


def sign(secret: bytes, text: bytes) -> str:
    """The hex HMAC-SHA1 Segment sends, of `text` with `secret`."""
    return hmac.new(secret, text, hashlib.sha1).hexdigest()


def first_element(body: bytes) -> bytes | None:
    """The bytes of the first element of a JSON array body, exactly as they stand in it.

    None when the body is not UTF-8, not an array, empty, or its first element does not parse.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    start = _skip_space(text, 0)
    if not text.startswith("[", start):
        return None
    start = _skip_space(text, start + 1)
    try:
        _, end = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):  # also an empty array: "]" is not a value
        return None
    return text[start:end].encode("utf-8")


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in _JSON_SPACE:
        index += 1
    return index
