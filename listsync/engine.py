"""The one claim -> send -> record loop both pipelines use.

Both the lists pipeline and event delivery send in passes until a pass sends nothing, stop the
whole run when Iterable refuses the key or cannot be reached at all, and stop sending for work
whose lease another replica has taken. Those rules live here once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn, Protocol

from listsync.errors import AuthError, RetryableError
from listsync.iterable.responses import CONNECT_FAILED

logger = logging.getLogger(__name__)


def note(names: list[str], name: str) -> None:
    """Add to a report list once, however many passes of a run see the same audience."""
    if name not in names:
        names.append(name)


class StopRun(Exception):
    """Raised inside a pipeline when nothing more may be sent: the API key was refused, Iterable
    cannot be reached, or another replica took the work over."""


class Outcome(Protocol):
    """A pipeline's report: `fatal` says why the whole run stopped (exit 2)."""

    fatal: str | None


def repeat_passes(one_pass: Callable[[], bool], *, max_passes: int) -> None:
    """Run passes until one returns False (it sent nothing, or nothing more is due) or StopRun.

    A later pass picks up what an earlier one put back (a retry that is due again, a user whose
    earlier event was delivered meanwhile); `max_passes` bounds a run that keeps failing."""
    for _ in range(max_passes):
        try:
            if not one_pass():
                return
        except StopRun:
            return


def stop_refused(report: Outcome, exc: AuthError, *, kept: str = "nothing more was sent") -> NoReturn:
    """A refused key is a configuration problem, not the members': keep them pending, send nothing more."""
    report.fatal = f"the API key was refused by Iterable ({exc.status}); {kept}"
    logger.error(report.fatal, extra={"event": "auth_refused"})
    raise StopRun from None


def unreachable(exc: RetryableError) -> bool:
    """Not even a connection to Iterable on the client's last try, after all its retries. A
    dropped socket or a timeout is not enough: those happen to a reachable Iterable too."""
    return exc.code == CONNECT_FAILED


def stop_unreachable(report: Outcome, exc: RetryableError) -> NoReturn:
    """Iterable cannot be reached: a connection problem (exit 2), not the members'. Whatever was
    in hand stays pending; going on would only spend every remaining batch on the same failure."""
    report.fatal = f"could not reach Iterable ({exc}); nothing more was sent"
    logger.error(report.fatal, extra={"event": "iterable_unreachable"})
    raise StopRun from None


def still_ours(renewed: bool, what: str, **extra: object) -> bool:
    """After renewing a lease before sending: False (and said once in the log) when our lease lapsed,
    e.g. during long retries, and another replica took `what` over; sending on would send twice."""
    if not renewed:
        logger.warning("%s was taken over by another replica; leaving it", what, extra={"event": "lease_lost", **extra})
    return renewed
