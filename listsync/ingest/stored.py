"""Inbox rows read back without validating them again: `RULES` fingerprints the validation rules
in force, each stored event records the fingerprint that accepted it, and `stored_event` rebuilds
the event from its stored columns when the rules are still those (see `lists.apply`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from listsync.domain import InboundEvent
from listsync.ingest.validate import OBJECT_FIELDS

_RULE_MODULES = ("validate.py", "fast_path.py", "extract.py", "audience.py", "stored.py", "../json_text.py")


def _rules_fingerprint() -> str:
    """A digest of the sources that decide what is accepted (this module, body parsing, the
    Engage settings, JSON decoding): it changes whenever the validation rules may have. An
    unreadable source gives a fresh value per process, so every stored event is validated again."""
    digest = hashlib.sha256()
    try:
        for name in _RULE_MODULES:
            digest.update((Path(__file__).parent / name).read_bytes())
    except OSError:
        return os.urandom(8).hex()
    return digest.hexdigest()[:16]


RULES = _rules_fingerprint()


def stored_event(
    payload: Mapping[str, Any],
    *,
    type: str,
    message_id: str,
    timestamp: datetime,
    event: str | None,
    user_id: str | None,
    anonymous_id: str | None,
    email: str | None,
) -> InboundEvent:
    """An event these rules (`RULES`) accepted, read back from the inbox without validating it
    again: the normalised fields are what `validate_event` made of it, as stored beside the
    payload, and the objects are the stored payload's, as validating that payload gives them
    (they were objects or null). Only the derived messageId of an event without one that hid a
    write key below the top level differs: the stored one is the inbox's own dedupe key."""
    objects = {name: payload.get(name) or {} for name in OBJECT_FIELDS}
    return InboundEvent(
        type=type,
        message_id=message_id,
        timestamp=timestamp,
        user_id=user_id,
        anonymous_id=anonymous_id,
        email=email,
        event=event,
        name=payload.get("name"),
        traits=objects["traits"],
        properties=objects["properties"],
        context=objects["context"],
        raw=payload,
    )
