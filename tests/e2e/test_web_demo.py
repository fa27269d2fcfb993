"""The web demo page in a real headless Chromium (Debian `chromium`) over the real stack:
pick a demo photo, see the detected boxes, tap one, see the grid the API returns for it."""

from __future__ import annotations

import shutil

import httpx
import pytest

pytestmark = [pytest.mark.e2e]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
GRID_K = 12  # the page asks for this many results


def test_pick_photo_tap_box_shows_the_api_grid(served):
    from playwright.sync_api import sync_playwright

    assert shutil.which("chromium"), (
        "Debian's chromium is needed for the web demo test: `apt-get install -y chromium` "
        "(make test installs it when run as root)")
    url = served.stack.url
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.locator("#photos img.demo-photo").first.click()
            page.wait_for_selector("#stage .box", timeout=30_000)
            boxes = page.locator("#stage .box")
            n_boxes = boxes.count()
            assert n_boxes >= 1
            assert page.locator("#stage .box.salient").count() == 1
            assert "objects: tap one" in page.locator("#status").inner_text()

            tapped = n_boxes - 1  # not necessarily the default box: the tap must count
            boxes.nth(tapped).click()
            page.wait_for_selector("#results .item", timeout=30_000)
            page.wait_for_function("document.getElementById('status').textContent"
                                   ".includes('results in')", timeout=30_000)
            shown = [page.locator("#results .item").nth(i).get_attribute("data-item-id")
                     for i in range(page.locator("#results .item").count())]
            assert page.locator("#stage .box.chosen").get_attribute("data-index") == str(tapped)
            photo_url = page.locator("#photos img.demo-photo").first.get_attribute("src")
            assert not errors, errors
        finally:
            browser.close()

    # the grid is exactly what the API answers for that photo and box
    photo = httpx.get(f"{url}{photo_url}").content
    direct = httpx.post(f"{url}/v1/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                        data={"box_index": str(tapped), "k": str(GRID_K)}, timeout=30).json()
    assert shown == [it["item_id"] for it in direct["items"]]
    assert len(shown) == GRID_K
