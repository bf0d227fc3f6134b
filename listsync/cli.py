"""The `listsync` command: parse arguments, load configuration, hand over to the engine.

One top-level error handler: a short message on stderr and the exit status of the contract
(2 for configuration and connection problems), the traceback only at debug level.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import OperationalError

from listsync import __version__, logs
from listsync.config import Settings, load_settings
from listsync.errors import ConfigError, ListsyncError
from listsync.startup import database_label

logger = logging.getLogger("listsync")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="listsync",
        description=("Keep Iterable lists and profiles in step with your CDP's audiences and events."),
    )
    _global_options(parser, default=None)
    parser.add_argument("--version", action="version", version=f"listsync {__version__}")
    # The global options are also accepted after the verb (`listsync status --config x.toml`);
    # there their default is SUPPRESS, so a value given before the verb is not overwritten.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, default=argparse.SUPPRESS)
    commands = _Subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), common)
    commands.add_parser(
        "daemon", help="run the receiver, the pollers and periodic syncs until SIGTERM/SIGINT"
    )
    sync = commands.add_parser("sync", help="one-shot: poll sources, send everything due, then exit")
    sync.add_argument("--allow-mass-unsubscribe", action="store_true", help="release runs held by the guard")
    sync.add_argument(
        "--recreate-missing-lists",
        action="store_true",
        help="recreate lists Iterable no longer knows and resend their members",
    )
    sync.add_argument(
        "--reconcile", action="store_true", help="read each list back from Iterable and repair drift"
    )
    sync.add_argument("--no-progress", action="store_true", help="no progress display (bars on a terminal, periodic lines otherwise)")
    sync.add_argument(
        "--retry-failed", action="store_true", help="send again the members and events that failed for good"
    )
    ingest = commands.add_parser(
        "ingest", help="read Segment-format NDJSON events (FILE, FILE.gz or - for stdin)"
    )
    ingest.add_argument("file", metavar="FILE")
    ingest.add_argument("--no-progress", action="store_true", help="no progress display")
    status = commands.add_parser("status", help="a table per audience (the audience_status view)")
    status.add_argument("--json", action="store_true", help="print the rows as JSON")
    plan = commands.add_parser("plan", help="what the next sync would send, without sending")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument(
        "--sample", type=int, default=0, metavar="N", help="show N example members per audience and N events"
    )
    runs = commands.add_parser("runs", help="the run history (the run_history view), newest first")
    runs.add_argument("--json", action="store_true", help="print the rows as JSON")
    runs.add_argument("--limit", type=int, default=20, metavar="N", help="how many runs (default 20)")
    runs.add_argument("--trigger", help="only runs of this trigger (daemon, sync, reconcile)")
    db = commands.add_parser("db", help="database schema")
    db_commands = _Subcommands(db.add_subparsers(dest="db_command", required=True, metavar="ACTION"), common)
    db_commands.add_parser("upgrade", help="apply the migrations")
    db_commands.add_parser("current", help="print the schema revision")
    db_commands.add_parser("prune", help="delete what the [retention] settings no longer keep")
    return parser


def _global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=default,
        help="TOML file (default: $LISTSYNC_CONFIG, ./listsync.toml)",
    )
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=default,
        help="overrides logging.level",
    )


class _Subcommands:
    """add_parser with the global options added to every verb."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self._action = action
        self._common = common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._action.add_parser(name, parents=[self._common], **kwargs)
        return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings: Settings | None = None
    try:
        settings = load_settings(args.config)
        logs.configure(args.log_level or settings.logging.level, settings.logging.json_format)
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"listsync: {exc}", file=sys.stderr)
        return 2
    except OperationalError as exc:
        logger.debug("database error", exc_info=True)
        where = f" at {database_label(settings.database_url)}" if settings else ""
        print(
            f"listsync: cannot use the database{where}: {exc.orig.__class__.__name__}: {_first_line(exc.orig)}",
            file=sys.stderr,
        )
        return 2
    except ListsyncError as exc:
        logger.debug("error", exc_info=True)
        print(f"listsync: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _first_line(error: BaseException | None) -> str:
    return str(error).strip().splitlines()[0] if error and str(error).strip() else ""


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from listsync import commands

    handlers: dict[str, Any] = {
        "daemon": lambda: commands.daemon(settings, config_file=args.config),
        "sync": lambda: commands.sync(
            settings,
            allow_mass_unsubscribe=args.allow_mass_unsubscribe,
            recreate_missing_lists=args.recreate_missing_lists,
            reconcile=args.reconcile,
            progress=not args.no_progress,
            config_file=args.config,
            retry_failed=args.retry_failed,
        ),
        "ingest": lambda: commands.ingest(settings, args.file, progress=not args.no_progress),
        "status": lambda: commands.status(settings, as_json=args.json),
        "plan": lambda: commands.plan(settings, as_json=args.json, sample=args.sample),
        "runs": lambda: commands.run_history(
            settings, as_json=args.json, limit=args.limit, trigger=args.trigger
        ),
        "db": lambda: commands.db(settings, args.db_command),
    }
    result: int = handlers[args.command]()
    return result
