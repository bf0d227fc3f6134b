"""`listsync.identity`, the one place that decides identity per Iterable project type."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from listsync.domain import ProjectType
from listsync.lists import identity
from listsync.lists.identity import Addressee, EmailEffect, Identity, Match

EMAIL, HYBRID, USER_ID = ProjectType.EMAIL, ProjectType.HYBRID, ProjectType.USER_ID


def who(user_id: str | None, email: str | None) -> Identity:
    return Identity(user_id, email)


def test_the_module_is_pure() -> None:
    tree = ast.parse(Path(identity.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    banned = ("listsync.db", "listsync.iterable", "httpx", "sqlalchemy")
    assert not [name for name in imported if name.startswith(banned)], imported


ROWS = {1: who("u1", "old@x.com"), 2: who(None, "new@x.com"), 3: who(None, "solo@x.com"), 4: who("u9", None)}


@pytest.mark.parametrize(
    ("project", "event", "match"),
    [
        # a userId names the profile whatever email the event carries; the email-only row of the
        # same (unique) email is that profile too in hybrid projects
        (HYBRID, who("u1", "new@x.com"), Match((1,), (2,))),
        (USER_ID, who("u1", "new@x.com"), Match((1,))),
        (HYBRID, who("u2", "solo@x.com"), Match((3,))),  # an email-only member gets its userId
        (USER_ID, who("u2", "solo@x.com"), Match((3,))),
        (HYBRID, who(None, "old@x.com"), Match((1,))),
        (USER_ID, who(None, "old@x.com"), Match()),  # an email is no identifier in userId projects
        (HYBRID, who("u3", "u3@x.com"), Match()),
        # email projects: each email is its own profile
        (EMAIL, who("u1", "new@x.com"), Match((2,))),
        (EMAIL, who("u1", "old@x.com"), Match((1,))),
        (EMAIL, who("u1", "other@x.com"), Match()),
        (EMAIL, who("u9", "u9@x.com"), Match((4,))),  # a userId-only member gets its email
        (EMAIL, who("u1", None), Match((1,))),  # a userId alone speaks for all its profiles
    ],
)
def test_which_membership_an_event_is_about(project: ProjectType, event: Identity, match: Match) -> None:
    assert identity.resolve(project, event, ROWS) == match


def test_duplicate_rows_of_one_user_id_collapse_in_user_id_types() -> None:
    rows = {5: who("l5", "l5@example.com"), 6: who("l5", "l5-new@example.com")}
    assert identity.resolve(HYBRID, who("l5", "l5-new@example.com"), rows) == Match((6,), (5,))
    assert identity.resolve(USER_ID, who("l5", "x@example.com"), rows) == Match((5,), (6,))
    assert identity.resolve(EMAIL, who("l5", None), rows) == Match((5, 6))


def test_the_latest_event_moves_the_attribute_never_the_key() -> None:
    current = who("u1", "old@x.com")
    assert identity.adopt(HYBRID, current, who("u1", "new@x.com"), newer=True) == who("u1", "new@x.com")
    assert identity.adopt(HYBRID, current, who("u1", "new@x.com"), newer=False) == current
    assert identity.adopt(HYBRID, who(None, "e@x.com"), who("u1", "e@x.com"), newer=False) == who("u1", "e@x.com")
    assert identity.adopt(EMAIL, current, who("u2", "old@x.com"), newer=True) == who("u2", "old@x.com")
    assert identity.adopt(EMAIL, who("u9", None), who("u9", "e@x.com"), newer=True) == who("u9", "e@x.com")


def test_email_change_renames_or_splits() -> None:
    rows = {1: who("u1", "old@x.com")}
    assert identity.email_change(HYBRID, "u1", "new@x.com", rows) == (1, EmailEffect.RENAME)
    assert identity.email_change(USER_ID, "u1", "new@x.com", rows) == (1, EmailEffect.RENAME)
    assert identity.email_change(EMAIL, "u1", "new@x.com", rows) == (1, EmailEffect.SPLIT)
    assert identity.email_change(HYBRID, "u1", "old@x.com", rows) is None
    two = {1: who("u1", "a@x.com"), 2: who("u1", "b@x.com")}
    assert identity.email_change(EMAIL, "u1", "c@x.com", two) is None  # which one? not guessed


def test_profile_email_update_per_type() -> None:
    """Iterable: users/updateEmail is for email-based projects and names the profile by
    currentEmail or currentUserId, not both; elsewhere users/update by userId."""
    assert identity.email_update(EMAIL, "u1", "old@x.com") == identity.EmailUpdate(
        "users/updateEmail", current_email="old@x.com")
    assert identity.email_update(EMAIL, "u1", None) == identity.EmailUpdate("users/updateEmail", current_user_id="u1")
    assert identity.email_update(HYBRID, "u1", "old@x.com") == identity.EmailUpdate(
        "users/update", current_user_id="u1")
    assert identity.email_update(USER_ID, "u1", None) == identity.EmailUpdate("users/update", current_user_id="u1")
    assert identity.email_update(HYBRID, None, "old@x.com") == identity.EmailUpdate(
        "users/updateEmail", current_email="old@x.com")
    assert identity.email_update(USER_ID, None, "old@x.com") is None


@pytest.mark.parametrize(
    ("project", "current", "synced", "sent"),
    [
        (HYBRID, who("l5", "l5-new@example.com"), who("l5", "l5@example.com"), Addressee(user_id="l5")),
        (HYBRID, who("u1", "e@x.com"), who(None, "e@x.com"), Addressee(email="e@x.com")),  # subscribed by email
        (HYBRID, who(None, "e@x.com"), who(None, None), Addressee(email="e@x.com")),
        (USER_ID, who("u1", "e@x.com"), who("u1", "e@x.com"), Addressee(user_id="u1")),
        (EMAIL, who("u1", "new@x.com"), who("u1", "old@x.com"), Addressee(email="old@x.com")),
        (EMAIL, who("u1", None), who("u1", None), Addressee(user_id="u1")),
    ],
)
def test_unsubscribe_names_the_profile_iterable_was_given(
    project: ProjectType, current: Identity, synced: Identity, sent: Addressee
) -> None:
    assert identity.for_unsubscribe(project, current, synced) == sent


def test_subscribe_and_stale_identities() -> None:
    assert identity.for_subscribe(USER_ID, who("u1", "e@x.com")) == Addressee("e@x.com", "u1", prefer_user_id=True)
    assert identity.for_subscribe(EMAIL, who("u1", None)) == Addressee(None, "u1")  # no placeholder profiles
    assert identity.stale(HYBRID, who("u1", "e@x.com"), who(None, "e@x.com"))  # links the userId
    assert identity.stale(HYBRID, who("u1", "new@x.com"), who("u1", "old@x.com"))
    assert not identity.stale(USER_ID, who("u1", "new@x.com"), who("u1", "old@x.com"))
    assert not identity.stale(EMAIL, who("u2", "e@x.com"), who("u1", "e@x.com"))
