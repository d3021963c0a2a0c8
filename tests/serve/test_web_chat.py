"""The web chat page at / in headless Chromium: streamed answers, the stop button, multi-turn history
and the system prompt, against a live `llamaherd serve` with the real default model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.server import llamaherd_server

# The exact float32 path of the real default model: answers are checked for content ("Paris"),
# which should not hinge on the speed work in the quantized kernels.
SERVE_OPTIONS = ("--dtype", "float32")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with llamaherd_server(None, "--max-seqs", "4", "--ctx-size", "2048", *SERVE_OPTIONS,
                          threads=2) as s:
        yield s.url


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[Any]:
    if not CHROMIUM.exists():
        raise RuntimeError("the web chat test needs Debian's chromium: run "
                           "`bash scripts/setup.sh --test` (or apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(120_000)
        page.goto(server + "/")
        yield page
        browser.close()


def assistant_texts(page: Any) -> list[str]:
    return page.locator(".msg.assistant").all_inner_texts()


def sent_bodies(page: Any, action: Any) -> dict[str, Any]:
    """Run `action` and return the JSON body of the chat request it sends."""
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as req:
        action()
    return json.loads(req.value.post_data)


def running_sequences(server: str) -> float:
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith("llamaherd_running_sequences "):
            return float(line.split()[1])
    raise AssertionError("no running-sequences metric")


def test_page_loads_and_knows_the_model(page: Any) -> None:
    page.wait_for_function("document.getElementById('model').textContent.includes('smollm2')")
    assert page.title() == "llamaherd chat"


def test_a_message_gets_a_streamed_answer(page: Any) -> None:
    page.fill("#system", "You are a concise assistant.")
    page.fill("#temperature", "0")
    page.fill("#top-p", "0.9")
    page.fill("#max-tokens", "48")
    page.fill("#input", "What is the capital of France?")
    body = sent_bodies(page, lambda: page.click("#send"))
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 48
    assert body["top_p"] == 0.9
    assert body["messages"] == [{"role": "system", "content": "You are a concise assistant."},
                                {"role": "user", "content": "What is the capital of France?"}]
    # the answer grows while it streams: seen partly written, then finished
    bubble = page.locator(".msg.assistant").first
    page.wait_for_function("document.querySelector('.msg.assistant.streaming')?.textContent"
                           ".length > 0")
    partial = bubble.inner_text()
    page.wait_for_selector("#send:not([disabled])")
    final = bubble.inner_text()
    assert final.startswith(partial) and "Paris" in final
    assert "streaming" not in (bubble.get_attribute("class") or "")


def test_stop_ends_a_long_answer_and_frees_the_server(page: Any, server: str) -> None:
    page.fill("#temperature", "0.8")
    page.fill("#max-tokens", "1500")
    page.fill("#input", "Write a very long story about a dragon.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant')[1]?.textContent"
                           ".length > 20")
    assert running_sequences(server) == 1
    page.click("#stop")
    page.wait_for_selector("#send:not([disabled])", timeout=10_000)
    bubble = page.locator(".msg.assistant").nth(1)
    assert "stopped" in (bubble.get_attribute("class") or "")
    stopped_at = bubble.inner_text()
    time.sleep(1.0)
    assert bubble.inner_text() == stopped_at  # nothing more arrives
    deadline = time.monotonic() + 10
    while running_sequences(server) != 0:  # the server cancelled the sequence
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_second_message_carries_the_history(page: Any) -> None:
    page.fill("#max-tokens", "24")
    page.fill("#input", "Thanks! And of Italy?")
    body = sent_bodies(page, lambda: page.press("#input", "Enter"))
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert body["messages"][-1]["content"] == "Thanks! And of Italy?"
    assert "Paris" in body["messages"][2]["content"]
    page.wait_for_selector("#send:not([disabled])")
    texts = assistant_texts(page)
    assert len(texts) == 3 and texts[2].strip()
