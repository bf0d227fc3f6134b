"""Secrets stay secret end to end: the Iterable API key and the receiver's write keys appear in no log
line (every logger at DEBUG, SQL included), no exception text and no row of any table, on both databases.

The emulator here echoes the API key it was sent in every error message, the worst case of what a
server may do, so the client's redaction is exercised and not just the absence of the key."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from starlette.testclient import TestClient

from listsync import context, preview, sync
from listsync.errors import IterableError, ListNotFoundError, PermanentError, RateLimitedError
from listsync.ingest.receiver import build_app
from listsync.iterable.client import IterableClient
from listsync.iterable.payloads import Subscriber
from listsync.iterable.retry import RetryPolicy
from listsync.logs import JsonFormatter
from tests.emulator import EmulatorServer, FaultRule, IterableEmulator, Reply
from tests.helpers import audience_event, ingest, make_settings, sync_context

API_KEY = "sk-live-ZZTOP-8842"
WRONG_KEY = "sk-live-WRONG-5150"
WRITE_KEY = "wk-live-QUEEN-7731"


class EchoingEmulator(IterableEmulator):
    """Puts the Api-Key it received into the message of every JSON error it answers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keys_seen: set[str] = set()

    def handle(
        self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str], body: bytes
    ) -> Reply:
        reply = super().handle(method, path, query, headers, body)
        sent = next((v for k, v in headers.items() if k.lower() in ("api-key", "api_key")), "")
        self.keys_seen.add(sent)
        if reply.status < 400 or not reply.body.startswith(b"{"):
            return reply
        payload = reply.json()
        payload["msg"] = f"{payload.get('msg')} (request made with Api-Key {sent})"
        return dataclasses.replace(reply, body=json.dumps(payload).encode())


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG (sqlalchemy's SQL and rows too), non-propagating ones included."""
    caplog.set_level(logging.DEBUG)
    attached = []
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            caplog.set_level(logging.DEBUG, logger=name)
            if not logger.propagate:
                logger.addHandler(caplog.handler)
                attached.append(logger)
    yield caplog
    for logger in attached:
        logger.removeHandler(caplog.handler)


def log_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    formatter = JsonFormatter()
    return [formatter.format(record) for record in caplog.records]


def table_dump(database_url: str) -> tuple[str, int]:
    """Every row of every table and view, as text, and the number of rows."""
    engine = create_engine(database_url)
    try:
        names = inspect(engine).get_table_names() + inspect(engine).get_view_names()
        lines = []
        with engine.connect() as conn:
            for name in names:
                lines += [f"{name}: {tuple(row)}" for row in conn.execute(text(f'SELECT * FROM "{name}"'))]
        return "\n".join(lines), len(lines)
    finally:
        engine.dispose()


def exception_texts(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), repr(exc.args), "".join(traceback.format_exception(exc))]


def collect(texts: list[str], call: Callable[[], object]) -> None:
    try:
        call()
    except (IterableError, ValueError) as exc:
        texts.extend(exception_texts(exc))


def run_until_quiet(ctx: context.SyncContext, texts: list[str], runs: int = 4) -> None:
    for _ in range(runs):
        report = sync.run_once(ctx)
        texts += [report.summary(), repr(report)]
        if report.requests == 0:
            return


def vip(i: int, inside: bool = True, at: float = 0.0) -> dict[str, Any]:
    return audience_event("vip", inside=inside, user_id=f"u{i}", email=f"user{i}@x.com", at=at, kind="track")


def test_api_key_is_in_no_log_exception_or_row(database_url: str, captured: pytest.LogCaptureFixture) -> None:
    emu = EchoingEmulator(project_type="hybrid", api_keys=API_KEY, seed=5)
    emu.disable_rate_limits()
    emu.invalid_emails.update({"user37@x.com", "user38@x.com"})  # in the last batch of 8
    emu.forgotten.add("user39@x.com")
    for rule in (
        FaultRule("lists/subscribe", "status", status=400, count=1),  # first batch fails for good
        FaultRule("lists/subscribe", "status", status=503, count=6),  # exhausts the second batch's 6 attempts
        FaultRule("lists/subscribe", "rate_limit", count=2),
        FaultRule("lists/subscribe", "drop_after", count=1),
        FaultRule("lists/subscribe", "delay", count=1, delay_seconds=1.5),  # beyond the client timeout
        FaultRule("lists/unsubscribe", "status", status=400, count=1),
        FaultRule("lists/unsubscribe", "status", status=502, count=1),
        FaultRule("lists/unsubscribe", "drop_before", count=1),
    ):
        emu.add_fault(rule)
    texts: list[str] = []
    rejected = {"type": "bogus", "messageId": "bad-1", "apiKey": API_KEY, "properties": {"api_key": API_KEY}}
    with EmulatorServer(emu) as server:
        settings = make_settings(
            database_url,
            server.url,
            api_key=API_KEY,
            iterable={"timeout_seconds": 0.5},
            sync={"batch_size": 8},
        )
        texts += [repr(settings), str(settings), settings.model_dump_json()]
        with sync_context(settings) as ctx:
            texts.append(repr(ctx.client))
            ingest(ctx, [vip(i) for i in range(40)] + [rejected])
            run_until_quiet(ctx, texts)
            ingest(
                ctx, [vip(i, inside=False, at=10) for i in range(20, 30)]
            )  # under the mass-unsubscribe guard
            run_until_quiet(ctx, texts)

        # A second client whose key Iterable refuses (and echoes back).
        wrong = make_settings(database_url, server.url, api_key=WRONG_KEY)
        with sync_context(wrong) as ctx:
            ingest(ctx, [vip(i, at=20) for i in range(40, 45)])
            report = sync.run_once(ctx)
            assert report.fatal and report.exit_code == 2
            texts += [report.summary(), str(report.fatal)]

        # Each failure class raised straight from the client, with the key echoed in the message.
        retry = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.01)
        for key in (API_KEY, WRONG_KEY):
            with IterableClient(api_key=key, base_url=server.url, retry=retry, timeout=0.5) as client:
                texts.append(repr(client))
                collect(
                    texts,
                    lambda c=client: c.subscribe(
                        1, [Subscriber("a@x.com")], update_existing_users_only=False
                    ),
                )
                collect(texts, lambda c=client: c.create_list(" "))
                collect(texts, lambda c=client: c.get_list_users(1, prefer_user_id=False))
                emu.add_fault(FaultRule("*", "rate_limit", count=2))
                collect(texts, lambda c=client: c.get_lists())
                emu.add_fault(FaultRule("*", "status", status=500, count=2))
                collect(texts, lambda c=client: c.get_lists())
                emu.add_fault(FaultRule("*", "drop_before", count=2))
                collect(texts, lambda c=client: c.get_lists())
                collect(texts, lambda c=client: c.subscribe(1, [], update_existing_users_only=False))

    # The dry run logs the bodies it would send at DEBUG.
    with sync_context(make_settings(database_url, api_key="")) as ctx:
        ingest(ctx, [vip(i, at=30) for i in range(45, 50)])
        texts += [sync.run_once(ctx).summary(), json.dumps(preview.audiences_preview(ctx), default=str)]

    logs = log_texts(captured)
    dump, rows = table_dump(database_url)
    for secret in (API_KEY, WRONG_KEY):
        assert [t for t in texts if secret in t] == []
        assert [line for line in logs if secret in line] == []
        assert [line for line in dump.splitlines() if secret in line] == []

    # The scenario really happened: both keys reached the emulator, errors were echoed and redacted,
    # SQL was logged, and the failure rows exist.
    assert {API_KEY, WRONG_KEY} <= emu.keys_seen
    assert {"status", "rate_limit", "drop_after", "drop_before", "delay"} <= set(emu.faults_injected)
    assert emu.requests_to("lists/unsubscribe") and emu.requests_to("lists/subscribe")
    assert any("[redacted]" in t for t in texts) and any("[redacted]" in t for t in logs)
    assert "[redacted]" in dump and "invalid:" in dump and "forgotten:" in dump
    assert any(r.name.startswith("sqlalchemy.engine") for r in captured.records)
    assert any(r.name == "listsync.iterable.dry_run" and r.levelno == logging.DEBUG for r in captured.records)
    assert rows > 100


def test_client_exceptions_name_their_class_without_the_key() -> None:
    """The redaction keeps what the operator needs: class, status and Iterable's code."""
    emu = EchoingEmulator(api_keys=API_KEY)
    with EmulatorServer(emu) as server, IterableClient(api_key=API_KEY, base_url=server.url) as client:
        with pytest.raises(ListNotFoundError) as missing:
            client.get_list_users(77, prefer_user_id=False)
        emu.add_fault(FaultRule("*", "rate_limit"))
        client_fast = IterableClient(api_key=API_KEY, base_url=server.url, retry=RetryPolicy(max_attempts=1))
        with client_fast, pytest.raises(RateLimitedError) as limited:
            client_fast.get_lists()
    assert str(missing.value) == (
        "GET /api/lists/getUsers: HTTP 400 BadParams: List 77 does not exist "
        "(request made with Api-Key [redacted])"
    )
    assert isinstance(missing.value, PermanentError) and limited.value.code == "RateLimitExceeded"
    assert API_KEY not in str(limited.value)


def test_write_key_is_in_no_row_or_log(database_url: str, captured: pytest.LogCaptureFixture) -> None:
    settings = make_settings(database_url, api_key="", receiver={"write_keys": [WRITE_KEY]})
    basic = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    valid = [vip(i) for i in range(3)]
    answers = []
    with sync_context(settings) as ctx, TestClient(build_app(settings, ctx.factory)) as http:
        auth = (WRITE_KEY, "")
        # Basic auth plus writeKey in the body, as Segment's libraries send it.
        answers.append(http.post("/v1/batch", auth=auth, json={"batch": valid[:1], "writeKey": WRITE_KEY}))
        # writeKey in the body only (analytics.js style), on a single-event endpoint.
        answers.append(http.post("/v1/track", json={**valid[1], "writeKey": WRITE_KEY}))
        # A batch with one rejected item that carries the key itself.
        bad_item = {
            "type": "bogus",
            "messageId": "bad-2",
            "writeKey": WRITE_KEY,
            "context": {"writeKey": WRITE_KEY},
        }
        answers.append(
            http.post("/v1/batch", auth=auth, json={"batch": [valid[2], bad_item], "writeKey": WRITE_KEY})
        )
        # Whole bodies rejected: every event bad, then JSON that does not parse.
        answers.append(http.post("/v1/batch", json={"batch": [bad_item], "writeKey": WRITE_KEY}))
        broken = f'{{"writeKey": "{WRITE_KEY}", "batch": [{{"type": "identify", '.encode()
        answers.append(http.post("/v1/batch", auth=auth, content=broken))
        # A refused key stores nothing.
        answers.append(
            http.post("/v1/batch", auth=("nope", ""), json={"batch": valid, "writeKey": WRITE_KEY})
        )
        texts = [repr(settings), settings.model_dump_json()] + [a.text for a in answers]
        texts.append(sync.run_once(ctx).summary())  # dry run: memberships made from the stored events
    assert [a.status_code for a in answers] == [200, 200, 200, 400, 400, 401]
    assert answers[2].json()["rejected"] == 1
    dump, _ = table_dump(database_url)
    assert "u0" in dump and "u2" in dump and "bad-2" in dump  # the events and the rejections are stored
    assert dump.count("dead_letters:") == 3
    logs = log_texts(captured)
    for secret in (WRITE_KEY, basic):
        assert [line for line in dump.splitlines() if secret in line] == []
        assert [line for line in logs if secret in line] == []
        assert [t for t in texts if secret in t] == []


@pytest.mark.parametrize("case", ["nested_in_accepted_event", "unquoted_in_malformed_body"])
def test_write_key_outside_the_usual_place_is_not_stored(database_url: str, case: str) -> None:
    settings = make_settings(database_url, api_key="", receiver={"write_keys": [WRITE_KEY]})
    with sync_context(settings) as ctx, TestClient(build_app(settings, ctx.factory)) as http:
        if case == "nested_in_accepted_event":
            event = vip(1)
            event["context"]["writeKey"] = WRITE_KEY
            assert http.post("/v1/track", auth=(WRITE_KEY, ""), json=event).status_code == 200
        else:
            body = f"{{writeKey: '{WRITE_KEY}', batch: []}}".encode()
            assert http.post("/v1/batch", auth=(WRITE_KEY, ""), content=body).status_code == 400
    dump, _ = table_dump(database_url)
    assert [line for line in dump.splitlines() if WRITE_KEY in line] == []
