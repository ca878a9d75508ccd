"""Shared pytest fixtures (append only; each fixture says who relies on it)."""

from __future__ import annotations

import pytest
from browser_setup import CHROMIUM_ARGS, CHROMIUM_PATH


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init tiny Stable Diffusion saved as a diffusers folder (built once per test session).

    Load it with `load_pipeline(ModelConfig(source="local", pretrained=str(tiny_model_dir)))`.
    """
    from magic_align.diffusion.loading import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-model")
    build_tiny_pipeline(seed=0).save_pretrained(folder)
    return folder


# Used by tests/test_judge_stage.py, tests/test_feedback.py, tests/test_agreement.py (judge stage, pairs, agreement).
FEEDBACK_CHECKLIST_YAML = """
id: feedback-test
description: two small checklists for the ledger / judge / pairs tests
conditions:
  - condition: alpha
    display_name: Alpha
    token: <alpha>
    items:
      - {id: red, aspect: color, text: "the lesion is red"}
      - {id: round, aspect: shape, text: "the lesion is round", requires: red}
      - {id: big, aspect: size, text: "the lesion is big"}
      - {id: scaly, aspect: texture, text: "the lesion is scaly"}
      - {id: arm, aspect: location, text: "the lesion is on the arm"}
  - condition: beta
    display_name: Beta
    token: <beta>
    items:
      - {id: dark, aspect: color, text: "the lesion is dark"}
      - {id: flat, aspect: shape, text: "the lesion is flat"}
      - {id: small, aspect: size, text: "the lesion is small"}
      - {id: smooth, aspect: texture, text: "the lesion is smooth"}
      - {id: face, aspect: location, text: "the lesion is on the face"}
"""


@pytest.fixture
def feedback_run(tmp_path):
    """A run directory with a ledger holding `units` x K synthetic 8 x 8 PNG samples of round 0.

    Call it: `config, ledger, samples = feedback_run(units=4, k=2)`. Each image's red channel is
    `17 * index` (so images differ); targets alternate between the conditions 'alpha' and 'beta' of a small
    checklist file written beside the run (config.judge.checklist points at it).
    """
    import hashlib

    from PIL import Image

    from magic_align.config import load_config
    from magic_align.ledger import Ledger, SampleRow
    from magic_align.run import prepare_run

    def build(units: int = 4, k: int = 2, real: int = 0, extra: list[str] | None = None):
        checklist_path = tmp_path / "checklists.yaml"
        checklist_path.write_text(FEEDBACK_CHECKLIST_YAML)
        overrides = [f"runs_dir='{tmp_path / 'runs'}'", f"judge.checklist='{checklist_path}'", "judge.concurrency=4"]
        config = load_config("tiny", overrides + (extra or []))
        paths = prepare_run(config)
        ledger = Ledger(paths.ledger)
        rows = []
        for index in range(units * k + real):
            unit, kk = divmod(index, k)
            relative = f"samples/round-0/images/{index:04d}.png"
            target = paths.root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), ((17 * index) % 256, 40, 90)).save(target)
            rows.append(
                SampleRow(
                    sample_id=f"r0-u{unit:03d}-k{kk}",
                    round=0,
                    unit_id=f"u{unit:03d}",
                    k=kk,
                    image_path=relative,
                    image_sha256=hashlib.sha256(target.read_bytes()).hexdigest(),
                    source_id=f"real-{unit}",
                    source_label="beta" if unit % 2 == 0 else "alpha",
                    target_label="alpha" if unit % 2 == 0 else "beta",
                    prompt="an image of <alpha> on human skin",
                    seed=index,
                    shard=None,
                    shard_index=None,
                    synthetic=index < units * k,
                )
            )
        ledger.add_samples(rows)
        return config, ledger, rows

    return build


@pytest.fixture
def two_condition_data(tmp_path):
    """A two-condition image-folder dataset and its checklist file, for the trainers' tests (test_finetune,
    test_rft). Returns (checklist_yaml, images_root, {condition: token}). Dark blobs ("melanoma") and white
    patches ("vitiligo") on a skin tone, 40 x 48 px (so the centre crop matters), 4 images per class."""
    import numpy as np
    from PIL import Image

    tokens = {"melanoma": "<mel>", "vitiligo": "<vit>"}
    lines = ["id: test-two", "conditions:"]
    for condition, token in tokens.items():
        lines += [
            f"  - condition: {condition}",
            f"    display_name: {condition.title()}",
            f"    token: '{token}'",
            "    items:",
            "      - {id: colour, aspect: color, text: the lesion has the expected colour}",
            "      - {id: size, aspect: size, text: the lesion has the expected size}",
        ]
    checklist = tmp_path / "two-conditions.yaml"
    checklist.write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(0)
    root = tmp_path / "two-condition-images"
    for condition in tokens:
        folder = root / condition
        folder.mkdir(parents=True)
        for index in range(4):
            image = np.full((40, 48, 3), (200, 150, 120), dtype=np.float32) + rng.normal(0, 6, (40, 48, 3))
            y, x = np.mgrid[:40, :48]
            cy, cx = 20 + rng.integers(-5, 5), 24 + rng.integers(-5, 5)
            mask = (y - cy) ** 2 + (x - cx) ** 2 < (8 + index) ** 2
            image[mask] = (40, 30, 25) if condition == "melanoma" else (250, 248, 245)
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{condition}-{index}.png")
    return checklist, root, tokens


# Used by tests/test_review_api.py, tests/test_review_security.py, tests/test_review_browser.py (review page).
@pytest.fixture
def review_run(feedback_run):
    """`feedback_run(units=4, k=2)` (8 samples, targets alpha/beta) plus verdicts of two judges, "judge:a" and
    "judge:b". They disagree on 2 items of r0-u001-k0 and on 1 item of r0-u002-k1; judge:b's answer about
    r0-u003-k1 failed to parse. Returns (config, ledger, samples, checklists)."""
    from magic_align.checklists.schema import load_checklists
    from magic_align.judges.base import Verdict

    config, ledger, samples = feedback_run(units=4, k=2)
    checklists = load_checklists(config.judge.checklist)
    different = {"r0-u001-k0": {0: 0, 2: 0}, "r0-u002-k1": {4: 0}}
    for index, sample in enumerate(samples):
        checklist = checklists[sample.target_label]
        items_a = [1, 1, (index + 1) % 2, 1, index % 2]
        items_b = list(items_a)
        for position, value in different.get(sample.sample_id, {}).items():
            items_b[position] = 1 - items_a[position] if value == 0 else value
        reasons = [f"reason a{index}.{i}" for i in range(5)]
        ledger.put_verdict(sample.image_sha256, "judge:a", checklist.version, "p1",
                           Verdict(items=items_a, rationales=reasons, raw="a"), checklist.condition)
        if sample.sample_id == "r0-u003-k1":
            verdict_b = Verdict(items=[None] * 5, raw="???", parse_status="failed", error="no JSON in the answer")
        else:
            verdict_b = Verdict(items=items_b, raw="b")
        ledger.put_verdict(sample.image_sha256, "judge:b", checklist.version, "p1", verdict_b, checklist.condition)
    return config, ledger, samples, checklists


@pytest.fixture(scope="module")
def chromium_browser():
    """A headless Debian chromium (`make browser` installs it) driven by Playwright's sync API; skips the
    test with the reason when chromium or Playwright is missing. Open pages with `chromium_browser.new_page()`
    and close them in the test.

    Module scope, not session: a live sync Playwright keeps its event loop in the main thread, and any other
    `sync_playwright()` (tests/test_review_browser.py starts its own) fails with "using Playwright Sync API
    inside the asyncio loop" until it is stopped; closing it after each test file keeps files independent."""
    from pathlib import Path

    if not Path(CHROMIUM_PATH).exists():
        pytest.skip(f"Debian chromium is not installed at {CHROMIUM_PATH} (`make browser` or `apt-get install chromium`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM_PATH, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """One intra-op torch thread for the whole suite. Every test uses tiny tensors and models; on the shared
    2-core machine the default two threads oversubscribe the cores and tiny-UNet steps run 10-20x slower
    (measured: 0.17 s vs 3 s per forward+backward under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
