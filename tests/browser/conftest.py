"""Fixtures of the dashboard's browser tests: a platform of their own and Debian's Chromium driven by Playwright.

The platform is the real one (PostgreSQL, RabbitMQ, a Celery worker, the monitor, the API with the dashboard,
sshd nodes on 127.14.x.x); Chromium is ``/usr/bin/chromium`` (never a downloaded browser), headless, one fresh
profile per signed-in user, with the network features that would call out to Google switched off.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, sync_playwright

from tests.conftest import AMQP_URL, ROOT, new_postgres_database
from tests.harness import Client, Platform, start_platform

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOTS = ROOT / "docs" / "screenshots"  # committed: docs/dashboard.md shows them
ADMIN_PROJECT = "admin"


@pytest.fixture(scope="session")
def dashboard_database() -> Iterator[str]:
    """A PostgreSQL database of the browser tests' own platform, dropped afterwards."""
    with new_postgres_database("cloudml_dash") as url:
        yield url


@pytest.fixture(scope="session")
def dashboard_platform(tmp_path_factory, dashboard_database, tf_runtime) -> Iterator[Platform]:
    import kombu

    queue = f"cloudml-dash-{uuid.uuid4().hex[:8]}"
    with start_platform(tmp_path_factory.mktemp("dashboard-platform"), database_url=dashboard_database,
                        broker_url=AMQP_URL, task_queue=queue, local_address_prefix="127.14",
                        local_port_base=29500, stop_grace_seconds=2, admin_project=ADMIN_PROJECT) as running:
        yield running
    with kombu.Connection(AMQP_URL) as connection:
        connection.default_channel.queue_delete(queue)


@pytest.fixture(scope="session")
def team_a(dashboard_platform) -> Client:
    """A member of project team-a, talking to the API (the tests' way to make work appear)."""
    return dashboard_platform.client("team-a", "member")


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: install Debian's chromium (make system-packages)"
    with sync_playwright() as running:
        yield running


class Browser:
    """Opens signed-in pages, one fresh Chromium profile per user; closes them all at the end."""

    def __init__(self, playwright: Playwright, folder: Path, base_url: str):
        self.playwright, self.folder, self.base_url = playwright, folder, base_url
        self.contexts: list[BrowserContext] = []

    def new_page(self) -> Page:
        profile = self.folder / f"profile-{len(self.contexts)}"
        context = self.playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900}, base_url=self.base_url)
        context.set_default_timeout(60_000)
        self.contexts.append(context)
        page = context.pages[0] if context.pages else context.new_page()
        page.on("dialog", lambda dialog: dialog.accept())  # the "are you sure?" of destructive actions
        return page

    def signed_in(self, token: str) -> Page:
        page = self.new_page()
        page.goto("/dashboard/login")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_selector("#sidebar")
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture(scope="module")
def browser(playwright, dashboard_platform, tmp_path_factory) -> Iterator[Browser]:
    opened = Browser(playwright, tmp_path_factory.mktemp("chromium"), dashboard_platform.base_url)
    yield opened
    opened.close()


def screenshot(page: Page, name: str) -> None:
    """Save the page as docs/screenshots/NAME.png (viewport only, to keep the files small)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
