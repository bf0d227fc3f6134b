"""PURE: which identifiers a subscriber is sent with, by Iterable project type.

hybrid (also for email-based projects): subscribe with email and/or userId, whichever are known;
unsubscribe with one identifier, email first, because in an email-based project a userId may not
identify anyone and Iterable would answer notFound while the member stays in the list.
userId projects: a userId is required; subscribe sets preferUserId; email rides along when known.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from listsync.domain import ProjectType
from listsync.iterable.payloads import Subscriber

MISSING_USER_ID = "missing_identifier: a userId is required when the Iterable project type is userId"
MISSING_ANY_ID = "missing_identifier: an email or a userId is required"


@dataclass(frozen=True)
class Identity:
    user_id: str | None
    email: str | None


def identity(user_id: str | None, email: str | None) -> Identity:
    """Normalise stored identifiers ('' means absent)."""
    return Identity(user_id or None, email or None)


def missing_identifier(project_type: ProjectType, who: Identity) -> str | None:
    """The reason a member cannot be sent at all under this project type, or None."""
    if project_type is ProjectType.USER_ID and not who.user_id:
        return MISSING_USER_ID
    if not who.user_id and not who.email:
        return MISSING_ANY_ID
    return None


def subscriber_for_subscribe(
    project_type: ProjectType, who: Identity, data_fields: Mapping[str, Any] | None
) -> Subscriber:
    return Subscriber(
        email=who.email,
        user_id=who.user_id,
        data_fields=dict(data_fields) if data_fields else None,
        prefer_user_id=project_type is ProjectType.USER_ID,
    )


def subscriber_for_unsubscribe(project_type: ProjectType, who: Identity) -> Subscriber:
    if project_type is ProjectType.USER_ID:
        return Subscriber(user_id=who.user_id)
    if who.email:
        return Subscriber(email=who.email)
    return Subscriber(user_id=who.user_id)


def resolve(
    project_type: ProjectType, user_id: str, email: str, candidates: Mapping[int, tuple[str, str]]
) -> list[int]:
    """Which stored subscribers (id -> (userId, email), '' for absent) an event about (user_id,
    email) is about; [] means a new subscriber.

    The same pair wins. In userId projects the userId alone identifies. In hybrid projects an
    event carrying both identifiers first completes a row that lacked one of them (the member seen
    before its email was known), and an event carrying one identifier speaks for every row with
    it. Two rows with one userId and different emails stay two subscribers: Engage sends one event
    per email of a profile.
    """
    exact = [i for i, pair in candidates.items() if pair == (user_id, email)]
    if exact:
        return exact
    same_user = [i for i, (u, _) in candidates.items() if user_id and u == user_id]
    if project_type is ProjectType.USER_ID and user_id:
        return same_user
    if user_id and email:
        lacking_email = [i for i in same_user if not candidates[i][1]]
        lacking_user = [i for i, (u, e) in candidates.items() if e == email and not u]
        return (lacking_email or lacking_user)[:1]
    if user_id:
        return same_user
    return [i for i, (_, e) in candidates.items() if email and e == email]
