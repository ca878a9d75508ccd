"""The classifier harness: does synthetic data help a skin-disease classifier?

Two modes on a `Backbone` (`evaluate.mode`):

- **linear probe** (the default and the paper's protocol: linear classifiers on frozen features): the backbone is frozen; features are computed once per image and cached on disk under
  `run/eval/features/<backbone>/` (keyed by backbone identity + image content hash), so every seed and every
  setting after the first costs only the training of a linear layer;
- **fine-tune**: backbone + linear head trained end to end (a fresh backbone per seed); kept for comparison.

The training set is the real training images, optionally with a synthetic pool drawn at a fixed share `rho`
of every batch (paper: 0.2), as in the paper. Synthetic images never enter the test set, and a synthetic
image is kept for training only when its *source* image is a training image (and its source group, the
patient or case, has no image in the test set): `select_synthetic` enforces it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from magic_align.backbones import Backbone, to_uint8_tensor
from magic_align.run import atomic_path

ImageLoader = Callable[[Path], Image.Image]


@dataclass(frozen=True)
class Example:
    """One image as the harness sees it. For a synthetic image, `label` is its *target* condition and
    `group` / `source_id` are those of the real image it was made from."""

    id: str
    path: Path
    label: int
    key: str  # content hash of the image file: the feature cache key
    skin_type: int = -1
    group: str = ""
    source_id: str = ""
    synthetic: bool = False


@dataclass(frozen=True)
class Schedule:
    """Optimisation of one classifier run (paper: Adam lr 0.01, StepLR x0.1 every 50 epochs, 200 epochs)."""

    epochs: int = 200
    lr: float = 0.01
    optimizer: str = "adam"
    step_size: int = 50
    gamma: float = 0.1
    batch_size: int = 32
    rho: float = 0.2

    @classmethod
    def from_config(cls, evaluate) -> "Schedule":
        return cls(evaluate.epochs, evaluate.lr, evaluate.optimizer, evaluate.step_size, evaluate.gamma,
                   evaluate.batch_size, evaluate.rho)


@dataclass
class RunResult:
    """Predictions of one trained classifier on the test set."""

    seed: int
    y_true: np.ndarray
    y_pred: np.ndarray
    skin_types: np.ndarray
    n_real: int
    n_synthetic: int


# ------------------------------------------------------------------------------------------------ leakage
def select_synthetic(
    synthetic: Sequence[Example],
    held_out: Sequence[Example],
    allowed_sources: set[str] | None = None,
) -> tuple[list[Example], dict[str, int]]:
    """The synthetic images that may be used for training, and counts of those dropped and why.

    A synthetic image belongs to its source's side of the split: it is dropped when its source image, or any
    image of its source's group, is held out (validation or test). With `allowed_sources`, only sources in
    that set are accepted (the training ids; in the few-shot setting with extra unlabeled sources, those too).
    """
    held_ids = {example.id for example in held_out}
    held_groups = {example.group for example in held_out if example.group}
    kept, dropped = [], {"source_held_out": 0, "group_held_out": 0, "source_not_allowed": 0}
    for example in synthetic:
        if example.source_id in held_ids:
            dropped["source_held_out"] += 1
        elif example.group and example.group in held_groups:
            dropped["group_held_out"] += 1
        elif allowed_sources is not None and example.source_id not in allowed_sources:
            dropped["source_not_allowed"] += 1
        else:
            kept.append(example)
    return kept, dropped


def _check_no_leakage(train: Sequence[Example], synthetic: Sequence[Example], test: Sequence[Example]) -> None:
    synthetic_in_test = [example.id for example in test if example.synthetic]
    if synthetic_in_test:
        raise ValueError(f"synthetic images must never be tested on; found {synthetic_in_test[:5]} in the test set")
    test_keys = {example.key for example in test}
    overlap = [example.id for example in list(train) + list(synthetic) if example.key in test_keys]
    if overlap:
        raise ValueError(f"images {overlap[:5]} are both in training and in the test set (same file content)")
    _, dropped = select_synthetic(synthetic, test)
    if dropped["source_held_out"] or dropped["group_held_out"]:
        raise ValueError(f"synthetic images made from test images would enter training ({dropped}); filter them "
                         "with select_synthetic first")


# ------------------------------------------------------------------------------------------------ batches
def synthetic_per_batch(batch_size: int, rho: float) -> int:
    """How many of a batch's slots go to synthetic images: round(rho x batch), at least 1 when rho > 0, and
    always leaving one real slot."""
    if rho <= 0:
        return 0
    return min(batch_size - 1, max(1, round(rho * batch_size)))


def mixed_batches(n_real: int, n_synthetic: int, batch_size: int, rho: float, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches over indices [0, n_real) (real) and [n_real, n_real + n_synthetic) (synthetic).

    Every real image appears once per epoch; each batch gets `synthetic_per_batch` synthetic images, drawn
    without replacement from a reshuffled pool (the pool wraps around when it runs out). The last, shorter
    batch keeps the same synthetic share.
    """
    k = synthetic_per_batch(batch_size, rho) if n_synthetic > 0 else 0
    real_per_batch = batch_size - k
    real_order = rng.permutation(n_real)
    pool: list[int] = []
    batches = []
    for start in range(0, n_real, real_per_batch):
        real = real_order[start : start + real_per_batch]
        want = k if len(real) == real_per_batch else round(len(real) * k / real_per_batch)
        chosen = []
        while len(chosen) < want:
            if not pool:
                pool = (n_real + rng.permutation(n_synthetic)).tolist()
            chosen.append(pool.pop())
        batches.append(np.concatenate([real, np.asarray(chosen, dtype=real.dtype)]))
    return batches


def make_optimizer(schedule: Schedule, parameters) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    parameters = list(parameters)
    if schedule.optimizer == "adam":
        optimizer = torch.optim.Adam(parameters, lr=schedule.lr)
    elif schedule.optimizer == "adamw":
        optimizer = torch.optim.AdamW(parameters, lr=schedule.lr)
    elif schedule.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=schedule.lr, momentum=0.9)
    else:
        raise ValueError(f"evaluate.optimizer = {schedule.optimizer!r}; expected adam, adamw or sgd")
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=schedule.step_size, gamma=schedule.gamma)


# ------------------------------------------------------------------------------------------ feature cache
class FeatureCache:
    """Frozen-backbone features on disk: `<root>/<backbone>/<shard>.safetensors`, one vector per image hash.

    Kept in memory once read, so the settings and seeds of one evaluation share one pass over the images.
    New features are appended as a new shard (written atomically), so an interrupted run keeps what it did.
    """

    def __init__(self, root: Path, backbone: Backbone):
        digest = hashlib.sha256(backbone.identity.encode()).hexdigest()[:12]
        self.folder = Path(root) / f"{backbone.name}-{digest}"
        self.backbone = backbone
        self.extracted = 0  # images run through the backbone by this object (for tests and benchmarks)
        self._vectors: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        if self._vectors is None:
            self._vectors = {}
            for shard in sorted(self.folder.glob("*.safetensors")):
                self._vectors.update(load_file(shard))
        return self._vectors

    def features(self, examples: Sequence[Example], loader: ImageLoader, batch_size: int = 32) -> torch.Tensor:
        """[len(examples), dim] features, extracting (and storing) only those not cached yet."""
        vectors = self._load()
        missing: dict[str, Path] = {}
        for example in examples:
            if example.key not in vectors and example.key not in missing:
                missing[example.key] = example.path
        if missing:
            keys = list(missing)
            new: dict[str, torch.Tensor] = {}
            for start in range(0, len(keys), batch_size):
                chunk = keys[start : start + batch_size]
                output = self.backbone.features([loader(missing[key]) for key in chunk], batch_size=batch_size)
                new.update({key: output[i].clone().contiguous() for i, key in enumerate(chunk)})
            self.folder.mkdir(parents=True, exist_ok=True)
            shard = self.folder / f"{len(list(self.folder.glob('*.safetensors'))):05d}-{keys[0][:8]}.safetensors"
            with atomic_path(shard) as temporary:
                save_file(new, str(temporary), metadata={"backbone": self.backbone.identity})
            vectors.update(new)
            self.extracted += len(new)
        if not examples:
            return torch.zeros((0, self.backbone.dim))
        return torch.stack([vectors[example.key] for example in examples])


# ---------------------------------------------------------------------------------------------- training
class LinearProbes(nn.Module):
    """One linear classifier per seed, trained side by side as one batched layer (weights [S, D, C]).

    Features are standardised with the real training features' statistics. Seeds never interact: each has its
    own init, its own batch order, and Adam updates element by element, so this equals S separate runs at
    the cost of about one (the cheap part of the linear-probe benchmark)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int, seeds: Sequence[int]):
        super().__init__()
        dim = len(mean)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        bound = 1 / math.sqrt(dim)  # nn.Linear's default init range
        weights, biases = [], []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            weights.append((torch.rand(dim, num_classes, generator=generator) * 2 - 1) * bound)
            biases.append((torch.rand(num_classes, generator=generator) * 2 - 1) * bound)
        self.weight = nn.Parameter(torch.stack(weights))  # [S, D, C]
        self.bias = nn.Parameter(torch.stack(biases).unsqueeze(1))  # [S, 1, C]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [S, B, D] (one batch per seed) or [B, D] (the same batch for all) -> logits [S, B, C]."""
        standardised = (features - self.mean) / self.std
        if standardised.dim() == 2:
            standardised = standardised.expand(self.weight.shape[0], -1, -1)
        return torch.baddbmm(self.bias, standardised, self.weight)


def train_linear_probes(
    features: torch.Tensor, labels: torch.Tensor, n_real: int, num_classes: int, schedule: Schedule,
    seeds: Sequence[int],
) -> LinearProbes:
    """Train one probe per seed on rows [0, n_real) (real) and [n_real, N) (synthetic, mixed in at share rho
    per batch)."""
    real = features[:n_real]
    std = real.std(0) if n_real > 1 else torch.ones(features.shape[1])
    # A feature constant over the real training images (a unit dead on this domain) carries no information
    # about the classes; dividing its value on other images (synthetic ones, test ones) by a tiny floor would
    # blow it up and let random weights decide. An infinite scale holds it at 0 everywhere.
    std = std.masked_fill(std <= 1e-6, float("inf"))
    probes = LinearProbes(real.mean(0), std, num_classes, seeds)
    optimizer, scheduler = make_optimizer(schedule, probes.parameters())
    rngs = [np.random.default_rng(seed) for seed in seeds]
    n_synthetic = len(features) - n_real
    for _ in range(schedule.epochs):
        # Every seed gets batches of the same sizes (they depend only on the counts), in its own order.
        epoch = [mixed_batches(n_real, n_synthetic, schedule.batch_size, schedule.rho, rng) for rng in rngs]
        for step in range(len(epoch[0])):
            index = torch.from_numpy(np.stack([batches[step] for batches in epoch]))  # [S, B]
            logits = probes(features[index])
            optimizer.zero_grad(set_to_none=True)
            # Sum over seeds of each seed's mean loss: every seed gets exactly its own gradient.
            loss = nn.functional.cross_entropy(logits.transpose(1, 2), labels[index], reduction="none").mean(1).sum()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return probes.eval()


class FinetuneClassifier(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.trunk = backbone.model
        self.head = nn.Linear(backbone.dim, num_classes).to(backbone.device)

    def forward(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_uint8(batch_uint8))


def train_finetune(
    backbone: Backbone, images: torch.Tensor, labels: torch.Tensor, n_real: int, num_classes: int,
    schedule: Schedule, seed: int,
) -> FinetuneClassifier:
    """Fine-tune backbone + head on uint8 images [N, 3, S, S] (real rows first), with random horizontal flips."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = FinetuneClassifier(backbone, num_classes)
    model.train()
    optimizer, scheduler = make_optimizer(schedule, model.parameters())
    loss_function = nn.CrossEntropyLoss()
    device = backbone.device
    for _ in range(schedule.epochs):
        for batch in mixed_batches(n_real, len(images) - n_real, schedule.batch_size, schedule.rho, rng):
            index = torch.from_numpy(batch)
            x = images[index]
            flip = torch.from_numpy(rng.random(len(batch)) < 0.5)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            optimizer.zero_grad(set_to_none=True)
            loss_function(model(x), labels[index].to(device)).backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


@torch.no_grad()
def _predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    outputs = [model(inputs[start : start + batch_size]).argmax(-1).cpu() for start in range(0, len(inputs), batch_size)]
    return torch.cat(outputs).numpy() if outputs else np.zeros(0, dtype=int)


def _labels(examples: Sequence[Example]) -> torch.Tensor:
    return torch.tensor([example.label for example in examples], dtype=torch.long)


def run_linear_probe(
    cache: FeatureCache, train: Sequence[Example], synthetic: Sequence[Example], test: Sequence[Example],
    num_classes: int, schedule: Schedule, seeds: Sequence[int], loader: ImageLoader,
) -> list[RunResult]:
    """One linear probe per seed on cached features (seeds trained side by side); test predictions of each."""
    _check_no_leakage(train, synthetic, test)
    features = cache.features(list(train) + list(synthetic) + list(test), loader, schedule.batch_size)
    n_train = len(train) + len(synthetic)
    train_features, test_features = features[:n_train], features[n_train:]
    labels = _labels(list(train) + list(synthetic))
    probes = train_linear_probes(train_features, labels, len(train), num_classes, schedule, seeds)
    with torch.no_grad():
        predictions = probes(test_features).argmax(-1).numpy()  # [S, N_test]
    return [_result(seed, test, predictions[k], len(train), len(synthetic)) for k, seed in enumerate(seeds)]


def run_finetune(
    make_backbone: Callable[[], Backbone], train: Sequence[Example], synthetic: Sequence[Example],
    test: Sequence[Example], num_classes: int, schedule: Schedule, seeds: Sequence[int], loader: ImageLoader,
) -> list[RunResult]:
    """Full fine-tuning, one fresh backbone per seed; images are decoded and resized once (uint8 in memory)."""
    _check_no_leakage(train, synthetic, test)
    size = make_backbone().image_size
    train_images = _decode(list(train) + list(synthetic), loader, size)
    test_images = _decode(test, loader, size)
    labels = _labels(list(train) + list(synthetic))
    results = []
    for seed in seeds:
        model = train_finetune(make_backbone(), train_images, labels, len(train), num_classes, schedule, seed)
        results.append(_result(seed, test, _predict(model, test_images), len(train), len(synthetic)))
    return results


def _decode(examples: Sequence[Example], loader: ImageLoader, size: int, chunk: int = 64) -> torch.Tensor:
    parts = [to_uint8_tensor([loader(e.path) for e in examples[start : start + chunk]], size)
             for start in range(0, len(examples), chunk)]
    return torch.cat(parts) if parts else torch.zeros((0, 3, size, size), dtype=torch.uint8)


def restrict(result: RunResult, indices: Sequence[int]) -> RunResult:
    """The predictions of one run on part of its test images (one classifier, graded on two sets)."""
    index = np.asarray(indices, dtype=int)
    return RunResult(result.seed, result.y_true[index], result.y_pred[index], result.skin_types[index],
                     result.n_real, result.n_synthetic)


def _result(seed: int, test: Sequence[Example], y_pred: np.ndarray, n_real: int, n_synthetic: int) -> RunResult:
    return RunResult(
        seed=seed,
        y_true=np.array([example.label for example in test], dtype=int),
        y_pred=np.asarray(y_pred, dtype=int),
        skin_types=np.array([example.skin_type for example in test], dtype=int),
        n_real=n_real,
        n_synthetic=n_synthetic,
    )
