"""Linear probe with cached features: 5 seeds x 5 settings against one setting (target: at most 1.5x).

The reference is one setting as a user would run it alone: its features extracted (cold cache) and one
linear probe trained. The measured case is the paper's whole comparison (real, + T2I, + I2I, + MAGIC-DPO,
+ MAGIC-RFT) with 5 seeds each, once the features are cached on disk (a fresh cache object, so reading the
cache from disk is included). Both use the paper's schedule (Adam lr 0.01, StepLR x0.1 every 50 epochs,
200 epochs, batch 32, rho 0.2) and the offline EfficientNet-Lite0 backbone at 224 px.

Run: `python -m benchmarks.run probe`.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from magic_align.backbones import load_backbone
from magic_align.evaluate.classifier import Example, FeatureCache, Schedule, run_linear_probe

NUM_CLASSES = 20
N_TRAIN = 120  # real training images (the paper: 3,100)
N_TEST = 120
SETTINGS = ("real", "t2i", "i2i", "magic-dpo", "magic-rft")
SEEDS = [0, 1, 2, 3, 4]
TARGET = 1.5


def _draw(path: Path, label: int, rng: np.random.Generator) -> None:
    """A 96 px image whose colour and shape count depend on the class, with noise."""
    image = Image.new("RGB", (96, 96), tuple(int(v) for v in rng.integers(90, 200, 3)))
    draw = ImageDraw.Draw(image)
    hue = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256])
    for _ in range(1 + label % 4):
        x, y, r = (int(v) for v in rng.integers(10, 80, 3) // (1, 1, 4))
        colour = tuple(int(v) for v in np.clip(hue + rng.normal(0, 20, 3), 0, 255))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    image.save(path)


def _examples(folder: Path, count: int, seed: int, prefix: str, synthetic: bool, sources=None) -> list[Example]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for index in range(count):
        label = index % NUM_CLASSES
        path = folder / f"{prefix}-{index}.png"
        _draw(path, label, rng)
        source = sources[index % len(sources)] if sources else None
        examples.append(Example(f"{prefix}-{index}", path, label, hashlib.sha256(path.read_bytes()).hexdigest(),
                                skin_type=1 + index % 6, group=source.group if source else f"{prefix}-{index}",
                                source_id=source.id if source else "", synthetic=synthetic))
    return examples


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def run() -> str:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices on a shared machine: threads only wait on each other
    try:
        return _run()
    finally:
        torch.set_num_threads(previous_threads)


def _run() -> str:
    schedule = Schedule()  # the paper's
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        train = _examples(root / "train", N_TRAIN, 0, "train", False)
        test = _examples(root / "test", N_TEST, 1, "test", False)
        pools = {"real": []}
        for offset, setting in enumerate(SETTINGS[1:], start=2):
            pools[setting] = _examples(root / setting, N_TRAIN, offset, setting, True, sources=train)
        backbone = load_backbone("efficientnet-lite0")

        # Reference: one setting alone, cold cache, one seed.
        start = time.perf_counter()
        cold = FeatureCache(root / "features", backbone)
        run_linear_probe(cold, train, pools["magic-dpo"], test, NUM_CLASSES, schedule, [0], _load)
        one_setting = time.perf_counter() - start
        extracted_one = cold.extracted

        # Complete the cache (the other synthetic sets, once), then time the 5 x 5 comparison from the disk.
        start = time.perf_counter()
        cold.features([e for pool in pools.values() for e in pool], _load)
        fill_time = time.perf_counter() - start
        extracted_rest = cold.extracted - extracted_one
        start = time.perf_counter()
        warm = FeatureCache(root / "features", backbone)
        accuracies = {}
        for setting in SETTINGS:
            results = run_linear_probe(warm, train, pools[setting], test, NUM_CLASSES, schedule, SEEDS, _load)
            accuracies[setting] = float(np.mean([np.mean(r.y_true == r.y_pred) for r in results]))
        comparison = time.perf_counter() - start
        assert warm.extracted == 0, "the warm comparison must not extract features"

    ratio = comparison / one_setting
    verdict = "meets" if ratio <= TARGET else "misses"
    steps = schedule.epochs * int(np.ceil(N_TRAIN / (schedule.batch_size - 6)))
    return f"""## Linear probe: 5 seeds x 5 settings with cached features

Command: `python -m benchmarks.run probe`. EfficientNet-Lite0 (offline weights) at 224 px, {NUM_CLASSES} classes,
{N_TRAIN} real training + {N_TEST} test images, 4 synthetic sets of {N_TRAIN} images; the paper's schedule
({schedule.epochs} epochs, Adam lr {schedule.lr:g}, x{schedule.gamma:g} every {schedule.step_size}, batch {schedule.batch_size},
rho {schedule.rho:g}: about {steps} optimizer steps per probe); torch with 1 intra-op thread.

| case | images through the backbone | time (s) |
|---|---|---|
| one setting (+ MAGIC-DPO, 1 seed), cold cache | {extracted_one} | {one_setting:.1f} |
| completing the cache: the 3 other synthetic sets (once) | {extracted_rest} | {fill_time:.1f} |
| 5 settings x 5 seeds, cached features (read from disk) | 0 | {comparison:.1f} |

Ratio (5 x 5 cached) / (one setting): **{ratio:.2f}** (target at most {TARGET}): {verdict} the target.
The seeds of a setting train side by side as one batched layer (`LinearProbes`), so 25 probes cost about
5 probe trainings. Mean test accuracy over seeds (toy images, for sanity only):
{", ".join(f"{s} {a:.2f}" for s, a in accuracies.items())}.
"""


if __name__ == "__main__":
    print(run())
