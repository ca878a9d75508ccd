"""The recognition probe, the independent grader of `magic compare`: trained on real images of a hand-made domain
(one clearly different look per condition), it recognises images of the right condition and rejects images of a
wrong one; it is cached by what it was trained on; and the per-condition KID tells matched from mismatched sets."""

import numpy as np
import pytest
import torch
from PIL import Image

from magic_align.backbones import load_backbone
from magic_align.data.images import sha256_file
from magic_align.evaluate.classifier import Example, Schedule
from magic_align.evaluate.recognition import (
    RecognitionError,
    conditional_kid,
    target_recognition,
    train_recognizer,
)

CONDITIONS = ("red-spots", "green-stripes", "blue-plain")


def draw(condition: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A skin-toned square with the condition's look: red spots, green stripes, or a plain blue patch."""
    pixels = np.full((size, size, 3), (205, 160, 135), float) + rng.normal(0, 8, (size, size, 3))
    y, x = np.mgrid[:size, :size]
    if condition == "red-spots":
        for _ in range(6):
            cy, cx = rng.integers(6, size - 6, 2)
            pixels[(y - cy) ** 2 + (x - cx) ** 2 < 16] = (170, 20, 30)
    elif condition == "green-stripes":
        offset = rng.integers(0, 8)
        pixels[((x + offset) // 4) % 2 == 0] = (40, 150, 60)
    else:
        cy, cx = rng.integers(16, size - 16, 2)
        pixels[(abs(y - cy) < 12) & (abs(x - cx) < 12)] = (30, 60, 190)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save(folder, condition: str, index: int, rng) -> tuple:
    path = folder / f"{condition}-{index}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    draw(condition, rng).save(path)
    return path


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    """Real training images (8 per condition) and fresh images of each condition (4 each), as files."""
    root = tmp_path_factory.mktemp("recognition")
    rng = np.random.default_rng(0)
    train = [Example(f"{c}-{i}", path, CONDITIONS.index(c), sha256_file(path))
             for c in CONDITIONS for i in range(8) for path in [save(root / "train", c, i, rng)]]
    fresh = {c: [save(root / "fresh", c, i, rng) for i in range(4)] for c in CONDITIONS}
    return root, train, fresh


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("efficientnet-lite0", image_size=64)


SCHEDULE = Schedule(epochs=30, lr=0.01, step_size=30, batch_size=8)


def test_target_recognition_by_hand():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3]])
    assert target_recognition(probabilities, [0, 0, 2]) == [(1, 0.7), (0, 0.3), (0, 0.3)]


def test_recognises_the_right_condition_and_rejects_a_wrong_one(domain, backbone, tmp_path):
    _, train, fresh = domain
    recognizer = train_recognizer(backbone, tmp_path / "features", train, CONDITIONS, SCHEDULE, seed=0)
    for condition, images in fresh.items():
        right = recognizer.grade(images, [condition] * len(images))
        assert [hit for hit, _ in right] == [1] * len(images), condition
        assert min(probability for _, probability in right) > 0.5
        for other in CONDITIONS:
            if other == condition:
                continue
            wrong = recognizer.grade(images, [other] * len(images))
            assert [hit for hit, _ in wrong] == [0] * len(images), (condition, other)
            assert max(probability for _, probability in wrong) < 0.5


def test_the_probe_is_cached_by_what_it_was_trained_on(domain, backbone, tmp_path, monkeypatch):
    import magic_align.evaluate.recognition as recognition

    _, train, fresh = domain
    store = tmp_path / "recognition"
    first = train_recognizer(backbone, tmp_path / "features", train, CONDITIONS, SCHEDULE, 0, store=store)
    assert len(list(store.glob("*.safetensors"))) == 1
    images = fresh["red-spots"]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached probe was trained again")

    monkeypatch.setattr(recognition, "train_linear_probes", no_training)
    again = train_recognizer(backbone, tmp_path / "features", train, CONDITIONS, SCHEDULE, 0, store=store)
    assert again.key == first.key
    assert np.allclose(again.probabilities(images), first.probabilities(images))
    monkeypatch.undo()
    fewer = train_recognizer(backbone, tmp_path / "features", train[1:], CONDITIONS, SCHEDULE, 0, store=store)
    assert fewer.key != first.key and len(list(store.glob("*.safetensors"))) == 2


def test_one_condition_cannot_train_a_probe(domain, backbone, tmp_path):
    _, train, _ = domain
    with pytest.raises(RecognitionError, match="at least 2 conditions"):
        train_recognizer(backbone, tmp_path, [e for e in train if e.label == 0], CONDITIONS, SCHEDULE, 0)


def test_an_unknown_target_is_named(domain, backbone, tmp_path):
    _, train, fresh = domain
    recognizer = train_recognizer(backbone, tmp_path, train, CONDITIONS, SCHEDULE, 0)
    with pytest.raises(RecognitionError, match="'purple'"):
        recognizer.grade(fresh["blue-plain"][:1], ["purple"])


def test_conditional_kid_compares_each_image_with_real_images_of_its_target():
    generator = torch.Generator().manual_seed(0)
    real = {"a": torch.randn(30, 8, generator=generator), "b": torch.randn(30, 8, generator=generator) + 3}
    like_a, like_b = torch.randn(10, 8, generator=generator), torch.randn(10, 8, generator=generator) + 3
    fake = torch.cat([like_a, like_b])
    matched, per_condition = conditional_kid(real, fake, ["a"] * 10 + ["b"] * 10, subsets=5, seed=0)
    swapped, _ = conditional_kid(real, fake, ["b"] * 10 + ["a"] * 10, subsets=5, seed=0)
    assert set(per_condition) == {"a", "b"}
    assert matched < 0.1 * swapped
    # a condition with one generated image (or no real images) is left out of the mean
    value, per_condition = conditional_kid(real, fake[:11], ["a"] * 10 + ["b"], subsets=5, seed=0)
    assert set(per_condition) == {"a"} and value == pytest.approx(per_condition["a"])
    assert np.isnan(conditional_kid(real, fake[:2], ["c", "c"], subsets=5, seed=0)[0])
