"""A throwaway PostgreSQL for tests: $LISTSYNC_TEST_PG_URL, else testcontainers when a Docker engine
answers, else a private cluster from the local initdb/pg_ctl binaries on a free loopback port.

initdb and pg_ctl refuse to run as root, so as root they run as the `postgres` user (or `nobody`)
through runuser, in a temporary directory owned by that user.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidate = Path(out.stdout.strip())
        if (candidate / "pg_ctl").exists():
            return candidate
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return versions[0].parent if versions else None


def _unprivileged_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and no unprivileged user to run PostgreSQL as")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def local_cluster() -> Iterator[str]:
    """Start a private, non-durable cluster and yield its SQLAlchemy URL."""
    bindir = _pg_bindir()
    if bindir is None:
        raise RuntimeError("no Docker engine and no local PostgreSQL server binaries (initdb/pg_ctl)")
    user = _unprivileged_user()
    tmp = tempfile.mkdtemp(prefix="listsync-pg-")
    if user:
        entry = pwd.getpwnam(user)
        os.chown(tmp, entry.pw_uid, entry.pw_gid)
    prefix = ["runuser", "-u", user, "--"] if user else []

    def run(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*prefix, *argv], capture_output=True, cwd=tmp)

    data, log = f"{tmp}/data", f"{tmp}/server.log"
    init = run(f"{bindir}/initdb", "-D", data, "-U", "test", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr.decode(errors='replace')}")
    port = 0
    for _attempt in range(5):
        port = _free_port()
        opts = (
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        if run(f"{bindir}/pg_ctl", "-D", data, "-l", log, "-o", opts, "-w", "start").returncode == 0:
            break
    else:
        raise RuntimeError(f"PostgreSQL did not start; see {log}")

    def stop() -> None:
        run(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(stop)
    try:
        yield f"postgresql+psycopg://test@127.0.0.1:{port}/postgres"
    finally:
        stop()
        atexit.unregister(stop)


@contextlib.contextmanager
def postgres_url() -> Iterator[str]:
    """The PostgreSQL server for this test session, by the order in the module docstring."""
    given = os.environ.get("LISTSYNC_TEST_PG_URL")
    if given:
        yield given
        return
    if _docker_reachable():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:15-alpine", driver="psycopg") as container:
            yield container.get_connection_url()
        return
    with local_cluster() as url:
        yield url
