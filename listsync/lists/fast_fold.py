"""PURE: which deltas of a batch the set-based fold takes, and why its outcome is the rules' outcome.

Folding a batch delta by delta in Python (`identity.resolve`, `membership.apply_delta`) costs far
more than the database work it leads to. Most deltas, though, have the outcome that any reader of
`identity` and `membership` can state without running them, and the database applies those to a
whole batch in a few statements (`db.fold_stage` reads the deltas out of the stored events,
`db.fold.classify` picks them, `db.fold.insert_new` and `db.fold.update_matched` apply them):

* **insert**: no membership of the audience shares the delta's userId or email. `identity.resolve`
  over no candidates is `Match()` (no target), so the fold creates `membership.new_member(delta)`:
  pending when it wants in (nothing was ever sent), synced when it wants out.
* **update**: exactly one membership of the audience shares the delta's userId or email, and its
  userId and email are the delta's own. For every project type `resolve` then targets that row and
  absorbs nothing (the by-userId rules find it as the one row of that userId, or as the one
  email-only row; the by-email rules as the one row of that email, or the one row of a userId-only
  event), and `identity.adopt` keeps its identifiers (they already are the event's), so
  `adopt_identity` changes nothing and the outcome is `membership.apply_delta` on the stored row.
  With identifiers unchanged that is: nothing unless the delta is newer by (timestamp, messageId);
  else the delta's desired state, time, messageId and (when it has any) data fields, and the state
  `membership.settle` gives, unless the desired state is unchanged and the member failed.
* Only deltas that are **alone** in their batch take either path: no other delta of the batch for
  the same audience, and no event that Python reads (an email change, an oddly spelled flag),
  names their userId or their email. Whatever the others do (create, rename, absorb, split, move
  an email) touches only rows sharing their own identifiers (an email change: its userId's rows,
  and its new email), so a lone delta's row is touched by no one else, and when the two paths
  run cannot matter; only the order of new rows does, and both kinds are inserted together in
  batch order.

Everything else (identity merges, a member first seen by email getting its userId, an email that
moves, several deltas for one member in a batch) is folded by the rules (`lists.rules_fold`), one
by one in batch order. tests/integration/test_fold_paths.py folds random streams both ways.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from listsync.domain import MembershipDelta

FoldItem = tuple[int, MembershipDelta, dict[str, Any] | None]  # (audience_id, delta, data fields)

# What a quoted label of an SQLite JSON path can hold (the staged SQL builds paths from names):
# SQLite reads the label up to the next '"' and compares it with the key as the stored JSON text
# spells it, so anything that text spells as itself: all but '"', '\\' and the control characters,
# which the JSON encoders escape (and lone surrogates, which no UTF-8 text holds).
_PATH_SAFE = re.compile(r'[^"\\\x00-\x1f\ud800-\udfff]+')


@dataclass
class FoldCounts:
    """How a batch's deltas (known desired state) were folded."""

    inserted: int = 0  # set-based: new members
    updated: int = 0  # set-based: one stored member with the delta's identifiers (when newer)
    by_rules: int = 0

    def add(self, other: FoldCounts) -> None:
        self.inserted += other.inserted
        self.updated += other.updated
        self.by_rules += other.by_rules


def path_safe(name: str) -> bool:
    return _PATH_SAFE.fullmatch(name) is not None


def by_field_names(
    keys: Iterable[str], names_of: Callable[[str], Sequence[str]]
) -> dict[tuple[str, ...], list[str]]:
    """Audience keys grouped by their configured data-field names (each name once, in order);
    keys without any are left out."""
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for key in keys:
        names = tuple(dict.fromkeys(names_of(key)))
        if names:
            groups[names].append(key)
    return dict(groups)
