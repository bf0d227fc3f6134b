"""A delivery pass that must stop sends nothing more than what is already on the wire: after a
refused API key, and after another replica took the delivery lease, the bulk calls queued behind
them stay pending. Several calls are queued at once (the emulator answers slowly)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from listsync import sync
from listsync.db import models as m
from listsync.db.session import transaction
from listsync.events import delivery
from tests.emulator import EmulatorServer, IterableEmulator
from tests.emulator.faults import FaultRule
from tests.helpers import API_KEY, ingest, make_settings, sync_context


def clicks(users: int) -> list[dict[str, Any]]:
    return [{"type": "track", "event": "Clicked", "messageId": f"t{u}", "userId": f"u{u}",
             "timestamp": "2026-02-01T10:00:00Z", "properties": {}} for u in range(users)]  # fmt: skip


def test_a_refused_key_sends_none_of_the_calls_queued_behind_it(database_url: str) -> None:
    emulator = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emulator.disable_rate_limits()
    emulator.add_fault(FaultRule(endpoint="events/trackBulk", kind="status", status=401))
    with EmulatorServer(emulator, latency_seconds=1.5) as server, \
            sync_context(make_settings(database_url, server.url)) as ctx:  # fmt: skip
        ingest(ctx, clicks(4500))  # five trackBulk calls
        report = sync.run_once(ctx)
    assert report.exit_code != 0
    assert len(emulator.requests_to("events/trackBulk")) == 1


def test_a_lost_lease_sends_none_of_the_calls_queued(database_url: str) -> None:
    emulator = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emulator.disable_rate_limits()
    taken_after: list[int] = []
    with EmulatorServer(emulator, latency_seconds=1.0) as server, \
            sync_context(make_settings(database_url, server.url)) as ctx:  # fmt: skip
        ingest(ctx, clicks(10_500))  # eleven trackBulk calls

        def take_over() -> None:
            while not emulator.requests_to("events/trackBulk"):
                time.sleep(0.02)
            with transaction(ctx.factory) as session:
                session.execute(
                    update(m.Lease)
                    .where(m.Lease.name == delivery.LEASE_NAME)
                    .values(owner="replica-2", until=datetime.now(UTC) + timedelta(hours=1))
                )
            taken_after.append(len(emulator.requests_to("events/trackBulk")))

        other_replica = threading.Thread(target=take_over)
        other_replica.start()
        report = delivery.deliver_pending(ctx)
        other_replica.join(60)
    sent = len(emulator.requests_to("events/trackBulk"))
    # At most the call already on the wire, and the one its worker started as it was answered.
    assert sent - taken_after[0] <= 2 and sent < 11
    assert report.delivered == 1000 * (sent - 1) or report.delivered == 1000 * sent


def test_a_graceful_stop_sends_none_of_the_calls_queued_and_the_next_run_sends_them(database_url: str) -> None:
    emulator = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emulator.disable_rate_limits()
    stopping = threading.Event()
    stopped_after: list[int] = []
    with EmulatorServer(emulator, latency_seconds=1.0) as server, \
            sync_context(make_settings(database_url, server.url)) as ctx:  # fmt: skip
        ingest(ctx, clicks(5500))  # six trackBulk calls, queued as routing goes on
        ctx.should_stop = stopping.is_set

        def sigterm() -> None:  # once every event is routed: the calls are queued behind the first
            while _deliveries(ctx) < 5500:
                time.sleep(0.02)
            stopping.set()
            stopped_after.append(len(emulator.requests_to("events/trackBulk")))

        daemon = threading.Thread(target=sigterm)
        daemon.start()
        first = delivery.deliver_pending(ctx)
        daemon.join(60)
        sent = len(emulator.requests_to("events/trackBulk"))
        # At most the call on the wire as the stop came.
        assert sent - stopped_after[0] <= 1 and sent < 6
        # What was routed and not sent stays pending; the rest of the inbox is routed next time.
        assert first.delivered == 1000 * sent and first.retrying == first.routed - first.delivered

        ctx.should_stop = lambda: False
        second = delivery.deliver_pending(ctx)
    assert second.delivered == 5500 - first.delivered and second.retrying == 0
    tracked = [event["id"] for request in emulator.requests_to("events/trackBulk") for event in request.body["events"]]
    assert sorted(tracked) == sorted(f"t{u}" for u in range(5500))  # each event sent once, none lost


def _deliveries(ctx: Any) -> int:
    with transaction(ctx.factory) as session:
        return int(session.scalar(select(func.count()).select_from(m.EventDelivery)) or 0)
