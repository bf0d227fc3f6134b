"""**Receive** -> store: Segment's HTTP Tracking API on Starlette, so Segment's own libraries can
point their `host` at listsync.

Routes: `POST /v1/identify|track|page|screen|group|alias|batch`, the one-letter aliases
`/v1/i|t|p|s|g|a|b` that Segment's browser library (analytics.js) posts to, and `GET /health` (listsync.health).
`POST /v1/webhook` takes what Segment's Webhooks destinations send (`webhook_route`).
segment-analytics-python only ever posts gzip-or-plain JSON to `{host}/v1/batch` with Basic auth
and the key repeated as `writeKey` in the body.

Decisions:

* Authentication is HTTP Basic with a configured write key as user name; the password is
  ignored, as Segment ignores it. A request without an Authorization header may instead carry
  `writeKey` in its JSON body (Segment's HTTP API allows it, analytics.js relies on it). Keys are
  compared with `hmac.compare_digest` against every configured key, without stopping at the first
  match. The body's `writeKey` never reaches storage: `validate` drops it from each event.
  `Authorization: Bearer <write key>` is accepted too (what a Segment webhook destination can send).
* No configured write keys means every request gets 401 and one warning is logged when the app
  is built. An open receiver would accept anyone's events into Iterable lists; refusing is the
  safe failure, and the warning says why.
* Nothing is stored for a request that fails authentication, not even a rejected row: an
  unauthenticated sender must not be able to fill `dead_letters`.
* Size limits follow Segment: 500 KB per body (after gzip decompression), 32 KB per event; bodies
  are read and decompressed within bounds by `http_body`.
* Answers: 200 `{"success": true, "accepted", "duplicates", "rejected"}` once the body parsed and
  at least one of its events was stored or already known (or the batch was empty); items rejected
  one by one are dead-lettered and counted. 400 `{"success": false, "error": "<code>: ..."}` when
  the body as a whole, or every event in it, was rejected; Segment's libraries do not retry a 400,
  which is right since the same bytes would fail again. 401 for a bad key. 503 when the database
  failed, which Segment's libraries retry.
* 200 is sent only after the inbox transaction committed. Parsing and validation run in a worker
  thread so the event loop keeps serving; the inbox writes of concurrent requests share one
  commit (`group_commit`), each request answered once that commit returned; `on_accepted` is
  called after it.
* The Authorization header and write keys are never logged. Log records carry a stable name in
  `extra["event"]`.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from listsync import health, metrics
from listsync.config import Settings
from listsync.db.session import transaction
from listsync.domain import Rejection, utcnow
from listsync.ingest import accept, extract, http_body, validate
from listsync.ingest.group_commit import GroupCommitter
from listsync.ingest.http_body import Outcome
from listsync.ingest.http_server import DirectPostApp, GuardedH11Protocol, listening_socket
from listsync.ingest.scrub import scrub_text
from listsync.ingest.webhook_route import Parser, webhook_route

logger = logging.getLogger(__name__)

SOURCE = "receiver"
MAX_CONNECTIONS = 1000

# Path segment -> Segment type (None: a batch). The one-letter forms are analytics.js's.
_ENDPOINTS: dict[str, str | None] = {
    **{kind: kind for kind in extract.SEGMENT_TYPES},
    **{kind[0]: kind for kind in extract.SEGMENT_TYPES},
    "batch": None,
    "b": None,
}


_UNAUTHORIZED = Outcome(401, error="invalid write key")
_UNAVAILABLE = Outcome(503, error="storage unavailable, retry later")


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
    routes.append(webhook_route(settings, handler))
    routes += health.routes(settings, factory)
    routes.append(Route("/metrics", _metrics_endpoint(factory), methods=["GET"]))
    direct = {f"/v1/{name}": handler.asgi(kind) for name, kind in _ENDPOINTS.items()}
    return DirectPostApp(routes=routes, direct=direct)


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
        self._committer = GroupCommitter(factory)
        self._on_accepted = on_accepted

    def endpoint(self, path_type: str | None) -> Callable[[Request], Any]:
        async def receive(request: Request) -> Response:
            outcome = await self._receive(request, path_type)
            return outcome.response()

        return receive

    def asgi(self, path_type: str | None) -> ASGIApp:
        """`endpoint` as a bare ASGI app (`http_server.DirectPostApp`)."""

        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            outcome = await self._receive(Request(scope, receive), path_type)
            await outcome.response()(scope, receive, send)

        return serve

    async def _receive(self, request: Request, path_type: str | None) -> Outcome:
        header_key = http_body.header_write_key(request.headers.get("authorization"))
        # A wrong header key is refused before a byte of the body is read.
        if not self._keys or (header_key is not None and not self.known(header_key)):
            return self._refuse(request)
        raw = await http_body.read_body(request)
        if isinstance(raw, Outcome):
            return raw
        body, problem = http_body.decode(raw, request.headers.get("content-encoding", ""), http_body.declared_length(request))
        if header_key is None and (problem is not None or not self.known(http_body.body_write_key(body))):
            return self._refuse(request)
        return await self.store(request, body, problem, partial(extract.parse_body, path_type=path_type))

    async def store(self, request: Request, body: bytes, problem: Rejection | None, parse: Parser) -> Outcome:
        """Store an authenticated body in a worker thread; the answer once it is committed."""
        try:
            outcome = await run_in_threadpool(_store, self._committer, body, problem, parse)
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

    def known(self, candidate: str | None) -> bool:
        if not candidate:
            return False
        given = candidate.encode("utf-8")
        match = False
        for key in self._keys:  # no early exit: the time taken says nothing about which key matched
            match |= hmac.compare_digest(given, key)
        return match

    def _refuse(self, request: Request) -> Outcome:
        logger.info(
            "receiver refused a request without a valid write key",
            extra={"event": "receiver_unauthorized", "path": request.url.path},
        )
        return _UNAUTHORIZED

    def _after_commit(self, outcome: Outcome, path: str) -> None:
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


def _store(committer: GroupCommitter, body: bytes, problem: Rejection | None, parse: Parser) -> Outcome:
    """Parse and validate one body here, store it in the next group commit; returns only after
    that commit (concurrent requests share it: see `group_commit`)."""
    now = utcnow()
    parsed = problem or parse(body)
    if isinstance(parsed, Rejection):
        # The body as a whole is unusable (too large, bad gzip, not JSON): dead-letter an excerpt.
        excerpt = scrub_text(body.decode("utf-8", "replace")) if body else ""
        _commit(committer, [extract.RejectedItem(parsed, excerpt)], now)
        return Outcome(400, error=parsed.reason)
    counts = _commit(committer, parsed, now)
    if parsed and counts.rejected == len(parsed):
        return Outcome(400, error=_first_reason(parsed, now))
    return Outcome(200, counts=counts)


def _commit(committer: GroupCommitter, items: Sequence[extract.BodyItem], now: datetime) -> accept.IngestCounts:
    checked = accept.check_items(items, now=now)
    counts = committer.run(
        lambda session: accept.store_checked(session, checked, source=SOURCE, now=now),
        weight=len(items),
        shared=lambda session: accept.store_checked(session, checked, source=SOURCE, now=now, isolate=False),
    )
    return accept.counted(counts, source=SOURCE)


def _store_unprocessable(factory: sessionmaker[Session], body: bytes) -> Outcome:
    reason = "internal_error: listsync could not process this body; it is kept here for a replay"
    with transaction(factory) as session:
        item = extract.RejectedItem(Rejection(reason), scrub_text(body.decode("utf-8", "replace")))
        accept.accept_items(session, [item], source=SOURCE, now=utcnow())
    return Outcome(400, error=reason)


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
        self._socket = listening_socket(self._host, self._requested_port)
        self._port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            self._app,
            http=GuardedH11Protocol,
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
