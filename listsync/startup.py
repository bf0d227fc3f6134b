"""What a person needs to see when a command starts: which file, which database, which Iterable.

Also the guard of the read-only verbs: `status`, `plan` and `runs` look at an existing database
and never create one where a wrong path points.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy.engine import make_url

from listsync.config import Settings, config_path
from listsync.errors import ConfigError
from listsync.iterable.client import base_url_for

logger = logging.getLogger("listsync")

# The write key of config.dev.toml, printed in the README: fine on a laptop, never in production.
DEV_WRITE_KEY = "dev-write-key"


def database_label(database_url: str) -> str:
    """The database as a person reads it: a SQLite URL's file, else the URL without its password."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return os.path.abspath(url.database)
    return url.render_as_string(hide_password=True)


def describe(settings: Settings, config_file: str | os.PathLike[str] | None) -> str:
    """One line: config file, database (password hidden), Iterable URL and whether this is a dry run."""
    path = config_path(config_file)
    where = str(Path(path).resolve()) if path else "none (built-in defaults)"
    iterable = base_url_for(settings.iterable.data_center, settings.iterable.base_url)
    mode = " (dry run: no iterable.api_key, nothing is sent)" if settings.iterable.dry_run else ""
    return f"config {where}; database {database_label(settings.database_url)}; Iterable {iterable}{mode}"


def log_startup(verb: str, settings: Settings, config_file: str | os.PathLike[str] | None) -> None:
    logger.info(
        "listsync %s: %s",
        verb,
        describe(settings, config_file),
        extra={"event": "startup", "verb": verb},
    )


def warn_dev_write_key(settings: Settings) -> None:
    """Say loudly when the receiver accepts the write key everybody knows from the README."""
    if any(key.get_secret_value() == DEV_WRITE_KEY for key in settings.receiver.write_keys):
        logger.warning(
            "DEVELOPMENT MODE: the receiver accepts the documented write key of config.dev.toml; anyone "
            "can send events. Do not use this configuration in production.",
            extra={"event": "dev_write_key"},
        )


def require_existing_database(database_url: str) -> None:
    """Refuse to look at a SQLite file that is not there: opening it would create an empty one."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    if not os.path.exists(url.database):
        raise ConfigError(
            f"no database at {os.path.abspath(url.database)} (database_url); check the path, or create "
            "it with `listsync db upgrade`"
        )
