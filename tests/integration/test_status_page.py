"""The status page as people use it: served by the daemon (or at /status on the receiver's port),
behind the admin token, driven in headless Chromium against a database filled by real sync runs
with the emulator. The page's queries themselves are covered on both databases in test_dashboard."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from listsync import web
from listsync.config import Settings
from listsync.db import session as dbs
from listsync.ingest import receiver
from tests.browser import chromium
from tests.emulator import IterableEmulator
from tests.helpers import audience_event
from tests.integration.status_seed import ADMIN_TOKEN, INVALID_EMAILS, seed, settings_data
from tests.integration.test_cli import write_config
from tests.integration.test_daemon_e2e import _free_port, _healthy, _wait

WRITE_KEY = "wk-status-page"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_status_page_on_the_receivers_port_shows_nothing_without_the_token(
    database_url: str, emulator: tuple[IterableEmulator, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    emu, url = emulator
    settings = Settings(**settings_data(database_url, url, receiver={"enabled": True, "write_keys": [WRITE_KEY]},
                                        status_page={"enabled": True, "on_receiver": True}))
    seed(settings, emu)
    page = web.status_page(settings)
    assert page is not None and page.on_receiver
    engine = dbs.make_engine(database_url)
    server = receiver.ReceiverServer(page.over(receiver.build_app(settings, dbs.session_factory(engine))))
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert http.get("/health").status_code == 200  # the receiver still answers beside the page
            _refused_without_the_token(http)
            overview = http.get("/status/", headers=BEARER)
            assert overview.status_code == 200, overview.text
            assert "15 of 20" in overview.text and "listsync sync --allow-mass-unsubscribe" in overview.text
            assert 'id="runs-chart"' in overview.text and "missing_identifier" in overview.text
            assert "script-src 'sha256-" in overview.headers["content-security-policy"]
            assert overview.headers["cache-control"] == "no-store"
            partial = http.get("/status/", params={"partial": "1"}, headers=BEARER)
            assert "<html" not in partial.text and "data-updated" in partial.text
            detail = http.get("/status/audience", params={"key": "newsletter"}, headers=BEARER)
            assert all(email in detail.text for email in INVALID_EMAILS) and "invalid" in detail.text
            assert http.post("/status/", headers=BEARER).status_code == 405  # read-only
            _login_sets_a_cookie_that_is_not_the_token(http)
    finally:
        server.stop()
        page.close()
        engine.dispose()
    assert ADMIN_TOKEN not in caplog.text


def _refused_without_the_token(http: httpx.Client) -> None:
    browser = http.get("/status/", headers={"Accept": "text/html"})
    assert browser.status_code == 303 and browser.headers["location"] == "/status/login?next=%2Fstatus%2F"
    script = http.get("/status/audience", params={"key": "newsletter"})
    assert script.status_code == 401 and script.headers["www-authenticate"].startswith("Bearer")
    assert INVALID_EMAILS[0] not in script.text
    for wrong in ("Bearer not-the-token", f"Bearer {WRITE_KEY}", f"Basic {ADMIN_TOKEN}"):
        answer = http.get("/status/", headers={"Authorization": wrong, "Accept": "text/html"})
        assert answer.status_code == 401, wrong
    with httpx.Client(base_url=str(http.base_url), cookies={"listsync_status": ADMIN_TOKEN}) as token_as_cookie:
        assert token_as_cookie.get("/status/").status_code == 401


def _login_sets_a_cookie_that_is_not_the_token(http: httpx.Client) -> None:
    refused = http.post("/status/login", data={"token": "guess", "next": "/status/runs"})
    assert refused.status_code == 401 and "not the status page" in refused.text
    login = http.post("/status/login", data={"token": ADMIN_TOKEN, "next": "/status/runs"})
    assert login.status_code == 303 and login.headers["location"] == "/status/runs"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and ADMIN_TOKEN not in cookie
    assert http.get("/status/runs").status_code == 200  # the client keeps the cookie
    offsite = http.post("/status/login", data={"token": ADMIN_TOKEN, "next": "//evil.example/"})
    assert offsite.headers["location"] == "/status/"
    http.post("/status/logout")
    assert http.get("/status/runs").status_code == 401


DAEMON_CONFIG_SECTIONS = {"sync": {"interval_seconds": 0.5}, "logging": {"json_format": True, "level": "DEBUG"}}


def test_daemon_status_page_in_headless_chromium(
    tmp_path: Path, emulator: tuple[IterableEmulator, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    emu, url = emulator
    database_url = f"sqlite:///{tmp_path / 'listsync.db'}"
    dbs.upgrade(database_url)
    receiver_port, page_port = _free_port(), _free_port()
    data = settings_data(
        database_url, url, **DAEMON_CONFIG_SECTIONS,
        receiver={"enabled": True, "port": receiver_port, "write_keys": [WRITE_KEY]},
        status_page={"enabled": True, "port": page_port, "refresh_seconds": 1},
    )
    seeded = seed(Settings(**data), emu)
    config = write_config(tmp_path / "listsync.toml", data)
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-m", "listsync", "--config", str(config), "daemon"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ})
    status = f"http://127.0.0.1:{page_port}/status/"
    try:
        assert _wait(lambda: _healthy(f"http://127.0.0.1:{receiver_port}")), log.read_text()
        assert _wait(lambda: _answers(status)), log.read_text()
        assert httpx.get(status).status_code == 401
        with chromium(tmp_path / "chromium-profile") as driver:
            wait = WebDriverWait(driver, 60)
            driver.get(status)
            assert "/status/login" in driver.current_url  # no token, no page
            driver.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
            driver.find_element(By.CSS_SELECTOR, "form.login button").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#audiences tbody tr"))

            rows = {r.find_element(By.TAG_NAME, "a").text: r.text
                    for r in driver.find_elements(By.CSS_SELECTOR, "#audiences tbody tr")}
            assert set(rows) == {seeded.held, seeded.calm, seeded.failing}
            assert "15 of 20" in rows[seeded.held] and "held" in rows[seeded.held]
            assert "listsync sync --allow-mass-unsubscribe" in rows[seeded.held]
            chart = driver.find_element(By.ID, "runs-chart")
            assert chart.find_elements(By.CSS_SELECTOR, "rect.changed") and chart.find_elements(By.CSS_SELECTOR, "rect.failed")
            assert "missing_identifier" in driver.find_element(By.ID, "rejected").text
            assert "upsert_user" in driver.find_element(By.ID, "deliveries").text
            driver.set_window_size(1400, driver.execute_script("return document.body.scrollHeight") + 200)
            screenshot = tmp_path / "status-page.png"
            assert driver.save_screenshot(str(screenshot))
            with capsys.disabled():
                print(f"\nstatus page screenshot: {screenshot}")

            # While the page stays open, a new audience arrives through the receiver and is synced.
            _send_audience(receiver_port, "fresh_signups", users=3)
            wait.until(lambda d: "fresh_signups" in d.find_element(By.ID, "audiences").text)
            assert "/status/login" not in driver.current_url

            driver.find_element(By.LINK_TEXT, seeded.failing).click()
            wait.until(lambda d: d.find_elements(By.ID, "failed"))
            failed = driver.find_element(By.ID, "failed").text
            assert all(email in failed for email in INVALID_EMAILS) and "invalid" in failed
            assert "lists/subscribe" in driver.find_element(By.ID, "requests").text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    events = {json.loads(line).get("event") for line in log.read_text().splitlines() if line.startswith("{")}
    assert {"status_page_started", "status_page_stopped"} <= events
    assert ADMIN_TOKEN not in log.read_text()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 401
    except httpx.HTTPError:
        return False


def _send_audience(port: int, key: str, *, users: int) -> None:
    batch = [audience_event(key, inside=True, user_id=f"f{i}", email=f"f{i}@x.com", at=5) for i in range(users)]
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/batch", json={"batch": batch}, auth=(WRITE_KEY, ""), timeout=10)
    assert answer.status_code == 200, answer.text
