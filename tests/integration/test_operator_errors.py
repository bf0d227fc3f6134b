"""What an operator sees when something is wrong at start: one line on stderr, exit status 2, the
key or variable or path named, no traceback, no secret; and the one startup line when all is well."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from listsync import cli
from listsync.config import load_settings
from listsync.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _listsync(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m listsync ARGS` in tmp_path with a clean LISTSYNC_* environment plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("LISTSYNC_")}
    return subprocess.run(
        [sys.executable, "-m", "listsync", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=120,
    )


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("LISTSYNC_") and not name.upper().startswith("LISTSYNC_TEST_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_write_keys_not_json_is_one_line_naming_the_variable_and_not_its_value(tmp_path: Path) -> None:
    line = _one_line(_listsync(tmp_path, "status", env={"LISTSYNC_RECEIVER__WRITE_KEYS": "wk-secret-1"}))
    assert "LISTSYNC_RECEIVER__WRITE_KEYS" in line and "expected JSON" in line
    assert "wk-secret-1" not in line


def test_env_typo_is_named_as_an_environment_variable_with_a_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[sync]\nbatch_size = 10\n")
    line = _one_line(_listsync(tmp_path, "--config", str(config), "status", env={"LISTSYNC_SYNC__INTERVAL_SECOND": "5"}))
    assert "unknown environment variable LISTSYNC_SYNC__INTERVAL_SECOND" in line
    assert "did you mean LISTSYNC_SYNC__INTERVAL_SECONDS" in line
    assert "c.toml" not in line


def test_bad_env_value_is_blamed_on_the_variable_not_the_file(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[sync]\nbatch_size = 10\n")
    clean_env.setenv("LISTSYNC_SYNC__INTERVAL_SECONDS", "-1")
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    message = str(raised.value)
    assert "sync.interval_seconds (environment variable LISTSYNC_SYNC__INTERVAL_SECONDS)" in message
    assert "c.toml" not in message


def test_unknown_listsync_variable_is_reported(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTSYNC_RECIEVER__PORT", "9000")
    with pytest.raises(ConfigError, match="unknown environment variable LISTSYNC_RECIEVER__PORT"):
        load_settings(None)


def test_open_tables_and_json_values_from_the_environment_are_accepted(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTSYNC_AUDIENCES__VIP__CAMPAIGN_ID", "7")
    clean_env.setenv("LISTSYNC_RECEIVER__WRITE_KEYS", '["wk1"]')
    settings = load_settings(None)
    assert settings.audiences["vip"].campaign_id == 7
    assert [k.get_secret_value() for k in settings.receiver.write_keys] == ["wk1"]


def test_status_on_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    line = _one_line(_listsync(tmp_path, "status", env={"LISTSYNC_DATABASE_URL": "sqlite:///nothere.db"}))
    assert str(tmp_path / "nothere.db") in line
    assert not (tmp_path / "nothere.db").exists()


def test_unwritable_database_path_is_named(tmp_path: Path) -> None:
    path = tmp_path / "no-such-folder" / "x.db"
    line = _one_line(_listsync(tmp_path, "db", "upgrade", env={"LISTSYNC_DATABASE_URL": f"sqlite:///{path}"}))
    assert str(path) in line


def test_postgres_password_is_hidden_in_database_errors(tmp_path: Path) -> None:
    url = "postgresql+psycopg://listsync:pw-s3cret@127.0.0.1:1/listsync"
    line = _one_line(_listsync(tmp_path, "db", "upgrade", env={"LISTSYNC_DATABASE_URL": url}))
    assert "127.0.0.1:1/listsync" in line and "pw-s3cret" not in line


def test_address_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _listsync(
            tmp_path,
            "daemon",
            env={"LISTSYNC_RECEIVER__PORT": str(port), "LISTSYNC_LOGGING__LEVEL": "ERROR"},
        )
    line = _one_line(done)
    assert f"127.0.0.1:{port}" in line and "receiver.port" in line


def test_config_is_accepted_after_the_verb(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "ops.db"
    config = tmp_path / "c.toml"
    config.write_text(f'database_url = "sqlite:///{database}"\n')
    assert cli.main(["--config", str(config), "db", "upgrade"]) == 0
    assert cli.main(["status", "--config", str(config)]) == 0
    assert cli.main(["db", "current", "--config", str(config)]) == 0
    assert "(no audiences yet)" in capsys.readouterr().out


def test_startup_line_names_config_database_and_iterable(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'database_url = "sqlite:///ops.db"\n[iterable]\nbase_url = "http://127.0.0.1:1"\n[receiver]\nenabled = false\n'
    )
    done = _listsync(tmp_path, "sync", "--config", str(config))
    startup = [line for line in done.stderr.splitlines() if "listsync sync: config" in line]
    assert len(startup) == 1, done.stderr
    assert str(config) in startup[0] and str(tmp_path / "ops.db") in startup[0]
    assert "Iterable http://127.0.0.1:1 (dry run" in startup[0]
