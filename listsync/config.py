"""Configuration: one TOML file plus LISTSYNC_* environment overrides, validated at start.

The file is found by `--config PATH`, else `$LISTSYNC_CONFIG`, else `./listsync.toml`, else the
built-in defaults. Environment variables win over the file: `LISTSYNC_` + the key path joined by
`__` (LISTSYNC_ITERABLE__API_KEY). Secrets are SecretStr so they never print by accident.
`load_settings` is the only place that builds Settings; a bad value becomes one ConfigError line
naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from listsync import config_env
from listsync.domain import ProjectType
from listsync.errors import ConfigError, MappingError
from listsync.events import mapping

DEFAULT_CONFIG_FILE = "listsync.toml"
CONFIG_ENV_VAR = "LISTSYNC_CONFIG"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class IterableSettings(Section):
    api_key: SecretStr = SecretStr("")
    data_center: Literal["US", "EU"] = "US"
    base_url: str = ""
    project_type: ProjectType = ProjectType.HYBRID
    timeout_seconds: float = Field(30.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=20)
    retry_base_seconds: float = Field(0.5, ge=0)
    retry_max_seconds: float = Field(30.0, ge=0)
    rate_limits: dict[str, float] = Field(default_factory=dict)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL, or empty for the data center's URL")
        return value

    @property
    def dry_run(self) -> bool:
        return not self.api_key.get_secret_value()


class ReceiverSettings(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8088, ge=0, le=65535)
    write_keys: list[SecretStr] = Field(default_factory=list)
    webhook_secrets: list[SecretStr] = Field(default_factory=list)


class SyncSettings(Section):
    interval_seconds: float = Field(10.0, gt=0)
    batch_size: int = Field(1000, ge=1, le=1000)
    max_unsubscribe_fraction: float = Field(0.5, ge=0, le=1)
    guard_min_list_size: int = Field(10, ge=0)
    retry_base_seconds: float = Field(30.0, ge=0)
    retry_max_seconds: float = Field(3600.0, ge=0)
    lease_seconds: float = Field(300.0, gt=0)
    reconcile_interval_seconds: float = Field(0.0, ge=0)
    # List requests of one audience on the wire at once. Iterable documents no limit for
    # lists/subscribe and lists/unsubscribe; listsync paces them at 100/s (the documented rate of
    # their sibling GET /api/lists). By Little's law, keeping that pace over a 80 ms round trip
    # takes 100/s x 0.08 s = 8 requests in flight; fewer leaves the pace unused, more only queues
    # in the rate limiter and bursts at a project whose limit other senders share. Segment's
    # Iterable Lists sends a batch's subscribe and unsubscribe calls in parallel, unbounded.
    max_in_flight: int = Field(8, ge=1, le=64)


class AudienceSettings(Section):
    campaign_id: int = Field(0, ge=0)
    channel_unsubscribe: bool = False
    update_existing_users_only: bool = False
    data_fields: list[str] = Field(default_factory=list)


class AudienceOverride(Section):
    """Per-audience settings; a key left out takes its value from [audience_defaults]."""

    campaign_id: int | None = Field(None, ge=0)
    channel_unsubscribe: bool | None = None
    update_existing_users_only: bool | None = None
    data_fields: list[str] | None = None


class FileSourceSettings(Section):
    path: str = ""
    interval_seconds: float = Field(5.0, gt=0)


class SqlSourceSettings(Section):
    url: SecretStr = SecretStr("")
    query: str = ""
    interval_seconds: float = Field(300.0, gt=0)

    @field_validator("url")
    @classmethod
    def _readable_url(cls, value: SecretStr) -> SecretStr:
        """A password with a raw '@' makes the rest of it the host, which every failed poll would
        then log; refused here, in words that do not repeat the URL."""
        text = value.get_secret_value()
        if text:
            try:
                host = make_url(text).host or ""
            except ArgumentError:
                raise ValueError("expected a SQLAlchemy URL such as postgresql+psycopg://user@host/db") from None
            if "@" in host:
                raise ValueError("the URL has more than one '@': write an '@' in the password as %40")
        return value


class SourcesSettings(Section):
    files: FileSourceSettings = Field(default_factory=FileSourceSettings)
    sql: SqlSourceSettings = Field(default_factory=SqlSourceSettings)


class MappingSettings(Section):
    """One [[actions.mappings]] entry. A mapping named like a preset replaces it, and may leave out
    trigger and action to keep the preset's (and, with its trigger, its exclusion of audience events)."""

    name: str = Field(min_length=1)
    trigger: str | None = None
    action: str | None = None
    fields: dict[str, Any] = Field(default_factory=dict)
    batch: bool | None = None  # None: [actions].batching
    enabled: bool = True

    def spec(self, batching: bool) -> mapping.MappingSpec:
        base = mapping.preset(self.name)
        keeps_trigger = base is not None and self.trigger is None
        action = self.action or (base.action if base else "")
        if not action:
            raise ValueError(f"mapping {self.name!r}: action: required (upsert_user, custom_event, ...)")
        if self.trigger is None and base is None:
            raise ValueError(f"mapping {self.name!r}: trigger: required, e.g. 'type = \"track\"'")
        kind = mapping.action_kind(action) if action in mapping.ACTION_NAMES else None
        batch = self.batch if self.batch is not None else batching and kind in mapping.BATCHABLE
        return mapping.MappingSpec(
            name=self.name,
            trigger=self.trigger if self.trigger is not None else base.trigger,  # type: ignore[union-attr]
            action=action,
            fields=self.fields,
            batch=bool(batch),
            audiences=not keeps_trigger or bool(base and base.audiences),
            classic_pages=bool(base and base.classic_pages and keeps_trigger),
        )


class ActionsSettings(Section):
    """Per-event actions (Iterable (Actions)): presets, the classic page settings, custom mappings."""

    enabled: bool = True
    presets: bool = True
    map_all_pages: bool = False
    track_all_pages: bool = False
    track_categorized_pages: bool = False
    track_named_pages: bool = False
    batching: bool = True  # Segment's enable_batching default for Upsert User and Custom Event
    max_attempts: int = Field(10, ge=1, le=1000)
    mappings: list[MappingSettings] = Field(default_factory=list, max_length=mapping.MAX_MAPPINGS)

    @model_validator(mode="after")
    def _mappings_compile(self) -> ActionsSettings:
        try:
            self.compiled()
        except MappingError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def pages_on(self) -> bool:
        return self.track_all_pages or self.track_categorized_pages or self.track_named_pages

    def specs(self) -> list[mapping.MappingSpec]:
        """The mappings in force: presets (unless off), replaced or added to by [[actions.mappings]]."""
        try:
            configured = [m.spec(self.batching) for m in self.mappings if m.enabled]
        except ValueError as exc:
            raise MappingError(str(exc)) from None
        disabled = [m.name for m in self.mappings if not m.enabled]
        specs = mapping.effective_specs(configured, presets=self.presets, pages=self.pages_on, disabled=disabled)
        own = {m.name for m in self.mappings}
        return [spec if spec.name in own else self._batched(spec) for spec in specs]

    def _batched(self, preset: mapping.MappingSpec) -> mapping.MappingSpec:
        batch = self.batching and mapping.action_kind(preset.action) in mapping.BATCHABLE
        return dataclasses.replace(preset, batch=batch)

    def compiled(self) -> list[mapping.ActionMapping]:
        return mapping.compile_all(self.specs())


class StatusPageSettings(Section):
    """The read-only status page (listsync.web): off unless enabled, always behind admin_token."""

    enabled: bool = False
    on_receiver: bool = False  # true: served at /status on the receiver's host and port
    host: str = "127.0.0.1"
    port: int = Field(8089, ge=0, le=65535)
    admin_token: SecretStr = SecretStr("")
    refresh_seconds: float = Field(10.0, ge=1)

    @model_validator(mode="after")
    def _token_when_enabled(self) -> StatusPageSettings:
        if self.enabled and len(self.admin_token.get_secret_value()) < 16:
            raise ValueError("admin_token: required, 16 characters or more, when the status page is enabled")
        return self


class RetentionSettings(Section):
    """How long finished work is kept; 0 keeps it forever. `listsync db prune` and the daemon apply it."""

    inbox_days: float = Field(14.0, ge=0)
    request_items_days: float = Field(30.0, ge=0)
    runs_days: float = Field(90.0, ge=0)
    rejected_days: float = Field(90.0, ge=0)
    prune_interval_seconds: float = Field(3600.0, gt=0)


class HealthSettings(Section):
    max_sync_lag_seconds: float = Field(900.0, ge=0)  # GET /health says sync_lag beyond this; 0: never


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False


class Settings(BaseSettings):
    """Every key of listsync; config.example.toml documents each with its default."""

    model_config = SettingsConfigDict(
        env_prefix="LISTSYNC_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    database_url: str = "sqlite:///listsync.db"

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        try:
            backend = make_url(value).get_backend_name()
        except ArgumentError:
            raise ValueError("expected a SQLAlchemy URL such as sqlite:///listsync.db") from None
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"expected a sqlite:// or postgresql+psycopg:// URL, not {backend}://")
        return value
    iterable: IterableSettings = Field(default_factory=IterableSettings)
    receiver: ReceiverSettings = Field(default_factory=ReceiverSettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    audience_defaults: AudienceSettings = Field(default_factory=AudienceSettings)
    audiences: dict[str, AudienceOverride] = Field(default_factory=dict)
    sources: SourcesSettings = Field(default_factory=SourcesSettings)
    actions: ActionsSettings = Field(default_factory=ActionsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    status_page: StatusPageSettings = Field(default_factory=StatusPageSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)

    @model_validator(mode="after")
    def _status_page_has_its_own_token(self) -> Settings:
        token = self.status_page.admin_token.get_secret_value()
        if token and token in {key.get_secret_value() for key in self.receiver.write_keys}:
            raise ValueError("status_page.admin_token: must not be one of the receiver's write keys")
        if self.status_page.enabled and self.status_page.on_receiver and not self.receiver.enabled:
            raise ValueError("status_page.on_receiver: the receiver is disabled")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init kwargs; environment variables must override them.
        return (env_settings, init_settings)

    def audience(self, audience_key: str, sent_by_engage: Mapping[str, Any] | None = None) -> AudienceSettings:
        """The effective settings of one audience: [audience_defaults], then what Engage sent with
        the audience (context.personas.audience_settings), then [audiences."<key>"]."""
        merged = self.audience_defaults
        for name, value in (sent_by_engage or {}).items():
            merged = _with_setting(merged, name, value)
        override = self.audiences.get(audience_key)
        if override is not None:
            merged = merged.model_copy(update=override.model_dump(exclude_none=True))
        return merged


def _with_setting(settings: AudienceSettings, name: str, value: Any) -> AudienceSettings:
    """`settings` with one setting Engage sent, validated and coerced as the config file's would be.

    Events are checked when they arrive (`audience.audience_settings`); a value stored by an older
    release that does not validate is ignored rather than sent to Iterable as it is.
    """
    if name not in AudienceSettings.model_fields:
        return settings
    try:
        return AudienceSettings.model_validate({**settings.model_dump(), name: value})
    except ValidationError:
        return settings


def config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """The file to read: --config, else $LISTSYNC_CONFIG, else ./listsync.toml if it exists."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV_VAR)
    if from_env:
        return Path(from_env)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def load_settings(explicit: str | os.PathLike[str] | None = None) -> Settings:
    """Build Settings from the chosen file and the environment, or raise one clear ConfigError."""
    path = config_path(explicit)
    data = _read_toml(path) if path else {}
    config_env.check(Settings, os.environ)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except SettingsError as exc:  # a value config_env.check could not foresee; still one line
        raise ConfigError(f"invalid environment variable: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


def _describe(exc: ValidationError, path: Path | None) -> str:
    """One line naming each bad key and what is expected; values of secret keys are not echoed."""
    parts, from_file = [], False
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif not _is_secret_key(key) and "input" in error and not isinstance(error["input"], dict):
            message += f" (got {error['input']!r})"
        variable = config_env.variable_for(tuple(error["loc"]), os.environ)
        from_file = from_file or variable is None
        parts.append(f"{key} (environment variable {variable}): {message}" if variable else f"{key}: {message}")
    where = f" in {path}" if path and from_file else ""
    return f"invalid configuration{where}: " + "; ".join(parts)


def _is_secret_key(key: str) -> bool:
    return any(word in key for word in ("api_key", "write_keys", "webhook_secrets", "url", "token"))
