"""Prometheus metrics, served at /metrics by the receiver.

Counters are bumped where things happen (receiver, Iterable client, lists engine); gauges about
backlog are read from the database at scrape time, so every replica reports the same truth and
nothing has to be kept in step by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from listsync.db import backlog, health_queries, views
from listsync.domain import utcnow

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_RECEIVED = Counter(
    "listsync_events_received_total",
    "Inbound events by source and outcome (accepted, duplicate, rejected).",
    ["source", "outcome"],
    registry=REGISTRY,
)
ITERABLE_REQUESTS = Counter(
    "listsync_iterable_requests_total",
    "Iterable HTTP attempts by endpoint and status (0: no response).",
    ["endpoint", "status"],
    registry=REGISTRY,
)
ITERABLE_RATE_LIMITED = Counter(
    "listsync_iterable_rate_limited_total",
    "429 RateLimitExceeded answers by endpoint.",
    ["endpoint"],
    registry=REGISTRY,
)
def count_events(source: str, accepted: int, duplicates: int, rejected: int) -> None:
    for outcome, amount in (("accepted", accepted), ("duplicate", duplicates), ("rejected", rejected)):
        if amount:
            EVENTS_RECEIVED.labels(source, outcome).inc(amount)


def count_request(endpoint: str, status: int | None) -> None:
    ITERABLE_REQUESTS.labels(endpoint, str(status or 0)).inc()
    if status == 429:
        ITERABLE_RATE_LIMITED.labels(endpoint).inc()


class BacklogCollector(Collector):
    """Pending work and lag per audience, read from the audience_status view and memberships."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def collect(self) -> Iterator[Any]:
        pending = GaugeMetricFamily(
            "listsync_pending_members",
            "Members waiting to be sent, by audience and direction.",
            labels=["audience", "direction"],
        )
        failed = GaugeMetricFamily(
            "listsync_failed_members", "Members Iterable refused for good.", labels=["audience"]
        )
        lag = GaugeMetricFamily(
            "listsync_sync_lag_seconds",
            "Age of the oldest pending change (its event time to now).",
            labels=["audience"],
        )
        inbox = GaugeMetricFamily(
            "listsync_inbox_unapplied", "Accepted events not yet folded into memberships."
        )
        with self.factory() as session:
            for row in views.audience_status(session):
                pending.add_metric([row["audience_key"], "subscribe"], row["pending_subscribe"])
                pending.add_metric([row["audience_key"], "unsubscribe"], row["pending_unsubscribe"])
                failed.add_metric([row["audience_key"]], row["failed"])
            for key, oldest in health_queries.oldest_pending_by_audience(session):
                lag.add_metric([key], max(0.0, (utcnow() - oldest).total_seconds()))
            inbox.add_metric(
                [], health_queries.unapplied_events(session)
            )
            operator = list(_operator_gauges(session))
        yield from (pending, failed, lag, inbox, *operator)


def _operator_gauges(session: Session) -> Iterator[GaugeMetricFamily]:
    """Last successful run, event-delivery backlog and failures: what the example alerts watch."""
    last_ok = health_queries.last_successful_run_at(session)
    yield GaugeMetricFamily(
        "listsync_last_successful_run_timestamp_seconds",
        "End of the last sync run that finished without a fatal error (Unix time; 0: none yet).",
        value=last_ok.timestamp() if last_ok else 0.0,
    )
    waiting = backlog.backlog(session)
    deliveries = GaugeMetricFamily(
        "listsync_event_deliveries", "Event deliveries by state (pending includes waiting_retry).", labels=["state"]
    )
    for state, column in (
        ("pending", "deliveries_pending"),
        ("waiting_retry", "deliveries_waiting_retry"),
        ("failed", "deliveries_failed"),
    ):
        deliveries.add_metric([state], waiting[column])
    yield deliveries
    run = health_queries.last_finished_run(session)
    yield GaugeMetricFamily(
        "listsync_last_run_failed",
        "1 when the last finished run ended on a fatal error (refused API key, Iterable unreachable).",
        value=1.0 if run is not None and run.status == "failed" else 0.0,
    )


def render(factory: sessionmaker[Session] | None) -> bytes:
    """The text exposition of every metric, backlog included when a database is given."""
    if factory is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    registry.register(BacklogCollector(factory))
    return generate_latest(REGISTRY) + generate_latest(registry)
