"""The run report in a real headless Chromium (Debian's `chromium` through Playwright, `chromium_browser` in
conftest.py): it loads from a file URL with no network, every image decodes, the tables read as written,
and the layout fits a phone-sized screen."""

from __future__ import annotations

import pytest

from magic_align.evaluate.report import run_report
from report_run import EXPECTED, build_report_run, expected_image_count

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def report_pages(tmp_path_factory):
    """(full report, empty report) of fabricated runs, as file URLs."""
    config, _ = build_report_run(tmp_path_factory.mktemp("full"))
    full = run_report(config)
    config, _ = build_report_run(tmp_path_factory.mktemp("empty"), ledger=False, evaluate=False, alignment=False,
                                 logs=False)
    empty = run_report(config)
    return full.resolve().as_uri(), empty.resolve().as_uri()


def open_page(browser, url: str, width: int = 1280, height: int = 900):
    """A page at `url`, with every request it made and every console error it logged."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(30_000)
    requests, errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url, wait_until="load")
    return page, requests, errors


def test_report_renders_with_every_image(chromium_browser, report_pages):
    page, requests, errors = open_page(chromium_browser, report_pages[0])
    try:
        assert page.title() == "magic-align report: report"
        images = page.evaluate(
            "() => Array.from(document.images).map(img => ({complete: img.complete, width: img.naturalWidth}))"
        )
        assert len(images) == expected_image_count()
        assert all(image["complete"] and image["width"] > 0 for image in images), images
        # self-contained: the page itself and nothing else (images are data URIs, never fetched from anywhere)
        assert [url for url in requests if not url.startswith("data:")] == [report_pages[0]]
        assert errors == []

        classifier = page.locator("table.classifier").first.inner_text()
        assert EXPECTED["accuracy_real"] in classifier and EXPECTED["accuracy_dpo"] in classifier
        # the best accuracy is marked; the other metrics are equal in every row, so none of them is
        assert page.locator("table.classifier td.best").all_inner_texts() == [EXPECTED["accuracy_dpo"]]
        assert EXPECTED["skin_type_3"] in page.locator("table.skin").first.inner_text()
        headings = page.locator("section h2").all_inner_texts()
        assert "Images per condition" in headings and "Classifier: real vs real + synthetic" in headings
        # images of the grid are laid out as squares of a sensible size, not collapsed or blown up
        size = page.evaluate("() => { const r = document.querySelector('figure.tile img').getBoundingClientRect();"
                             " return [r.width, r.height]; }")
        assert 60 <= size[0] <= 200 and abs(size[0] - size[1]) < 1
        assert page.locator("p.empty").count() == 0  # every section of the full run has data
    finally:
        page.close()


def test_report_fits_a_phone_screen(chromium_browser, report_pages):
    page, _, errors = open_page(chromium_browser, report_pages[0], width=390, height=844)
    try:
        # wide tables scroll inside their own box; the page itself never scrolls sideways
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1
        widths = page.evaluate("() => Array.from(document.querySelectorAll('figure.tile img'))"
                               ".map(img => img.getBoundingClientRect().right)")
        assert widths and max(widths) <= 390
        assert errors == []
    finally:
        page.close()


def test_empty_run_renders_its_placeholders(chromium_browser, report_pages):
    page, _, errors = open_page(chromium_browser, report_pages[1])
    try:
        placeholders = page.locator("p.empty").all_inner_texts()
        assert len(placeholders) >= 8 and all(text.startswith("No data yet.") for text in placeholders)
        assert page.evaluate("() => document.images.length") == 0
        assert 'name = "report"' in page.locator("pre.config").inner_text()
        assert errors == []
    finally:
        page.close()
