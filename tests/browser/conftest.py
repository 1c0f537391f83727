"""Real headless Chromium (Debian's package) driven by Playwright, for the console and client.

`make test` installs /usr/bin/chromium with apt-get when it is missing and it runs as root.
Playwright's own browser download is never used: this machine reaches package registries
only. A test skips only where the browser truly cannot be had: no chromium, and not root.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Git-ignored (reports/); kept after the run so a failure can be looked at, not only read.
SCREENSHOTS = Path(__file__).resolve().parents[2] / "reports" / "screenshots"


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.geteuid() == 0:
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    pytest.skip(
        f"{CHROMIUM} is missing and this user is not root, so it cannot be installed here; "
        "run `apt-get install chromium` as root (or `make test` as root)"
    )


@pytest.fixture
async def page(request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    """A fresh browser page; a full-page screenshot is saved when the test ends.

    Request it after the gateway fixture: fixtures are torn down in reverse, so the
    screenshot shows the page while the gateway still serves it.
    """
    _require_chromium()
    errors: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = await context.new_page()
            page.set_default_timeout(10_000)
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=SCREENSHOTS / f"{request.node.name}.png", full_page=True)
        finally:
            await browser.close()
    assert not errors, f"uncaught errors in the page: {errors}"
