"""Run the Iterable emulator as a standalone HTTP server for local development.

    python -m tests.emulator --port 9999 --project-type hybrid --api-key KEY

Run it with the virtual environment's Python from the repository root (`.venv/bin/python -m
tests.emulator`). Point listsync's Iterable base URL at the printed address; `GET /_emulator` shows
its lists with their members. Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import threading

from tests.emulator.server import OVERVIEW_PATH, EmulatorServer
from tests.emulator.state import DEFAULT_API_KEY, IterableEmulator
from tests.emulator.users import PROJECT_TYPES


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.emulator", description="Iterable API emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999, help="0 picks a free port")
    parser.add_argument("--project-type", choices=PROJECT_TYPES, default="hybrid")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        help=f"accepted API key (repeatable; default {DEFAULT_API_KEY})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-rate-limits", action="store_true", help="make every endpoint unlimited")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="pause before every answer, in milliseconds (default 0)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted."""
    args = _parse_args(argv)
    emulator = IterableEmulator(
        project_type=args.project_type, api_keys=args.api_keys or [DEFAULT_API_KEY], seed=args.seed
    )
    if args.no_rate_limits:
        emulator.disable_rate_limits()
    latency = args.latency_ms / 1000
    with EmulatorServer(emulator, host=args.host, port=args.port, latency_seconds=latency) as server:
        print(f"Iterable emulator ({args.project_type} project) listening on {server.url}", flush=True)
        print(f"lists and members: curl {server.url}{OVERVIEW_PATH}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
