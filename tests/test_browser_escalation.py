"""Escalation on the chat page, in a real headless Chromium: every unsure answer offers "Talk to a person", and an
escalation the server decides is shown, never silent (issue 14)."""

from __future__ import annotations

import shutil

import pytest
from playwright.async_api import expect

from tests.test_browser import open_chat, say

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is needed (make test installs it)"),
]


async def test_an_unsure_answer_offers_a_person_and_the_escalation_shows(browser, server, double) -> None:
    page = await open_chat(browser, server.url)
    double.set_mode("openai", "ok")
    await say(page, "How long does standard shipping take?")
    sure = page.locator('.msg[data-role="assistant"]').last
    await expect(sure.locator(".badge-provider")).to_have_text("openai", timeout=15000)
    await expect(sure.locator("button.talk-to-person")).to_have_count(0)

    double.set_mode("openai", "low_logprobs")
    await say(page, "How many days does normal shipping take?")
    unsure = page.locator('.msg[data-role="assistant"]').nth(1)
    await expect(unsure.locator("button.talk-to-person")).to_have_text("Talk to a person", timeout=15000)
    await expect(page.locator("#escalation-banner")).to_be_hidden()  # a first miss: offered, not escalated
    await unsure.locator("button.talk-to-person").click()
    await expect(page.locator("#escalation-banner")).to_contain_text("You asked for a person.", timeout=10000)


async def test_an_upset_visitor_sees_a_person_is_coming(browser, server) -> None:
    page = await open_chat(browser, server.url)
    await say(page, "This is ridiculous, your answers are useless!")
    banner = page.locator("#escalation-banner")
    await expect(banner).to_contain_text("a person from our team can help", timeout=15000)
    assert page.errors == []  # type: ignore[attr-defined]
