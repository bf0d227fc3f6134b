"""What every benchmark family shares: the CLI as a measured child process, the emulator as
another, config files, databases, event files and the stable SQL views.

listsync is driven only through its public surface (the `listsync` command, TOML config, the
`audience_status` view, `listsync.db.session`), so the engine's modules can move freely.
Each CLI step runs as its own child; its wall time is taken around the process and its peak
memory is that child's own ru_maxrss (os.wait4), so no step inherits another's peak.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "bench-api-key"
WRITE_KEY = "bench-write-key"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
# listsync's own pacing of list calls (100/s, an undocumented endpoint's default) is lifted for
# the list benchmarks, so they measure the engine against the wire, not the pacing.
UNPACED_LISTS = {"POST /api/lists/subscribe": 1_000_000.0, "POST /api/lists/unsubscribe": 1_000_000.0}


class BenchError(RuntimeError):
    """A step that failed: the message names the step and the child's last stderr line."""


# --- child processes ------------------------------------------------------------------------


@dataclass
class Step:
    """One finished child process."""

    args: list[str]
    seconds: float
    peak_mb: float
    returncode: int
    stdout: str
    stderr: str

    def last_error(self) -> str:
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {self.returncode}"


def run_measured(args: list[str], *, timeout: float, env: Mapping[str, str] | None = None) -> Step:
    """Run `args` to the end; wall seconds and the child's own peak RSS. Killed after `timeout`."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        timer = threading.Timer(timeout, _kill, args=(proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        step = Step(args, seconds, usage.ru_maxrss / 1024, proc.returncode, out.read(), err.read())
    if proc.returncode == -signal.SIGKILL:
        raise BenchError(f"{' '.join(args[2:4])}: not finished after {timeout:.0f} s (killed)")
    return step


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def listsync(*args: str, config: Path, timeout: float, ok: tuple[int, ...] = (0,)) -> Step:
    """`listsync ARGS --config CONFIG` as a measured child; BenchError unless its exit status is in `ok`."""
    step = run_measured([sys.executable, "-m", "listsync", *args, "--config", str(config)], timeout=timeout)
    if step.returncode not in ok:
        raise BenchError(f"listsync {' '.join(args)}: exit {step.returncode}: {step.last_error()}")
    return step


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def emulator(*, latency_ms: float = 0.0, rate_limits: bool = False) -> Iterator[str]:
    """The Iterable emulator in its own process (so listsync's peak memory is its own); yields its URL."""
    args = [sys.executable, "-m", "tests.emulator", "--port", "0", "--api-key", API_KEY]
    args += [] if rate_limits else ["--no-rate-limits"]
    args += ["--latency-ms", str(latency_ms)] if latency_ms else []
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise BenchError(f"the emulator did not start: {line.strip() or proc.wait(timeout=10)}")
        yield line.strip().rsplit(" ", 1)[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def daemon(config: Path, port: int, *, timeout: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """`listsync daemon` in its own process until the block ends (SIGTERM); ready once /health/live answers."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "listsync", "daemon", "--config", str(config)], cwd=ROOT,
                                stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + timeout
            while not _answers(f"http://127.0.0.1:{port}/health/live"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                    raise BenchError(f"listsync daemon did not come up: {tail[0]}")
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# --- configuration ----------------------------------------------------------------------------


def write_config(path: Path, settings: Mapping[str, Any]) -> Path:
    """Write nested dicts as TOML: scalars first, then one [table] per nested dict."""
    lines: list[str] = []
    _toml_table(lines, [], settings)
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_table(lines: list[str], prefix: list[str], table: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    if prefix and scalars:
        lines.append("[" + ".".join(json.dumps(part) for part in prefix) + "]")
    lines += [f"{json.dumps(key)} = {_toml_value(value)}" for key, value in scalars.items()]
    for key, value in table.items():
        if isinstance(value, Mapping):
            _toml_table(lines, [*prefix, key], value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value))


def settings(url: str, base_url: str = "", **sections: Mapping[str, Any]) -> dict[str, Any]:
    """The config of one benchmark: the database, the emulator (if any), quiet JSON logs; the
    list calls unpaced unless `iterable` says otherwise. `sections` are merged in per table."""
    config: dict[str, Any] = {
        "database_url": url,
        "iterable": {"api_key": API_KEY if base_url else "", "base_url": base_url,
                     "rate_limits": dict(UNPACED_LISTS), "retry_base_seconds": 0.05},
        "receiver": {"write_keys": [WRITE_KEY]},
        "sync": {"batch_size": 1000, "interval_seconds": 3600.0},
        "logging": {"level": "WARNING", "json_format": True},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


# --- databases --------------------------------------------------------------------------------


class Databases:
    """Fresh databases by name: SQLite files under `tmp`, or databases on one PostgreSQL server."""

    def __init__(self, kind: str, tmp: Path, server_url: str | None = None) -> None:
        self.kind = kind
        self.tmp = tmp
        self.server_url = server_url

    def fresh(self, name: str) -> str:
        if self.kind == "sqlite":
            path = self.tmp / f"{name}.db"
            path.unlink(missing_ok=True)
            return f"sqlite:///{path}"
        self._admin(f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}")
        return self._url(name)

    def clone(self, source_url: str, name: str) -> str:
        """A copy of a database no process is using (a file copy; CREATE DATABASE ... TEMPLATE)."""
        if self.kind == "sqlite":
            path = self.tmp / f"{name}.db"
            source = source_url.removeprefix("sqlite:///")
            for suffix in ("", "-wal"):
                if Path(source + suffix).exists():
                    shutil.copyfile(source + suffix, str(path) + suffix)
            return f"sqlite:///{path}"
        source = source_url.rsplit("/", 1)[1]
        self._admin(f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name} TEMPLATE {source}")
        return self._url(name)

    def _url(self, name: str) -> str:
        assert self.server_url is not None
        return self.server_url.rsplit("/", 1)[0] + "/" + name

    def _admin(self, *statements: str) -> None:
        from sqlalchemy import create_engine, text

        assert self.server_url is not None
        admin = create_engine(self.server_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                for statement in statements:
                    conn.execute(text(statement))
        finally:
            admin.dispose()


def audience_status(url: str, audience: str) -> dict[str, Any]:
    """The audience's row of the stable `audience_status` view (empty if it has none)."""
    from sqlalchemy import text

    from listsync.db import session as dbs

    engine = dbs.make_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT * FROM audience_status WHERE audience_key = :k"), {"k": audience})
            found = row.mappings().first()
    finally:
        engine.dispose()
    return dict(found) if found else {}


# --- events -----------------------------------------------------------------------------------


def stamp(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def audience_event(audience: str, i: int, *, inside: bool = True, at: float = 0.0, tag: str = "e") -> dict[str, Any]:
    """Engage's `Audience Entered` / `Audience Exited` track for member `i`."""
    return {
        "type": "track", "event": "Audience Entered" if inside else "Audience Exited",
        "userId": f"user-{i}", "messageId": f"{tag}-{audience}-{i}", "timestamp": stamp(at or i / 1000),
        "properties": {"audience_key": audience, audience: inside, "email": f"user{i}@example.com"},
        "context": {"personas": {"computation_class": "audience", "computation_key": audience}},
    }


def write_ndjson(path: Path, events: Iterator[dict[str, Any]]) -> int:
    count = 0
    with path.open("w") as out:
        for event in events:
            out.write(json.dumps(event, separators=(",", ":")) + "\n")
            count += 1
    return count


def rate(count: float, seconds: float) -> int:
    return round(count / seconds) if seconds > 0 else 0


# --- results ----------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table; `met` is None where there is no target."""

    measure: str
    figure: str
    ratio: str = ""
    target: str = ""
    met: bool | None = None

    def as_json(self) -> dict[str, Any]:
        return {"measure": self.measure, "figure": self.figure, "ratio": self.ratio, "target": self.target,
                "met": self.met}


@dataclass
class Result:
    """What one family measured: table rows and the raw figures (printed as JSON)."""

    rows: list[Row]
    raw: dict[str, Any]


def secs(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds:.0f} s"


def num(value: float) -> str:
    return f"{value:,.0f}"


@dataclass
class Run:
    """One benchmark run: where its databases and files live and how big it is."""

    dbs: Databases
    files: Path  # event files and warehouses, shared by the SQLite and PostgreSQL passes
    members: int  # the N of the targets (1,000,000; 100,000 with --quick)
    huge: bool
    timeout: float

    def config(self, name: str, config: Mapping[str, Any]) -> Path:
        return write_config(self.dbs.tmp / f"{name}.toml", config)

    def events_file(self, name: str, events: Callable[[], Iterator[dict[str, Any]]]) -> Path:
        """An NDJSON file written once per run, whatever the database."""
        path = self.files / f"{name}.ndjson"
        if not path.exists():
            write_ndjson(path, events())
        return path
