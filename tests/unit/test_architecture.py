"""The tree's architecture, checked over the source with `ast`: imports point down the layers, no
module imports itself back through others, pure modules load no I/O library, and SQL is written
only under listsync/db/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "listsync"
PURE = {
    "listsync.lists.membership", "listsync.lists.identity", "listsync.lists.planner", "listsync.lists.fast_fold",
    "listsync.events.fields", "listsync.events.triggers", "listsync.events.mapping", "listsync.events.actions",
    "listsync.iterable.payloads", "listsync.iterable.dates",
    "listsync.ingest.extract", "listsync.ingest.validate", "listsync.ingest.fast_path", "listsync.ingest.audience",
    "listsync.ingest.stored", "listsync.ingest.scrub", "listsync.ingest.webhook", "listsync.ingest.sql_rows",
    "listsync.json_text", "listsync.web.html",
}  # fmt: skip
# Lower layers first; a module may import its own layer or lower ones. Longest prefix wins.
LAYERS = [
    ["listsync", "listsync.domain", "listsync.errors"],
    sorted(PURE),
    ["listsync.config", "listsync.config_env", "listsync.logs"],
    ["listsync.db"],
    ["listsync.metrics", "listsync.iterable"],
    ["listsync.context"],
    ["listsync.engine"],
    ["listsync.ingest", "listsync.lists", "listsync.events", "listsync.health"],
    ["listsync.sync", "listsync.preview", "listsync.progress", "listsync.run_log",
     "listsync.display", "listsync.startup", "listsync.web"],
    ["listsync.daemon", "listsync.commands"],
    ["listsync.cli", "listsync.__main__"],
]  # fmt: skip
IO_LIBRARIES = {"sqlalchemy", "httpx", "psycopg", "alembic", "prometheus_client", "starlette", "uvicorn"}
# What a module outside db/ may take from SQLAlchemy: sessions, engines, URLs and errors, no SQL.
NOT_SQL = {"sqlalchemy.orm", "sqlalchemy.exc", "sqlalchemy.engine", "sqlalchemy:Engine"}
SQL_OUTSIDE_DB = {"listsync.ingest.sql_source"}  # reads the user's warehouse and diffs it in place


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


MODULES = _modules()


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import, at any depth, except those under `if TYPE_CHECKING:`."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [alias.name for alias in node.names]))
    return out


def _targets(module: str, names: list[str]) -> list[str]:
    """The listsync modules an import loads: `from listsync.db import models` loads listsync.db.models."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs or ([module] if module in MODULES else [])


def _graph() -> dict[str, set[str]]:
    return {
        name: {t for mod, names in _imports(tree) for t in _targets(mod, names) if t != name}
        for name, tree in MODULES.items()
    }


def _layer(module: str) -> int:
    best = (-1, -1)
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), rank)
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{source} (layer {_layer(source)}) imports {target} (layer {_layer(target)})"
        for source, targets in _graph().items()
        for target in targets
        if target != "listsync" and _layer(target) > _layer(source)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph, cycles = _graph(), []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_pure_modules_load_no_io_library() -> None:
    loaded = [
        f"{name} imports {mod}"
        for name in sorted(PURE)
        for mod, _ in _imports(MODULES[name])
        if mod.split(".")[0] in IO_LIBRARIES
    ]
    assert loaded == []


def test_sql_is_written_only_under_db() -> None:
    writers = []
    for name, tree in MODULES.items():
        if name.startswith("listsync.db") or name in SQL_OUTSIDE_DB:
            continue
        for mod, names in _imports(tree):
            if mod.split(".")[0] != "sqlalchemy" or mod in NOT_SQL:
                continue
            writers += [f"{name} imports {mod}.{n}" for n in names or ["*"] if f"{mod}:{n}" not in NOT_SQL]
    assert writers == []
