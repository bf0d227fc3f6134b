"""**Receive** -> store: Segment's HTTP Tracking API on Starlette, so Segment's own libraries can
point their `host` at listsync.

Routes: `POST /v1/identify|track|page|screen|group|alias|batch`, the one-letter aliases
`/v1/i|t|p|s|g|a|b` that Segment's browser library (analytics.js) posts to, and `GET /health` (listsync.health).
`POST /v1/webhook` takes what Segment's Webhooks destinations send (see `_WebhookHandler`).
segment-analytics-python only ever posts gzip-or-plain JSON to `{host}/v1/batch` with Basic auth
and the key repeated as `writeKey` in the body.

Decisions:

* Authentication is HTTP Basic with a configured write key as user name; the password is
  ignored, as Segment ignores it. A request without an Authorization header may instead carry
  `writeKey` in its JSON body (Segment's HTTP API allows it, analytics.js relies on it). Keys are
  compared with `hmac.compare_digest` against every configured key, without stopping at the first
  match. The body's `writeKey` never reaches storage: `extract` drops it from each event.
  `Authorization: Bearer <write key>` is accepted too (what a Segment webhook destination can send).
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

import asyncio
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
from functools import partial
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
from uvicorn.protocols.http.h11_impl import H11Protocol

from listsync import health, metrics
from listsync.config import Settings
from listsync.db.session import transaction
from listsync.domain import Rejection
from listsync.ingest import accept, extract, validate, webhook
from listsync.ingest.scrub import scrub_text

logger = logging.getLogger(__name__)

SOURCE = "receiver"
MAX_BODY_BYTES = extract.MAX_BATCH_BYTES
# One byte past the limit is enough to know a body is too large; nothing beyond it is kept.
_READ_LIMIT = MAX_BODY_BYTES + 1
# Bytes of an oversized body read (and discarded) so that its sender receives the answer.
DRAIN_LIMIT = 16 * 1024 * 1024
BODY_TIMEOUT_SECONDS = 30.0
# A connection that has not sent a request's headers within this time is closed (slow clients).
HEADER_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 1000
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
        only = " except signed ones on /v1/webhook" if settings.receiver.webhook_secrets else ""
        logger.warning(
            "receiver has no write keys configured; every request%s will be refused with 401",
            only,
            extra={"event": "receiver_no_write_keys"},
        )
    handler = _Handler(keys, factory, on_accepted)
    routes = [
        Route(f"/v1/{name}", handler.endpoint(kind), methods=["POST"]) for name, kind in _ENDPOINTS.items()
    ]
    routes.append(_webhook_route(settings, handler))
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
        header_key = _header_write_key(request.headers.get("authorization"))
        # A wrong header key is refused before a byte of the body is read.
        if not self._keys or (header_key is not None and not self._known(header_key)):
            return self._refuse(request)
        raw = await _read_body(request)
        if isinstance(raw, _Outcome):
            return raw
        body, problem = _decode(raw, request.headers.get("content-encoding", ""), _declared_length(request))
        if header_key is None and (problem is not None or not self._known(_body_write_key(body))):
            return self._refuse(request)
        return await self.store(request, body, problem, partial(extract.parse_body, path_type=path_type))

    async def store(self, request: Request, body: bytes, problem: Rejection | None, parse: _Parser) -> _Outcome:
        """Store an authenticated body in a worker thread; the answer once it is committed."""
        try:
            outcome = await run_in_threadpool(_store, self._factory, body, problem, parse)
        except SQLAlchemyError as exc:
            logger.error(
                "receiver could not store a request: %s",
                type(exc).__name__,
                extra={"event": "receiver_store_failed", "path": request.url.path},
            )
            return _UNAVAILABLE
        except Exception:
            # A defect of ours, not the sender's: a 5xx would make Segment's clients retry the same
            # bytes forever. The body is kept as a dead letter, so nothing is lost, and refused.
            logger.exception("receiver failed on a request", extra={"event": "receiver_internal_error"})
            return await run_in_threadpool(_store_unprocessable, self._factory, body)
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


_Parser = Callable[[bytes], "Rejection | list[extract.BodyItem]"]


def _store(factory: sessionmaker[Session], body: bytes, problem: Rejection | None, parse: _Parser) -> _Outcome:
    """Parse, validate and commit one body; returns only after the commit."""
    now = datetime.now(UTC)
    parsed = problem or parse(body)
    if isinstance(parsed, Rejection):
        # The body as a whole is unusable (too large, bad gzip, not JSON): dead-letter an excerpt.
        excerpt = scrub_text(body.decode("utf-8", "replace")) if body else ""
        with transaction(factory) as session:
            accept.accept_items(session, [extract.RejectedItem(parsed, excerpt)], source=SOURCE, now=now)
        return _Outcome(400, error=parsed.reason)
    with transaction(factory) as session:
        counts = accept.accept_items(session, parsed, source=SOURCE, now=now)
    if parsed and counts.rejected == len(parsed):
        return _Outcome(400, error=_first_reason(parsed, now))
    return _Outcome(200, counts=counts)


def _store_unprocessable(factory: sessionmaker[Session], body: bytes) -> _Outcome:
    reason = "internal_error: listsync could not process this body; it is kept here for a replay"
    with transaction(factory) as session:
        item = extract.RejectedItem(Rejection(reason), scrub_text(body.decode("utf-8", "replace")))
        accept.accept_items(session, [item], source=SOURCE, now=datetime.now(UTC))
    return _Outcome(400, error=reason)


def _first_reason(items: Sequence[extract.BodyItem], now: datetime) -> str:
    """Why the first item was rejected, for the 400 of a body whose every item was.

    `accept_items` only counts rejections; asking the pure validator again (on the error path
    only) gives the sender the reason without a query.
    """
    first = items[0]
    if isinstance(first, extract.RejectedItem):
        return first.rejection.reason
    checked = validate.validate_event(first.raw, received_at=now, encoded_size=first.size)
    if isinstance(checked, Rejection):
        return checked.reason
    return "rejected: every event of the body was rejected"


# ---------------------------------------------------------------------------------------------
# POST /v1/webhook: what Segment's Webhooks destinations send

WEBHOOK_PATH = "/v1/webhook"
_WEBHOOK_UNAUTHORIZED = _Outcome(401, error="invalid signature or write key")


def _webhook_route(settings: Settings, handler: _Handler) -> Route:
    secrets = [secret.get_secret_value().encode("utf-8") for secret in settings.receiver.webhook_secrets]
    webhook_handler = _WebhookHandler(handler, [secret for secret in secrets if secret])
    return Route(WEBHOOK_PATH, webhook_handler.receive, methods=["POST"])


class _WebhookHandler:
    """One Segment event of any type, or a JSON array of them (Webhooks (Actions) with batching).

    Decisions:

    * Credentials: a write key in the Authorization header (Basic, or `Bearer <key>`, which a
      Segment destination can send as a custom header), or a signature (`X-Signature`, or
      `X-Segment-Signature` for the whole body) made with one of `receiver.webhook_secrets`; see
      `listsync.ingest.webhook` for what exactly is signed. Every credential present must be
      valid: a wrong key or a wrong signature is 401 even beside a good one, and a request with
      neither is 401. Nothing of a refused request is stored, and neither secrets nor signatures
      are logged.
    * A wrong header key is refused before the body is read. A signature needs the whole body,
      so a body too large (or not valid gzip) cannot be checked: with a header key it is
      dead-lettered as on the other routes; with a signature alone it is answered 400 with the
      reason and nothing is stored, as the sender is unknown.
    * Storing, per-event rejection and answers are those of `/v1/batch`: 200 once the inbox
      committed, with a bad event of an array recorded alone in `rejected_events`; 400 when the
      body, or every event in it, was rejected (Segment's platform drops a 4xx other than 408,
      410, 429 and 460, right for bytes that would fail again); 503 when the database failed,
      which it retries. A replayed delivery dedupes on messageId.
    """

    def __init__(self, handler: _Handler, secrets: Sequence[bytes]) -> None:
        self._handler = handler
        self._secrets = list(secrets)

    async def receive(self, request: Request) -> Response:
        outcome = await self._receive(request)
        return outcome.response()

    async def _receive(self, request: Request) -> _Outcome:
        handler = self._handler
        header_key = _header_write_key(request.headers.get("authorization"))
        if header_key is not None and not handler._known(header_key):
            return _refuse_webhook(request, "wrong write key")
        signatures = _signatures(request)
        if header_key is None and not signatures:
            return _refuse_webhook(request, "no signature and no write key")
        raw = await _read_body(request)
        if isinstance(raw, _Outcome):
            return raw
        body, problem = _decode(raw, request.headers.get("content-encoding", ""), _declared_length(request))
        if problem is None and not self._verified(signatures, body):
            return _refuse_webhook(request, "wrong signature")
        if problem is not None and header_key is None:
            logger.info(
                "receiver could not check the signature of an unreadable body: %s",
                problem.reason[:200],
                extra={"event": "receiver_webhook_unchecked", "path": request.url.path},
            )
            return _Outcome(400, error=problem.reason)
        return await handler.store(request, body, problem, extract.parse_webhook_body)

    def _verified(self, signatures: Sequence[tuple[str, bool]], body: bytes) -> bool:
        """Every signature present matches (True when there is none: a header key authenticated)."""
        return all(
            webhook.signature_matches(value, body, self._secrets, whole_body_only=whole_body_only)
            for value, whole_body_only in signatures
        )


def _signatures(request: Request) -> list[tuple[str, bool]]:
    """(value, whole body only) of each signature header the request carries."""
    found = []
    for name, whole_body_only in ((webhook.SIGNATURE_HEADER, False), (webhook.BODY_SIGNATURE_HEADER, True)):
        value = request.headers.get(name)
        if value is not None:
            found.append((value, whole_body_only))
    return found


def _refuse_webhook(request: Request, why: str) -> _Outcome:
    logger.info(
        "receiver refused a webhook request: %s",
        why,
        extra={"event": "receiver_unauthorized", "path": request.url.path},
    )
    return _WEBHOOK_UNAUTHORIZED


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


def _header_write_key(header: str | None) -> str | None:
    """The write key of an Authorization header: a `Bearer` token (what a Segment webhook
    destination can send as a custom header), else the Basic user name (see `_basic_user`)."""
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
    return _basic_user(header)


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


async def _read_body(request: Request) -> bytes | _Outcome:
    """The body (capped at _READ_LIMIT), or the answer for a sender that never finished sending it."""
    try:
        return await _read_capped(request, _READ_LIMIT)
    except ClientDisconnect:  # gone before the body arrived: nothing to store, nobody to answer
        return _Outcome(400, error="client disconnected")
    except TimeoutError:
        return _Outcome(408, error=f"request_timeout: body not received within {BODY_TIMEOUT_SECONDS:g} s")


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

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, name: str = "receiver") -> None:
        self._app = app
        self._name = name  # in log lines and events: the status page is served by this class too
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
        self._socket = _listening_socket(self._host, self._requested_port)
        self._port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            self._app,
            http=_GuardedH11Protocol,
            log_level="warning",
            lifespan="off",
            log_config=None,  # leave logging to the daemon's configuration
            access_log=False,
            timeout_graceful_shutdown=10,
            limit_concurrency=MAX_CONNECTIONS,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"listsync-{self._name}", daemon=True)
        self._thread.start()
        self._wait_started(timeout)
        logger.info(
            "%s listening on %s:%d",
            self._name,
            self._host,
            self.port,
            extra={"event": f"{self._name}_started", "host": self._host, "port": self.port},
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
        logger.info("%s stopped", self._name, extra={"event": f"{self._name}_stopped"})

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


def _listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket created with proto=IPPROTO_TCP.

    asyncio turns Nagle's algorithm off only for sockets whose proto says TCP, and accepted
    sockets inherit the listener's; `socket.create_server` leaves proto 0, which made every
    keep-alive request after the first wait for the peer's delayed ACK (~40 ms).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers.

    uvicorn's keep-alive timer restarts on every byte, so a client trickling a header a byte at a
    time would hold its connection forever; here the headers of a request must be complete within
    HEADER_TIMEOUT_SECONDS of the connection opening or of the previous answer.
    """

    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers arrived
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(HEADER_TIMEOUT_SECONDS, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
