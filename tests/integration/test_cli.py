"""The `listsync` verbs as a user runs them: `listsync.cli.main([...])` in-process (stdout captured),
and `python -m listsync` as a subprocess; real databases (SQLite and PostgreSQL), the emulator over HTTP.

Also the shared builders of the scenario tests: a settings dict that is written as the TOML file
the CLI reads and also builds the in-process Settings, so both always agree.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from listsync import cli, context
from listsync.config import Settings
from tests.emulator import EmulatorServer, IterableEmulator
from tests.helpers import API_KEY, audience_event, ingest, sync_context

# --- shared builders ------------------------------------------------------------------------------


def config_data(database_url: str, base_url: str, *, api_key: str = API_KEY, **sections: Any) -> dict[str, Any]:
    """Everything a test configures; sections are merged over fast-retry test defaults."""
    data: dict[str, Any] = {
        "database_url": database_url,
        "iterable": {
            "api_key": api_key,
            "base_url": base_url,
            "max_attempts": 3,
            "retry_base_seconds": 0.01,
            "retry_max_seconds": 0.05,
            "rate_limits": {"GET /api/lists/getUsers": 1000.0},
        },
        "sync": {"retry_base_seconds": 0, "retry_max_seconds": 0},
        "receiver": {"enabled": False, "port": 0},
        "logging": {"level": "WARNING"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # strings and lists of strings: JSON syntax is valid TOML here


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    scalars = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    lines = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key)
            lines.append(to_toml(value, name) or f"[{name}]")
    return "\n".join(lines)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(to_toml(data) + "\n")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    """`listsync --config FILE ARGS...` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(["--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def view_rows(ctx: context.SyncContext, sql: str) -> list[dict[str, Any]]:
    with ctx.factory() as session:
        return [dict(r) for r in session.execute(text(sql)).mappings()]


def audience_row(ctx: context.SyncContext, key: str) -> dict[str, Any]:
    rows = view_rows(ctx, "SELECT * FROM audience_status")
    found = [r for r in rows if r["audience_key"] == key]
    assert len(found) == 1, rows
    return found[0]


def member_rows(ctx: context.SyncContext, key: str) -> dict[str, dict[str, Any]]:
    """member_status rows of one audience by user_id (or email when there is none)."""
    rows = view_rows(ctx, "SELECT * FROM member_status")
    return {r["user_id"] or r["email"]: r for r in rows if r["audience_key"] == key}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """cli.main points the root logger at the captured stderr; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _list_requests(emu: IterableEmulator) -> int:
    return len(emu.requests_to("lists/subscribe")) + len(emu.requests_to("lists/unsubscribe"))


# --- the verbs ------------------------------------------------------------------------------------


def test_ingest_plan_sync_status_round_trip(
    database_url: str, emulator: tuple[IterableEmulator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emu, url = emulator
    data = config_data(database_url, url)
    config = write_config(tmp_path / "listsync.toml", data)
    events = tmp_path / "events.ndjson"
    enters = [audience_event("vip", inside=True, user_id=f"u{i}", email=f"u{i}@x.com", at=1) for i in range(3)]
    enters.append(audience_event("churn", inside=True, user_id="u9", email="u9@x.com", at=1))
    events.write_text("\n".join(json.dumps(e) for e in enters) + "\n")

    code, out, _ = run_cli(capsys, config, "ingest", str(events))
    assert code == 0 and "accepted 4" in out

    # plan: per-audience counts, nothing sent
    code, out, _ = run_cli(capsys, config, "plan", "--json")
    assert code == 0
    plan = {row["audience_key"]: row for row in json.loads(out)["audiences"]}
    assert (plan["vip"]["subscribe"], plan["vip"]["unsubscribe"]) == (3, 0)
    assert (plan["churn"]["subscribe"], plan["churn"]["unsubscribe"]) == (1, 0)
    code, out, _ = run_cli(capsys, config, "plan")
    assert code == 0
    vip_line = next(line for line in out.splitlines() if line.startswith("vip"))
    assert vip_line.split()[:3] == ["vip", "3", "0"]  # list_id is still empty: key, subscribe, unsubscribe
    assert emu.requests == []

    code, out, _ = run_cli(capsys, config, "sync")
    assert code == 0, out
    assert "4 subscribed" in out and "0 failed" in out
    vip = emu.lists_named("vip")[0]
    assert emu.list_member_emails(vip) == {"u0@x.com", "u1@x.com", "u2@x.com"}

    # an exit: plan shows it, sends nothing; sync sends it
    events.write_text(json.dumps(audience_event("vip", inside=False, user_id="u0", email="u0@x.com", at=5)) + "\n")
    run_cli(capsys, config, "ingest", str(events))
    before = len(emu.requests)
    code, out, _ = run_cli(capsys, config, "plan", "--json")
    plan = {row["audience_key"]: row for row in json.loads(out)["audiences"]}
    assert (plan["vip"]["subscribe"], plan["vip"]["unsubscribe"], plan["vip"]["list_id"]) == (0, 1, vip)
    assert (plan["churn"]["subscribe"], plan["churn"]["unsubscribe"]) == (0, 0)
    assert len(emu.requests) == before
    assert run_cli(capsys, config, "sync")[0] == 0
    assert emu.list_member_emails(vip) == {"u1@x.com", "u2@x.com"}

    # status --json is the audience_status view, row for row
    code, out, _ = run_cli(capsys, config, "status", "--json")
    assert code == 0
    shown = json.loads(out)
    with sync_context(Settings(**data)) as ctx:
        view = view_rows(ctx, "SELECT * FROM audience_status ORDER BY audience_key")
    assert [row["audience_key"] for row in shown] == ["churn", "vip"]
    for row, expected in zip(shown, view, strict=True):
        assert set(row) == set(expected)
        for column, value in expected.items():
            if column == "last_synced_at":
                assert value is not None and row[column] is not None
            else:
                assert row[column] == value, column
    assert (shown[1]["members"], shown[1]["synced_members"], shown[1]["list_id"]) == (2, 2, vip)
    code, out, _ = run_cli(capsys, config, "status")
    assert code == 0 and "synced_members" in out.splitlines()[0]
    assert any(line.startswith("vip") and str(vip) in line for line in out.splitlines())


def test_sync_exits_1_when_members_fail(
    database_url: str, emulator: tuple[IterableEmulator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emu, url = emulator
    emu.invalid_emails.add("bad@x.com")
    data = config_data(database_url, url)
    config = write_config(tmp_path / "listsync.toml", data)
    with sync_context(Settings(**data)) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id="u1", email="good@x.com", at=1),
                     audience_event("vip", inside=True, user_id="u2", email="bad@x.com", at=1)])
        code, out, _ = run_cli(capsys, config, "sync")
        assert code == 1, out
        assert "1 failed" in out and "1 subscribed" in out
        assert emu.list_member_emails(emu.lists_named("vip")[0]) == {"good@x.com"}
        failed = member_rows(ctx, "vip")["u2"]
        assert failed["state"] == "failed" and failed["last_error"].startswith("invalid")
        # the failure stays visible and is not re-sent; nothing else is due, so the next run is clean
        before = len(emu.requests)
        code, out, _ = run_cli(capsys, config, "sync")
        assert code == 0, out
        assert len(emu.requests) == before
        assert audience_row(ctx, "vip")["failed"] == 1


def test_bad_configuration_exits_2_with_one_line_naming_the_key(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(database_url, "http://127.0.0.1:9", sync={"batch_size": 5000})
    config = write_config(tmp_path / "bad.toml", data)
    for verb in (["sync"], ["status"], ["plan"]):
        code, out, err = run_cli(capsys, config, *verb)
        assert code == 2
        assert err.strip().count("\n") == 0 and "sync.batch_size" in err, err
    data = config_data(database_url, "http://127.0.0.1:9", iterable={"project_type": "emailBased"})
    config = write_config(tmp_path / "bad2.toml", data)
    code, _, err = run_cli(capsys, config, "sync")
    assert code == 2 and "iterable.project_type" in err
    code, _, err = run_cli(capsys, tmp_path / "missing.toml", "sync")
    assert code == 2 and "missing.toml" in err


@pytest.mark.parametrize("list_exists", [False, True], ids=["new-list", "existing-list"])
def test_refused_api_key_exits_2_and_keeps_members_pending(
    database_url: str,
    emulator: tuple[IterableEmulator, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    list_exists: bool,
) -> None:
    emu, url = emulator
    good = config_data(database_url, url)
    config = write_config(tmp_path / "good.toml", good)
    wrong = write_config(tmp_path / "wrong.toml", config_data(database_url, url, api_key="not-the-key"))
    with sync_context(Settings(**good)) as ctx:
        if list_exists:
            ingest(ctx, [audience_event("vip", inside=True, user_id="u0", email="u0@x.com", at=0)])
            assert run_cli(capsys, config, "sync")[0] == 0
        ingest(ctx, [audience_event("vip", inside=True, user_id=f"u{i}", email=f"u{i}@x.com", at=1)
                     for i in range(1, 4)])
        lists_before, seen = emu.lists_named("vip"), len(emu.requests)
        code, out, err = run_cli(capsys, wrong, "sync")
        assert code == 2, out + err
        assert "refused" in out + err
        assert "not-the-key" not in out + err
        assert emu.lists_named("vip") == lists_before
        refused = emu.requests[seen:]
        assert refused and all(r.status == 401 for r in refused)
        if list_exists:  # the one subscribe that met the refusal; nothing after it
            assert [r.endpoint for r in refused] == ["lists/subscribe"]
        members = member_rows(ctx, "vip")
        for user in ("u1", "u2", "u3"):
            assert (members[user]["state"], members[user]["synced"]) == ("pending", None)
            assert members[user]["last_error"] is None  # a refused key is not the member's fault
        assert audience_row(ctx, "vip")["pending_subscribe"] == 3
        last_run = view_rows(ctx, "SELECT status, finished_at FROM sync_runs ORDER BY id DESC")[0]
        assert last_run["status"] == "failed" and last_run["finished_at"] is not None
        # with the right key everything goes out
        code, out, _ = run_cli(capsys, config, "sync")
        assert code == 0, out
        want = {f"u{i}@x.com" for i in range(0 if list_exists else 1, 4)}
        assert emu.list_member_emails(emu.lists_named("vip")[0]) == want
        row = audience_row(ctx, "vip")
        assert row["members"] == row["synced_members"] == len(want)


def test_dry_run_sends_nothing_and_marks_nothing_synced(
    database_url: str, emulator: tuple[IterableEmulator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emu, url = emulator
    data = config_data(database_url, url, api_key="")
    config = write_config(tmp_path / "dry.toml", data)
    with sync_context(Settings(**data)) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id=f"u{i}", email=f"u{i}@x.com", at=1)
                     for i in range(3)])
        code, out, _ = run_cli(capsys, config, "sync")
        assert code == 0, out
        assert "dry run" in out
        assert emu.requests == []
        row = audience_row(ctx, "vip")
        assert (row["list_id"], row["synced_members"], row["pending_subscribe"]) == (None, 0, 3)
        assert row["last_synced_at"] is None
        assert {(r["state"], r["synced"]) for r in member_rows(ctx, "vip").values()} == {("pending", None)}
        assert view_rows(ctx, "SELECT * FROM api_requests") == []


def test_python_m_listsync_subprocess(
    database_url: str, emulator: tuple[IterableEmulator, str], tmp_path: Path
) -> None:
    emu, url = emulator
    data = config_data(database_url, url)
    config = write_config(tmp_path / "listsync.toml", data)
    with sync_context(Settings(**data)) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id="u1", email="u1@x.com", at=1)])

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "listsync", "--config", str(config), *args],
                              capture_output=True, text=True, timeout=60)

    done = run("sync", "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    assert emu.list_member_emails(emu.lists_named("vip")[0]) == {"u1@x.com"}
    shown = json.loads(run("status", "--json").stdout)
    assert [(r["audience_key"], r["members"], r["synced_members"]) for r in shown] == [("vip", 1, 1)]
    bad = write_config(tmp_path / "bad.toml", config_data(database_url, url, sync={"bogus": 1}))
    done = subprocess.run([sys.executable, "-m", "listsync", "--config", str(bad), "sync"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "sync.bogus" in done.stderr


def test_unreachable_iterable_exits_2_and_keeps_members_pending(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emu = IterableEmulator(project_type="hybrid", api_keys=API_KEY)
    emu.disable_rate_limits()
    server = EmulatorServer(emu)
    port = server.port
    data = config_data(database_url, server.url)
    config = write_config(tmp_path / "listsync.toml", data)
    with sync_context(Settings(**data)) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id="u0", email="u0@x.com", at=0)])
        assert run_cli(capsys, config, "sync")[0] == 0
        server.close()  # Iterable is gone: connections are refused
        ingest(ctx, [audience_event("vip", inside=True, user_id="u1", email="u1@x.com", at=1),
                     audience_event("new", inside=True, user_id="u1", email="u1@x.com", at=1)])
        code, out, err = run_cli(capsys, config, "sync")
        assert code == 2, out + err
        assert "could not reach Iterable" in out
        assert audience_row(ctx, "vip")["pending_subscribe"] == 1
        assert audience_row(ctx, "new")["list_id"] is None
        with EmulatorServer(emu, port=port):
            code, out, _ = run_cli(capsys, config, "sync")
            assert code == 0, out
        assert emu.list_member_emails(emu.lists_named("vip")[0]) == {"u0@x.com", "u1@x.com"}
        assert emu.list_member_emails(emu.lists_named("new")[0]) == {"u1@x.com"}


def test_iterable_5xx_on_list_lookup_skips_the_run_with_a_reason(
    database_url: str, emulator: tuple[IterableEmulator, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.emulator import FaultRule

    emu, url = emulator
    data = config_data(database_url, url)
    config = write_config(tmp_path / "listsync.toml", data)
    with sync_context(Settings(**data)) as ctx:
        ingest(ctx, [audience_event("vip", inside=True, user_id="u1", email="u1@x.com", at=1)])
        emu.add_fault(FaultRule("GET lists", "status", count=3, status=503))  # every client attempt
        code, out, err = run_cli(capsys, config, "sync")
        assert code == 1, out + err
        assert "vip: GET /api/lists: HTTP 503" in out
        assert audience_row(ctx, "vip")["pending_subscribe"] == 1
        code, out, _ = run_cli(capsys, config, "sync")
        assert code == 0, out
        assert emu.list_member_emails(emu.lists_named("vip")[0]) == {"u1@x.com"}
