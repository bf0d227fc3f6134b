"""A real HTTP/1.1 server on 127.0.0.1 in front of an `IterableEmulator`.

Each connection gets its own thread (`ThreadingHTTPServer`), connections are kept alive between
requests, every response carries Content-Length and goes out in one write (with TCP_NODELAY,
so no Nagle/delayed-ACK stalls). Connection faults are real: "drop_before" and
"drop_after" close the socket without writing a byte (the client sees the server disconnect), and
"delay" sleeps in the connection's thread, outside the emulator's lock, before answering.
`latency_seconds` adds the same pause to every answer (a round trip to a distant API), also
outside the lock, so requests on different connections wait in parallel.
`close()` also shuts down idle keep-alive connections, so pooled clients cannot keep talking to a
closed server.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.emulator.replies import Reply
from tests.emulator.state import IterableEmulator

IDLE_TIMEOUT_SECONDS = 60.0
# Not an Iterable endpoint and needs no API key: lists with their members, for a person to look at.
OVERVIEW_PATH = "/_emulator"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_SECONDS
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_GET
    do_PUT = do_GET
    do_DELETE = do_GET
    do_PATCH = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet; tests inspect `emulator.requests` instead."""

    def _serve(self) -> None:
        body = self._read_body()
        target = urlsplit(self.path)
        if self.command == "GET" and target.path.rstrip("/") == OVERVIEW_PATH:
            self._send(Reply(200, json.dumps(self.server.emulator.overview(), indent=2).encode()))
            return
        query = dict(parse_qsl(target.query, keep_blank_values=True))
        headers = dict(self.headers.items())
        reply = self.server.emulator.handle(self.command, unquote(target.path), query, headers, body)
        if reply.action in ("drop_before", "drop_after"):
            self._drop()
            return
        if reply.action == "delay":
            time.sleep(reply.delay_seconds)
        if self.server.latency_seconds > 0:
            time.sleep(self.server.latency_seconds)
        self._send(reply)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, reply: Reply) -> None:
        reason = self.responses.get(reply.status, ("",))[0]
        lines = [
            f"{self.protocol_version} {reply.status} {reason}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {len(reply.body)}",
            *(f"{name}: {value}" for name, value in reply.headers.items()),
        ]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + reply.body)  # one write: no Nagle/delayed-ACK stall
        except OSError:  # the client gave up (e.g. timed out during a delay)
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], emulator: IterableEmulator) -> None:
        self.emulator = emulator
        self.latency_seconds = 0.0
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed mid-request (the kill -9 tests do this on purpose) is not an emulator bug.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open client connection."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class EmulatorServer:
    """Serve `emulator` over HTTP until `close()`; usable as a context manager."""

    def __init__(
        self, emulator: IterableEmulator, host: str = "127.0.0.1", port: int = 0, latency_seconds: float = 0.0
    ) -> None:
        self.emulator = emulator
        self._httpd = _Server((host, port), emulator)
        self.latency_seconds = latency_seconds
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._closed = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"iterable-emulator-{self.port}",
            daemon=True,
        )
        self._thread.start()

    @property
    def latency_seconds(self) -> float:
        """Pause before every answer (0: none); may be changed while serving."""
        return self._httpd.latency_seconds

    @latency_seconds.setter
    def latency_seconds(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("latency_seconds must be >= 0")
        self._httpd.latency_seconds = seconds

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (endpoints live under ``/api``)."""
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        """Stop accepting, close open connections and free the port. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> EmulatorServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
