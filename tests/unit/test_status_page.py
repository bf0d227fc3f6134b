"""The status page's pure parts: its configuration, the chart's axes, escaping, the login redirect."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from listsync.config import load_settings
from listsync.db.dashboard import AudienceRow, RunBucket
from listsync.errors import ConfigError
from listsync.web import app, chart, pages


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[status_page]\nenabled = true\n", "status_page: admin_token: required"),
        ('[status_page]\nenabled = true\nadmin_token = "short"\n', "16 characters"),
        (
            '[receiver]\nwrite_keys = ["same-secret-0123456789"]\n'
            '[status_page]\nenabled = true\nadmin_token = "same-secret-0123456789"\n',
            "must not be one of the receiver's write keys",
        ),
        (
            '[receiver]\nenabled = false\n[status_page]\nenabled = true\non_receiver = true\n'
            'admin_token = "a-long-enough-admin-token"\n',
            "the receiver is disabled",
        ),
    ],
)
def test_status_page_configuration_is_refused_without_a_token_of_its_own(
    tmp_path: Path, toml: str, message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message) as refused:
        load_settings(path)
    assert "same-secret" not in str(refused.value) and "a-long-enough" not in str(refused.value)


def test_status_page_is_off_unless_enabled_and_on_loopback(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[status_page]\nadmin_token = "an-admin-token-for-tests"\n')
    settings = load_settings(path).status_page
    assert (settings.enabled, settings.on_receiver, settings.host) == (False, False, "127.0.0.1")
    assert "an-admin-token" not in repr(settings)


def test_chart_axes_are_round_and_the_svg_escapes_nothing_unsafe() -> None:
    assert [chart._nice_max(v) for v in (0, 0.4, 3, 37, 999)] == [4.0, 0.4, 4.0, 40, 2000]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    svg = chart.run_chart([RunBucket(start, 2, 30, 1, 0.5), RunBucket(start, 0, 0, 0, 0.0)])
    assert svg.count('class="changed"') == 1 and svg.count('class="failed"') == 1
    assert svg.count("<polyline") == 1 and "<script" not in svg


def test_audience_cells_escape_keys_and_show_the_releasing_command() -> None:
    now = datetime(2026, 1, 2, tzinfo=UTC)
    held = AudienceRow(1, "<b>vip</b>", 7, "ready", "held: run `listsync sync --allow-mass-unsubscribe`", now)
    html = "".join(pages._audience_cells(held, now))
    assert "<b>vip</b>" not in html and "&lt;b&gt;vip&lt;/b&gt;" in html
    assert "<code>listsync sync --allow-mass-unsubscribe</code>" in html
    missing = AudienceRow(2, "gone", 8, "missing", None, None)
    assert "listsync sync --recreate-missing-lists" in "".join(pages._audience_cells(missing, now))


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/status/runs?window=7d", "/status/runs?window=7d"),
        ("https://evil.example/", "/status/"),
        ("//evil.example/status/", "/status/"),
        ("/statusfoo", "/status/"),
        (None, "/status/"),
    ],
)
def test_login_only_returns_to_the_status_page(target: str | None, expected: str) -> None:
    assert app._safe_next(target) == expected
