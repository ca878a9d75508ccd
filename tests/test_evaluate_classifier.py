"""Classifier harness: batches with a fixed synthetic share, no leakage, feature cache, learns a toy set."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magic_align.backbones import load_backbone
from magic_align.evaluate.classifier import (
    Example,
    FeatureCache,
    Schedule,
    mixed_batches,
    run_finetune,
    run_linear_probe,
    select_synthetic,
    synthetic_per_batch,
    train_linear_probes,
)
from magic_align.evaluate.metrics import accuracy


COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def _loader(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def toy_examples(folder: Path, n_per_class: int, seed: int, prefix: str, synthetic: bool = False,
                 sources: list[Example] | None = None) -> list[Example]:
    """Noisy solid-colour squares: class = colour. Separable by a linear probe on any sensible features."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for label, colour in enumerate(COLOURS):
        for index in range(n_per_class):
            array = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            path = folder / f"{prefix}-{label}-{index}.png"
            Image.fromarray(array).save(path)
            source = sources[(label * n_per_class + index) % len(sources)] if sources else None
            examples.append(Example(
                id=f"{prefix}-{label}-{index}", path=path, label=label,
                key=hashlib.sha256(path.read_bytes()).hexdigest(), skin_type=1 + index % 6,
                group=source.group if source else f"{prefix}-{label}-{index}",
                source_id=source.id if source else "", synthetic=synthetic,
            ))
    return examples


def test_synthetic_per_batch():
    assert synthetic_per_batch(32, 0.2) == 6  # round(6.4)
    assert synthetic_per_batch(10, 0.2) == 2
    assert synthetic_per_batch(4, 0.01) == 1  # at least one when rho > 0
    assert synthetic_per_batch(2, 0.9) == 1  # always one real slot
    assert synthetic_per_batch(32, 0.0) == 0


def test_mixed_batches_keep_the_share_and_cover_real_once():
    rng = np.random.default_rng(0)
    batches = mixed_batches(n_real=40, n_synthetic=7, batch_size=10, rho=0.2, rng=rng)
    real = np.concatenate([b[b < 40] for b in batches])
    assert sorted(real.tolist()) == list(range(40))  # each real image once per epoch
    for batch in batches:
        assert len(batch) == 10 and (batch >= 40).sum() == 2
    synthetic = np.concatenate([b[b >= 40] for b in batches])
    # 10 synthetic draws from a pool of 7: all seven used before any repeats
    assert set(synthetic[:7].tolist()) == set(range(40, 47))
    assert all(len(b) == 7 for b in mixed_batches(21, 0, 7, 0.2, rng))  # no pool: all real


def test_select_synthetic_follows_the_source_split():
    train = [Example(f"r{i}", Path(f"r{i}.png"), 0, f"k{i}", group=f"patient{i}") for i in range(3)]
    test = [Example("t0", Path("t0.png"), 0, "kt0", group="patient9"),
            Example("t1", Path("t1.png"), 0, "kt1", group="patient2")]  # patient2 also has a training image
    synthetic = [
        Example("s0", Path("s0.png"), 1, "ks0", group="patient0", source_id="r0", synthetic=True),
        Example("s1", Path("s1.png"), 1, "ks1", group="patient9", source_id="t0", synthetic=True),
        Example("s2", Path("s2.png"), 1, "ks2", group="patient2", source_id="r2", synthetic=True),
        Example("s3", Path("s3.png"), 1, "ks3", group="other", source_id="x", synthetic=True),
    ]
    kept, dropped = select_synthetic(synthetic, test, allowed_sources={e.id for e in train})
    assert [e.id for e in kept] == ["s0"]
    assert dropped == {"source_held_out": 1, "group_held_out": 1, "source_not_allowed": 1}
    kept, _ = select_synthetic(synthetic, test)  # no allow-list: external sources are fine
    assert [e.id for e in kept] == ["s0", "s3"]


def test_harness_refuses_leaks(tmp_path):
    train = toy_examples(tmp_path / "train", 2, 0, "train")
    test = toy_examples(tmp_path / "test", 2, 1, "test")
    cache = FeatureCache(tmp_path / "features", load_backbone("small-cnn", image_size=32))
    schedule = Schedule(epochs=1, batch_size=4)
    from_test = toy_examples(tmp_path / "syn", 1, 2, "syn", synthetic=True, sources=test)
    with pytest.raises(ValueError, match="made from test images"):
        run_linear_probe(cache, train, from_test, test, 3, schedule, [0], _loader)
    synthetic_in_test = toy_examples(tmp_path / "syn2", 1, 3, "syn2", synthetic=True, sources=train)
    with pytest.raises(ValueError, match="never be tested on"):
        run_linear_probe(cache, train, [], test + synthetic_in_test, 3, schedule, [0], _loader)
    with pytest.raises(ValueError, match="same file content"):
        run_linear_probe(cache, train + test[:1], [], test, 3, schedule, [0], _loader)


def test_linear_probe_learns_a_separable_set_and_caches_features(tmp_path):
    train = toy_examples(tmp_path / "train", 8, 0, "train")
    test = toy_examples(tmp_path / "test", 6, 1, "test")
    synthetic = toy_examples(tmp_path / "syn", 4, 2, "syn", synthetic=True, sources=train)
    backbone = load_backbone("small-cnn", image_size=32)
    cache = FeatureCache(tmp_path / "features", backbone)
    schedule = Schedule(epochs=12, lr=0.02, step_size=8, batch_size=12, rho=0.25)
    results = run_linear_probe(cache, train, synthetic, test, 3, schedule, [0, 1], _loader)
    assert cache.extracted == len(train) + len(test) + len(synthetic)
    for result in results:
        assert accuracy(result.y_true, result.y_pred) >= 0.9
        assert result.n_real == 24 and result.n_synthetic == 12
    # The same images again: nothing extracted, in this object or in a fresh one reading the disk.
    run_linear_probe(cache, train, [], test, 3, schedule, [2], _loader)
    fresh = FeatureCache(tmp_path / "features", backbone)
    again = run_linear_probe(fresh, train, synthetic, test, 3, schedule, [0], _loader)
    assert cache.extracted == len(train) + len(test) + len(synthetic) and fresh.extracted == 0
    assert (again[0].y_pred == results[0].y_pred).all()  # same seed, same features: same classifier


def test_labels_matter(tmp_path):
    # Shuffled training labels: the probe cannot beat chance by much (the test can fail if the harness leaks).
    train = toy_examples(tmp_path / "train", 8, 0, "train")
    rng = np.random.default_rng(0)
    shuffled = [Example(e.id, e.path, int(rng.integers(0, 3)), e.key, group=e.group) for e in train]
    test = toy_examples(tmp_path / "test", 10, 1, "test")
    cache = FeatureCache(tmp_path / "features", load_backbone("small-cnn", image_size=32))
    schedule = Schedule(epochs=12, lr=0.02, step_size=8, batch_size=12, rho=0.0)
    (result,) = run_linear_probe(cache, shuffled, [], test, 3, schedule, [0], _loader)
    assert accuracy(result.y_true, result.y_pred) < 0.8


def test_finetune_learns_a_separable_set(tmp_path):
    train = toy_examples(tmp_path / "train", 8, 0, "train")
    test = toy_examples(tmp_path / "test", 4, 1, "test")
    synthetic = toy_examples(tmp_path / "syn", 2, 2, "syn", synthetic=True, sources=train)
    schedule = Schedule(epochs=8, lr=0.005, step_size=6, batch_size=10, rho=0.2)
    results = run_finetune(lambda: load_backbone("small-cnn", image_size=32), train, synthetic, test, 3, schedule,
                           [0], _loader)
    assert accuracy(results[0].y_true, results[0].y_pred) >= 0.9


def test_seeds_trained_side_by_side_equal_separate_runs():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(30, 5)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 3, 30))
    schedule = Schedule(epochs=3, lr=0.05, step_size=2, batch_size=8, rho=0.25)
    together = train_linear_probes(features, labels, 24, 3, schedule, [0, 1, 2])
    alone = train_linear_probes(features, labels, 24, 3, schedule, [1])
    assert torch.allclose(together.weight[1], alone.weight[0], atol=1e-5)
    assert not torch.allclose(together.weight[0], together.weight[1])


def test_paper_classifier_is_a_linear_head_on_a_frozen_backbone_with_the_paper_schedule(tmp_path):
    from magic_align.config import load_config
    from magic_align.evaluate.classifier import make_optimizer

    evaluate = load_config("paper").evaluate
    assert evaluate.mode == "linear_probe" and load_config("tiny", ['evaluate.mode="finetune"']).evaluate.mode == "finetune"
    schedule = Schedule.from_config(evaluate)
    assert (schedule.optimizer, schedule.lr, schedule.epochs, schedule.rho) == ("adam", 0.01, 200, 0.2)
    optimizer, step_lr = make_optimizer(schedule, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.Adam)
    rates = []
    for _ in range(schedule.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step_lr.step()
    assert rates[0] == rates[49] == 0.01  # x0.1 every 50 epochs
    assert rates[50] == pytest.approx(1e-3) and rates[100] == pytest.approx(1e-4) and rates[199] == pytest.approx(1e-5)

    # the linear mode leaves the backbone's weights as they were; whole-backbone fine-tuning changes them
    train = toy_examples(tmp_path / "train", 4, 0, "train")
    test = toy_examples(tmp_path / "test", 2, 1, "test")
    small = Schedule(epochs=2, lr=0.01, step_size=1, batch_size=6, rho=0.0)
    backbone = load_backbone("small-cnn", image_size=32)
    before = {name: value.clone() for name, value in backbone.model.state_dict().items()}
    run_linear_probe(FeatureCache(tmp_path / "features", backbone), train, [], test, 3, small, [0], _loader)
    assert all(torch.equal(before[name], value) for name, value in backbone.model.state_dict().items())
    tuned = load_backbone("small-cnn", image_size=32)
    before = {name: value.clone() for name, value in tuned.model.state_dict().items()}
    run_finetune(lambda: tuned, train, [], test, 3, small, [0], _loader)
    assert any(not torch.equal(before[name], value) for name, value in tuned.model.state_dict().items())


def test_a_feature_constant_on_real_training_images_decides_nothing():
    # Two informative features and one that is constant (0) on every real training image; a synthetic image
    # or a test image with a large value there must not be pulled towards any class by it.
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 2, 40))
    informative = torch.from_numpy(rng.normal(size=(40, 2)).astype(np.float32)) + labels[:, None].float() * 4
    features = torch.cat([informative, torch.zeros(40, 1)], dim=1)
    features[30:, 2] = 50.0  # rows 30.. are synthetic: the dead feature varies only there
    schedule = Schedule(epochs=20, lr=0.05, step_size=50, batch_size=8, rho=0.25)
    probes = train_linear_probes(features, labels, 30, 2, schedule, [0])
    test = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1e4], [4.0, 4.0, 0.0], [4.0, 4.0, -1e4]])
    logits = probes(test)[0]
    assert torch.isfinite(logits).all()
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[2], logits[3])
    assert logits[0].argmax() == 0 and logits[2].argmax() == 1
