"""Iterable user profiles and how each project type identifies a user.

Project types (Iterable's "Project Types and Unique Identifiers"):

* ``email``: the email identifies the user. A userId sent with an email is written onto that user.
  A userId alone must match an existing user, unless ``preferUserId`` is true, in which case a user
  with a generated ``<hex>@placeholder.email`` address is created.
* ``hybrid``: email and userId are both unique and at least one is required. Lookup is by userId
  first, then by email. It is a conflict when the email belongs to a different user than the
  userId, or (userId unknown) to a user who already has another userId.
  A userId whose user has another email takes the new email when nobody else owns it, so list
  membership follows the user. An email-only user found by email adopts a new userId.
* ``userId``: userId is required (at most 52 characters, case-sensitive); email is an ordinary
  field that need not be unique.

A new email, per type: ``users/update`` (and any upsert) with a known userId and a new email
changes that profile's email in hybrid and userId projects; in email projects the email finds (or
creates) another profile and the userId moves to it, so the profile is renamed only by
``users/updateEmail`` (by ``currentEmail`` or ``currentUserId``), and list membership follows the
renamed profile. A lookup (unsubscribe) by an identifier no profile has is ``notFound``.

Emulator choices where Iterable is silent: emails are compared and stored lower-cased; an email is
valid when it looks like ``local@domain.tld`` and is not in ``invalid_emails``; a non-string
identifier is invalid; an empty string counts as absent; in email projects a userId moves to the
user it was last sent with. Failures are raised as `IdentityFailure`, whose kind matches the
``failedUpdates`` key prefixes of bulk responses.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

ProjectType = Literal["email", "hybrid", "userId"]
Mode = Literal["upsert", "update", "lookup"]
FailureKind = Literal["invalid", "notFound", "forgotten", "conflict", "invalidData", "missing"]

PROJECT_TYPES: tuple[str, ...] = ("email", "hybrid", "userId")
MAX_USER_ID_LENGTH = 52
PLACEHOLDER_DOMAIN = "placeholder.email"
_EMAIL_SHAPE = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")


@dataclass
class User:
    """One profile; `iid` is the emulator's internal id (list membership refers to it)."""

    iid: int
    email: str | None = None
    user_id: str | None = None
    data_fields: dict[str, Any] = field(default_factory=dict)
    cart: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> str:
        """userId when set, else email: the key used by the emulator's counters."""
        return self.user_id or self.email or f"#{self.iid}"


@dataclass(frozen=True)
class Identity:
    """The identifiers one request item carries, already validated."""

    email: str | None
    user_id: str | None
    prefer_user_id: bool = False


class IdentityFailure(Exception):
    """An item that cannot be applied; `entries` name it under bulk ``failedUpdates`` keys."""

    def __init__(self, kind: FailureKind, email: str | None = None, user_id: str | None = None) -> None:
        super().__init__(f"{kind}: email={email!r} userId={user_id!r}")
        self.kind = kind
        self.email = email
        self.user_id = user_id

    @property
    def entries(self) -> list[tuple[str, str]]:
        """(failedUpdates key, identifier) pairs; none for a missing identifier."""
        if self.kind == "missing":
            return []
        pairs = [(f"{self.kind}Emails", self.email), (f"{self.kind}UserIds", self.user_id)]
        return [(key, value) for key, value in pairs if value is not None]


def is_email_shaped(value: str) -> bool:
    """True for ``local@domain.tld``."""
    return bool(_EMAIL_SHAPE.match(value))


def merge_fields(target: dict[str, Any], fields: Mapping[str, Any], nested: bool) -> None:
    """Merge dataFields: top-level replace, or recursive for objects when `nested` is true."""
    for name, value in fields.items():
        current = target.get(name)
        if nested and isinstance(value, Mapping) and isinstance(current, dict):
            merge_fields(current, value, nested)
        else:
            target[name] = copy.deepcopy(value)


class UserStore:
    """All profiles of one project, with email and userId indexes. Not locked: the caller locks."""

    def __init__(self, project_type: ProjectType, rng: random.Random) -> None:
        if project_type not in PROJECT_TYPES:
            raise ValueError(f"project_type must be one of {PROJECT_TYPES}, not {project_type!r}")
        self.project_type: ProjectType = project_type
        self.users: dict[int, User] = {}
        self.invalid_emails: set[str] = set()
        self.forgotten: set[str] = set()
        self._rng = rng
        self._by_email: dict[str, int] = {}
        self._by_user_id: dict[str, int] = {}
        self._next_iid = 1

    # lookups ---------------------------------------------------------------------------------

    def find_email(self, email: str) -> User | None:
        """The user owning `email` (the latest writer in userId projects)."""
        iid = self._by_email.get(email.lower())
        return None if iid is None else self.users[iid]

    def find_user_id(self, user_id: str) -> User | None:
        """The user with this userId."""
        iid = self._by_user_id.get(user_id)
        return None if iid is None else self.users[iid]

    # parsing ---------------------------------------------------------------------------------

    def parse(self, item: Mapping[str, Any]) -> Identity:
        """Validate an item's email/userId and check the forgotten set."""
        email = self.parse_email(item.get("email"))
        user_id = self._parse_user_id(item.get("userId"))
        if email is None and user_id is None:
            raise IdentityFailure("missing")
        if self.project_type == "userId" and user_id is None:
            raise IdentityFailure("missing", email=email)
        ident = Identity(email, user_id, item.get("preferUserId") is True)
        self.check_forgotten(ident.email, ident.user_id)
        return ident

    def blame(self, item: Any) -> IdentityFailure:
        """An invalidData failure naming whatever identifiers a raw item has."""
        if not isinstance(item, Mapping):
            return IdentityFailure("missing")
        email, user_id = item.get("email"), item.get("userId")
        return IdentityFailure(
            "invalidData",
            email=email.lower() if isinstance(email, str) and email else None,
            user_id=user_id if isinstance(user_id, str) and user_id else None,
        )

    def parse_email(self, raw: Any) -> str | None:
        """The lower-cased email, None when absent; raises an "invalid" failure."""
        if raw is None or raw == "":
            return None
        if not isinstance(raw, str):
            raise IdentityFailure("invalid", email=str(raw))
        email = raw.lower()
        if not is_email_shaped(email) or email in {bad.lower() for bad in self.invalid_emails}:
            raise IdentityFailure("invalid", email=email)
        return email

    def _parse_user_id(self, raw: Any) -> str | None:
        if raw is None or raw == "":
            return None
        if not isinstance(raw, str):
            raise IdentityFailure("invalid", user_id=str(raw))
        if self.project_type == "userId" and len(raw) > MAX_USER_ID_LENGTH:
            raise IdentityFailure("invalid", user_id=raw)
        return raw

    def check_forgotten(self, email: str | None, user_id: str | None) -> None:
        """Raise a "forgotten" failure naming whichever identifiers are in `forgotten`."""
        forgotten_emails = {value.lower() for value in self.forgotten}
        email = email if email is not None and email.lower() in forgotten_emails else None
        user_id = user_id if user_id in self.forgotten else None
        if email is not None or user_id is not None:
            raise IdentityFailure("forgotten", email=email, user_id=user_id)

    # resolution ------------------------------------------------------------------------------

    def resolve(self, ident: Identity, mode: Mode) -> User:
        """Find (and for "upsert" create) the user; "lookup" never changes anything."""
        if self.project_type == "email":
            return self._resolve_email_project(ident, mode)
        if self.project_type == "hybrid":
            return self._resolve_hybrid(ident, mode)
        return self._resolve_user_id_project(ident, mode)

    def upsert(self, item: Mapping[str, Any], mode: Mode, fields_key: str | None = "dataFields") -> User:
        """Parse, resolve and merge the item's dataFields (unless `fields_key` is None)."""
        ident = self.parse(item)
        fields = item.get(fields_key) if fields_key else None
        if fields is not None and not isinstance(fields, Mapping):
            raise IdentityFailure("invalidData", ident.email, ident.user_id)
        user = self.resolve(ident, mode)
        if fields and mode != "lookup":
            merge_fields(user.data_fields, fields, item.get("mergeNestedObjects") is True)
        return user

    def _resolve_email_project(self, ident: Identity, mode: Mode) -> User:
        if ident.email is None:
            return self._email_project_by_user_id(ident, mode)
        user = self.find_email(ident.email)
        if user is None:
            if mode != "upsert":
                raise IdentityFailure("notFound", ident.email, ident.user_id)
            user = self.create(ident.email, None)
        if ident.user_id and mode != "lookup" and user.user_id != ident.user_id:
            self.set_user_id(user, ident.user_id)
        return user

    def _email_project_by_user_id(self, ident: Identity, mode: Mode) -> User:
        assert ident.user_id is not None
        user = self.find_user_id(ident.user_id)
        if user is not None:
            return user
        if mode == "upsert" and ident.prefer_user_id:
            return self.create(self._placeholder_email(), ident.user_id)
        raise IdentityFailure("notFound", user_id=ident.user_id)

    def _resolve_hybrid(self, ident: Identity, mode: Mode) -> User:
        by_uid = self.find_user_id(ident.user_id) if ident.user_id else None
        by_email = self.find_email(ident.email) if ident.email else None
        if by_uid is not None and by_email is not None and by_uid is not by_email:
            raise IdentityFailure("conflict", ident.email, ident.user_id)
        if by_uid is not None:
            if ident.email and by_email is None and mode != "lookup":
                self.set_email(by_uid, ident.email)
            return by_uid
        if by_email is not None:
            return self._adopt_user_id(by_email, ident, mode)
        if mode != "upsert":
            raise IdentityFailure("notFound", ident.email, ident.user_id)
        return self.create(ident.email, ident.user_id)

    def _adopt_user_id(self, user: User, ident: Identity, mode: Mode) -> User:
        if ident.user_id is None:
            return user
        if user.user_id is not None:
            raise IdentityFailure("conflict", ident.email, ident.user_id)
        if mode != "lookup":
            self.set_user_id(user, ident.user_id)
        return user

    def _resolve_user_id_project(self, ident: Identity, mode: Mode) -> User:
        assert ident.user_id is not None
        user = self.find_user_id(ident.user_id)
        if user is None:
            if mode != "upsert":
                raise IdentityFailure("notFound", user_id=ident.user_id)
            return self.create(ident.email, ident.user_id)
        if ident.email and mode != "lookup" and user.email != ident.email:
            self.set_email(user, ident.email)
        return user

    # mutation --------------------------------------------------------------------------------

    def create(self, email: str | None, user_id: str | None) -> User:
        """A new profile; the caller has checked uniqueness."""
        user = User(iid=self._next_iid)
        self._next_iid += 1
        self.users[user.iid] = user
        if email is not None:
            self.set_email(user, email)
        if user_id is not None:
            self.set_user_id(user, user_id)
        return user

    def set_email(self, user: User, email: str) -> None:
        """Give `user` this email, keeping the index in step."""
        email = email.lower()
        if user.email is not None and self._by_email.get(user.email) == user.iid:
            del self._by_email[user.email]
        user.email = email
        self._by_email[email] = user.iid

    def set_user_id(self, user: User, user_id: str) -> None:
        """Give `user` this userId; a previous holder (email projects only) loses it."""
        previous = self._by_user_id.get(user_id)
        if previous is not None and previous != user.iid:
            self.users[previous].user_id = None
        if user.user_id is not None:
            self._by_user_id.pop(user.user_id, None)
        user.user_id = user_id
        self._by_user_id[user_id] = user.iid

    def _placeholder_email(self) -> str:
        while True:
            email = f"{self._rng.getrandbits(64):016x}@{PLACEHOLDER_DOMAIN}"
            if email not in self._by_email:
                return email
