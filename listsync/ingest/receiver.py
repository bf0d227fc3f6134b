"""**Receive** -> store: Segment's HTTP Tracking API on Starlette, so Segment's own libraries can
point their `host` at listsync.

Routes: `POST /v1/identify|track|page|screen|group|alias|batch`, the one-letter aliases
`/v1/i|t|p|s|g|a|b` that Segment's browser library (analytics.js) posts to, and `GET /health` (listsync.health).
segment-analytics-python only ever posts gzip-or-plain JSON to `{host}/v1/batch` with Basic auth
and the key repeated as `writeKey` in the body.

Decisions:

* Authentication is HTTP Basic with a configured write key as user name; the password is
  ignored, as Segment ignores it. A request without an Authorization header may instead carry
  `writeKey` in its JSON body (Segment's HTTP API allows it, analytics.js relies on it). Keys are
  compared with `hmac.compare_digest` against every configured key, without stopping at the first
  match. The body's `writeKey` never reaches storage: `extract` drops it from each event.
* No configured write keys means every request gets 401 and one warning is logged when the app
  is built. An open receiver would accept anyone's events into Iterable lists; refusing is the
  safe failure, and the warning says why.
* Nothing is stored for a request that fails authentication, not even a rejected row: an
  unauthenticated sender must not be able to fill `dead_letters`.
* Size limits follow Segment: 500 KB per body (after gzip decompression), 32 KB per event. At most
  500 KB + 1 bytes are ever read or decompressed, so a large or bomb body costs bounded memory.
* Answers: 200 `{"success": true, "accepted", "duplicates", "rejected"}` once the body parsed and
  at least one of its events was stored or already known (or the batch was empty); items rejected
  one by one are dead-lettered and counted. 400 `{"success": false, "error": "<code>: ..."}` when
  the body as a whole, or every event in it, was rejected; Segment's libraries do not retry a 400,
  which is right since the same bytes would fail again. 401 for a bad key. 503 when the database
  failed, which Segment's libraries retry.
* 200 is sent only after the inbox transaction committed. The database work runs in a worker
  thread so the event loop keeps serving; `on_accepted` is called after the commit.
* The Authorization header and write keys are never logged. Log records carry a stable name in
  `extra["event"]`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import socket
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from listsync import health, metrics
from listsync.config import Settings
from listsync.db.session import transaction
from listsync.domain import Rejection
from listsync.ingest import accept, extract

logger = logging.getLogger(__name__)

SOURCE = "receiver"
MAX_BODY_BYTES = extract.MAX_BATCH_BYTES
# One byte past the limit is enough to know a body is too large; nothing beyond it is read.
_READ_LIMIT = MAX_BODY_BYTES + 1
_GZIP_ENCODINGS = frozenset({"gzip", "x-gzip"})
_PLAIN_ENCODINGS = frozenset({"", "identity"})

# Path segment -> Segment type (None: a batch). The one-letter forms are analytics.js's.
_ENDPOINTS: dict[str, str | None] = {
    **{kind: kind for kind in extract.SEGMENT_TYPES},
    **{kind[0]: kind for kind in extract.SEGMENT_TYPES},
    "batch": None,
    "b": None,
}


@dataclass(frozen=True)
class _Outcome:
    """What one request came to, ready to become a response."""

    status: int
    error: str | None = None
    counts: accept.IngestCounts | None = None

    def response(self) -> JSONResponse:
        if self.error is not None:
            return JSONResponse({"success": False, "error": self.error}, status_code=self.status)
        counts = self.counts or accept.IngestCounts()
        body = {
            "success": True,
            "accepted": counts.accepted,
            "duplicates": counts.duplicates,
            "rejected": counts.rejected,
        }
        return JSONResponse(body, status_code=self.status)


_UNAUTHORIZED = _Outcome(401, error="invalid write key")
_UNAVAILABLE = _Outcome(503, error="storage unavailable, retry later")


# ---------------------------------------------------------------------------------------------
# The app


def build_app(
    settings: Settings,
    factory: sessionmaker[Session],
    *,
    on_accepted: Callable[[], None] | None = None,
) -> Starlette:
    """The receiver as an ASGI app; events go through `accept` into the inbox of `factory`."""
    keys = [key.get_secret_value().encode("utf-8") for key in settings.receiver.write_keys]
    keys = [key for key in keys if key]
    if not keys:
        logger.warning(
            "receiver has no write keys configured; every request will be refused with 401",
            extra={"event": "receiver_no_write_keys"},
        )
    handler = _Handler(keys, factory, on_accepted)
    routes = [
        Route(f"/v1/{name}", handler.endpoint(kind), methods=["POST"]) for name, kind in _ENDPOINTS.items()
    ]
    routes += health.routes(settings, factory)
    routes.append(Route("/metrics", _metrics_endpoint(factory), methods=["GET"]))
    return Starlette(routes=routes)


def _metrics_endpoint(factory: sessionmaker[Session]) -> Callable[[Request], Any]:
    async def serve(_request: Request) -> Response:
        body = await run_in_threadpool(metrics.render, factory)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return serve


class _Handler:
    """The request handling, closed over the keys and the session factory."""

    def __init__(
        self, keys: Sequence[bytes], factory: sessionmaker[Session], on_accepted: Callable[[], None] | None
    ) -> None:
        self._keys = list(keys)
        self._factory = factory
        self._on_accepted = on_accepted

    def endpoint(self, path_type: str | None) -> Callable[[Request], Any]:
        async def receive(request: Request) -> Response:
            outcome = await self._receive(request, path_type)
            return outcome.response()

        return receive

    async def _receive(self, request: Request, path_type: str | None) -> _Outcome:
        header_key = _basic_user(request.headers.get("authorization"))
        # A wrong header key is refused before a byte of the body is read.
        if not self._keys or (header_key is not None and not self._known(header_key)):
            return self._refuse(request)
        try:
            raw = await _read_capped(request, _READ_LIMIT)
        except ClientDisconnect:  # gone before the body arrived: nothing to store, nobody to answer
            return _Outcome(400, error="client disconnected")
        body, problem = _decode(raw, request.headers.get("content-encoding", ""), _declared_length(request))
        if header_key is None and (problem is not None or not self._known(_body_write_key(body))):
            return self._refuse(request)
        try:
            outcome = await run_in_threadpool(_store, self._factory, body, problem, path_type)
        except SQLAlchemyError as exc:
            logger.error(
                "receiver could not store a request: %s",
                type(exc).__name__,
                extra={"event": "receiver_store_failed", "path": request.url.path},
            )
            return _UNAVAILABLE
        self._after_commit(outcome, request.url.path)
        return outcome

    def _known(self, candidate: str | None) -> bool:
        if not candidate:
            return False
        given = candidate.encode("utf-8")
        match = False
        for key in self._keys:  # no early exit: the time taken says nothing about which key matched
            match |= hmac.compare_digest(given, key)
        return match

    def _refuse(self, request: Request) -> _Outcome:
        logger.info(
            "receiver refused a request without a valid write key",
            extra={"event": "receiver_unauthorized", "path": request.url.path},
        )
        return _UNAUTHORIZED

    def _after_commit(self, outcome: _Outcome, path: str) -> None:
        counts = outcome.counts
        if outcome.error is not None:
            logger.info(
                "receiver rejected a body: %s",
                outcome.error[:200],
                extra={"event": "receiver_body_rejected", "path": path},
            )
            return
        if counts is None:
            return
        logger.debug(
            "receiver stored events",
            extra={
                "event": "receiver_accepted",
                "path": path,
                "accepted": counts.accepted,
                "duplicates": counts.duplicates,
                "rejected": counts.rejected,
            },
        )
        if counts.accepted and self._on_accepted is not None:
            try:
                self._on_accepted()
            except Exception:  # the events are committed; a failing wake-up must not turn into a 500
                logger.exception("on_accepted callback failed", extra={"event": "receiver_wake_failed"})


# ---------------------------------------------------------------------------------------------
# Storing (runs in a worker thread)


def _store(
    factory: sessionmaker[Session], body: bytes, problem: Rejection | None, path_type: str | None
) -> _Outcome:
    """Parse, validate and commit one body; returns only after the commit."""
    now = datetime.now(UTC)
    if problem is not None:
        # The body never became JSON text (too large, bad gzip): dead-letter a readable excerpt.
        excerpt = accept.scrub_text(body.decode("utf-8", "replace")) if body else ""
        with transaction(factory) as session:
            accept.accept_items(session, [extract.RejectedItem(problem, excerpt)], source=SOURCE, now=now)
        return _Outcome(400, error=problem.reason)
    parsed = extract.parse_body(body, path_type=path_type)
    if isinstance(parsed, Rejection):
        with transaction(factory) as session:
            accept.accept_body(session, body, path_type=path_type, source=SOURCE, now=now)
        return _Outcome(400, error=parsed.reason)
    with transaction(factory) as session:
        counts = accept.accept_items(session, parsed, source=SOURCE, now=now)
    if parsed and counts.rejected == len(parsed):
        return _Outcome(400, error=_first_reason(parsed, now))
    return _Outcome(200, counts=counts)


def _first_reason(items: Sequence[extract.BodyItem], now: datetime) -> str:
    """Why the first item was rejected, for the 400 of a body whose every item was.

    `accept_items` only counts rejections; asking the pure validator again (on the error path
    only) gives the sender the reason without a query.
    """
    first = items[0]
    if isinstance(first, extract.RejectedItem):
        return first.rejection.reason
    checked = extract.validate_event(first.raw, received_at=now, encoded_size=first.size)
    if isinstance(checked, Rejection):
        return checked.reason
    return "rejected: every event of the body was rejected"


# ---------------------------------------------------------------------------------------------
# Request parsing helpers


def _basic_user(header: str | None) -> str | None:
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


def _body_write_key(body: bytes) -> str | None:
    """`writeKey` at the top of a JSON body, for senders that authenticate that way."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    key = decoded.get("writeKey") if isinstance(decoded, dict) else None
    return key if isinstance(key, str) else None


def _declared_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


async def _read_capped(request: Request, limit: int) -> bytes:
    """At most `limit` bytes of the body; the rest is never read into memory."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def _decode(raw: bytes, encoding: str, declared: int | None) -> tuple[bytes, Rejection | None]:
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


# ---------------------------------------------------------------------------------------------
# Serving in a thread


class ReceiverServer:
    """Uvicorn serving an app from a background thread, for the daemon and for tests.

    The listening socket is bound in `start()` itself, so a port in use fails there with an
    OSError (uvicorn's own binding would exit the process), and port 0 gives a free port whose
    number `port` reports.
    """

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._app = app
        self._host = host
        self._requested_port = port
        self._socket: socket.socket | None = None
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        factory: sessionmaker[Session],
        *,
        on_accepted: Callable[[], None] | None = None,
    ) -> ReceiverServer:
        app = build_app(settings, factory, on_accepted=on_accepted)
        return cls(app, host=settings.receiver.host, port=settings.receiver.port)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the receiver is not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Bind and serve; returns once uvicorn accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the receiver is already started")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._socket = socket.create_server((self._host, self._requested_port), family=family)
        self._port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            lifespan="off",
            log_config=None,  # leave logging to the daemon's configuration
            access_log=False,
            timeout_graceful_shutdown=10,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="listsync-receiver", daemon=True)
        self._thread.start()
        self._wait_started(timeout)
        logger.info(
            "receiver listening on %s:%d",
            self._host,
            self.port,
            extra={"event": "receiver_started", "host": self._host, "port": self.port},
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Stop accepting, let requests in flight finish, then return."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._thread = None
        logger.info("receiver stopped", extra={"event": "receiver_stopped"})

    def _run(self) -> None:
        assert self._server is not None and self._socket is not None
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._error = exc

    def _wait_started(self, timeout: float) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError("the receiver failed to start") from self._error
            if time.monotonic() > deadline:
                raise TimeoutError(f"the receiver did not start within {timeout} s")
            time.sleep(0.01)
