"""A database for the status page tests, filled the way users fill it: Engage events in, real sync
runs against the emulator. It ends with one held audience, one audience with failed members, a
calm audience in step, rejected events and per-event deliveries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from listsync import sync
from listsync.config import Settings
from tests.emulator import IterableEmulator
from tests.helpers import API_KEY, audience_event, ingest, sync_context

ADMIN_TOKEN = "status-admin-token-7c2e91"
INVALID_EMAILS = ("u101@x.com", "u102@x.com")


@dataclass(frozen=True)
class Seeded:
    held: str = "vip"
    failing: str = "newsletter"
    calm: str = "calm"
    invalid_emails: tuple[str, ...] = INVALID_EMAILS


def settings_data(database_url: str, base_url: str, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "database_url": database_url,
        "iterable": {
            "api_key": API_KEY,
            "base_url": base_url,
            "max_attempts": 2,
            "retry_base_seconds": 0.01,
            "retry_max_seconds": 0.05,
        },
        "sync": {"retry_base_seconds": 0, "retry_max_seconds": 0, "max_unsubscribe_fraction": 0.5},
        "receiver": {"enabled": False, "port": 0},
        "status_page": {"admin_token": ADMIN_TOKEN},
        "logging": {"level": "WARNING"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def _enters(key: str, users: range | list[int], at: float) -> list[dict[str, Any]]:
    return [audience_event(key, inside=True, user_id=f"u{i}", email=f"u{i}@x.com", at=at) for i in users]


def _exits(key: str, users: range | list[int], at: float) -> list[dict[str, Any]]:
    return [audience_event(key, inside=False, user_id=f"u{i}", email=f"u{i}@x.com", at=at) for i in users]


def seed(settings: Settings, emu: IterableEmulator) -> Seeded:
    names = Seeded()
    emu.invalid_emails.update(INVALID_EMAILS)
    with sync_context(settings) as ctx:
        ingest(
            ctx,
            _enters(names.held, range(20), at=1)
            + _enters(names.calm, range(12), at=1)
            + _enters(names.failing, range(100, 104), at=1),
        )
        ingest(
            ctx,
            [
                {
                    "type": "track",
                    "event": "Signed Up",
                    "userId": "ada",
                    "messageId": "signup-1",
                    "timestamp": "2026-01-01T00:00:00Z",
                    "properties": {"email": "ada@example.com"},
                },
                {
                    "type": "identify",
                    "userId": "ada",
                    "messageId": "identify-1",
                    "timestamp": "2026-01-01T00:00:00Z",
                    "traits": {"email": "ada@example.com"},
                },
            ],
        )
        sync.run_once(ctx)
        ingest(ctx, _exits(names.held, range(15), at=2) + _exits(names.calm, range(2), at=2))
        sync.run_once(ctx)
        ingest(
            ctx,
            [
                {"type": "identify", "messageId": "no-identity-1", "timestamp": "2026-01-01T00:00:00Z"},
                {"type": "identify", "messageId": "no-identity-2", "timestamp": "2026-01-01T00:00:00Z"},
                {
                    "type": "teleport",
                    "userId": "x",
                    "messageId": "bad-type-1",
                    "timestamp": "2026-01-01T00:00:00Z",
                },
            ],
        )
    return names
