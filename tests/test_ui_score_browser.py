"""The "Score text" page in a real browser: two `wikigpt serve` backends (two different tiny
models sharing a tokenizer), `wikigpt ui --compare-api-url ... --wikitext-file wiki.test.raw`,
Debian's Chromium through Playwright.

A user picks a WikiText test paragraph, scores it and sees every token shaded by the model's
surprise, hover text with p and the top alternatives, perplexity and bits per byte for both
models side by side and their difference; then the main API stops and scoring again shows the
friendly error (what failed, the URL, how to start the backend), no traceback. Screenshots go
to the test's temp dir (path printed with -s).
"""

from __future__ import annotations

import os
import re

import pytest

from tests.conftest import free_port, make_tiny_model, require
from tests.test_ui_browser import CHROMIUM, CHROMIUM_ARGS, start, stop

pytestmark = pytest.mark.browser


@pytest.fixture
def servers(tiny_model_dir, wikitext_dir, tmp_path):
    require(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does it)")
    other = make_tiny_model(tmp_path / "other", n_layer=1)  # same tokenizer, other weights
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = []
    try:
        for model, port, url, name in ((tiny_model_dir, ports[0], urls[0], "main"), (other, ports[1], urls[1], "other")):
            procs.append(start(["serve", "--model", str(model), "--device", "cpu", "--port", str(port),
                                "--max-batch-size", "2"], tmp_path / f"api-{name}.log", url + "/ready"))
        procs.append(start(["ui", "--api-url", urls[0], "--compare-api-url", urls[1], "--port", str(ports[2]),
                            "--wikitext-file", str(wikitext_dir / "wiki.test.raw"), "--status-interval", "0"],
                           tmp_path / "ui.log", f"{urls[2]}/_stcore/health", timeout=60))
        yield procs[0], urls[2], urls[0]
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_score_page_shades_tokens_side_by_side_then_a_stopped_api_is_friendly(servers, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    api, ui_url, api_url = servers
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(ui_url + "/score")
            expect(page.get_by_text("How surprised is the model")).to_be_visible(timeout=30_000)
            expect(page.get_by_role("link", name="Continue text")).to_be_visible()  # the first page is one click away
            page.get_by_text("A WikiText paragraph").click()
            box = page.get_by_label("Text to score")
            expect(box).not_to_have_value("", timeout=30_000)  # the first paragraph of wiki.test.raw
            paragraph = box.input_value()
            page.get_by_role("button", name="Score").click()
            views = page.locator(".wg-scored")
            expect(views).to_have_count(3, timeout=60_000)  # main, compared, difference
            expect(page.get_by_text("Difference")).to_be_visible()

            body = page.inner_text("body")
            assert len(re.findall(r"perplexity [\d,.]+ · [\d.]+ bits per byte", body)) == 2, body  # both models
            tokens = views.first.locator(".wg-tok")
            n = tokens.count()
            assert n > 10 and views.first.inner_text() == paragraph  # every token shown, the text intact
            styles = [tokens.nth(i).get_attribute("style") for i in range(n)]
            shaded = [s for s in styles if re.search(r"rgba\(220, 38, 38, 0\.[1-9]", s)]
            assert "transparent" in styles[0] and len(shaded) >= n // 2, styles  # first token unscored, the rest red
            tip = tokens.nth(3).get_attribute("data-tip")
            assert re.search(r"p [\d.e-]+ · [\d.]+ bits\nmost likely here:\n", tip), tip
            assert len(tip.splitlines()) == 2 + 5  # five alternatives (the slider's default)
            assert "the first token" in tokens.first.get_attribute("data-tip")
            diff = views.nth(2).locator(".wg-tok")
            assert diff.count() == n and "minus" in diff.nth(3).get_attribute("data-tip")
            tokens.nth(3).hover()
            page.screenshot(path=tmp_path / "1-scored.png", full_page=True)

            # a text of one's own, with markup-like characters and characters split across tokens
            page.get_by_text("Paste text").click()
            own = "Data science uses <statistics> & [algorithms]; = Rome = *covers* it in 東京 café."
            box.fill(own)
            box.press("Control+Enter")  # Streamlit applies a text area's value on Ctrl+Enter
            page.get_by_role("button", name="Score").click()
            expect(page.locator(".wg-scored").first).to_have_text(own, timeout=60_000)

            stop(api)  # the main backend goes away: scoring again must say so, not crash or hang
            page.get_by_role("button", name="Score").click()
            error = page.get_by_text("Cannot reach the backend")
            expect(error).to_be_visible(timeout=30_000)
            body = page.inner_text("body")
            assert f"{api_url}/v1/completions" in body and "wikigpt serve" in body
            assert "Traceback" not in page.content()
            page.screenshot(path=tmp_path / "2-backend-down.png", full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshots: {tmp_path}")
