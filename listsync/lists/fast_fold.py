"""PURE: which deltas of a batch the set-based fold takes, and why its outcome is the rules' outcome.

Folding a batch delta by delta in Python (`identity.resolve`, `membership.apply_delta`) costs far
more than the database work it leads to. Most deltas, though, have the outcome that any reader of
`identity` and `membership` can state without running them:

* **insert**: no membership of the audience shares the delta's userId or email. `identity.resolve`
  over no candidates is `Match()` (no target), so the fold creates `membership.new_member(delta)`;
  the set-based fold inserts exactly that row (built by `new_member` itself).
* **update**: exactly one membership of the audience shares the delta's userId or email, and its
  userId and email are the delta's own. For every project type `resolve` then targets that row and
  absorbs nothing (the by-userId rules find it as the one row of that userId, or as the one
  email-only row; the by-email rules as the one row of that email, or the one row of a userId-only
  event), and `identity.adopt` keeps its identifiers (they already are the event's), so
  `adopt_identity` changes nothing and the outcome is `membership.apply_delta` on the stored row.
  With identifiers unchanged that is: nothing unless the delta is newer by (timestamp, messageId);
  else the delta's desired state, time, messageId and (when it has any) data fields, and the state
  `membership.settle` gives, unless the desired state is unchanged and the member failed. The
  database applies it in one statement per batch (`db.fold.update_from_deltas`, which spells that
  rule in SQL; tests/integration/test_fold_paths.py folds random streams both ways).
* Only deltas that are **alone** in their batch take either path: no other delta of the batch for
  the same audience names their userId or their email. Whatever another delta does (create, rename,
  absorb, split) touches only rows sharing its own identifiers, so a lone delta's row is touched by
  no one else, and the order in which the two paths run cannot matter.

Everything else (identity merges, a member first seen by email getting its userId, an email that
moves, several deltas for one member in a batch) goes through the rules in `apply`, one by one.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from listsync.domain import MembershipDelta
from listsync.lists import membership as rules

FoldItem = tuple[int, MembershipDelta, dict[str, Any] | None]  # (audience_id, delta, data fields)


class StoredKey(Protocol):
    """What the classifier needs of a stored membership: its identifiers and its event time."""

    id: int
    audience_id: int
    user_id: str
    email: str
    desired_at: datetime
    desired_message_id: str


@dataclass
class Split:
    """A batch's deltas by path, each with its position in the batch (the order new rows get)."""

    inserts: list[tuple[int, FoldItem]] = field(default_factory=list)
    updates: list[tuple[int, FoldItem]] = field(default_factory=list)  # (member id, item)
    by_rules: list[tuple[int, FoldItem]] = field(default_factory=list)
    unchanged: int = 0


def _keys(audience_id: int, delta: MembershipDelta) -> list[tuple[str, int, str]]:
    keys = []
    if delta.user_id:
        keys.append(("u", audience_id, delta.user_id))
    if delta.email:
        keys.append(("e", audience_id, delta.email))
    return keys


def split(items: Sequence[FoldItem], stored: Iterable[StoredKey]) -> Split:
    """Sort the batch's (known-desired) deltas into insert / update / by-rules, given the stored
    memberships that share a userId or an email with any of them. Deltas that an update would
    not change (older or replayed) are dropped and counted in `unchanged`."""
    rows: dict[int, StoredKey] = {}
    index: dict[tuple[str, int, str], set[int]] = defaultdict(set)
    for row in stored:
        rows[row.id] = row
        if row.user_id:
            index[("u", row.audience_id, row.user_id)].add(row.id)
        if row.email:
            index[("e", row.audience_id, row.email)].add(row.id)
    seen = Counter(key for audience_id, delta, _ in items for key in _keys(audience_id, delta))
    result = Split()
    for position, item in enumerate(items):
        audience_id, delta, _ = item
        keys = _keys(audience_id, delta)
        if any(seen[key] > 1 for key in keys):
            result.by_rules.append((position, item))
            continue
        found = set().union(*(index.get(key, set()) for key in keys))
        if not found:
            result.inserts.append((position, item))
            continue
        row = rows[next(iter(found))]
        if len(found) > 1 or (row.user_id, row.email) != (delta.user_id or "", delta.email or ""):
            result.by_rules.append((position, item))
        elif rules.newer_than(delta, row.desired_at, row.desired_message_id):
            result.updates.append((row.id, item))
        else:
            result.unchanged += 1
    return result
