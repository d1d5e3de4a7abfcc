"""End to end in a real browser: `wikigpt serve` on the tiny model, `wikigpt ui` in front of it,
Debian's Chromium driven by Playwright (never a downloaded browser).

A user types a prompt and sees the answer stream in under it; then the API stops, the user
sends again and sees the friendly error (what failed, the URL, how to start the backend) and
no traceback anywhere. Screenshots of both states go to the test's temp dir (path printed with -s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, require
from tests.test_ui import evaluated_model_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIKIGPT = str(Path(sys.executable).with_name("wikigpt"))


def start(args: list[str], log: Path, ready_url: str, timeout: float = 120) -> subprocess.Popen:
    """Start a wikigpt command and wait (bounded) until `ready_url` answers 200."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([WIKIGPT, *args], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"wikigpt {args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(ready_url, timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"wikigpt {args[0]} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def servers(evaluated_model_dir, tmp_path):
    require(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does it)")
    api_port, ui_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    api = start(["serve", "--model", str(evaluated_model_dir), "--device", "cpu", "--host", "127.0.0.1",
                 "--port", str(api_port)], tmp_path / "api.log", api_url + "/")
    ui = None
    try:
        ui = start(["ui", "--api-url", api_url, "--port", str(ui_port), "--status-interval", "1"],
                   tmp_path / "ui.log", f"http://127.0.0.1:{ui_port}/_stcore/health", timeout=60)
        yield api, f"http://127.0.0.1:{ui_port}", api_url
    finally:
        for proc in (ui, api):
            if proc is not None:
                stop(proc)


def test_prompt_streams_in_then_a_stopped_api_is_a_friendly_error(servers, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    api, ui_url, api_url = servers
    shots = tmp_path  # pytest keeps the last runs' temp dirs: look at the PNGs there
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(ui_url)
            expect(page.get_by_text("Backend ready")).to_be_visible(timeout=30_000)
            expect(page.get_by_text("not a chat assistant")).to_be_visible()
            expect(page.get_by_role("button", name="Training notebook")).to_be_visible()

            # Record every text the answer shows while it streams, then send a prompt.
            page.evaluate("""() => {
                window.seen = new Set();
                new MutationObserver(() => {
                    const msgs = document.querySelectorAll('[data-testid="stChatMessage"]');
                    if (msgs.length) window.seen.add(msgs[msgs.length - 1].innerText);
                }).observe(document.body, {subtree: true, childList: true, characterData: true});
            }""")
            box = page.get_by_test_id("stChatInputTextArea")
            box.fill("Data Science is")
            box.press("Enter")
            answer = page.get_by_test_id("stChatMessage").last
            expect(answer).to_contain_text("tokens in", timeout=60_000)  # the caption once it is done
            text = answer.get_by_test_id("stMarkdownContainer").first.inner_text()
            assert text.startswith("Data Science is") and len(text.strip()) > len("Data Science is")
            assert page.evaluate("window.seen.size") >= 3, "the answer did not appear piece by piece"
            page.screenshot(path=shots / "1-answer.png")

            stop(api)  # the backend goes away: the page must say so, not crash or hang
            expect(page.get_by_text("Backend unavailable")).to_be_visible(timeout=15_000)
            box.fill("The history of the Roman Empire")
            box.press("Enter")
            error = page.get_by_text("Cannot reach the backend").last
            expect(error).to_be_visible(timeout=30_000)
            body = page.inner_text("body")
            assert f"{api_url}/v1/completions" in body and "wikigpt serve" in body and "make run" in body
            expect(page.get_by_role("button", name="Retry")).to_be_visible()
            assert "Traceback" not in page.content()
            page.screenshot(path=shots / "2-backend-down.png")
        finally:
            browser.close()
    print(f"\nscreenshots: {shots}")
