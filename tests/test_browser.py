"""The pages in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import shutil
import signal

import pytest
from playwright.async_api import Browser, Page, expect
from playwright.async_api import Error as PlaywrightError

from server.settings import Secret
from tests.processes import ServerProcess

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is needed (make test installs it)"),
]


async def open_chat(browser: Browser, url: str) -> Page:
    page = await (await browser.new_context()).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url + "/")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=15000)
    page.errors = errors  # type: ignore[attr-defined]
    return page


async def open_agent_console(browser: Browser, url: str, key: str = "alex-key-123-4567-89ab") -> Page:
    """The agent console in a fresh context, signed in and connected."""
    agent = await (await browser.new_context()).new_page()
    await agent.goto(url + "/agent")
    await agent.fill("#agent-key", key)
    await agent.click("#sign-in")
    await expect(agent.locator("#agent-status")).to_have_attribute("data-state", "connected", timeout=15000)
    return agent


async def say(page: Page, text: str) -> None:
    await page.fill("#composer", text)
    await page.press("#composer", "Enter")


async def test_page_sends_a_message_and_shows_the_reply_as_text(browser, server, double) -> None:
    page = await open_chat(browser, server.url)
    response = await page.request.get(server.url + "/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    await say(page, "<img src=x onerror=alert(1)> where is my order?")
    reply = page.locator('.msg[data-role="assistant"] .msg-text').last
    await expect(reply).to_have_text("Echo: <img src=x onerror=alert(1)> where is my order?", timeout=15000)
    await expect(page.locator('.msg[data-role="assistant"] .badge-provider').last).to_have_text("openai")
    assert await page.locator("img").count() == 0
    await expect(page.locator('.msg[data-role="user"]')).to_have_count(1)
    assert page.errors == []  # type: ignore[attr-defined]


async def test_page_streams_and_stops_a_reply(browser, server, double) -> None:
    double.set_mode("openai", "ok", tokens=300, chunk_delay=0.03)
    page = await open_chat(browser, server.url)
    await say(page, "write a long answer")
    bubble = page.locator('.msg[data-role="assistant"] .msg-text').last
    await expect(bubble).to_contain_text("tok3", timeout=15000)
    await expect(page.locator("#stop")).to_be_visible()
    await expect(page.locator("#typing")).to_be_visible()
    await page.click("#stop")
    await expect(page.locator('.msg[data-role="assistant"] .note').last).to_have_text("stopped", timeout=10000)
    await expect(page.locator("#stop")).to_be_hidden()
    text = await bubble.text_content()
    assert text and "tok299" not in text
    assert await double.wait_closed_early("openai", timeout=5)


async def test_page_resumes_after_a_network_drop_without_duplicates(browser, server, double) -> None:
    double.set_mode("openai", "ok", tokens=80, chunk_delay=0.03)
    page = await open_chat(browser, server.url)
    await say(page, "first question")
    await expect(page.locator('.msg[data-role="assistant"] .msg-text').last).to_contain_text("tok5", timeout=15000)
    await page.evaluate("async () => (await import('/static/chat.js')).socket().io.engine.close()")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=15000)
    expected = " ".join(f"tok{i}" for i in range(80))
    await expect(page.locator('.msg[data-role="assistant"] .msg-text').last).to_have_text(expected, timeout=15000)
    await expect(page.locator('.msg[data-role="assistant"]')).to_have_count(1)
    await expect(page.locator('.msg[data-role="user"]')).to_have_count(1)
    # and after a reload the conversation is resumed from localStorage
    await page.reload()
    await expect(page.locator('.msg[data-role="assistant"] .msg-text')).to_have_text([expected], timeout=15000)


async def test_agent_console_and_customer_page_together(browser, start_server, double) -> None:
    server = await start_server(agent_api_keys=(("alex", Secret("alex-key-123-4567-89ab")),))
    agent = await open_agent_console(browser, server.url)

    customer = await open_chat(browser, server.url)
    await say(customer, "hello, I need help with a return")
    await expect(customer.locator('.msg[data-role="assistant"]')).to_have_count(1, timeout=15000)
    await customer.click("#talk-to-human")
    await expect(customer.locator("#escalation-banner")).to_be_visible()

    entry = agent.locator("#queue .queue-entry").first
    await expect(entry).to_contain_text("user_request", timeout=15000)
    await entry.locator("button.claim").click()
    await expect(agent.locator("#transcript")).to_contain_text("hello, I need help with a return", timeout=10000)
    await agent.fill("#agent-reply", "Hi, I'm Alex <b>bold?</b> — happy to help.")
    await agent.click("#agent-send")
    reply = customer.locator('.msg[data-role="agent"] .msg-text')
    await expect(reply).to_have_text("Hi, I'm Alex <b>bold?</b> — happy to help.", timeout=10000)
    await say(customer, "thanks Alex")
    await expect(agent.locator("#transcript")).to_contain_text("thanks Alex", timeout=10000)
    await agent.click("#release")
    await expect(customer.locator('.msg[data-role="system"]').last).to_contain_text("assistant is back", timeout=10000)


AGENT_KEY_STORE = "supportChat.agentKey"


async def stored_agent_key(page: Page) -> str | None:
    """The key the console keeps in sessionStorage for this tab."""
    return await page.evaluate("(name) => sessionStorage.getItem(name)", AGENT_KEY_STORE)


async def test_agent_console_survives_a_server_restart(browser, cluster_env: dict[str, str], connect) -> None:
    server = ServerProcess({**cluster_env, "SHUTDOWN_GRACE": "1"})
    try:
        await server.start()
        agent = await (await browser.new_context()).new_page()
        errors: list[str] = []
        agent.on("pageerror", lambda exc: errors.append(str(exc)))
        await agent.goto(server.url + "/agent")
        await agent.fill("#agent-key", "alex-key-123-4567-89ab")
        await agent.click("#sign-in")
        status = agent.locator("#agent-status")
        await expect(status).to_have_attribute("data-state", "connected", timeout=15000)
        await agent.evaluate("window.sameDocument = true")

        await server.stop()  # a graceful restart (SIGTERM), as a deploy does
        await expect(status).to_have_attribute("data-state", "reconnecting", timeout=10000)
        await expect(status).to_contain_text("Reconnecting")
        assert await stored_agent_key(agent) == "alex-key-123-4567-89ab"
        await expect(agent.locator("#sign-out")).to_be_visible()

        await server.start()  # the same port
        await expect(status).to_have_attribute("data-state", "connected", timeout=15000)
        assert await agent.evaluate("window.sameDocument") is True  # reconnected without a page reload
        customer = await connect(server.url)
        joined = await customer.call("join-chat", {"userId": "after-restart"})
        assert (await customer.call("escalate", {"sessionId": joined["sessionId"], "reason": "back after restart"}))["ok"]
        await expect(agent.locator("#queue .queue-entry").first).to_contain_text("back after restart", timeout=10000)
        await customer.disconnect()

        # a crash, and a reload while the server is down, keep the key: back up, the console signs in by itself
        await server.stop(signal.SIGKILL)
        with pytest.raises(PlaywrightError):
            await agent.reload()
        await server.start()
        await agent.goto(server.url + "/agent")
        await expect(status).to_have_attribute("data-state", "connected", timeout=15000)
        await expect(agent.locator("#queue .queue-entry").first).to_contain_text("back after restart", timeout=10000)
        assert await stored_agent_key(agent) == "alex-key-123-4567-89ab"
        assert errors == []
    finally:
        await server.stop(signal.SIGKILL)  # a graceful stop would wait for the console's socket


async def test_agent_console_refuses_and_forgets_a_wrong_key(browser, start_server) -> None:
    server = await start_server(agent_api_keys=(("alex", Secret("alex-key-123-4567-89ab")),))
    agent = await (await browser.new_context()).new_page()
    await agent.goto(server.url + "/agent")
    status = agent.locator("#agent-status")
    await agent.fill("#agent-key", "not-a-key")
    await agent.click("#sign-in")
    await expect(status).to_have_attribute("data-state", "offline", timeout=15000)
    await expect(status).to_have_text("Sign-in refused")
    await expect(agent.locator("#toast")).to_have_text("A valid agent key is required.")
    assert await stored_agent_key(agent) is None
    await expect(agent.locator("#sign-in")).to_be_visible()
    await expect(agent.locator("#sign-out")).to_be_hidden()

    # a stored key the server no longer accepts is refused and cleared too, not retried
    await agent.evaluate("([name, key]) => sessionStorage.setItem(name, key)", [AGENT_KEY_STORE, "revoked-key"])
    await agent.reload()
    await expect(status).to_have_text("Sign-in refused", timeout=15000)
    assert await stored_agent_key(agent) is None
    assert await agent.evaluate("async () => (await import('/static/agent.js')).socket().active") is False

    await agent.fill("#agent-key", "alex-key-123-4567-89ab")
    await agent.click("#sign-in")
    await expect(status).to_have_attribute("data-state", "connected", timeout=15000)
    assert await stored_agent_key(agent) == "alex-key-123-4567-89ab"


async def test_dashboard_draws_the_analytics(browser, start_server, connect, double) -> None:
    from tests.clients import joined_client

    server = await start_server(agent_api_keys=(("ana", Secret("ana-key-2468-ace0-1357")),))
    client, session_id, _ = await joined_client(connect, server.url)
    sent = await client.call("send-message", {"sessionId": session_id, "message": "hello"})
    await client.reply_to(sent["messageId"])
    page = await (await browser.new_context()).new_page()
    await page.goto(server.url + "/dashboard")
    await page.fill("#agent-key", "wrong")
    await page.click("#dash-load")
    await expect(page.locator("#dash-status")).to_have_text("Key refused")
    await page.fill("#agent-key", "ana-key-2468-ace0-1357")
    await page.click("#dash-load")
    await expect(page.locator("#dash-status")).to_have_text("Signed in")
    await expect(page.locator(".chart")).to_have_count(8)
    await expect(page.locator('.chart[data-metric="Conversations"] rect')).to_have_count(1)
    await expect(page.locator("#totals")).to_contain_text("1conversations")
