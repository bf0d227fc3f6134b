"""Which names the SQLite set-based fold can put in a quoted JSON path label."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from listsync.json_text import dumps
from listsync.lists import fast_fold


def test_labels_hold_what_the_stored_text_spells_as_itself() -> None:
    for name in ("vip", "Gold (é) [1]'s", "a.b:c-d", "$x*", "名前", "x\x7f"):
        assert fast_fold.path_safe(name), name
    for name in ("", 'say "hi"', "back\\slash", "line\nbreak", "\x00", "\ud800"):
        assert not fast_fold.path_safe(name), repr(name)


@given(st.text())
def test_a_safe_name_is_stored_verbatim(name: str) -> None:
    """A safe name appears in the stored payload exactly as itself (between its quotes), which is
    what SQLite 3.40 compares a quoted label with."""
    if fast_fold.path_safe(name):
        assert f'"{name}":1' in dumps({name: 1})
        assert f'"{name}":1' in json.dumps({name: 1}, separators=(",", ":"), ensure_ascii=False)
