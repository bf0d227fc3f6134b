"""The one exception tree of listsync.

    ListsyncError
    ├── ConfigError                 bad configuration: stop, exit status 2
    ├── IngestError                 an inbound event or body that cannot be accepted (dead-lettered)
    ├── WorkerFailed                `listsync ingest`'s reading process failed or died (exit status 1)
    └── IterableError               anything Iterable answered, or failed to answer
        ├── RetryableError          429, 5xx, timeouts, dropped connections: try again later
        │   └── RateLimitedError    429 RateLimitExceeded; carries retry_after when known
        ├── PermanentError          400/404/409...: these items fail with Iterable's code and message
        │   └── ListNotFoundError   a stored list id that Iterable no longer knows
        └── AuthError               401/403: the API key was refused; stop sending, keep work pending

The first split under IterableError is about what the caller does next: retry, give up on the
items, or stop everything.
"""

from __future__ import annotations


class ListsyncError(Exception):
    """Root of every error listsync raises on purpose."""


class ConfigError(ListsyncError):
    """A configuration value is missing or invalid; the message names the key."""


class IngestError(ListsyncError):
    """An inbound event or request body that cannot be accepted."""


class WorkerFailed(ListsyncError):
    """The worker process that reads `listsync ingest`'s input failed or died; chunks stored before stay."""


class IterableError(ListsyncError):
    """An Iterable request did not succeed.

    Attributes:
        status: the HTTP status, or None when no response arrived.
        code: Iterable's error code from the body (e.g. "BadParams"), when there was one.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class RetryableError(IterableError):
    """A transient failure: the same request may succeed later."""


class RateLimitedError(RetryableError):
    """Iterable answered 429; retry_after is the server's hint in seconds, if it gave one."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = 429,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class PermanentError(IterableError):
    """Iterable refused the request's content; resending it unchanged will fail again."""


class ListNotFoundError(PermanentError):
    """The list id is unknown to Iterable (deleted, or from another project)."""


class AuthError(IterableError):
    """The API key was refused (401/403). Nothing more should be sent until the key is fixed."""


class MappingError(ValueError):
    """A trigger or field value that cannot be used; the message names the mapping and field."""
