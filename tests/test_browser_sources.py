"""Sources in the pages, in a real headless Chromium: under the answer, citations as footnotes, after a reload, and in
the agent console's transcript."""

from __future__ import annotations

import re
import shutil

import pytest
from playwright.async_api import expect

from server.ai.knowledge import KnowledgeBase
from tests.servers import AGENT_KEYS
from tests.test_browser import open_agent_console, open_chat, say

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is needed (make test installs it)"),
]
QUESTION = "How do I return an item?"
_LISTED = re.compile(r"^\[(\d+)\]\s*(?:Q:\s*)?(.+?)\s*$", re.MULTILINE)


async def test_the_page_shows_an_answers_sources_and_its_citations(browser, server, double, settings) -> None:
    entries = {e.question: e for e in KnowledgeBase.from_directory(settings.knowledge_dir).entries}
    double.set_mode("openai", "ok", reply="Start the return under Orders [2]. <b>Pack</b> it well [1].")
    page = await open_chat(browser, server.url)
    await say(page, QUESTION)
    answer = page.locator('.msg[data-role="assistant"]').last
    await expect(answer.locator(".sources li")).to_have_count(2, timeout=15000)
    system = double.requests["openai"][-1]["body"]["messages"][0]["content"]
    listed = {int(n): title for n, title in _LISTED.findall(system) if title in entries}
    titles = [listed[2], listed[1]]  # in order of first citation
    await expect(answer.locator(".sources li")).to_have_text(titles)
    await expect(answer.locator(".msg-text")).to_have_text("Start the return under Orders1. <b>Pack</b> it well2.")
    await expect(answer.locator(".msg-text sup.cite a")).to_have_text(["1", "2"])
    await expect(answer.locator(".msg-text sup.cite a").first).to_have_attribute("title", titles[0])
    assert await page.locator("b").count() == 0  # text, never HTML

    await page.reload()  # from history
    answer = page.locator('.msg[data-role="assistant"]').last
    await expect(answer.locator(".sources li")).to_have_text(titles, timeout=15000)
    await expect(answer.locator(".msg-text sup.cite")).to_have_count(2)
    user = page.locator('.msg[data-role="user"]').last
    await expect(user.locator(".sources")).to_have_count(0)
    assert page.errors == []  # type: ignore[attr-defined]


async def test_the_agent_console_shows_the_sources_in_the_transcript(browser, start_server, settings) -> None:
    server = await start_server(ai_providers=("local",), agent_api_keys=AGENT_KEYS, agent_wait_timeout=30.0)
    agent = await open_agent_console(browser, server.url)

    customer = await open_chat(browser, server.url)
    await say(customer, QUESTION)
    answer = customer.locator('.msg[data-role="assistant"]').last
    await expect(answer.locator(".sources li")).to_have_text([QUESTION], timeout=15000)
    await expect(answer.locator(".badge-provider")).to_have_text("local")
    await customer.click("#talk-to-human")
    entry = agent.locator("#queue .queue-entry").first
    await expect(entry).to_contain_text("user_request", timeout=15000)
    await entry.locator("button.claim").click()
    said = agent.locator('#transcript .msg[data-role="assistant"]').first
    await expect(said.locator(".sources li")).to_have_text([QUESTION], timeout=10000)
