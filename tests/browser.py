"""Headless Chromium (Debian's chromium + chromedriver) driven by Selenium, for the status page
tests. The flags keep Chromium from reaching Google's services, which this network refuses."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1100",
]


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if Path(name).exists() else None)
        if found:
            return found
    return None


@contextmanager
def chromium(profile_dir: Path) -> Iterator[object]:
    """A WebDriver for a fresh headless Chromium profile.

    Without Chromium the test skips on a developer's machine, but fails where
    LISTSYNC_TEST_REQUIRE_BROWSER=1 (CI installs Chromium and sets it): a browser test must not pass
    there by not running.
    """
    from selenium import webdriver

    browser = _binary("chromium", "/usr/bin/chromium", "chromium-browser")
    driver_path = _binary("chromedriver", "/usr/bin/chromedriver")
    if browser is None or driver_path is None:
        missing = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("LISTSYNC_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
