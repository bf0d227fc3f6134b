"""The benchmarks write their config files with a small TOML writer: listsync must read them as meant."""

from __future__ import annotations

from pathlib import Path

from bench.harness import UNPACED_LISTS, settings, write_config
from listsync.config import load_settings


def test_bench_config_round_trips_through_load_settings(tmp_path: Path) -> None:
    config = settings(
        "sqlite:///bench.db",
        "http://127.0.0.1:9",
        sources={"sql": {"url": "sqlite:///warehouse.db", "query": "SELECT 'a' AS audience_key, \"x\" AS user_id"}},
        receiver={"port": 0},
    )
    loaded = load_settings(write_config(tmp_path / "bench.toml", config))
    assert loaded.database_url == "sqlite:///bench.db"
    assert loaded.iterable.base_url == "http://127.0.0.1:9" and not loaded.iterable.dry_run
    assert loaded.iterable.rate_limits == UNPACED_LISTS
    assert loaded.sources.sql.query == "SELECT 'a' AS audience_key, \"x\" AS user_id"
    assert loaded.sources.sql.url.get_secret_value() == "sqlite:///warehouse.db"
    assert loaded.receiver.port == 0 and [k.get_secret_value() for k in loaded.receiver.write_keys]
    assert loaded.logging.json_format and loaded.sync.batch_size == 1000
