"""The review page in a real headless Chromium (Debian's `chromium`, driven by Playwright; never Playwright's
own browser download): review images with the keyboard only, then read the ledger.

The same machinery takes the screenshots in docs/review.md:

    .venv/bin/python tests/test_review_browser.py --screenshots docs
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest
from browser_setup import CHROMIUM_ARGS, CHROMIUM_PATH

CHROMIUM = shutil.which("chromium") or (CHROMIUM_PATH if Path(CHROMIUM_PATH).exists() else None)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (`make browser` installs it)"),
]


@contextlib.contextmanager
def serve(app):
    """Run `app` with uvicorn on a free loopback port in a thread; yields the base URL.

    The socket is bound and listening before the thread starts, so the browser's first request waits in the
    kernel's backlog instead of racing the server's start-up."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 860):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


# --------------------------------------------------------------------------------------------- the test
def test_keyboard_review_reaches_the_ledger(review_run):
    from magic_align.review.app import create_app

    config, ledger, samples, checklists = review_run
    app = create_app(config, reviewer="Dr Browser", judge_id="judge:a")
    judge_a = {
        s.sample_id: ledger.find_verdict(s.image_sha256, "judge:a", checklists[s.target_label].version).items
        for s in samples
    }
    with serve(app) as url, browser_page() as page:
        page.goto(url + "/")
        first, second, third = page.locator("ol.queue .sid").all_inner_texts()[:3]
        assert (first, second) == ("r0-u001-k0", "r0-u002-k1")  # disagreements first

        page.keyboard.press("Enter")  # queue page: open the next unreviewed image
        page.wait_for_url(f"**/review/{first}")
        assert page.locator("#sample-image").evaluate("img => img.complete && img.naturalWidth") == 8
        page.keyboard.press("1")  # toggle items 1 and 3 away from judge:a's answers
        page.keyboard.press("3")
        page.keyboard.press("n")  # into the note, type, and leave it again
        page.keyboard.type("3: lesion too big")
        page.keyboard.press("Escape")
        page.keyboard.press("5")  # a digit outside the note toggles again
        page.keyboard.press("Enter")  # save and move on
        page.wait_for_url(f"**/review/{second}")

        page.keyboard.press("ArrowRight")  # move on without saving ...
        page.wait_for_url(f"**/review/{third}")
        page.keyboard.press("ArrowLeft")  # ... and back
        page.wait_for_url(f"**/review/{second}")
        page.keyboard.press("2")
        page.keyboard.press("Enter")
        page.wait_for_url(f"**/review/{third}")

        page.keyboard.press("ArrowLeft")  # back to the second: the page starts from my saved answer
        page.wait_for_url(f"**/review/{second}")
        assert "Started from your review" in page.inner_text("#review-form")
        assert page.locator("#history li").count() == 1

        page.goto(url + "/")
        assert page.inner_text("#done-count") == "2"
        page.keyboard.press("Enter")  # the next unreviewed image is the third
        page.wait_for_url(f"**/review/{third}")

    expected_first = list(judge_a[first])
    for position in (0, 2, 4):
        expected_first[position] = 1 - expected_first[position]
    expected_second = list(judge_a[second])
    expected_second[1] = 1 - expected_second[1]
    reviews = {review.sample_id: review for review in ledger.reviews()}
    assert set(reviews) == {first, second}
    assert reviews[first].items == expected_first
    assert reviews[first].note == "3: lesion too big"
    assert reviews[second].items == expected_second
    assert {review.reviewer for review in reviews.values()} == {"Dr Browser"}


def test_gallery_and_agreement_in_the_browser(review_run):
    from magic_align.review.app import create_app

    config, ledger, samples, checklists = review_run
    with serve(create_app(config, reviewer="Dr Browser", judge_id="judge:a")) as url, browser_page() as page:
        page.goto(url + "/gallery/beta")
        tiles = page.locator("#gallery .tile")
        assert tiles.count() == sum(1 for s in samples if s.target_label == "beta")
        beta = sorted(s.sample_id for s in samples if s.target_label == "beta")
        tiles.first.click()
        page.wait_for_url(re.compile(rf".*/review/{beta[0]}\?via=gallery$"))
        page.keyboard.press("Enter")  # confirm the judge's answers; the gallery's next image opens
        page.wait_for_url(re.compile(rf".*/review/{beta[1]}\?via=gallery$"))
        page.goto(url + "/gallery/beta")
        assert "(1 reviewed images)" in page.inner_text("table.agreement caption")
        assert page.locator("#gallery .tile.reviewed").count() == 1
    assert len(ledger.reviews()) == 1


def test_token_login_in_the_browser(review_run):
    """Behind the token nothing under /static/ answers, so the login page carries its own style (allowed by
    its hash in the page's CSP); after the login the page's script is served and the keyboard works."""
    from magic_align.review.app import create_app

    config, ledger, samples, checklists = review_run
    token = "browser-token-0123456789abcdef"
    with serve(create_app(config, token=token, reviewer="Dr Browser", judge_id="judge:a")) as url, browser_page() as page:
        page.goto(url + "/")
        page.wait_for_url("**/login")
        button = page.locator("button[type=submit]")
        assert button.evaluate("b => getComputedStyle(b).backgroundColor") == "rgb(36, 87, 166)"
        page.fill("input[name=token]", token)
        button.click()
        page.wait_for_url(url + "/")
        page.keyboard.press("Enter")  # review.js, served now, opens the next image
        page.wait_for_url("**/review/*")


# ----------------------------------------------------------------------------------------- screenshots
def build_demo_run(root: Path):
    """A small demo-domain run for the screenshots: 6 conditions x 4 procedural images, graded by the rules
    judge and a second judge that disagrees now and then, with a few expert reviews."""
    import numpy as np

    from magic_align.checklists.schema import load_checklists
    from magic_align.config import load_config
    from magic_align.demo.procedural import png_bytes, render, to_pil
    from magic_align.judges import make_judge
    from magic_align.judges.base import Verdict
    from magic_align.ledger import Ledger, SampleRow
    from magic_align.run import prepare_run

    config = load_config("demo", [f"runs_dir='{root}'", "review.per_condition=3"])
    paths = prepare_run(config)
    ledger = Ledger(paths.ledger)
    checklists = load_checklists(config.judge.checklist)
    judge = make_judge(config.judge, checklists)
    rng = np.random.default_rng(7)
    rows, images = [], {}
    for c, checklist in enumerate(checklists.conditions):
        for index in range(4):
            drawn_as = checklist.condition if index < 3 else checklists.conditions[(c + 1) % 6].condition
            image = to_pil(render(drawn_as, rng, size=64).image)
            data = png_bytes(image)
            relative = f"samples/round-0/images/{checklist.condition}-{index}.png"
            (paths.root / relative).parent.mkdir(parents=True, exist_ok=True)
            (paths.root / relative).write_bytes(data)
            sample_id = f"r0-u{c:02d}{index // 2}-k{index % 2}"
            images[sample_id] = image
            rows.append(SampleRow(sample_id, 0, f"u{c:02d}{index // 2}", index % 2, relative,
                                  hashlib.sha256(data).hexdigest(), f"real-{c}{index}", drawn_as,
                                  checklist.condition, f"an image of {checklist.token} on human skin", index))
    ledger.add_samples(rows)
    for number, row in enumerate(rows):
        checklist = checklists[row.target_label]
        verdict = asyncio.run(judge.judge(images[row.sample_id], checklist))
        ledger.put_verdict(row.image_sha256, judge.id, checklist.version, judge.prompt_version, verdict, checklist.condition)
        other = list(verdict.items)
        if number % 3 == 0:
            other[number % 5] = 1 - (other[number % 5] or 0)
        status = "failed" if number == 7 else "ok"
        second = Verdict(items=[None] * 5 if status == "failed" else other, parse_status=status,
                         rationales=["" for _ in other], error="no JSON object in the answer" if status == "failed" else None)
        ledger.put_verdict(row.image_sha256, "openai:gpt-4o", checklist.version, "p1", second, checklist.condition)
        if number % 4 == 1:
            reviewed = list(verdict.items)
            reviewed[(number + 1) % 5] = 1 - (reviewed[(number + 1) % 5] or 0)
            ledger.add_review(row.sample_id, checklist.version, reviewed, "Dr Okafor", "border is smoother than drawn")
        elif number % 4 == 2:
            ledger.add_review(row.sample_id, checklist.version, list(verdict.items), "Dr Lindqvist")
    return config


VISIBLE_IMAGES_LOADED = """() => Array.from(document.images)
    .filter(img => img.getBoundingClientRect().top < window.innerHeight)
    .every(img => img.complete && img.naturalWidth > 0)"""


def take_screenshots(folder: Path) -> list[Path]:
    import tempfile

    from magic_align.review.app import create_app

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        config = build_demo_run(Path(scratch))
        with serve(create_app(config, reviewer="Dr Okafor")) as url, browser_page(1280, 860) as page:
            pages = (("/", "review-queue.png"), ("/gallery/melanoma", "review-gallery.png"),
                     ("/review/r0-u000-k0", "review-page.png"))
            for path, name in pages:
                page.goto(url + path)
                page.wait_for_function(VISIBLE_IMAGES_LOADED)  # thumbnails are lazy: wait for those on screen
                page.screenshot(path=str(folder / name))
                written.append(folder / name)
    return written


def test_screenshot_machinery(tmp_path):
    """The docs' screenshot script still works (it writes three PNGs of the expected size)."""
    from PIL import Image

    written = take_screenshots(tmp_path)
    assert [path.name for path in written] == ["review-queue.png", "review-gallery.png", "review-page.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.size == (1280, 860)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--screenshots":
        sys.exit("usage: python tests/test_review_browser.py --screenshots FOLDER")
    if CHROMIUM is None:
        sys.exit("chromium is not installed; `make browser` installs it")
    for written in take_screenshots(Path(sys.argv[2])):
        print(f"wrote {written}")
