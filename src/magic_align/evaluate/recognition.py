"""Target recognition: a grader of generated images that never saw the judge.

A linear probe on the evaluate harness's frozen backbone (`evaluate.recognition_backbone`, else the first of
`evaluate.backbones`), trained on the run's *real* training images with their dataset labels, never on a judge's
verdicts. An image made for target condition c is *recognised* when the probe's most probable class is c; the
probe's probability of c is the softer form of the same measure. `magic compare` grades every image of the
alignment comparison with it (eval/alignment.json, `independent`), so a rise in items met can be checked against
something the model was not trained to please.

Generated images are not real ones: a small model's decoder blurs, shifts colours and loses fine detail, and a
probe that only ever saw clean images drifts on them (on the demo, towards the class of plain brown spots). With
`evaluate.recognition_augment = k`, the probe also trains on k degraded copies of every real training image
(Gaussian blur, down- and up-sampling, pixel noise, a small colour jitter; `random_degradation`), each keeping its
label: still real images and dataset labels only, never a verdict. `recognition_accuracy` reports the probe on
the clean real test images and on the same images after one fixed degradation (`TEST_DEGRADATION`, noise drawn
from its own stream), so a reader sees how far to trust it on generated images.

The probe is trained once per run and cached: `eval/recognition/<backbone>-<key>.safetensors`, the key a hash of
the backbone, the training images (content hashes and labels), the classes, the schedule and the augmentation;
features of the clean images come from the harness's feature cache (`eval/features/`), so `magic evaluate` and
`magic compare` extract each image once (the degraded copies are extracted when the probe is trained).

The artefact measure is KID per target condition: each setting's images made for condition c against the real
images of c the probe learned from, on the same backbone features, averaged over conditions weighted by image
count, with the change against the baseline bootstrapped over sources. KID, not FID: its estimator is unbiased,
so it stays meaningful with the few dozen real images a condition has, where FID of a 1280-d feature needs
thousands. Kernels are computed once per setting, so each bootstrap draw only sums them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from safetensors.torch import load_file, save_file

from magic_align.backbones import Backbone, load_backbone
from magic_align.config import RunConfig
from magic_align.data.images import load_image, sha256_file
from magic_align.errors import MagicError
from magic_align.evaluate.classifier import Example, FeatureCache, LinearProbes, Schedule, train_linear_probes
from magic_align.run import RunPaths, atomic_path
from magic_align.stats import bootstrap, cluster_bootstrap

FORMAT_VERSION = "1"
# bump when the degradations change: the key of every augmented probe changes with it
DEGRADATION_VERSION = "1"


class RecognitionError(MagicError, ValueError):
    """The recognition probe cannot be trained as asked (too few classes or images); the message says why."""


# ------------------------------------------------------------------------------------------- degradations
REFERENCE_SIDE = 64  # blur radii are given for an image of this short side and scale with the image


@dataclass(frozen=True)
class Degradation:
    """One label-preserving degradation of the kind a generator's decoder adds; identity by default."""

    blur: float = 0.0  # Gaussian blur radius in pixels of a REFERENCE_SIDE image
    downscale: float = 1.0  # shrink by this factor (box filter), then back up (bicubic): lost fine detail
    noise: float = 0.0  # standard deviation of Gaussian pixel noise, on the 0-255 scale
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


# the reported degraded test: a moderate version of each artefact at once, like a blurry 64-px sample
TEST_DEGRADATION = Degradation(blur=1.2, downscale=2.0, noise=3.0, brightness=0.97, contrast=0.92, saturation=0.9)
TRAIN_STREAM, TEST_STREAM = 11, 12  # random streams of the training copies and of the test degradation's noise


def random_degradation(rng: np.random.Generator) -> Degradation:
    """A random mix: usually blurred, often down/up-sampled or noisy, always slightly jittered in colour (mild
    and severe draws both, so the probe learns the classes across the range generated images fall in)."""
    return Degradation(
        blur=float(rng.uniform(0.3, 1.8)) if rng.uniform() < 0.75 else 0.0,
        downscale=float(rng.uniform(1.3, 3.0)) if rng.uniform() < 0.5 else 1.0,
        noise=float(rng.uniform(1.0, 8.0)) if rng.uniform() < 0.5 else 0.0,
        brightness=float(rng.uniform(0.9, 1.1)),
        contrast=float(rng.uniform(0.85, 1.1)),
        saturation=float(rng.uniform(0.8, 1.15)),
    )


def degrade(image: Image.Image, degradation: Degradation, rng: np.random.Generator) -> Image.Image:
    """The image after `degradation` (colour jitter, blur, down/up-sampling, noise, in that order); `rng` draws
    the noise."""
    image = image.convert("RGB")
    for enhancer, factor in ((ImageEnhance.Brightness, degradation.brightness),
                             (ImageEnhance.Contrast, degradation.contrast),
                             (ImageEnhance.Color, degradation.saturation)):
        if factor != 1.0:
            image = enhancer(image).enhance(factor)
    scale = min(image.size) / REFERENCE_SIDE
    if degradation.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(degradation.blur * scale))
    if degradation.downscale > 1.0:
        size = image.size
        small = (max(1, round(size[0] / degradation.downscale)), max(1, round(size[1] / degradation.downscale)))
        image = image.resize(small, Image.Resampling.BOX).resize(size, Image.Resampling.BICUBIC)
    if degradation.noise > 0:
        pixels = np.asarray(image, np.float32) + rng.normal(0.0, degradation.noise, (image.size[1], image.size[0], 3))
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image


def degraded_copies(images: Sequence[Image.Image], keys: Sequence[str], copies: int, seed: int) -> list[Image.Image]:
    """`copies` random degradations of each image (image-major: all copies of the first image, then the next);
    copy k of an image depends only on (seed, its key, k), never on which other images are in the set."""
    out = []
    for image, key in zip(images, keys):
        tag = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
        for copy in range(copies):
            rng = np.random.default_rng([seed, TRAIN_STREAM, tag, copy])
            out.append(degrade(image, random_degradation(rng), rng))
    return out


def fixed_degradation(images: Sequence[Image.Image], seed: int) -> list[Image.Image]:
    """Every image under `TEST_DEGRADATION`, its noise from a stream apart from the training copies'."""
    return [degrade(image, TEST_DEGRADATION, np.random.default_rng([seed, TEST_STREAM, index]))
            for index, image in enumerate(images)]


# ------------------------------------------------------------------------------------------------ probe
def fit_probe(backbone: Backbone, clean: torch.Tensor, labels: Sequence[int], load: Callable[[int], Image.Image],
              keys: Sequence[str], num_classes: int, schedule: Schedule, seed: int, augment: int) -> LinearProbes:
    """A linear probe on `clean` features [N, D] of real images with their `labels`, plus, when `augment` > 0,
    `augment` degraded copies of each image (`load(i)` reads image i; a batch at a time, so full-size images are
    never all in memory), each with its image's label. Every row counts as real: the standardisation and the
    batches see clean and degraded images alike."""
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    features = [clean]
    if augment > 0:
        for start in range(0, len(keys), schedule.batch_size):
            chunk = range(start, min(start + schedule.batch_size, len(keys)))
            copies = degraded_copies([load(i) for i in chunk], [keys[i] for i in chunk], augment, seed)
            features.append(backbone.features(copies, batch_size=schedule.batch_size))
        labels = torch.cat([labels, labels.repeat_interleave(augment)])
    schedule = Schedule(**{**schedule.__dict__, "rho": 0.0})  # real images only, never synthetic ones
    return train_linear_probes(torch.cat(features), labels, len(labels), num_classes, schedule, [seed])


def probe_probabilities(probe: LinearProbes, features: torch.Tensor) -> np.ndarray:
    """[N, C] class probabilities of [N, D] features."""
    if len(features) == 0:
        return np.zeros((0, probe.weight.shape[-1]))
    with torch.no_grad():
        return torch.softmax(probe(features)[0], -1).numpy()


@dataclass
class Recognizer:
    """A trained probe, its classes (index -> condition) and the feature cache it reads images through."""

    classes: list[str]
    probe: LinearProbes
    cache: FeatureCache
    backbone: str
    n_train: int
    key: str
    max_pixels: int | None = None
    augment: int = 0  # degraded copies per real training image it was trained with
    seed: int = 0

    def _examples(self, images: Sequence[Path]) -> list[Example]:
        return [Example(id=str(path), path=Path(path), label=-1, key=sha256_file(path)) for path in images]

    def features(self, images: Sequence[Path]) -> torch.Tensor:
        """[N, D] frozen features of the image files (cached by content)."""
        return self.cache.features(self._examples(images), self._load)

    def probabilities(self, images: Sequence[Path]) -> np.ndarray:
        """[N, C] class probabilities of the image files."""
        return probe_probabilities(self.probe, self.features(images) if images else torch.zeros((0, 1)))

    def image_probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[N, C] class probabilities of images in memory (not cached: degraded or freshly drawn ones)."""
        return probe_probabilities(self.probe, self.cache.backbone.features(list(images)) if images else torch.zeros((0, 1)))

    def grade(self, images: Sequence[Path], targets: Sequence[str]) -> list[tuple[int, float]]:
        """(recognised as its target: 0/1, probability of the target) per image."""
        probabilities = self.probabilities(images)
        return target_recognition(probabilities, [self.index(target) for target in targets])

    def grade_images(self, images: Sequence[Image.Image], targets: Sequence[str]) -> list[tuple[int, float]]:
        """`grade` for images in memory."""
        return target_recognition(self.image_probabilities(images), [self.index(target) for target in targets])

    def index(self, condition: str) -> int:
        if condition not in self.classes:
            raise RecognitionError(f"condition {condition!r} is not a class of the recognition probe "
                                   f"({', '.join(self.classes)}): it has no real training images")
        return self.classes.index(condition)

    def _load(self, path: Path):
        return _load(path, self.max_pixels)


def _load(path: Path, max_pixels: int | None):
    return load_image(path) if max_pixels is None else load_image(path, max_pixels)


def target_recognition(probabilities: np.ndarray, targets: Sequence[int]) -> list[tuple[int, float]]:
    """(argmax == target, probability of the target) for each row of [N, C] class probabilities."""
    probabilities = np.asarray(probabilities, float)
    return [(int(np.argmax(row) == target), float(row[target])) for row, target in zip(probabilities, targets)]


def recognizer_key(backbone_identity: str, classes: Sequence[str], examples: Sequence[Example], schedule: Schedule,
                   seed: int, augment: int = 0) -> str:
    """What a trained probe depends on: its backbone, classes, training images (by content), schedule and
    augmentation (the copies per image and the version of the degradations)."""
    payload = {"format": FORMAT_VERSION, "backbone": backbone_identity, "classes": list(classes), "seed": seed,
               "schedule": schedule.__dict__, "images": sorted((e.key, e.label) for e in examples)}
    if augment:  # absent when off, so the probes cached before augmentation existed keep their keys
        payload["augment"] = {"copies": augment, "degradations": DEGRADATION_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def train_recognizer(backbone: Backbone, cache_root: Path, examples: Sequence[Example], classes: Sequence[str],
                     schedule: Schedule, seed: int, store: Path | None = None,
                     max_pixels: int | None = None, augment: int = 0) -> Recognizer:
    """The probe of `examples` (real images, `label` = class index), loaded from `store` (a folder) when a probe
    of the same key is there, else trained and written there. `augment`: degraded copies per image (module
    docstring)."""
    present = sorted({e.label for e in examples})
    if len(present) < 2:
        raise RecognitionError(f"the recognition probe needs real training images of at least 2 conditions; got "
                               f"{len(examples)} image(s) of {len(present)}")
    schedule = Schedule(**{**schedule.__dict__, "rho": 0.0})  # real images only, never synthetic ones
    cache = FeatureCache(cache_root, backbone)
    key = recognizer_key(backbone.identity, classes, examples, schedule, seed, augment)
    file = Path(store) / f"{cache.folder.name}-{key}.safetensors" if store is not None else None

    def recognizer(probe: LinearProbes) -> Recognizer:
        return Recognizer(list(classes), probe.eval(), cache, backbone.name, len(examples), key, max_pixels,
                          augment, seed)

    if file is not None and file.is_file():
        state = load_file(str(file))
        probe = LinearProbes(state["mean"], state["std"], len(classes), [seed])
        probe.load_state_dict(state)
        return recognizer(probe)
    load = lambda path: _load(path, max_pixels)  # noqa: E731
    features = cache.features(list(examples), load, schedule.batch_size)
    probe = fit_probe(backbone, features, [e.label for e in examples], lambda i: load(examples[i].path),
                      [e.key for e in examples], len(classes), schedule, seed, augment)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as temporary:
            save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(temporary),
                      metadata={"classes": json.dumps(list(classes)), "backbone": backbone.identity,
                                "n_train": str(len(examples)), "augment": str(augment)})
    return recognizer(probe)


def run_recognizer(config: RunConfig, paths: RunPaths, train_records: Sequence, device: str = "cpu") -> Recognizer:
    """The run's recognition probe, trained on `train_records` (the split's real training images)."""
    evaluate = config.evaluate
    name = evaluate.recognition_backbone or evaluate.backbones[0]
    backbone = load_backbone(name, device, image_size=evaluate.image_size, pretrained=evaluate.backbone_paths.get(name),
                             seed=config.seed)
    classes = sorted({record.label for record in train_records})
    index = {label: i for i, label in enumerate(classes)}
    examples = [Example(r.id, Path(r.path), index[r.label], sha256_file(r.path)) for r in train_records]
    return train_recognizer(backbone, paths.eval / "features", examples, classes, Schedule.from_config(evaluate),
                            config.seed, store=paths.eval / "recognition", max_pixels=config.data.max_image_pixels,
                            augment=evaluate.recognition_augment)


def recognition_accuracy(recognizer: Recognizer, records: Sequence, resamples: int, seed: int) -> dict:
    """The probe's accuracy on real held-out images of its classes (how far the grader itself can be trusted):
    `accuracy` on the clean images, `degraded_accuracy` on the same images under `TEST_DEGRADATION` (how far it
    can be trusted on blurry generated ones)."""
    usable = [r for r in records if r.label in recognizer.classes]
    if not usable:
        return {"n": 0}
    targets = [r.label for r in usable]
    graded = recognizer.grade([Path(r.path) for r in usable], targets)
    degraded = recognizer.grade_images(fixed_degradation([recognizer._load(Path(r.path)) for r in usable], seed), targets)

    def accuracy(answers: list[tuple[int, float]]) -> dict:
        correct = np.array([recognised for recognised, _ in answers], float)
        return bootstrap(np.mean, correct, resamples=resamples, seed=seed).as_dict()

    return {"n": len(usable), "accuracy": accuracy(graded), "degraded_accuracy": accuracy(degraded),
            "degradation": TEST_DEGRADATION.__dict__, "augment": recognizer.augment}


# --------------------------------------------------------------------------------------------- artefacts
def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x . y / d + 1) ** 3 between the rows of x and y (d features)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def unbiased_mmd2(k_real: np.ndarray, k_fake: np.ndarray, k_cross: np.ndarray,
                  fake_rows: np.ndarray | None = None) -> float:
    """The unbiased squared MMD (KID) from precomputed kernels: real x real, fake x fake, real x fake. With
    `fake_rows` (a bootstrap draw of fake rows, repeats allowed) the fake side is those rows, and pairs of a row
    with a copy of itself are left out as the diagonal is (so a resample is not biased by its repeats)."""
    m = k_real.shape[0]
    real_term = (k_real.sum() - np.trace(k_real)) / (m * (m - 1))
    rows = np.arange(k_fake.shape[0]) if fake_rows is None else np.asarray(fake_rows)
    distinct = rows[:, None] != rows[None, :]
    if not distinct.any():
        return float("nan")
    fake_term = (k_fake[np.ix_(rows, rows)] * distinct).sum() / distinct.sum()
    return float(real_term + fake_term - 2.0 * k_cross[:, rows].mean())


@dataclass
class ConditionKernels:
    """The kernels of one target condition: its real reference images against themselves and the generated ones."""
    real: np.ndarray
    fake: np.ndarray
    cross: np.ndarray


def condition_kernels(real: Mapping[str, np.ndarray], fake: np.ndarray, fake_conditions: Sequence[str]
                      ) -> tuple[dict[str, ConditionKernels], np.ndarray, np.ndarray]:
    """The kernels of each target condition that has real images, the generated images' conditions, and each
    generated image's row within its condition's kernels: what `conditional_kid` reads."""
    conditions = np.asarray(list(fake_conditions))
    positions = np.zeros(len(conditions), dtype=int)
    kernels = {}
    for condition in sorted(set(conditions.tolist()) & set(real)):
        rows = np.flatnonzero(conditions == condition)
        positions[rows] = np.arange(len(rows))
        x, reference = fake[rows], real[condition]
        kernels[condition] = ConditionKernels(polynomial_kernel(reference, reference), polynomial_kernel(x, x),
                                              polynomial_kernel(reference, x))
    return kernels, conditions, positions


def conditional_kid(kernels: Mapping[str, ConditionKernels], conditions: np.ndarray, positions: np.ndarray,
                    rows: np.ndarray | None = None) -> tuple[float, dict[str, float]]:
    """KID of generated images against real images of their own target condition: per condition (at least 2
    images on each side) and their mean weighted by images (NaN when none). Image i is of `conditions[i]` and is
    row `positions[i]` of its condition's kernels; `rows` picks images (a bootstrap draw), all by default."""
    rows = np.arange(len(conditions)) if rows is None else np.asarray(rows)
    per_condition: dict[str, float] = {}
    weights: dict[str, int] = {}
    for condition, kernel in kernels.items():
        mine = rows[conditions[rows] == condition]
        if len(mine) < 2 or kernel.real.shape[0] < 2:
            continue
        value = unbiased_mmd2(kernel.real, kernel.fake, kernel.cross, positions[mine])
        if np.isfinite(value):
            per_condition[condition], weights[condition] = value, len(mine)
    total = sum(weights.values())
    if not total:
        return float("nan"), per_condition
    return sum(per_condition[c] * weights[c] / total for c in weights), per_condition


def artefact_measure(recognizer: Recognizer, reference_records: Sequence, images: Mapping[str, Mapping[str, str]],
                     targets: Mapping[str, str], root: Path, source_of: Mapping[str, str], baseline: str,
                     resamples: int, seed: int) -> dict:
    """KID to real images of each target condition, on the recognition backbone's features (the module
    docstring says why KID per condition): `settings` {setting: {kid, per_condition, n}} and `differences`
    {"<setting> - <baseline>": estimate}, each setting against the baseline on the units both have, with a
    bootstrap interval that resamples whole sources (a positive difference: further from the real images)."""
    by_condition: dict[str, list[Path]] = {}
    for record in reference_records:
        by_condition.setdefault(record.label, []).append(Path(record.path))
    real = {condition: recognizer.features(files).double().numpy() for condition, files in by_condition.items()}

    # each setting's features and kernels once, over all its units; the paired differences pick rows of them
    measured: dict[str, tuple[list[str], tuple]] = {}
    settings, differences = {}, {}
    for name, by_unit in images.items():
        units = sorted(by_unit)
        if len(units) < 2:
            continue
        fake = recognizer.features([root / by_unit[unit] for unit in units]).double().numpy()
        measured[name] = (units, condition_kernels(real, fake, [targets[unit] for unit in units]))
        value, per_condition = conditional_kid(*measured[name][1])
        settings[name] = {"kid": value, "per_condition": per_condition, "n": len(units)}
    for name in settings:
        if name == baseline or baseline not in settings:
            continue
        (ours_units, ours), (theirs_units, theirs) = measured[name], measured[baseline]
        units = sorted(set(ours_units) & set(theirs_units))
        ours_rows = np.searchsorted(ours_units, units)  # both unit lists are sorted
        theirs_rows = np.searchsorted(theirs_units, units)

        def change(picked: np.ndarray) -> float:
            return (conditional_kid(*ours, rows=ours_rows[picked])[0]
                    - conditional_kid(*theirs, rows=theirs_rows[picked])[0])

        differences[f"{name} - {baseline}"] = cluster_bootstrap(
            change, [source_of[unit] for unit in units], np.arange(len(units)), resamples=resamples, seed=seed
        ).as_dict()
    return {"settings": settings, "differences": differences}

