"""The explorer in a real headless Chromium: pages load, frames render, links resolve.

Runs whenever Chromium and Playwright are present (``make test`` installs both); on CI a
missing browser is a failure, not a skip. Screenshots go to ``test-artifacts/explorer/``
(or ``$CUPID_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cupid_engine.explorer import build_site

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM is None or sync_playwright is None:
        why = "Chromium (Debian package chromium)" if CHROMIUM is None else "playwright (extra 'dev')"
        if os.environ.get("CI"):
            pytest.fail(f"{why} is missing: `make test` installs it")
        pytest.skip(f"{why} is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def artifacts():
    root = Path(os.environ.get("CUPID_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
    out = root / "explorer"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _not_blank(png: bytes) -> bool:
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)
    return img.size > 0 and float(img.std()) > 10.0


def test_overview_rollout_and_top_influencer(browser, explorer_run, tmp_path, artifacts):
    build_site(explorer_run["store"], "base", tmp_path / "site", scores=explorer_run["scores"],
               data=explorer_run["data"], audit=explorer_run["audit"], top=3)
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "site" / "index.html").as_uri())
    page.wait_for_selector("body[data-page='overview']")
    assert page.inner_text("#success-rate") == "50%"
    assert page.locator("svg.hist").count() == 2 * 3  # two labels x three methods
    assert page.locator("svg.composition").count() == 2
    # The overview shows a failed rollout's frames beside its top influencers' frames.
    featured = page.locator("#featured .strip")
    assert featured.count() == 1 + 3 and all(_not_blank(featured.nth(i).screenshot()) for i in range(4))
    page.screenshot(path=str(artifacts / "overview.png"), full_page=True)

    page.click("text=All 4 rollouts")
    page.wait_for_selector("body[data-page='rollouts']")
    links = page.locator("a[href^='#rollout/']")
    assert links.count() == 4
    failed = explorer_run["rollouts"][0].episode_id  # roll_00 failed
    page.click(f"text={failed}")
    page.wait_for_selector("body[data-page='rollout']")
    frame = page.locator("#rframe .strip")
    assert _not_blank(frame.screenshot())
    assert page.locator("svg.linechart polyline.series").count() == 2
    demo_frames = page.locator("#demos .strip")
    assert demo_frames.count() == 3 and all(_not_blank(demo_frames.nth(i).screenshot()) for i in range(3))
    before = frame.get_attribute("style")
    page.locator("#scrub").fill(str(explorer_run["rollouts"][0].length - 1))
    assert frame.get_attribute("style") != before  # scrubbing moves the filmstrip
    page.screenshot(path=str(artifacts / "rollout.png"), full_page=True)

    page.locator("#demos .demo a").first.click()
    page.wait_for_selector("body[data-page='demo']")
    assert page.locator("table").count() == 2 and _not_blank(page.locator("#dframe .strip").screenshot())
    page.screenshot(path=str(artifacts / "demo.png"), full_page=True)

    # Every link of the demo page resolves to a page that renders.
    hrefs = page.eval_on_selector_all("a[href^='#']", "els => els.map(e => e.getAttribute('href'))")
    for href in sorted(set(hrefs)):
        page.evaluate("document.body.dataset.page = ''")
        page.goto((tmp_path / "site" / "index.html").as_uri() + href)
        page.wait_for_function("document.body.dataset.page && document.body.dataset.page !== ''")
        assert page.evaluate("document.body.dataset.page") != "error", href
    assert not errors, errors
