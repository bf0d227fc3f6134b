"""The LISTSYNC_* environment variables, checked before pydantic-settings reads them.

pydantic-settings ignores a variable whose name matches no key (a typo changes nothing, silently)
and raises a multi-line SettingsError for a list or table value that is not JSON. Both are turned
into one ConfigError line here that names the variable, never its value when it may be a secret.
"""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel

from listsync.errors import ConfigError

PREFIX = "LISTSYNC_"
DELIMITER = "__"
# Variables with the prefix that are not settings keys: the config file's path, the test suite's own.
NOT_KEYS = ("LISTSYNC_CONFIG",)
NOT_KEY_PREFIXES = ("LISTSYNC_TEST_",)
_SECRET_WORDS = ("API_KEY", "WRITE_KEYS", "URL", "SECRET")


@dataclass
class _Names:
    """Every variable name Settings accepts: exact names, and prefixes of open tables."""

    scalars: set[str] = field(default_factory=set)
    complex: set[str] = field(default_factory=set)  # lists and tables: the value must be JSON
    open_prefixes: set[str] = field(default_factory=set)  # [audiences.*], rate_limits.*: any key below

    def known(self, name: str) -> bool:
        return name in self.scalars or name in self.complex or name.startswith(tuple(self.open_prefixes))


def _walk(model: type[BaseModel], prefix: str, names: _Names) -> None:
    for key, info in model.model_fields.items():
        name = f"{prefix}{key.upper()}"
        annotation = info.annotation
        origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.complex.add(name)
            _walk(annotation, name + DELIMITER, names)
        elif origin is dict:
            names.complex.add(name)
            names.open_prefixes.add(name + DELIMITER)
        elif origin is list:
            names.complex.add(name)
        else:
            names.scalars.add(name)


def accepted_names(settings_model: type[BaseModel]) -> _Names:
    names = _Names()
    _walk(settings_model, PREFIX, names)
    return names


def listsync_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The LISTSYNC_* variables that are meant as settings keys, names upper-cased (pydantic-settings
    matches them case-insensitively)."""
    found = {name.upper(): value for name, value in environ.items() if name.upper().startswith(PREFIX)}
    return {
        name: value
        for name, value in found.items()
        if name not in NOT_KEYS and not name.startswith(NOT_KEY_PREFIXES)
    }


def check(settings_model: type[BaseModel], environ: Mapping[str, str]) -> None:
    """Raise one ConfigError line for an unknown LISTSYNC_* variable or a list/table that is not JSON."""
    names = accepted_names(settings_model)
    for name, value in sorted(listsync_variables(environ).items()):
        if not names.known(name):
            raise ConfigError(f"unknown environment variable {name}{_suggestion(name, names)}")
        if name in names.complex and not _is_json(value):
            raise ConfigError(
                f"environment variable {name}: expected JSON, e.g. {_example(name)}"
                + ("" if is_secret(name) else f" (got {value!r})")
            )


def _suggestion(name: str, names: _Names) -> str:
    close = difflib.get_close_matches(name, sorted(names.scalars | names.complex), n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else " (no settings key has this name)"


def _is_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _example(name: str) -> str:
    return f"{name}='[\"wk1\"]'" if name.endswith("WRITE_KEYS") else f"{name}='[\"a\", \"b\"]' or '{{\"key\": 1}}'"


def is_secret(name: str) -> bool:
    return any(word in name.upper() for word in _SECRET_WORDS)


def variable_for(loc: tuple[int | str, ...], environ: Mapping[str, str]) -> str | None:
    """The environment variable that set the key at `loc` (or one of its sections), if one did."""
    present = listsync_variables(environ)
    for depth in range(len(loc), 0, -1):
        name = PREFIX + DELIMITER.join(str(part).upper() for part in loc[:depth])
        if name in present:
            return name
    return None
