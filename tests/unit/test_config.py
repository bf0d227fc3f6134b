"""Configuration: the example file, environment overrides, and one clear line for a bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from listsync.config import Settings, load_settings
from listsync.domain import ProjectType
from listsync.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_example_file_loads_and_equals_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTSYNC_CONFIG", raising=False)
    loaded = load_settings(ROOT / "config.example.toml")
    assert loaded.model_dump() == Settings().model_dump()


def test_every_settings_key_is_documented_in_the_example() -> None:
    text = (ROOT / "config.example.toml").read_text()

    def keys(model: object, prefix: str = "") -> list[str]:
        out = []
        for name in type(model).model_fields:  # type: ignore[attr-defined]
            value = getattr(model, name)
            if hasattr(type(value), "model_fields"):
                out += keys(value, f"{prefix}{name}.")
            else:
                out.append(name)
        return out

    missing = [k for k in keys(Settings()) if k not in text and k != "audiences"]
    assert missing == []


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[iterable]\nproject_type = "hybrid"\napi_key = "from-file"\n[sync]\nbatch_size = 10\n')
    monkeypatch.setenv("LISTSYNC_ITERABLE__PROJECT_TYPE", "userId")
    monkeypatch.setenv("LISTSYNC_RECEIVER__WRITE_KEYS", '["wk-1", "wk-2"]')
    settings = load_settings(path)
    assert settings.iterable.project_type is ProjectType.USER_ID
    assert settings.sync.batch_size == 10
    assert [k.get_secret_value() for k in settings.receiver.write_keys] == ["wk-1", "wk-2"]
    assert "from-file" not in repr(settings)


def test_config_file_chosen_by_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[sync]\ninterval_seconds = 2\n")
    monkeypatch.setenv("LISTSYNC_CONFIG", str(path))
    assert load_settings().sync.interval_seconds == 2


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[iterable]\nproject_type = "both"\n', "iterable.project_type"),
        ("[sync]\nbatch_size = 5000\n", "sync.batch_size"),
        ('[iterable]\ndata_center = "APAC"\n', "iterable.data_center"),
        ("[sync]\nbogus = 1\n", "sync.bogus"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(path)


def test_cli_bad_value_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[iterable]\nproject_type = "both"\napi_key = "s3cr3t-key"\n')
    done = subprocess.run([sys.executable, "-m", "listsync", "--config", str(path), "status"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "iterable.project_type" in lines[0]
    assert "s3cr3t-key" not in done.stderr


def test_a_warehouse_password_with_a_raw_at_sign_is_refused_without_echoing_it(tmp_path: Path) -> None:
    """Else the password's tail becomes the host, which every failed poll would log."""
    path = tmp_path / "bad.toml"
    path.write_text('[sources.sql]\nurl = "postgresql+psycopg://reporter:hunter2@prod-secret@127.0.0.1:1/dw"\n')
    with pytest.raises(ConfigError, match=r"sources\.sql\.url.*%40") as refused:
        load_settings(path)
    assert "hunter2" not in str(refused.value) and "prod-secret" not in str(refused.value)
