"""The one claim -> send -> record loop both pipelines use.

Both the lists pipeline and event delivery send in passes until a pass sends nothing, stop the
whole run when Iterable refuses the key or cannot be reached at all, and stop sending for work
whose lease another replica has taken. Those rules live here once."""

from __future__ import annotations

import logging
from typing import NoReturn

from listsync.context import RunReport
from listsync.errors import AuthError, RetryableError
from listsync.iterable.client import CONNECT_FAILED

logger = logging.getLogger(__name__)


def note(names: list[str], name: str) -> None:
    """Add to a report list once, however many passes of a run see the same audience."""
    if name not in names:
        names.append(name)


class StopRun(Exception):
    """Raised inside a run when nothing more may be sent (the API key was refused)."""


def stop_refused(report: RunReport, exc: AuthError) -> NoReturn:
    """A refused key is a configuration problem, not the members': keep them pending, send nothing more."""
    report.fatal = f"the API key was refused by Iterable ({exc.status}); nothing more was sent"
    logger.error(report.fatal, extra={"event": "auth_refused"})
    raise StopRun from None


def unreachable(exc: RetryableError) -> bool:
    """Not even a connection to Iterable on the client's last try, after all its retries. A
    dropped socket or a timeout is not enough: those happen to a reachable Iterable too."""
    return exc.code == CONNECT_FAILED


def stop_unreachable(report: RunReport, exc: RetryableError) -> NoReturn:
    """Iterable cannot be reached: a connection problem (exit 2), not the members'. Whatever was
    in hand stays pending; going on would only spend every remaining batch on the same failure."""
    report.fatal = f"could not reach Iterable ({exc}); nothing more was sent"
    logger.error(report.fatal, extra={"event": "iterable_unreachable"})
    raise StopRun from None
