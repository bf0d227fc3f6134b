"""IterableClient against the emulator over real HTTP (EmulatorServer): every failure class, retries,
connection faults, hosts, getUsers parsing and pacing; then a 10,000-member subscribe through the sync
engine with heavy fault injection, on both databases."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import text

from listsync import sync
from listsync.errors import (
    AuthError,
    ConfigError,
    ListNotFoundError,
    PermanentError,
    RateLimitedError,
    RetryableError,
)
from listsync.iterable.client import (
    EU_BASE_URL,
    US_BASE_URL,
    IterableClient,
    RetryPolicy,
    base_url_for,
    client_from_settings,
)
from listsync.iterable.payloads import ItemOutcome, Subscriber
from tests.emulator import EmulatorServer, FaultRule, IterableEmulator
from tests.helpers import FakeClock, audience_event, ingest, make_settings, sync_context

KEY = "emu-client-key-41c9"
ATTEMPTS = 4


@pytest.fixture
def emu() -> IterableEmulator:
    emulator = IterableEmulator(project_type="hybrid", api_keys=KEY, seed=3)
    emulator.disable_rate_limits()
    return emulator


@pytest.fixture
def server(emu: IterableEmulator) -> Iterator[EmulatorServer]:
    with EmulatorServer(emu) as running:
        yield running


def make_client(
    url: str,
    *,
    key: str = KEY,
    attempts: int = ATTEMPTS,
    timeout: float = 5.0,
    clock: FakeClock | None = None,
    rate_limits: dict[str, float] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> IterableClient:
    clock = clock or FakeClock()
    return IterableClient(
        api_key=key,
        base_url=url,
        transport=transport,
        timeout=timeout,
        retry=RetryPolicy(max_attempts=attempts, base_delay=0.001, max_delay=0.01),
        rate_limits=rate_limits,
        sleep=clock.sleep,
        clock=clock,
    )


def subs(*emails: str) -> list[Subscriber]:
    return [Subscriber(email=email) for email in emails]


def statuses(emu: IterableEmulator, endpoint: str) -> list[int]:
    return [request.status for request in emu.requests_to(endpoint)]


# -- 2xx and per-member outcomes ---------------------------------------------------------------


def test_clean_subscribe_unsubscribe_and_lists(emu: IterableEmulator, server: EmulatorServer) -> None:
    with make_client(server.url) as client:
        list_id = client.create_list("clean")
        assert [(lst.id, lst.name) for lst in client.get_lists()] == [(list_id, "clean")]
        result = client.subscribe(list_id, subs("a@x.com", "B@x.com"), update_existing_users_only=False)
        assert (result.http_status, result.success_count, result.fail_count) == (200, 2, 0)
        assert result.attempts == 1
        assert result.outcome("a@x.com", None) is ItemOutcome.OK
        gone = client.unsubscribe(list_id, subs("a@x.com"), campaign_id=None, channel_unsubscribe=False)
        assert (gone.success_count, gone.fail_count) == (1, 0)
    assert emu.list_member_emails(list_id) == {"b@x.com"}


def test_mixed_failed_updates_in_one_200_hybrid(emu: IterableEmulator, server: EmulatorServer) -> None:
    emu.add_user(email="taken@x.com", user_id="u-taken")
    emu.add_user(email="existing@x.com", user_id="u-existing")
    emu.invalid_emails.add("bad@x.com")
    emu.forgotten.add("gone@x.com")
    sent = [
        Subscriber(email="new@x.com", user_id="u-new"),
        Subscriber(email="BAD@x.com"),  # invalid; reported lower-cased, matched case-insensitively
        Subscriber(email="gone@x.com", user_id="u-gone"),  # forgotten
        Subscriber(email="taken@x.com", user_id="u-other"),  # email owned by another userId: conflict
        Subscriber(email="Existing@X.com", user_id="u-existing"),
    ]
    with make_client(server.url) as client:
        list_id = client.create_list("mixed")
        result = client.subscribe(list_id, sent, update_existing_users_only=False)
    assert (result.http_status, result.success_count, result.fail_count) == (200, 2, 3)
    outcomes = [result.outcome(s.email, s.user_id) for s in sent]
    assert outcomes == [
        ItemOutcome.OK,
        ItemOutcome.INVALID,
        ItemOutcome.FORGOTTEN,
        ItemOutcome.CONFLICT,
        ItemOutcome.OK,
    ]
    assert emu.list_member_emails(list_id) == {"new@x.com", "existing@x.com"}


def test_mixed_failed_updates_userid_project() -> None:
    emu = IterableEmulator(project_type="userId", api_keys=KEY)
    emu.forgotten.add("u-forgotten")
    sent = [
        Subscriber(user_id="u-ok", email="ok@x.com"),
        Subscriber(user_id="x" * 53),  # longer than 52 characters: invalid userId
        Subscriber(user_id="u-forgotten"),
    ]
    with EmulatorServer(emu) as server, make_client(server.url) as client:
        list_id = client.create_list("uid")
        result = client.subscribe(list_id, sent, update_existing_users_only=False)
    assert [result.outcome(s.email, s.user_id) for s in sent] == [
        ItemOutcome.OK,
        ItemOutcome.INVALID,
        ItemOutcome.FORGOTTEN,
    ]
    assert emu.list_member_user_ids(list_id) == {"u-ok"}


def test_update_existing_users_only_reports_unknown_users_not_found(
    emu: IterableEmulator, server: EmulatorServer
) -> None:
    emu.add_user(email="known@x.com", user_id="u-known")
    sent = [
        Subscriber(email="known@x.com", user_id="u-known"),
        Subscriber(email="nobody@x.com", user_id="u-no"),
    ]
    with make_client(server.url) as client:
        list_id = client.create_list("existing-only")
        result = client.subscribe(list_id, sent, update_existing_users_only=True)
    assert [result.outcome(s.email, s.user_id) for s in sent] == [ItemOutcome.OK, ItemOutcome.NOT_FOUND]
    assert emu.list_member_emails(list_id) == {"known@x.com"}
    assert emu.user_by_email("nobody@x.com") is None


def test_unsubscribe_of_non_members_and_unknown_users_is_not_found(
    emu: IterableEmulator, server: EmulatorServer
) -> None:
    emu.add_user(email="outsider@x.com")
    with make_client(server.url) as client:
        list_id = client.create_list("unsub")
        client.subscribe(list_id, subs("in@x.com", "stay@x.com"), update_existing_users_only=False)
        sent = subs("in@x.com", "outsider@x.com", "ghost@x.com")
        result = client.unsubscribe(list_id, sent, campaign_id=None, channel_unsubscribe=False)
    assert (result.success_count, result.fail_count) == (1, 2)
    assert [result.outcome(s.email, None) for s in sent] == [
        ItemOutcome.OK,
        ItemOutcome.NOT_FOUND,
        ItemOutcome.NOT_FOUND,
    ]
    assert emu.list_member_emails(list_id) == {"stay@x.com"}


def test_partial_fault_reports_invalid_data_for_exactly_the_unapplied_members(
    emu: IterableEmulator, server: EmulatorServer
) -> None:
    rule = emu.add_fault(FaultRule("lists/subscribe", "partial", count=1, partial_fraction=0.4))
    emails = [f"p{i}@x.com" for i in range(10)]
    with make_client(server.url) as client:
        list_id = client.create_list("partial")
        result = client.subscribe(list_id, subs(*emails), update_existing_users_only=False)
    failed = {e for e in emails if result.outcome(e, None) is ItemOutcome.INVALID_DATA}
    ok = {e for e in emails if result.outcome(e, None) is ItemOutcome.OK}
    assert rule.fired == 1 and len(failed) == 4 and ok == set(emails) - failed
    assert (result.success_count, result.fail_count) == (6, 4)
    assert emu.list_member_emails(list_id) == ok


# -- permanent errors --------------------------------------------------------------------------


def test_bad_params_is_permanent_and_not_retried(emu: IterableEmulator, server: EmulatorServer) -> None:
    with make_client(server.url) as client:
        with pytest.raises(PermanentError) as real:
            client.create_list("   ")
        list_id = client.create_list("bad-params")
        emu.add_fault(FaultRule("lists/subscribe", "status", status=400))
        with pytest.raises(PermanentError) as injected:
            client.subscribe(list_id, subs("a@x.com"), update_existing_users_only=False)
    assert (real.value.status, real.value.code) == (400, "BadParams")
    assert "name is required" in str(real.value)
    assert type(injected.value) is PermanentError  # not ListNotFoundError: the message names no list
    assert (injected.value.status, injected.value.code) == (400, "BadParams")
    assert statuses(emu, "lists/subscribe") == [400]
    assert emu.list_member_emails(list_id) == set()


def test_batch_too_large_by_items_and_by_bytes_is_permanent_with_its_code(
    emu: IterableEmulator, server: EmulatorServer
) -> None:
    with make_client(server.url) as client:
        list_id = client.create_list("big")
        # The client refuses what cannot fit Iterable's limits before a byte is sent...
        with pytest.raises(ValueError, match="1001 subscribers"):
            client.subscribe(
                list_id, subs(*(f"u{i}@x.com" for i in range(1001))), update_existing_users_only=False
            )
        huge = [Subscriber(email=f"u{i}@x.com", data_fields={"blob": "x" * 5000}) for i in range(900)]
        with pytest.raises(ValueError, match="bytes"):
            client.subscribe(list_id, huge, update_existing_users_only=False)
        assert emu.requests_to("lists/subscribe") == []
        # ...and maps the server's BatchTooLarge (tighter limits here) to a PermanentError with the code.
        emu.max_batch = 5
        with pytest.raises(PermanentError) as by_items:
            client.subscribe(
                list_id, subs(*(f"u{i}@x.com" for i in range(6))), update_existing_users_only=False
            )
        emu.max_batch, emu.max_body_bytes = 1000, 2000
        with pytest.raises(PermanentError) as by_bytes:
            client.subscribe(list_id, huge[:3], update_existing_users_only=False)
    for error in (by_items.value, by_bytes.value):
        assert type(error) is PermanentError and (error.status, error.code) == (400, "BatchTooLarge")
    assert statuses(emu, "lists/subscribe") == [400, 400]
    assert emu.list_member_emails(list_id) == set()


def test_unknown_or_deleted_list_is_list_not_found(emu: IterableEmulator, server: EmulatorServer) -> None:
    with make_client(server.url) as client:
        list_id = client.create_list("doomed")
        emu.delete_list(list_id)
        with pytest.raises(ListNotFoundError) as sub:
            client.subscribe(list_id, subs("a@x.com"), update_existing_users_only=False)
        with pytest.raises(ListNotFoundError):
            client.unsubscribe(123, subs("a@x.com"), campaign_id=None, channel_unsubscribe=False)
        with pytest.raises(ListNotFoundError):
            client.get_list_users(list_id, prefer_user_id=False)
    assert sub.value.status == 400 and sub.value.code == "BadParams"
    assert [r.status for r in emu.requests if r.endpoint != "lists"] == [400, 400, 400]  # none retried


def test_refused_api_key_is_auth_error_and_never_retried(
    emu: IterableEmulator, server: EmulatorServer
) -> None:
    with make_client(server.url, key="not-the-key", attempts=5) as client:
        with pytest.raises(AuthError) as refused:
            client.subscribe(1, subs("a@x.com"), update_existing_users_only=False)
        with pytest.raises(AuthError):
            client.get_lists()
    assert (refused.value.status, refused.value.code) == (401, "BadApiKey")
    assert "not-the-key" not in str(refused.value)
    assert [r.status for r in emu.requests] == [401, 401]
    emu.add_fault(FaultRule("GET lists", "status", status=403, count=1))
    with make_client(server.url, attempts=5) as client, pytest.raises(AuthError) as forbidden:
        client.get_lists()
    assert forbidden.value.status == 403 and statuses(emu, "lists") == [401, 403]


# -- retried failures --------------------------------------------------------------------------


def test_429_is_retried_then_succeeds(emu: IterableEmulator, server: EmulatorServer) -> None:
    clock = FakeClock()
    with make_client(server.url, clock=clock) as client:
        list_id = client.create_list("limited")
        emu.add_fault(FaultRule("lists/subscribe", "rate_limit", count=2))
        result = client.subscribe(list_id, subs("a@x.com"), update_existing_users_only=False)
    assert result.attempts == 3 and statuses(emu, "lists/subscribe") == [429, 429, 200]
    assert emu.list_member_emails(list_id) == {"a@x.com"}
    assert len(clock.sleeps) >= 2 and max(clock.sleeps) < 0.05  # backoff and pacing only


def test_persistent_429_exhausts_into_rate_limited_error(
    emu: IterableEmulator, server: EmulatorServer
) -> None:
    with make_client(server.url) as client:
        list_id = client.create_list("limited")
        emu.add_fault(FaultRule("lists/subscribe", "rate_limit"))
        with pytest.raises(RateLimitedError) as exhausted:
            client.subscribe(list_id, subs("a@x.com"), update_existing_users_only=False)
    assert (exhausted.value.status, exhausted.value.code) == (429, "RateLimitExceeded")
    assert f"gave up after {ATTEMPTS} attempts" in str(exhausted.value)
    assert statuses(emu, "lists/subscribe") == [429] * ATTEMPTS


def test_retry_after_header_is_honoured(emu: IterableEmulator, server: EmulatorServer) -> None:
    emu.retry_after_header = 7
    clock = FakeClock()
    with make_client(server.url, clock=clock) as client:
        list_id = client.create_list("retry-after")
        emu.add_fault(FaultRule("lists/subscribe", "rate_limit", count=2))
        result = client.subscribe(list_id, subs("a@x.com"), update_existing_users_only=False)
    assert result.attempts == 3
    assert clock.sleeps == [7.0, 7.0]  # exactly the server's wait, no pacing sleep on top


def test_retry_after_from_the_emulators_own_limiter(emu: IterableEmulator) -> None:
    """Client configured faster than the emulator's getUsers bucket: the 429's Retry-After is slept,
    on a clock shared with the emulator, and the retry then fits."""
    clock = FakeClock()
    limited = IterableEmulator(api_keys=KEY, clock=clock, retry_after_header=12)
    limited.set_rate_limit("lists/getUsers", (5 / 60, 1))
    list_id = limited.create_list("paced")
    rates = {"GET /api/lists/getUsers": 1.0}
    with EmulatorServer(limited) as server, make_client(server.url, clock=clock, rate_limits=rates) as client:
        assert client.get_list_users(list_id, prefer_user_id=False) == []
        assert client.get_list_users(list_id, prefer_user_id=False) == []
    assert statuses(limited, "lists/getUsers") == [200, 429, 200]
    assert 12.0 in clock.sleeps


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried_then_succeeds(emu: IterableEmulator, server: EmulatorServer, status: int) -> None:
    with make_client(server.url) as client:
        list_id = client.create_list("flaky")
        emu.add_fault(FaultRule("lists/subscribe", "status", status=status, count=2))
        result = client.subscribe(list_id, subs("a@x.com"), update_existing_users_only=False)
    assert result.attempts == 3 and statuses(emu, "lists/subscribe") == [status, status, 200]
    assert emu.list_member_emails(list_id) == {"a@x.com"}


def test_persistent_5xx_exhausts_into_retryable_error(emu: IterableEmulator, server: EmulatorServer) -> None:
    with make_client(server.url) as client:
        list_id = client.create_list("down")
        emu.add_fault(FaultRule("lists/subscribe", "status", status=503))
        with pytest.raises(RetryableError) as exhausted:
            client.subscribe(list_id, subs("a@x.com"), update_existing_users_only=False)
        emu.clear_faults()
        emu.add_fault(FaultRule("lists/subscribe", "status", status=501, count=1))
        with pytest.raises(PermanentError):  # 501 Not Implemented will not change on a retry
            client.subscribe(list_id, subs("a@x.com"), update_existing_users_only=False)
    assert type(exhausted.value) is RetryableError
    assert (exhausted.value.status, exhausted.value.code) == (503, "GenericError")
    assert statuses(emu, "lists/subscribe") == [503] * ATTEMPTS + [501]


def test_delay_beyond_the_timeout_is_retried_and_the_change_was_applied_once(
    emu: IterableEmulator, server: EmulatorServer
) -> None:
    with make_client(server.url, timeout=0.3) as client:
        list_id = client.create_list("slow")
        emu.add_fault(FaultRule("lists/subscribe", "delay", count=1, delay_seconds=1.0))
        result = client.subscribe(list_id, subs("a@x.com", "b@x.com"), update_existing_users_only=False)
    assert result.attempts == 2 and result.outcome("a@x.com", None) is ItemOutcome.OK
    first, second = emu.requests_to("lists/subscribe")
    assert (first.fault, first.action, second.fault) == ("delay", "delay", None)
    # The timed-out attempt was applied; the retry found the members already there (idempotent).
    assert emu.list_member_emails(list_id) == {"a@x.com", "b@x.com"}
    assert emu.subscribe_count[(list_id, "a@x.com")] == 1
    assert emu.redundant_subscribes[(list_id, "a@x.com")] == 1


@pytest.mark.parametrize("kind", ["drop_before", "drop_after"])
def test_dropped_connections_are_retried_and_end_correct(
    emu: IterableEmulator, server: EmulatorServer, kind: str
) -> None:
    with make_client(server.url) as client:
        list_id = client.create_list("dropped")
        client.subscribe(list_id, subs("old@x.com"), update_existing_users_only=False)
        emu.add_fault(FaultRule("lists/subscribe", kind, count=1))  # type: ignore[arg-type]
        emu.add_fault(FaultRule("lists/unsubscribe", kind, count=1))  # type: ignore[arg-type]
        emu.add_fault(FaultRule("GET lists", kind, count=1))  # type: ignore[arg-type]
        result = client.subscribe(list_id, subs("a@x.com", "b@x.com"), update_existing_users_only=False)
        gone = client.unsubscribe(list_id, subs("old@x.com"), campaign_id=None, channel_unsubscribe=False)
        assert [lst.id for lst in client.get_lists()] == [list_id]
    assert result.attempts == gone.attempts == 2
    assert emu.list_member_emails(list_id) == {"a@x.com", "b@x.com"}
    assert emu.subscribe_count[(list_id, "a@x.com")] == 1
    assert emu.redundant_subscribes[(list_id, "a@x.com")] == (1 if kind == "drop_after" else 0)
    # After drop_after the retried unsubscribe finds the member already gone: notFound, which the
    # sync engine counts as done for an unsubscribe.
    expected = ItemOutcome.NOT_FOUND if kind == "drop_after" else ItemOutcome.OK
    assert gone.outcome("old@x.com", None) is expected
    assert emu.faults_injected[kind] == 3


def test_create_list_retried_after_drop_after_does_not_duplicate_the_list(
    emu: IterableEmulator, server: EmulatorServer
) -> None:
    emu.add_fault(FaultRule("POST lists", "drop_after", count=1))
    with make_client(server.url) as client:
        list_id = client.create_list("once")
    assert emu.lists_named("once") == [list_id]


# -- hosts, getUsers, pacing -------------------------------------------------------------------


class _ToEmulator(httpx.BaseTransport):
    """Sends requests addressed to Iterable's real hosts to the emulator, remembering the host."""

    def __init__(self, server: EmulatorServer) -> None:
        self.hosts: list[str] = []
        self._server = server
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.hosts.append(f"{request.url.scheme}://{request.url.host}")
        request.url = request.url.copy_with(scheme="http", host=self._server.host, port=self._server.port)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize(("center", "host"), [("US", US_BASE_URL), ("eu", EU_BASE_URL), ("EU", EU_BASE_URL)])
def test_data_center_selects_the_host(
    emu: IterableEmulator, server: EmulatorServer, center: str, host: str
) -> None:
    list_id = emu.create_list("dc")
    routed = _ToEmulator(server)
    assert base_url_for(center) == host
    with make_client(base_url_for(center), transport=routed) as client:
        assert [lst.id for lst in client.get_lists()] == [list_id]
    settings = make_settings("sqlite://", iterable={"api_key": KEY, "data_center": center.upper()})
    with client_from_settings(settings.iterable, transport=routed) as client:
        client.get_lists()
    assert routed.hosts == [host, host]
    assert base_url_for(center, f"{server.url}/") == server.url  # an explicit base_url wins
    with pytest.raises(ConfigError):
        base_url_for("APAC")


def test_get_users_text_parsing_hybrid(emu: IterableEmulator, server: EmulatorServer) -> None:
    with make_client(server.url) as client:
        list_id = client.create_list("hybrid-users")
        assert client.get_list_users(list_id, prefer_user_id=False) == []
        sent = [
            Subscriber(email="Both@X.com", user_id="u-both"),
            Subscriber(email="only-email@x.com"),
            Subscriber(user_id="u-only-id"),
        ]
        client.subscribe(list_id, sent, update_existing_users_only=False)
        emails = client.get_list_users(list_id, prefer_user_id=False)
        user_ids = client.get_list_users(list_id, prefer_user_id=True)
    assert emails == ["both@x.com", "only-email@x.com"]  # a userId-only member has no email line
    assert user_ids == ["u-both", "u-only-id"]
    assert [r.query for r in emu.requests_to("lists/getUsers")][-1] == {
        "listId": str(list_id),
        "preferUserId": "true",
    }


def test_get_users_text_parsing_userid_project() -> None:
    emu = IterableEmulator(project_type="userId", api_keys=KEY)
    emu.disable_rate_limits()
    with EmulatorServer(emu) as server, make_client(server.url) as client:
        list_id = client.create_list("uid-users")
        sent = [
            Subscriber(user_id="U-2", email="shared@x.com"),
            Subscriber(user_id="u-1", email="shared@x.com"),
        ]
        client.subscribe(list_id, sent, update_existing_users_only=False)
        assert client.get_list_users(list_id, prefer_user_id=True) == ["U-2", "u-1"]
        assert client.get_list_users(list_id, prefer_user_id=False) == ["shared@x.com", "shared@x.com"]


def test_pacing_at_the_emulators_limit_never_triggers_429() -> None:
    """Emulator and client share a fake clock: the client's own buckets keep it under the limit."""
    clock = FakeClock()
    emu = IterableEmulator(api_keys=KEY, clock=clock)  # getUsers: Iterable's 5/minute, burst 5
    emu.set_rate_limit("lists/subscribe", (4.0, 4.0))
    list_id = emu.create_list("paced")
    with EmulatorServer(emu) as server:
        with make_client(server.url, clock=clock, rate_limits={"POST /api/lists/subscribe": 4.0}) as client:
            for i in range(40):
                client.subscribe(list_id, subs(f"u{i}@x.com"), update_existing_users_only=False)
            for _ in range(12):
                client.get_list_users(list_id, prefer_user_id=False)
        assert statuses(emu, "lists/subscribe") == [200] * 40
        assert statuses(emu, "lists/getUsers") == [200] * 12
        assert clock.now - 1000.0 >= 11 * 12  # getUsers paced at one per 12 s
        # The control: a client twice as fast as the emulator is refused, and still gets through.
        with make_client(
            server.url, clock=clock, attempts=8, rate_limits={"POST /api/lists/subscribe": 8.0}
        ) as fast:
            for i in range(40):
                fast.subscribe(list_id, subs(f"f{i}@x.com"), update_existing_users_only=False)
    assert 429 in statuses(emu, "lists/subscribe")
    assert len(emu.list_member_emails(list_id)) == 80


# -- 10,000 members through the sync engine under faults ---------------------------------------

MEMBERS = 10_000
# Rules fire in order, first hit wins: conditional probabilities giving 20% 5xx, 10% 429, 5% dropped
# before and 5% dropped after being applied, of all requests to an endpoint.
FAULT_MIX: list[tuple[str, float]] = [
    ("status", 0.20),
    ("rate_limit", 0.10),
    ("drop_before", 0.05),
    ("drop_after", 0.05),
]


def add_fault_mix(emu: IterableEmulator) -> None:
    for endpoint in ("lists/subscribe", "GET lists", "POST lists"):
        left = 1.0
        for kind, share in FAULT_MIX:
            if endpoint == "POST lists" and kind == "drop_after":
                continue  # see test_create_list_retried_after_drop_after_does_not_duplicate_the_list
            emu.add_fault(FaultRule(endpoint, kind, probability=share / left, status=503))  # type: ignore[arg-type]
            left -= share


def test_10k_subscribe_under_faults_ends_exact(database_url: str) -> None:
    emu = IterableEmulator(project_type="hybrid", api_keys=KEY, seed=2)
    add_fault_mix(emu)
    wanted = {f"member{i}@example.com" for i in range(MEMBERS)}
    events = [
        audience_event(
            "faulted", inside=True, user_id=f"m-{i}", email=f"member{i}@example.com", kind="track", at=i
        )
        for i in range(MEMBERS)
    ]
    with EmulatorServer(emu) as server:
        settings = make_settings(database_url, server.url, api_key=KEY)
        with sync_context(settings) as ctx:
            assert ingest(ctx, events).accepted == MEMBERS
            reports = []
            for _ in range(5):
                reports.append(sync.run_once(ctx))
                if reports[-1].exit_code == 0:
                    break
            assert reports[-1].exit_code == 0, [r.summary() for r in reports]
            with ctx.factory() as session:
                status = dict(session.execute(text("SELECT * FROM audience_status")).mappings().one())
    (list_id,) = emu.lists_named("faulted")
    assert emu.list_member_emails(list_id) == wanted
    assert emu.internal_errors == []
    assert status["list_id"] == list_id
    assert status["members"] == status["synced_members"] == MEMBERS
    assert status["pending_subscribe"] == status["pending_unsubscribe"] == status["failed"] == 0
    sent = emu.requests_to("lists/subscribe")
    assert len(sent) >= math.ceil(MEMBERS / 1000)
    injected = emu.faults_injected
    assert all(injected[kind] > 0 for kind, _ in FAULT_MIX), injected
