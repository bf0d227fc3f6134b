"""A receiver in its own process, for the kill -9 test: settings come from LISTSYNC_* variables,
the chosen port is printed on stdout, then it serves until killed.

Run as `python tests/integration/receiver_proc.py` from a directory without a listsync.toml.
"""

from __future__ import annotations

import sys
import threading

from listsync.config import load_settings
from listsync.db.session import make_engine, session_factory
from listsync.ingest.receiver import ReceiverServer


def main() -> int:
    settings = load_settings()
    server = ReceiverServer.for_settings(settings, session_factory(make_engine(settings.database_url)))
    server.start()
    sys.stdout.write(f"{server.port}\n")
    sys.stdout.flush()
    threading.Event().wait()  # until SIGKILL
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
