"""The chat page at `/` in headless Chromium (Debian's `chromium`, driven by Playwright; no browser is
downloaded): type a message, watch the answer stream in, with a system prompt and sampling controls,
and no request leaves the machine."""
from __future__ import annotations

import os
import shutil
from urllib.parse import urlparse

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import ServerProcess, build_checkpoint  # noqa: E402

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-default-apps", "--disable-extensions", "--disable-sync",
                  "--no-first-run", "--metrics-recording-only", "--mute-audio"]


def _chromium() -> str:
    for path in (os.environ.get("LMFORGE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium; .ci/run does it)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[test]')")
    exe = _chromium()
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS, timeout=60_000)
        except Exception as e:  # noqa: BLE001 - a browser that cannot start here (no display libraries, ...)
            pytest.skip(f"Chromium at {exe} does not start: {str(e).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    s = ServerProcess(build_checkpoint(tmp_path_factory.mktemp("web") / "tiny"))
    yield s
    assert s.stop() == 0


MESSAGES = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Ahoy, who are you?"}]
SETTINGS = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 120}


def _long_answer(url: str) -> tuple[int, str]:
    """A seed whose answer runs to max_tokens (a random model may end early), and that answer."""
    for seed in range(40):
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, **SETTINGS, "seed": seed}, timeout=60)
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "length":
            return seed, choice["message"]["content"]
    pytest.fail("no seed gave a full-length answer")


def test_chat_page_streams_an_answer(browser, web_server):
    seed, expected = _long_answer(web_server.url)
    page = browser.new_page()
    outside = []

    def guard(route):  # the page must work offline: refuse (and remember) anything not on this server
        if urlparse(route.request.url).netloc != urlparse(web_server.url).netloc:
            outside.append(route.request.url)
            return route.abort()
        return route.continue_()

    page.route("**/*", guard)
    try:
        page.goto(web_server.url + "/", timeout=30_000)
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'", timeout=30_000)
        page.fill("#system", MESSAGES[0]["content"])
        page.fill("#temperature", str(SETTINGS["temperature"]))
        page.fill("#top_p", str(SETTINGS["top_p"]))
        page.fill("#max_tokens", str(SETTINGS["max_tokens"]))
        page.fill("#seed", str(seed))
        # Record what the answer bubble shows while it is still streaming.
        page.evaluate("""() => {
            window.partials = [];
            new MutationObserver(() => {
                const a = document.querySelector('.msg.assistant');
                if (a && a.dataset.done === 'false') window.partials.push(a.textContent.length);
            }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
        }""")
        # However fast the machine decodes, the answer must reach the page over time for it to show pieces:
        # hold the download to 8 KB/s from here on (the streamed events take about a second).
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 8000,
                                                      "uploadThroughput": -1})
        page.fill("#input", MESSAGES[1]["content"])
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.user", timeout=10_000)
        assert page.text_content(".msg.user") == "Ahoy, who are you?"
        page.wait_for_selector('.msg.assistant[data-done="true"]', timeout=60_000)
        assert page.query_selector(".msg.error") is None, page.text_content(".msg.error")
        meta = page.text_content(".msg.assistant .meta")
        answer = page.evaluate("document.querySelector('.msg.assistant').firstChild.textContent")
        partials = page.evaluate("window.partials")
    finally:
        page.close()
    assert answer and "tokens" in meta
    assert len(set(partials)) >= 2 and min(partials) < len(answer), "the answer should appear piece by piece"
    assert outside == []
    # The page sent the system prompt and the controls: its answer is the API's for the same settings.
    assert answer == expected
