"""What an accepted event means for Iterable lists and profiles: Engage audience deltas
(`extract_deltas`), email changes (`extract_email_change`) and per-audience settings.

Pure: no database, no HTTP, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from listsync.domain import Desired, EmailChange, InboundEvent, MembershipDelta
from listsync.ingest.extract import InvalidEvent

AUDIENCE_ENTERED = "Audience Entered"
AUDIENCE_EXITED = "Audience Exited"
_FLAG_STRINGS = {"true": True, "false": False}
# Engage's per-audience settings (context.personas.audience_settings) in listsync's own names.
_ENGAGE_SETTING_NAMES = {
    "updateExistingUsersOnly": "update_existing_users_only",
    "globalUnsubscribe": "channel_unsubscribe",
    "channelUnsubscribe": "channel_unsubscribe",
    "campaignId": "campaign_id",
}
_BOOLEAN_SETTINGS = frozenset({"update_existing_users_only", "channel_unsubscribe"})

def is_audience_event(event: InboundEvent) -> bool:
    """An Engage audience enter/exit: an identify computed as an audience, or the two tracks.

    Ordinary boolean traits (`newsletter: true`) never make an identify an audience event.
    """
    return is_audience_of(event.type, event.event, personas(event))


def is_audience_of(kind: str, event_name: Any, personas: Mapping[str, Any]) -> bool:
    """`is_audience_event` from an event's type, track name and context.personas."""
    if kind == "identify":
        return personas.get("computation_class") == "audience"
    return kind == "track" and event_name in (AUDIENCE_ENTERED, AUDIENCE_EXITED)


def extract_deltas(event: InboundEvent) -> list[MembershipDelta]:
    """The membership the event states, as at most one delta; [] for non-audience events.

    The flag (traits[K] or properties[K]) decides when it is a boolean or "true"/"false". Any
    other flag value is UNKNOWN rather than Segment's "truthy subscribes": an identify with a
    missing or odd flag records that the member was seen and keeps the stored membership. A
    track without a usable flag falls back to its name (Entered -> IN, Exited -> OUT); when the
    flag and the name disagree the flag wins, as Segment's destination reads only the flag.
    """
    key = audience_key(event) if is_audience_event(event) else None
    if key is None:
        return []
    source = event.traits if event.type == "identify" else event.properties
    return [
        MembershipDelta(
            audience_key=key,
            user_id=event.user_id,
            email=event.email,
            desired=_desired(event, source.get(key)),
            timestamp=event.timestamp,
            message_id=event.message_id,
            traits=_member_traits(event, source, key),
            audience_settings=_audience_settings(event),
        )
    ]


def extract_email_change(event: InboundEvent) -> EmailChange | None:
    """A plain identify naming both a userId and a valid email; the store decides if it changed."""
    if event.type != "identify" or is_audience_event(event):
        return None
    if event.user_id is None or event.email is None:
        return None
    return EmailChange(event.user_id, event.email, event.timestamp, event.message_id)


def personas(event: InboundEvent) -> Mapping[str, Any]:
    return personas_of(event.context)


def personas_of(context: Mapping[str, Any]) -> Mapping[str, Any]:
    """context.personas, {} when it is not an object."""
    personas = context.get("personas")
    return personas if isinstance(personas, dict) else {}


def audience_key(event: InboundEvent) -> str | None:
    return audience_key_of(event.type, event.properties, personas(event))


def audience_key_of(kind: str, properties: Mapping[str, Any], personas: Mapping[str, Any]) -> str | None:
    """`audience_key` from an event's type, properties and context.personas."""
    candidates = [personas.get("computation_key")]
    if kind == "track":
        candidates.insert(0, properties.get("audience_key"))
    return next((c for c in candidates if isinstance(c, str) and c), None)


def _desired(event: InboundEvent, flag: Any) -> Desired:
    if isinstance(flag, str):
        flag = _FLAG_STRINGS.get(flag.strip().lower(), flag)
    if isinstance(flag, bool):
        return Desired.IN if flag else Desired.OUT
    if event.type == "track":
        return Desired.IN if event.event == AUDIENCE_ENTERED else Desired.OUT
    return Desired.UNKNOWN


def _member_traits(event: InboundEvent, source: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Fields for the subscriber's dataFields: the event's own over context.traits, flag removed."""
    base = event.context.get("traits")
    traits = dict(base) if isinstance(base, dict) else {}
    traits.update(source)
    traits.pop(key, None)
    if event.type == "track":
        traits.pop("audience_key", None)
    return traits


def _audience_settings(event: InboundEvent) -> Mapping[str, Any] | None:
    return audience_settings(personas(event).get("audience_settings")) or None


def audience_settings(sent: Any) -> dict[str, Any]:
    """Engage's per-audience settings in listsync's names and types, unknown names ignored.

    Engage sends some as strings (`"campaignId": "777"`, `"channelUnsubscribe": "false"`); those
    are coerced. A value that cannot be coerced refuses the event, naming the setting, rather than
    reaching Iterable as a string.
    """
    if not isinstance(sent, dict):
        return {}
    settings: dict[str, Any] = {}
    for name, value in sent.items():
        ours = _ENGAGE_SETTING_NAMES.get(name)
        if ours is not None and value is not None:
            settings[ours] = _setting_value(name, ours, value)
    return settings


def _setting_value(name: str, ours: str, value: Any) -> bool | int:
    if ours in _BOOLEAN_SETTINGS:
        flag = _FLAG_STRINGS.get(value.strip().lower()) if isinstance(value, str) else value
        if isinstance(flag, bool):
            return flag
        raise InvalidEvent(f"invalid_audience_setting: {name} must be true or false, got {str(value)[:40]!r}")
    number: Any = value.strip() if isinstance(value, str) else value
    if isinstance(number, str) and number.isdigit() and len(number) < 19:
        number = int(number)
    if isinstance(number, int) and not isinstance(number, bool) and 0 <= number < 2**63:
        return number
    raise InvalidEvent(f"invalid_audience_setting: {name} must be a whole number, got {str(value)[:40]!r}")

