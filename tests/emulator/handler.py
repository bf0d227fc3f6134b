"""An in-process `httpx.MockTransport` in front of an `IterableEmulator`.

Injected connection faults surface the way httpx reports them for a real socket: a dropped
connection raises `httpx.RemoteProtocolError` ("Server disconnected without sending a response"),
and a delay longer than the request's read timeout waits that timeout and raises
`httpx.ReadTimeout` (the change has been applied: the ambiguous case). Pass a different `sleep`
(for example a no-op) to keep tests fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.emulator.replies import Reply
from tests.emulator.state import IterableEmulator


def make_mock_transport(
    emulator: IterableEmulator, *, sleep: Callable[[float], None] = time.sleep
) -> httpx.MockTransport:
    """A transport that answers every request from `emulator`."""

    def handle(request: httpx.Request) -> httpx.Response:
        reply = emulator.handle(
            request.method, request.url.path, dict(request.url.params), request.headers, request.read()
        )
        return _deliver(reply, request, sleep)

    return httpx.MockTransport(handle)


def _deliver(reply: Reply, request: httpx.Request, sleep: Callable[[float], None]) -> httpx.Response:
    if reply.action in ("drop_before", "drop_after"):
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
    if reply.action == "delay":
        _wait(reply.delay_seconds, request, sleep)
    headers = {"Content-Type": reply.content_type, **reply.headers}
    return httpx.Response(reply.status, headers=headers, content=reply.body, request=request)


def _wait(seconds: float, request: httpx.Request, sleep: Callable[[float], None]) -> None:
    read_timeout = _read_timeout(request)
    if read_timeout is not None and seconds > read_timeout:
        sleep(read_timeout)
        raise httpx.ReadTimeout("timed out", request=request)
    sleep(seconds)


def _read_timeout(request: httpx.Request) -> float | None:
    timeouts = request.extensions.get("timeout")
    if not isinstance(timeouts, dict):
        return None
    value = timeouts.get("read")
    return float(value) if value is not None else None
