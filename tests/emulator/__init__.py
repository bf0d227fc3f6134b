"""An Iterable emulator for listsync's tests: an in-memory Iterable project behind HTTP.

* `IterableEmulator` (state.py) is the model: lists, users with the identity rules of email-based,
  hybrid and userId-based projects, events, purchases, carts, per-endpoint rate limits and fault
  injection. It knows nothing about HTTP.
* `make_mock_transport` (handler.py) serves it to an `httpx.Client` in-process.
* `EmulatorServer` (server.py) serves it over real HTTP/1.1 on 127.0.0.1.
* `python -m tests.emulator` runs a standalone server for local development.

Every place where the emulator had to choose because Iterable documents nothing is listed in the
docstrings of state.py, endpoints.py, users.py and faults.py.
"""

from __future__ import annotations

from tests.emulator.faults import FaultRule
from tests.emulator.handler import make_mock_transport
from tests.emulator.replies import Reply
from tests.emulator.server import EmulatorServer
from tests.emulator.state import IterableEmulator, ListRecord, RecordedRequest
from tests.emulator.users import User

__all__ = [
    "EmulatorServer",
    "FaultRule",
    "IterableEmulator",
    "ListRecord",
    "RecordedRequest",
    "Reply",
    "User",
    "make_mock_transport",
]
