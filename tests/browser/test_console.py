"""The operator console in a real browser, against a real gateway and Redis."""

from __future__ import annotations

from playwright.async_api import Page, expect

from ..support import API_KEY, PUBLISHER_KEY, GatewayServer

REASON = "ticket 4312: purchase created by hand"


async def test_console_shows_the_live_event_its_trigger_update_pushed(
    gateway: GatewayServer, student: str, page: Page
) -> None:
    await page.goto(f"{gateway.url}/console")
    await page.fill("#api-key", API_KEY)
    await page.click("#login-form button")
    await expect(page.locator("#app-view")).to_be_visible()

    await page.fill("#student-id", student)
    await page.click("#lookup-form button")
    await expect(page.locator("#presence-count")).to_have_text("0")

    await page.click("#live-toggle")
    await expect(page.locator("#live-state")).to_have_attribute("data-state", "connected")

    await page.fill("#trigger-reason", REASON)
    await page.fill("#trigger-course", "9e16d892-4324-4568-be60-163aa1665683")
    await page.click("#trigger-form button")

    live = page.locator("#live-events tr")
    await expect(live).to_have_count(1)
    await expect(live.first).to_contain_text("STORE_INVALIDATE")
    await expect(live.first).to_contain_text(REASON)
    # The operator watching is not one of the student's devices.
    await expect(page.locator("#trigger-result")).to_contain_text("connected devices: 0")
    # The row pushed live is the event the trigger-update reported, and it is in history.
    pushed = (await page.locator("#trigger-result").inner_text()).split()[1]
    await expect(live.first).to_have_attribute("data-id", pushed)
    await expect(page.locator(f'#history-events tr[data-id="{pushed}"]')).to_have_count(1)

    audit = page.locator("#audit-entries tr")
    await expect(audit.first).to_contain_text("trigger-update")
    await expect(audit.first).to_contain_text(REASON)
    await expect(audit.nth(1)).to_contain_text("watch-token")


async def test_console_turns_a_publisher_key_away_and_says_which_key_it_needs(
    gateway: GatewayServer, page: Page
) -> None:
    await page.goto(f"{gateway.url}/console")
    await page.fill("#api-key", PUBLISHER_KEY)
    await page.click("#login-form button")
    await expect(page.locator("#login-error")).to_contain_text("needs an operator key")
    await expect(page.locator("#login-error")).to_contain_text("name:operator=key")
    await expect(page.locator("#app-view")).to_be_hidden()
    # Not kept: a reload does not sign the publisher key in.
    await page.reload()
    await expect(page.locator("#login-view")).to_be_visible()
    await expect(page.locator("#app-view")).to_be_hidden()
