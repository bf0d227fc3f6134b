"""What the emulator answers: the `Reply` handed to the HTTP layer and Iterable's JSON body shapes.

Iterable uses one body shape for success and for errors, `{"msg", "code", "params"}`, and a
`UserBulkUpdateListResponse` for list subscribe/unsubscribe and bulk user updates. `ApiError` is
raised inside endpoint code and turned into an error reply by the request pipeline.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["respond", "drop_before", "drop_after", "delay"]

JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"

FAILED_UPDATE_KEYS = (
    "invalidEmails",
    "invalidUserIds",
    "notFoundEmails",
    "notFoundUserIds",
    "forgottenEmails",
    "forgottenUserIds",
    "conflictEmails",
    "conflictUserIds",
    "invalidDataEmails",
    "invalidDataUserIds",
)


@dataclass(frozen=True)
class Reply:
    """One answer from the Iterable model.

    `action` tells the HTTP layer how to deliver it: "respond" normally, "drop_before" / "drop_after"
    close the connection without answering (the change was not / was applied), and "delay" answers
    after `delay_seconds`.
    """

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    action: Action = "respond"
    delay_seconds: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)

    def with_action(self, action: Action, delay_seconds: float = 0.0) -> Reply:
        """A copy delivered differently."""
        return dataclasses.replace(self, action=action, delay_seconds=delay_seconds)


class ApiError(Exception):
    """An error answer: HTTP status plus Iterable's error code and message."""

    def __init__(self, status: int, code: str, msg: str) -> None:
        super().__init__(f"{status} {code}: {msg}")
        self.status = status
        self.code = code
        self.msg = msg

    def reply(self) -> Reply:
        """This error as a reply."""
        return error_reply(self.status, self.code, self.msg)


def bad_params(msg: str) -> ApiError:
    """400 BadParams, Iterable's generic "invalid parameters" error."""
    return ApiError(400, "BadParams", msg)


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    """A JSON reply."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Reply(status=status, body=body, headers=dict(headers or {}))


def text_reply(lines: Iterable[str]) -> Reply:
    """A 200 text/plain reply with one value per line, as lists/getUsers answers."""
    body = "".join(f"{line}\n" for line in lines).encode()
    return Reply(status=200, body=body, content_type=TEXT_TYPE)


def error_reply(status: int, code: str, msg: str, headers: dict[str, str] | None = None) -> Reply:
    """Iterable's error shape."""
    return json_reply(status, {"msg": msg, "code": code, "params": None}, headers)


def success_reply(msg: str = "", params: dict[str, Any] | None = None) -> Reply:
    """Iterable's standard success shape."""
    return json_reply(200, {"msg": msg, "code": "Success", "params": params})


class BulkOutcome:
    """Accumulates per-item results of a bulk call into Iterable's bulk response body."""

    def __init__(self) -> None:
        self.success_count = 0
        self.fail_count = 0
        self.failed: dict[str, list[str]] = {key: [] for key in FAILED_UPDATE_KEYS}

    def ok(self) -> None:
        """One item applied."""
        self.success_count += 1

    def fail(self, entries: Iterable[tuple[str, str]]) -> None:
        """One item failed; `entries` name it under failedUpdates keys (possibly none)."""
        self.fail_count += 1
        for key, value in entries:
            self.failed[key].append(value)

    def payload(self, **extra: Any) -> dict[str, Any]:
        """The response body; deprecated top-level invalidEmails/invalidUserIds mirror failedUpdates."""
        body: dict[str, Any] = {
            "successCount": self.success_count,
            "failCount": self.fail_count,
            "invalidEmails": list(self.failed["invalidEmails"]),
            "invalidUserIds": list(self.failed["invalidUserIds"]),
            "failedUpdates": {key: list(values) for key, values in self.failed.items()},
        }
        body.update(extra)
        return body
