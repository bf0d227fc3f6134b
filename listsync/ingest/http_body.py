"""The HTTP side of receiving: credentials from headers and bodies, reading a body within its
limits (size, time), gzip without bombs, and the answer a request comes to (`Outcome`).

Size limits follow Segment: 500 KB per body (after gzip decompression). At most 500 KB + 1 bytes
are ever read or decompressed, so a large or bomb body costs bounded memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import zlib
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from listsync.domain import Rejection
from listsync.ingest import extract
from listsync.ingest.accept import IngestCounts

MAX_BODY_BYTES = extract.MAX_BATCH_BYTES
# One byte past the limit is enough to know a body is too large; nothing beyond it is kept.
_READ_LIMIT = MAX_BODY_BYTES + 1
# Bytes of an oversized body read (and discarded) so that its sender receives the answer.
DRAIN_LIMIT = 16 * 1024 * 1024
BODY_TIMEOUT_SECONDS = 30.0
_GZIP_ENCODINGS = frozenset({"gzip", "x-gzip"})
_PLAIN_ENCODINGS = frozenset({"", "identity"})


@dataclass(frozen=True)
class Outcome:
    """What one request came to, ready to become a response."""

    status: int
    error: str | None = None
    counts: IngestCounts | None = None

    def response(self) -> JSONResponse:
        if self.error is not None:
            return JSONResponse({"success": False, "error": self.error}, status_code=self.status)
        counts = self.counts or IngestCounts()
        body = {
            "success": True,
            "accepted": counts.accepted,
            "duplicates": counts.duplicates,
            "rejected": counts.rejected,
        }
        return JSONResponse(body, status_code=self.status)



def basic_user(header: str | None) -> str | None:
    """The user name of a Basic Authorization header; '' when the header is unusable, None if absent."""
    if header is None:
        return None
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[0]


def header_write_key(header: str | None) -> str | None:
    """The write key of an Authorization header: a `Bearer` token (what a Segment webhook
    destination can send as a custom header), else the Basic user name (see `basic_user`)."""
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
    return basic_user(header)


def body_write_key(body: bytes) -> str | None:
    """`writeKey` at the top of a JSON body, for senders that authenticate that way."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    key = decoded.get("writeKey") if isinstance(decoded, dict) else None
    return key if isinstance(key, str) else None


def declared_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


async def read_body(request: Request) -> bytes | Outcome:
    """The body (capped at _READ_LIMIT), or the answer for a sender that never finished sending it."""
    try:
        return await _read_capped(request, _READ_LIMIT)
    except ClientDisconnect:  # gone before the body arrived: nothing to store, nobody to answer
        return Outcome(400, error="client disconnected")
    except TimeoutError:
        return Outcome(408, error=f"request_timeout: body not received within {BODY_TIMEOUT_SECONDS:g} s")


async def _read_capped(request: Request, limit: int) -> bytes:
    """At most `limit` bytes of the body; the rest is read and discarded, never kept.

    Many clients (Python's urllib among them) write a whole body before reading the answer: if
    the server answered mid-body and closed, they would see a connection reset instead of the
    400. Up to DRAIN_LIMIT bytes are therefore drained; beyond that the connection is closed.
    The whole read must finish within BODY_TIMEOUT_SECONDS (a slow client is answered 408).
    """
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
        async for chunk in request.stream():
            if size < limit:
                chunks.append(chunk[: limit - size])
            size += len(chunk)
            if size > DRAIN_LIMIT:
                break
    return b"".join(chunks)


def decode(raw: bytes, encoding: str, declared: int | None) -> tuple[bytes, Rejection | None]:
    """The JSON bytes of a body, or the bytes kept for the dead letter and why it was refused."""
    encoding = encoding.strip().lower()
    if len(raw) > MAX_BODY_BYTES or (declared is not None and declared > MAX_BODY_BYTES):
        known = declared is not None and declared > MAX_BODY_BYTES
        size = f"{declared} bytes >" if known else "more than"
        # Compressed bytes would make an unreadable dead letter; keep text only.
        kept = raw[:MAX_BODY_BYTES] if encoding in _PLAIN_ENCODINGS else b""
        return kept, Rejection(f"body_too_large: {size} {MAX_BODY_BYTES} bytes")
    if encoding in _PLAIN_ENCODINGS:
        return raw, None
    if encoding not in _GZIP_ENCODINGS:
        return b"", Rejection(f"invalid_encoding: Content-Encoding {encoding[:40]!r} is not supported")
    try:
        body = gunzip_capped(raw, _READ_LIMIT)
    except (zlib.error, EOFError) as exc:
        return b"", Rejection(f"invalid_encoding: body is not valid gzip ({exc})")
    if len(body) > MAX_BODY_BYTES:
        reason = f"body_too_large: more than {MAX_BODY_BYTES} bytes after gzip decompression"
        return body[:MAX_BODY_BYTES], Rejection(reason)
    return body, None


def gunzip_capped(data: bytes, limit: int) -> bytes:
    """Decompress gzip `data`, producing at most `limit` bytes (a bomb stops there).

    Concatenated gzip members are joined, as `gzip.decompress` does. Raises EOFError for a
    truncated stream and zlib.error for a corrupt one.
    """
    out = bytearray()
    while True:
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        out += inflater.decompress(data, limit - len(out))
        if len(out) >= limit or inflater.unconsumed_tail:
            return bytes(out[:limit])
        if not inflater.eof:
            raise EOFError("truncated gzip stream")
        data = inflater.unused_data
        if not data:
            return bytes(out)
