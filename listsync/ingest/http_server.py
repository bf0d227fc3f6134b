"""The socket and HTTP protocol under the receiver and the status page (`ReceiverServer`): a
listener with Nagle's algorithm off, uvicorn's h11 protocol with a deadline for headers, and
an app that serves its busiest POST paths without Starlette's routing."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

# A connection that has not sent a request's headers within this time is closed (slow clients).
HEADER_TIMEOUT_SECONDS = 10.0


def listening_socket(host: str, port: int) -> socket.socket:
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


class GuardedH11Protocol(H11Protocol):
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


class DirectPostApp(Starlette):
    """Starlette, with `POST <path>` for the paths of `direct` served straight by their ASGI app:
    the receiver's handler gives the same answers as through its routes, without the middleware
    and route matching around each of its many requests. Any other request (another method, path
    or a mount's) takes the routes."""

    def __init__(self, *, routes: list[Any], direct: dict[str, ASGIApp]) -> None:
        super().__init__(routes=routes)
        self._direct = direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            direct = self._direct.get(scope["path"])
            if direct is not None:
                scope["app"] = self
                await _answering_errors(direct, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def _answering_errors(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """What Starlette's ServerErrorMiddleware does for the routes: an exception that escapes is
    answered 500 (if no answer was started) and raised again for the server to log."""
    started = False

    async def sending(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, sending)
    except Exception:
        if not started:
            await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
        raise
