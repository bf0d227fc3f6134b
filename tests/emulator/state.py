"""The emulated Iterable project: lists, users, events, purchases, limits and faults. No HTTP here.

`IterableEmulator.handle` takes one request (method, path, query, headers, raw body) and returns a
`Reply`; the HTTP layers (`handler.make_mock_transport`, `server.EmulatorServer`) only translate.
One lock serialises every request and helper, so the model is safe under a threaded server.

Request pipeline, in order: route (unknown method/path: 404 ``NotFound``, no auth needed), API key
(``Api-Key`` or ``Api_Key`` header; otherwise 401 ``BadApiKey``), rate limit (429
``RateLimitExceeded``), fault injection, body checks, the endpoint handler. Every request is
appended to `requests` with its parsed body, status and any injected fault.

Choices where Iterable documents nothing:

* more than `max_batch` (1000) subscribers, users or events in one call is 400 ``BatchTooLarge``;
* a body larger than `max_body_bytes` (4,000,000 bytes, Iterable's "4 MB") is 400
  ``BatchTooLarge`` on every endpoint;
* an empty or unparsable body is 400 ``BadJsonBody``; wrong field types are 400 ``BadParams``;
* list ids start at a seeded random number in [100000, 900000) and grow by 1 to 7;
* a 429 carries no ``Retry-After`` unless `retry_after_header` is set (Iterable sends none);
* ``updateExistingUsersOnly`` is honoured in hybrid and userId projects only (as Iterable says);
* an injected "status" fault below 500 answers code ``BadParams`` "Injected error".

Counters: `subscribe_count[(list_id, key)]` counts subscribes that added a non-member,
`redundant_subscribes` those that found the user already listed, `unsubscribe_count` removals; `key`
is the user's userId if set, else their email, at the time of the call. Helpers for tests (list
members, drift, users, events, purchases) take the lock and return copies.
"""

from __future__ import annotations

import copy
import json
import math
import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.emulator.endpoints import ApiRequest, match_route
from tests.emulator.faults import FaultPlan, FaultRule
from tests.emulator.ratelimit import Limit, RateLimiter
from tests.emulator.replies import ApiError, Reply, error_reply
from tests.emulator.users import IdentityFailure, ProjectType, User, UserStore

DEFAULT_API_KEY = "test-api-key"
DEFAULT_MAX_BATCH = 1000
DEFAULT_MAX_BODY_BYTES = 4_000_000


@dataclass
class ListRecord:
    """One static list; `members` holds internal user ids in the order they joined."""

    id: int
    name: str
    created_at: int
    description: str | None = None
    list_type: str = "Standard"
    members: dict[int, None] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The list as GET /api/lists shows it."""
        summary: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "createdAt": self.created_at,
            "listType": self.list_type,
        }
        if self.description is not None:
            summary["description"] = self.description
        return summary


@dataclass
class RecordedRequest:
    """One request as the emulator saw it.

    `body` is the parsed JSON (raw text if unparsable), `endpoint` the route key (None for an
    unknown path), `fault` the injected fault kind if one fired. `status` is what the model decided;
    with `action` "drop_before" it is 0 (nothing applied), with "drop_after" the client never saw it.
    """

    method: str
    path: str
    query: dict[str, str]
    endpoint: str | None = None
    body: Any = None
    status: int = 0
    fault: str | None = None
    action: str = "respond"


class IterableEmulator:
    """An in-memory Iterable project. See the module docstring for the request pipeline."""

    def __init__(
        self,
        *,
        project_type: ProjectType = "hybrid",
        api_keys: str | Iterable[str] = DEFAULT_API_KEY,
        seed: int = 0,
        rate_limits: Mapping[str, Limit] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        retry_after_header: float | None = None,
    ) -> None:
        self.api_keys: set[str] = {api_keys} if isinstance(api_keys, str) else set(api_keys)
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.retry_after_header = retry_after_header
        self.project_id = 1
        self._lock = threading.RLock()
        self._wall_clock = wall_clock
        self._ids = random.Random(f"{seed}:ids")
        self._next_list_id = self._ids.randrange(100_000, 900_000)
        self._faults = FaultPlan(random.Random(f"{seed}:faults"))
        self._limiter = RateLimiter(rate_limits, clock)
        self.store = UserStore(project_type, random.Random(f"{seed}:users"))
        self.list_records: dict[int, ListRecord] = {}
        self.event_records: dict[str, dict[str, Any]] = {}
        self.purchase_records: dict[str, dict[str, Any]] = {}
        self.subscribe_count: Counter[tuple[int, str]] = Counter()
        self.redundant_subscribes: Counter[tuple[int, str]] = Counter()
        self.unsubscribe_count: Counter[tuple[int, str]] = Counter()
        self.channel_unsubscribes: set[str] = set()
        self.internal_errors: list[str] = []
        self._requests: list[RecordedRequest] = []

    # configuration ---------------------------------------------------------------------------

    @property
    def project_type(self) -> ProjectType:
        """ "email", "hybrid" or "userId"."""
        return self.store.project_type

    @property
    def invalid_emails(self) -> set[str]:
        """Emails Iterable should reject as invalid even though they are well formed (mutable)."""
        return self.store.invalid_emails

    @property
    def forgotten(self) -> set[str]:
        """GDPR-forgotten emails and userIds (mutable)."""
        return self.store.forgotten

    @property
    def rate_limits(self) -> dict[str, Limit]:
        """A copy of the rate limits in force."""
        with self._lock:
            return self._limiter.limits

    def set_rate_limit(self, endpoint: str, limit: Limit) -> None:
        """Set `(rate_per_second, burst)` or None (unlimited) for an endpoint key."""
        with self._lock:
            self._limiter.set(endpoint, limit)

    def disable_rate_limits(self) -> None:
        """Make every endpoint unlimited."""
        with self._lock:
            for key in self._limiter.limits:
                self._limiter.set(key, None)

    def add_fault(self, rule: FaultRule) -> FaultRule:
        """Activate a fault rule; returns it (its `fired` counts firings)."""
        with self._lock:
            return self._faults.add(rule)

    def clear_faults(self) -> None:
        """Deactivate every fault rule."""
        with self._lock:
            self._faults.clear()

    @property
    def faults_injected(self) -> Counter[str]:
        """How many faults of each kind fired."""
        with self._lock:
            return Counter(self._faults.injected)

    # the request pipeline --------------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str], body: bytes
    ) -> Reply:
        """Process one HTTP request and say how to answer it."""
        record = RecordedRequest(method=method.upper(), path=path, query=dict(query))
        with self._lock:
            try:
                reply = self._process(record, headers, body)
            except Exception as exc:  # an emulator bug: answer 500 and keep the traceback for tests
                self.internal_errors.append(traceback.format_exc())
                reply = error_reply(500, "GenericError", f"Emulator error: {exc!r}")
            record.status, record.action = reply.status, reply.action
            self._requests.append(record)
        return reply

    def _process(self, record: RecordedRequest, headers: Mapping[str, str], raw: bytes) -> Reply:
        matched = match_route(record.method, record.path)
        if matched is None:
            return error_reply(404, "NotFound", f"No such endpoint: {record.method} {record.path}")
        route, path_id = matched
        record.endpoint = route.endpoint
        payload, body_error = self._read_body(raw) if route.reads_body else (None, None)
        record.body = payload
        early = self._gatekeep(record, headers)
        if early is not None:
            return early
        rule = self._faults.pick(record.method, route.endpoint, route.bulk)
        record.fault = rule.kind if rule else None
        if rule is not None and rule.kind in ("status", "rate_limit", "drop_before"):
            return self._fault_reply(rule, record.path)
        partial = rule.partial_fraction if rule is not None and rule.kind == "partial" else None
        request = ApiRequest(
            record.method, record.path, route.endpoint, record.query, payload, path_id, partial
        )
        reply = body_error.reply() if body_error else self._run(route.handler, request)
        return self._deliver(reply, rule)

    def _gatekeep(self, record: RecordedRequest, headers: Mapping[str, str]) -> Reply | None:
        if not self._authorized(headers):
            return error_reply(401, "BadApiKey", "Invalid API key")
        assert record.endpoint is not None
        if not self._limiter.allow(record.method, record.endpoint):
            return self._rate_limited(record.path)
        return None

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        for name, value in headers.items():
            if name.lower() in ("api-key", "api_key") and value in self.api_keys:
                return True
        return False

    def _read_body(self, raw: bytes) -> tuple[Any, ApiError | None]:
        if len(raw) > self.max_body_bytes:
            return None, ApiError(
                400, "BatchTooLarge", f"Body of {len(raw)} bytes exceeds {self.max_body_bytes}"
            )
        if not raw.strip():
            return None, None
        try:
            return json.loads(raw), None
        except ValueError:
            return raw.decode("utf-8", "replace"), ApiError(
                400, "BadJsonBody", "Request body is not valid JSON"
            )

    def _run(self, handler: Callable[[IterableEmulator, ApiRequest], Reply], request: ApiRequest) -> Reply:
        try:
            return handler(self, request)
        except ApiError as err:
            return err.reply()

    def _rate_limited(self, path: str) -> Reply:
        headers = {}
        if self.retry_after_header is not None:
            headers["Retry-After"] = f"{self.retry_after_header:g}"
        msg = f"Exceeded rate limit for endpoint: {path}, project: {self.project_id}"
        return error_reply(429, "RateLimitExceeded", msg, headers)

    def _fault_reply(self, rule: FaultRule, path: str) -> Reply:
        if rule.kind == "rate_limit":
            return self._rate_limited(path)
        if rule.kind == "drop_before":
            return Reply(status=0, body=b"", action="drop_before")
        code = "GenericError" if rule.status >= 500 else "BadParams"
        msg = "Internal error" if rule.status >= 500 else "Injected error"
        return error_reply(rule.status, code, msg)

    def _deliver(self, reply: Reply, rule: FaultRule | None) -> Reply:
        if rule is None:
            return reply
        if rule.kind == "drop_after":
            return reply.with_action("drop_after")
        if rule.kind == "delay":
            return reply.with_action("delay", rule.delay_seconds)
        return reply

    # services for the endpoint handlers (called with the lock held) -------------------------

    def create_list(self, name: str, description: str | None = None) -> int:
        """Create a list (duplicate names allowed) and return its id."""
        with self._lock:
            list_id = self._next_list_id
            self._next_list_id += self._ids.randint(1, 7)
            self.list_records[list_id] = ListRecord(list_id, name, self.now_millis(), description)
            return list_id

    def partial_indexes(self, fraction: float | None, size: int) -> set[int]:
        """Which items of a bulk call a partial fault fails: ceil(fraction * size), seeded."""
        if fraction is None or size == 0:
            return set()
        return set(self._faults.rng.sample(range(size), min(size, math.ceil(fraction * size))))

    def new_id(self) -> str:
        """A fresh 32-hex-digit id for events and purchases sent without one."""
        return f"{self._ids.getrandbits(128):032x}"

    def now_millis(self) -> int:
        """Wall-clock epoch milliseconds."""
        return int(self._wall_clock() * 1000)

    def now_seconds(self) -> int:
        """Wall-clock epoch seconds."""
        return int(self._wall_clock())

    # helpers for tests -----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request seen so far."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        """Requests whose endpoint key is `endpoint` (e.g. "lists/subscribe")."""
        return [request for request in self.requests if request.endpoint == endpoint]

    @property
    def events(self) -> dict[str, dict[str, Any]]:
        """Tracked events by id (a copy)."""
        with self._lock:
            return copy.deepcopy(self.event_records)

    @property
    def purchases(self) -> dict[str, dict[str, Any]]:
        """Tracked purchases by id (a copy)."""
        with self._lock:
            return copy.deepcopy(self.purchase_records)

    def lists_named(self, name: str) -> list[int]:
        """Ids of every list with exactly this name, oldest first."""
        with self._lock:
            return sorted(record.id for record in self.list_records.values() if record.name == name)

    def delete_list(self, list_id: int) -> bool:
        """Delete a list as a user would in Iterable's UI; False if it did not exist."""
        with self._lock:
            return self.list_records.pop(list_id, None) is not None

    def list_members(self, list_id: int) -> set[tuple[str | None, str | None]]:
        """(email, userId) of every member; KeyError for an unknown list."""
        with self._lock:
            return {(user.email, user.user_id) for user in self._members(list_id)}

    def overview(self) -> dict[str, Any]:
        """Every list with its members, and counts of users, events and purchases: what a person
        developing against the emulator wants to look at (served at GET /_emulator)."""
        with self._lock:
            lists = [
                {
                    "id": record.id,
                    "name": record.name,
                    "members": [{"email": u.email, "userId": u.user_id} for u in self._members(record.id)],
                }
                for record in sorted(self.list_records.values(), key=lambda r: r.id)
            ]
            return {
                "project_type": self.project_type,
                "lists": lists,
                "users": len(self.store.users),
                "events": len(self.event_records),
                "purchases": len(self.purchase_records),
                "requests": len(self._requests),
            }

    def list_member_emails(self, list_id: int) -> set[str]:
        """Emails of the list's members (members without one are left out)."""
        return {email for email, _ in self.list_members(list_id) if email is not None}

    def list_member_user_ids(self, list_id: int) -> set[str]:
        """userIds of the list's members (members without one are left out)."""
        return {user_id for _, user_id in self.list_members(list_id) if user_id is not None}

    def add_list_member(self, list_id: int, email: str | None = None, user_id: str | None = None) -> User:
        """Put a user on a list behind listsync's back (drift); creates the user when needed.

        Counters are not touched. Identity rules of the project type apply.
        """
        with self._lock:
            user = self._upsert_user({"email": email, "userId": user_id, "preferUserId": True})
            self.list_records[list_id].members[user.iid] = None
            return copy.deepcopy(user)

    def remove_list_member(self, list_id: int, email: str | None = None, user_id: str | None = None) -> bool:
        """Take a user off a list behind listsync's back; False if they were not a member."""
        with self._lock:
            user = self.store.find_user_id(user_id) if user_id else self.store.find_email(email or "")
            members = self.list_records[list_id].members
            if user is None or user.iid not in members:
                return False
            del members[user.iid]
            return True

    def add_user(
        self,
        email: str | None = None,
        user_id: str | None = None,
        data_fields: Mapping[str, Any] | None = None,
    ) -> User:
        """Create or update a profile directly; returns a copy."""
        with self._lock:
            item = {
                "email": email,
                "userId": user_id,
                "preferUserId": True,
                "dataFields": dict(data_fields or {}),
            }
            return copy.deepcopy(self._upsert_user(item))

    def user_by_email(self, email: str) -> User | None:
        """A copy of the profile owning this email."""
        with self._lock:
            return copy.deepcopy(self.store.find_email(email))

    def user_by_user_id(self, user_id: str) -> User | None:
        """A copy of the profile with this userId."""
        with self._lock:
            return copy.deepcopy(self.store.find_user_id(user_id))

    def users(self) -> list[User]:
        """Copies of every profile."""
        with self._lock:
            return copy.deepcopy(list(self.store.users.values()))

    def _members(self, list_id: int) -> list[User]:
        return [self.store.users[iid] for iid in self.list_records[list_id].members]

    def _upsert_user(self, item: Mapping[str, Any]) -> User:
        try:
            return self.store.upsert(item, "upsert")
        except IdentityFailure as failure:
            raise ValueError(f"cannot create user {item!r}: {failure}") from None
