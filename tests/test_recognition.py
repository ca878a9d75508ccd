"""The recognition probe, the independent grader of `magic compare`: trained on real images of a hand-made domain
(one clearly different look per condition), it recognises images of the right condition and rejects images of a
wrong one; it is cached by what it was trained on; and the per-condition KID tells matched from mismatched sets."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchmetrics.image.kid import poly_mmd

from magic_align.backbones import load_backbone
from magic_align.data.images import sha256_file
from magic_align.evaluate.classifier import Example, Schedule
from magic_align.evaluate.recognition import (
    Degradation,
    RecognitionError,
    condition_kernels,
    conditional_kid,
    polynomial_kernel,
    unbiased_mmd2,
    degrade,
    degraded_copies,
    recognition_accuracy,
    recognizer_key,
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
    rng = np.random.default_rng(0)
    real = {"a": rng.normal(size=(30, 8)), "b": rng.normal(size=(30, 8)) + 3}
    fake = np.concatenate([rng.normal(size=(10, 8)), rng.normal(size=(10, 8)) + 3])
    matched, per_condition = conditional_kid(*condition_kernels(real, fake, ["a"] * 10 + ["b"] * 10))
    swapped, _ = conditional_kid(*condition_kernels(real, fake, ["b"] * 10 + ["a"] * 10))
    assert set(per_condition) == {"a", "b"}
    assert matched < 0.1 * swapped
    # a condition with one generated image (or no real images) is left out of the mean
    value, per_condition = conditional_kid(*condition_kernels(real, fake[:11], ["a"] * 10 + ["b"]))
    assert set(per_condition) == {"a"} and value == pytest.approx(per_condition["a"])
    assert np.isnan(conditional_kid(*condition_kernels(real, fake[:2], ["c", "c"]))[0])


def test_unbiased_mmd2_by_hand_and_against_torchmetrics():
    # 1-d features: k(x, y) = (x * y + 1) ** 3
    real, fake = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0], [0.0]])
    k = lambda u, v: (u * v + 1.0) ** 3
    real_term = 2 * k(0, 1) / 2  # the one off-diagonal pair, both orders, over m (m - 1)
    fake_term = 2 * (k(1, 2) + k(1, 0) + k(2, 0)) / 6
    cross = np.mean([k(r, f) for r in (0, 1) for f in (1, 2, 0)])
    kernels = [polynomial_kernel(real, real), polynomial_kernel(fake, fake), polynomial_kernel(real, fake)]
    assert unbiased_mmd2(*kernels) == pytest.approx(real_term + fake_term - 2 * cross)
    # a bootstrap draw with a repeated row leaves out the row paired with its own copy
    drawn = unbiased_mmd2(*kernels, fake_rows=np.array([0, 0, 1]))
    fake_drawn = 2 * (k(1, 2) + k(1, 2)) / 4  # of the 6 ordered pairs, the 2 of row 0 with its copy are left out
    cross_drawn = np.mean([k(r, f) for r in (0, 1) for f in (1, 1, 2)])
    assert drawn == pytest.approx(real_term + fake_drawn - 2 * cross_drawn)
    # torchmetrics' KID with one subset holding every image is the same estimator
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 16)), rng.normal(size=(12, 16)) + 0.5  # torchmetrics takes equal sizes
    ours = unbiased_mmd2(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    theirs = float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y)))
    assert ours == pytest.approx(theirs, rel=1e-9)


# ------------------------------------------------------------------------------------------- augmentation
def neighbour_difference(image: Image.Image) -> float:
    """Mean absolute difference of horizontally adjacent pixels: the fine detail a blur removes."""
    pixels = np.asarray(image, float)
    return float(np.abs(np.diff(pixels, axis=1)).mean())


def checkerboard(size: int = 64, cell: int = 2) -> Image.Image:
    y, x = np.mgrid[:size, :size]
    return Image.fromarray(np.where(((x // cell + y // cell) % 2)[..., None] == 0, 200, 60).astype(np.uint8).repeat(3, 2))


def test_the_identity_degradation_keeps_every_pixel():
    image = draw("red-spots", np.random.default_rng(1))
    assert np.array_equal(np.asarray(degrade(image, Degradation(), np.random.default_rng(0))), np.asarray(image))


def test_blur_and_down_up_sampling_remove_fine_detail_and_noise_has_its_size():
    board = checkerboard()
    sharp = neighbour_difference(board)  # 31 of a row's 63 steps cross a cell edge, each a step of 140
    assert sharp == pytest.approx(140 * 31 / 63)
    for degradation in (Degradation(blur=1.5), Degradation(downscale=4.0)):
        assert neighbour_difference(degrade(board, degradation, np.random.default_rng(0))) < 0.5 * sharp, degradation
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    noisy = np.asarray(degrade(grey, Degradation(noise=5.0), np.random.default_rng(0)), float)
    assert 4.5 < noisy.std() < 5.5 and abs(noisy.mean() - 128) < 0.5
    # the blur radius is given for a 64-px image and scales with the image: a 128-px board blurred by the same
    # setting keeps as much of its (twice as large) cells as the 64-px board keeps of its own
    # (up to PIL's approximation of a Gaussian, which differs a little between radii)
    big = checkerboard(128, 4)
    small_kept = neighbour_difference(degrade(board, Degradation(blur=1.0), np.random.default_rng(0))) / sharp
    big_kept = neighbour_difference(degrade(big, Degradation(blur=1.0), np.random.default_rng(0))) / neighbour_difference(big)
    assert big_kept == pytest.approx(small_kept, rel=0.25)
    unscaled = big.filter(ImageFilter.GaussianBlur(1.0))  # what a radius in pixels of any image would keep
    assert neighbour_difference(unscaled) / neighbour_difference(big) > 2 * big_kept


def test_a_degraded_copy_depends_on_its_image_never_on_the_others():
    rng = np.random.default_rng(2)
    first, second = draw("red-spots", rng), draw("blue-plain", rng)
    forward = degraded_copies([first, second], ["k1", "k2"], copies=2, seed=0)
    backward = degraded_copies([second, first], ["k2", "k1"], copies=2, seed=0)
    assert len(forward) == 4
    assert np.array_equal(np.asarray(forward[0]), np.asarray(backward[2]))
    assert np.array_equal(np.asarray(forward[1]), np.asarray(backward[3]))
    assert not np.array_equal(np.asarray(forward[0]), np.asarray(forward[1]))  # two copies, two draws
    other_seed = degraded_copies([first], ["k1"], copies=1, seed=1)
    assert not np.array_equal(np.asarray(forward[0]), np.asarray(other_seed[0]))


def test_augmentation_trains_on_labelled_copies_and_changes_the_cache_key(domain, backbone, tmp_path, monkeypatch):
    import magic_align.evaluate.recognition as recognition

    _, train, _ = domain
    plain = recognizer_key("b", CONDITIONS, train, SCHEDULE, 0)
    assert recognizer_key("b", CONDITIONS, train, SCHEDULE, 0, augment=0) == plain  # old cached probes stay valid
    assert recognizer_key("b", CONDITIONS, train, SCHEDULE, 0, augment=2) not in {plain, recognizer_key(
        "b", CONDITIONS, train, SCHEDULE, 0, augment=1)}
    seen = {}
    real_training = recognition.train_linear_probes

    def spy(features, labels, n_real, *args):
        seen.update(rows=len(features), labels=labels.tolist(), n_real=n_real)
        return real_training(features, labels, n_real, *args)

    monkeypatch.setattr(recognition, "train_linear_probes", spy)
    store = tmp_path / "recognition"
    augmented = train_recognizer(backbone, tmp_path / "features", train, CONDITIONS, SCHEDULE, 0, store=store, augment=2)
    labels = [e.label for e in train]
    assert seen["rows"] == seen["n_real"] == 3 * len(train)  # every copy counts as a real image
    assert seen["labels"] == labels + [label for label in labels for _ in range(2)]  # each copy keeps its label
    plain_probe = train_recognizer(backbone, tmp_path / "features", train, CONDITIONS, SCHEDULE, 0, store=store)
    assert augmented.key != plain_probe.key and len(list(store.glob("*.safetensors"))) == 2
    assert (augmented.augment, plain_probe.augment) == (2, 0)


def test_recognition_accuracy_on_clean_and_degraded_real_images(domain, backbone, tmp_path):
    from types import SimpleNamespace

    _, train, fresh = domain
    recognizer = train_recognizer(backbone, tmp_path, train, CONDITIONS, SCHEDULE, 0, augment=1)
    records = [SimpleNamespace(label=c, path=path) for c, paths in fresh.items() for path in paths]
    records.append(SimpleNamespace(label="purple", path=fresh["blue-plain"][0]))  # not a class: left out
    found = recognition_accuracy(recognizer, records, resamples=20, seed=0)
    assert found["n"] == 12 and found["augment"] == 1
    assert found["accuracy"]["value"] == 1.0  # the look of each condition is unmistakable here
    clean_only = recognizer.grade_images([Image.open(r.path) for r in records[:12]], [r.label for r in records[:12]])
    assert [hit for hit, _ in clean_only] == [1] * 12  # in-memory grading agrees with the cached path
    assert 0.0 <= found["degraded_accuracy"]["value"] <= 1.0
    assert found["degradation"]["blur"] > 0 and found["degradation"]["downscale"] > 1
