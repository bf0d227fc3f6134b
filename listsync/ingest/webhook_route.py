"""`POST /v1/webhook`: what Segment's Webhooks destinations send, authenticated by a write key or
a signature (`listsync.ingest.webhook`), then stored as `/v1/batch` stores."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from listsync.config import Settings
from listsync.domain import Rejection
from listsync.ingest import extract, http_body, webhook
from listsync.ingest.http_body import Outcome

logger = logging.getLogger("listsync.ingest.receiver")

Parser = Callable[[bytes], "Rejection | list[extract.BodyItem]"]


class Storing(Protocol):
    """What the webhook route needs of the receiver's handler."""

    def known(self, candidate: str | None) -> bool: ...

    async def store(self, request: Request, body: bytes, problem: Rejection | None, parse: Parser) -> Outcome: ...


WEBHOOK_PATH = "/v1/webhook"
_WEBHOOK_UNAUTHORIZED = Outcome(401, error="invalid signature or write key")


def webhook_route(settings: Settings, handler: Storing) -> Route:
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

    def __init__(self, handler: Storing, secrets: Sequence[bytes]) -> None:
        self._handler = handler
        self._secrets = list(secrets)

    async def receive(self, request: Request) -> Response:
        outcome = await self._receive(request)
        return outcome.response()

    async def _receive(self, request: Request) -> Outcome:
        handler = self._handler
        header_key = http_body.header_write_key(request.headers.get("authorization"))
        if header_key is not None and not handler.known(header_key):
            return _refuse_webhook(request, "wrong write key")
        signatures = _signatures(request)
        if header_key is None and not signatures:
            return _refuse_webhook(request, "no signature and no write key")
        raw = await http_body.read_body(request)
        if isinstance(raw, Outcome):
            return raw
        body, problem = http_body.decode(raw, request.headers.get("content-encoding", ""), http_body.declared_length(request))
        if problem is None and not self._verified(signatures, body):
            return _refuse_webhook(request, "wrong signature")
        if problem is not None and header_key is None:
            logger.info(
                "receiver could not check the signature of an unreadable body: %s",
                problem.reason[:200],
                extra={"event": "receiver_webhook_unchecked", "path": request.url.path},
            )
            return Outcome(400, error=problem.reason)
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


def _refuse_webhook(request: Request, why: str) -> Outcome:
    logger.info(
        "receiver refused a webhook request: %s",
        why,
        extra={"event": "receiver_unauthorized", "path": request.url.path},
    )
    return _WEBHOOK_UNAUTHORIZED
