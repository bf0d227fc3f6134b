"""PURE: identity exactly as Iterable defines it, one place per project type.

Iterable's "Project Types and Unique Identifiers":

* **email** (email-based): the email is unique and identifies a profile; a userId is an attribute
  that the latest write moves to its profile. Each email is its own profile, so one person with two
  emails is two list members (Engage sends one event per email of a person).
* **hybrid**: userId and email are both unique; a userId, when known, names the profile.
* **userId**: the userId is unique and required; the email is an ordinary, non-unique field.

In hybrid and userId projects a userId names one profile: there is one membership per (audience,
userId), the latest event wins whatever email it carries, and an exit unsubscribes the profile by
userId. This module decides, and nothing else does:

1. which stored membership an event is about (`resolve`) and which identifiers it then keeps
   (`adopt`);
2. what an email change does to a membership (`email_change`) and to a profile (`email_update`);
3. which identifiers each request sends (`for_subscribe`, `for_unsubscribe`), and when a member
   subscribed under identifiers that no longer name its profile must be sent again (`stale`).

Memberships arrive as plain `Identity` values keyed by row id; no database, no HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from listsync.domain import ProjectType

MISSING_USER_ID = "missing_identifier: a userId is required when the Iterable project type is userId"
MISSING_ANY_ID = "missing_identifier: an email or a userId is required"


@dataclass(frozen=True)
class Identity:
    """The identifiers of an event or a membership; None means absent."""

    user_id: str | None
    email: str | None


def identity(user_id: str | None, email: str | None) -> Identity:
    """Normalise stored identifiers ('' means absent)."""
    return Identity(user_id or None, email or None)


def _by_user_id(project_type: ProjectType) -> bool:
    return project_type is not ProjectType.EMAIL


# --- 1. which membership an event is about --------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """`targets`: the memberships the event is about (none: a new one). `absorbed`: other rows of
    the same Iterable profile, to be merged into `targets[0]` and removed."""

    targets: tuple[int, ...] = ()
    absorbed: tuple[int, ...] = ()


def resolve(project_type: ProjectType, event: Identity, candidates: Mapping[int, Identity]) -> Match:
    """The memberships (row id -> identifiers) an event with these identifiers is about."""
    if _by_user_id(project_type):
        return _resolve_by_user_id(project_type, event, candidates)
    return _resolve_by_email(event, candidates)


class _Any:
    """Matches any identifier in `_ids` (None already means "absent")."""


_ANY = _Any()


def _ids(
    candidates: Mapping[int, Identity], user_id: str | None | _Any = _ANY, email: str | None | _Any = _ANY
) -> list[int]:
    """Row ids whose userId / email equal the given ones, in id order."""
    return sorted(
        i
        for i, who in candidates.items()
        if (user_id is _ANY or who.user_id == user_id) and (email is _ANY or who.email == email)
    )


def _pick(ids: list[int], preferred: list[int]) -> Match:
    target = next((i for i in ids if i in preferred), ids[0])
    return Match((target,), tuple(i for i in ids if i != target))


def _resolve_by_user_id(project_type: ProjectType, event: Identity, candidates: Mapping[int, Identity]) -> Match:
    email_only = _ids(candidates, user_id=None, email=event.email) if event.email else []
    if event.user_id:
        same_user = _ids(candidates, user_id=event.user_id)
        if not same_user:
            return Match(tuple(email_only[:1]))  # a member first seen by email alone gets its userId
        match = _pick(same_user, _ids(candidates, email=event.email) if event.email else [])
        # In hybrid projects the email is unique too: a row by that email alone is this profile.
        extra = tuple(email_only) if project_type is ProjectType.HYBRID else ()
        return Match(match.targets, match.absorbed + extra)
    if project_type is ProjectType.USER_ID or not event.email:
        return Match(tuple(email_only[:1]))
    with_user = [i for i in _ids(candidates, email=event.email) if candidates[i].user_id]
    if with_user:
        return Match((with_user[0],), tuple(email_only))
    return Match(tuple(email_only[:1]))


def _resolve_by_email(event: Identity, candidates: Mapping[int, Identity]) -> Match:
    if not event.email:
        # A userId alone speaks for every profile (email) of that user.
        return Match(tuple(_ids(candidates, user_id=event.user_id)) if event.user_id else ())
    same_email = _ids(candidates, email=event.email)
    if same_email:
        return _pick(same_email, _ids(candidates, user_id=event.user_id) + _ids(candidates, user_id=None))
    if event.user_id:
        return Match(tuple(_ids(candidates, user_id=event.user_id, email=None)[:1]))
    return Match()


def adopt(project_type: ProjectType, current: Identity, event: Identity, newer: bool) -> Identity:
    """The membership's identifiers after an event about it. The identifier that names the profile
    never changes once known; the other one follows the latest event (only a newer event may
    change it, so a late, older event cannot bring back an address the user left)."""
    if _by_user_id(project_type):
        email = event.email if newer and event.email else current.email or event.email
        return Identity(current.user_id or event.user_id, email)
    user_id = event.user_id if newer and event.user_id else current.user_id or event.user_id
    return Identity(user_id, current.email or event.email)


# --- 2. email changes -------------------------------------------------------------------------------


class EmailEffect(StrEnum):
    """What a user's new email does to a membership of theirs.

    RENAME: the same profile keeps its list membership under the new email (hybrid, userId).
    SPLIT: the old email's profile leaves and the new email's profile takes its place (email
    projects: each email is its own profile, and updateEmail may or may not have renamed it).
    """

    RENAME = "rename"
    SPLIT = "split"


def email_change(
    project_type: ProjectType, user_id: str, new_email: str, rows: Mapping[int, Identity]
) -> tuple[int, EmailEffect] | None:
    """The membership of one audience a plain identify (userId, new email) changes, and how.

    Only a user with exactly one membership in the audience is moved: several rows for one userId
    (email projects) mean several addresses on purpose, and are left alone rather than guessed at.
    """
    mine = _ids(rows, user_id=user_id)
    if len(mine) != 1 or rows[mine[0]].email in (None, new_email):
        return None
    effect = EmailEffect.RENAME if _by_user_id(project_type) else EmailEffect.SPLIT
    return mine[0], effect


@dataclass(frozen=True)
class EmailUpdate:
    """How a profile's email is changed: users/updateEmail naming the profile by exactly one of
    currentEmail / currentUserId, or users/update by userId carrying the new email."""

    endpoint: str
    current_email: str | None = None
    current_user_id: str | None = None


UPDATE_EMAIL = "users/updateEmail"
UPDATE_USER = "users/update"


def email_update(project_type: ProjectType, user_id: str | None, old_email: str | None) -> EmailUpdate | None:
    """Iterable's spec: updateEmail is for email-based projects and takes currentEmail *or*
    currentUserId; in hybrid and userId projects an email is changed by users/update by userId.
    None: the profile cannot be named (no identifier at all)."""
    if _by_user_id(project_type) and user_id:
        return EmailUpdate(UPDATE_USER, current_user_id=user_id)
    if project_type is ProjectType.USER_ID:
        return None
    if old_email:
        return EmailUpdate(UPDATE_EMAIL, current_email=old_email)
    if user_id:
        return EmailUpdate(UPDATE_EMAIL, current_user_id=user_id)
    return None


# --- 3. the identifiers each request sends -------------------------------------------------------------


@dataclass(frozen=True)
class Addressee:
    """The identifiers one subscribe or unsubscribe item carries."""

    email: str | None = None
    user_id: str | None = None
    prefer_user_id: bool = False


def missing_identifier(project_type: ProjectType, who: Identity) -> str | None:
    """The reason a member cannot be sent at all under this project type, or None."""
    if project_type is ProjectType.USER_ID and not who.user_id:
        return MISSING_USER_ID
    if not who.user_id and not who.email:
        return MISSING_ANY_ID
    return None


def for_subscribe(project_type: ProjectType, current: Identity) -> Addressee:
    """Every known identifier (Iterable links them on its profile). preferUserId only in userId
    projects, as Segment sends it; in email projects it would make placeholder profiles that no
    later email could find again."""
    return Addressee(current.email, current.user_id, prefer_user_id=project_type is ProjectType.USER_ID)


def for_unsubscribe(project_type: ProjectType, current: Identity, synced: Identity | None) -> Addressee:
    """One identifier: the one that names the profile Iterable was given. In hybrid and userId
    projects the userId (whatever email the member has now); in email projects the email."""
    given = synced if synced is not None and (synced.user_id or synced.email) else current
    if _by_user_id(project_type) and given.user_id:
        return Addressee(user_id=given.user_id)
    if project_type is ProjectType.USER_ID:
        return Addressee(user_id=current.user_id)
    return Addressee(email=given.email) if given.email else Addressee(user_id=given.user_id)


def for_request(project_type: ProjectType, current: Identity, synced: Identity, subscribing: bool) -> Addressee:
    """Who a subscribe or an unsubscribe for a member names: the planner sends it, and an
    in-doubt request is settled against it."""
    if subscribing:
        return for_subscribe(project_type, current)
    return for_unsubscribe(project_type, current, synced)


def stale(project_type: ProjectType, current: Identity, synced: Identity) -> bool:
    """A subscribed member whose identifiers moved since Iterable confirmed them, so the subscribe
    is sent again: in hybrid projects when the userId or the email is new to the profile (a userId
    links a profile first subscribed by email, a new email keeps Iterable's address in step); in
    email projects when the email changed (another profile); never in userId projects."""
    if project_type is ProjectType.USER_ID:
        return False
    if project_type is ProjectType.HYBRID:
        new_user_id = bool(current.user_id) and current.user_id != synced.user_id
        return new_user_id or (bool(synced.email) and current.email != synced.email)
    return bool(current.email) and current.email != synced.email
