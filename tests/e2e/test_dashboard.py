"""The dashboard in headless Chromium against a real stage 0 and one downstream stage: sign
in, see both stages, set the draft through the form, chat with streaming; and the screenshot
that docs/dashboard.md shows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import admin_pipeline

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "dashboard.png"
ADMIN_TOKEN = "dashboard-test-secret"
SLOW_MS = 180_000  # loading a draft or answering on a busy 2-core machine

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="no chromium: install Debian's package (`apt-get install chromium`); .ci/run does")


@pytest.fixture(scope="module")
def pipeline(smollm2_package: Path, tmp_path_factory: pytest.TempPathFactory):
    """Stage 0 (layers 0..12, admin token set) over one peer (12..30)."""
    root = tmp_path_factory.mktemp("dashboard")
    with admin_pipeline(smollm2_package, root, "0:12,12:30", ADMIN_TOKEN) as (stage0, peer):
        yield stage0, peer


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900})
        finally:
            browser.close()


@pytest.mark.slow
def test_dashboard_shows_the_pipeline_sets_the_draft_and_streams_a_chat(pipeline, page,
                                                                         smollm2_f32_package, tmp_path):
    from playwright.sync_api import expect

    stage0, peer = pipeline
    page.goto(f"{stage0.url}/")
    expect(page.locator("#login-message")).to_contain_text("admin token")
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")

    rows = page.locator("#stages tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator(".layers")).to_have_text("0..12")
    expect(rows.nth(1).locator(".layers")).to_have_text("12..30")
    expect(rows.nth(1)).to_contain_text(peer.endpoint)
    expect(page.locator("#placement")).to_have_text("given by --split")
    expect(rows.locator(".badge[data-state=ready]")).to_have_count(2)
    expect(page.locator("#model")).to_have_text("HuggingFaceTB/SmolLM2-135M-Instruct")
    expect(page.locator("#spec-indicator")).to_have_attribute("data-active", "false")

    page.fill("#draft-model", str(smollm2_f32_package))
    page.select_option("#window-policy", "adaptive")
    page.fill("#initial-window", "4")
    page.fill("#min-window", "2")
    page.fill("#max-window", "8")
    page.click("#set-draft")
    expect(page.locator("#spec-indicator")).to_have_attribute("data-active", "true", timeout=SLOW_MS)
    expect(page.locator("#spec-indicator")).to_have_text("active")
    expect(page.locator("#spec-settings")).to_contain_text("runtime PUT /v1/draft")

    page.fill("#chat-max-tokens", "24")
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#chat-send")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-done", "true", timeout=SLOW_MS)
    assert "Paris" in answer.locator(".text").inner_text()
    assert int(answer.get_attribute("data-chunks")) > 1  # it arrived in pieces, as it was made
    expect(answer.locator(".stats")).to_contain_text("smollm2-f32: accepted")
    expect(page.locator("#accept-rate")).to_contain_text("%")  # the live metrics saw it
    expect(page.locator("#requests")).to_have_text("1")

    # The docs' screenshot is rewritten only when asked: a test run leaves the checkout clean.
    target = SCREENSHOT if os.environ.get("LAYERLINE_UPDATE_SCREENSHOT") else tmp_path / SCREENSHOT.name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.png")
    page.screenshot(path=str(partial), full_page=True)
    os.replace(partial, target)
