"""Target recognition: a grader of generated images that never saw the judge.

A linear probe on the evaluate harness's frozen backbone (`evaluate.recognition_backbone`, else the first of
`evaluate.backbones`), trained on the run's *real* training images with their dataset labels, never on a judge's
verdicts. An image made for target condition c is *recognised* when the probe's most probable class is c; the
probe's probability of c is the softer form of the same measure. `magic compare` grades every image of the
alignment comparison with it (eval/alignment.json, `independent`), so a rise in items met can be checked against
something the model was not trained to please.

The probe is trained once per run and cached: `eval/recognition/<backbone>-<key>.safetensors`, the key a hash of
the backbone, the training images (content hashes and labels), the classes and the schedule; features come from
the harness's feature cache (`eval/features/`), so `magic evaluate` and `magic compare` extract each image once.

The artefact measure is KID per target condition: each setting's images made for condition c against the real
training images of c, on the same backbone features, averaged over conditions weighted by image count. KID, not
FID: its estimator is unbiased, so it stays meaningful with the few dozen real images a condition has, where FID
of a 1280-d feature needs thousands.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from magic_align.backbones import Backbone, load_backbone
from magic_align.config import RunConfig
from magic_align.data.images import load_image, sha256_file
from magic_align.errors import MagicError
from magic_align.evaluate.classifier import Example, FeatureCache, LinearProbes, Schedule, train_linear_probes
from magic_align.evaluate.fid import kid_from_features
from magic_align.run import RunPaths, atomic_path
from magic_align.stats import bootstrap

FORMAT_VERSION = "1"


class RecognitionError(MagicError, ValueError):
    """The recognition probe cannot be trained as asked (too few classes or images); the message says why."""


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

    def _examples(self, images: Sequence[Path]) -> list[Example]:
        return [Example(id=str(path), path=Path(path), label=-1, key=sha256_file(path)) for path in images]

    def features(self, images: Sequence[Path]) -> torch.Tensor:
        """[N, D] frozen features of the image files (cached by content)."""
        return self.cache.features(self._examples(images), self._load)

    def probabilities(self, images: Sequence[Path]) -> np.ndarray:
        """[N, C] class probabilities of the image files."""
        if not images:
            return np.zeros((0, len(self.classes)))
        with torch.no_grad():
            logits = self.probe(self.features(images))[0]
        return torch.softmax(logits, -1).numpy()

    def grade(self, images: Sequence[Path], targets: Sequence[str]) -> list[tuple[int, float]]:
        """(recognised as its target: 0/1, probability of the target) per image."""
        probabilities = self.probabilities(images)
        return target_recognition(probabilities, [self.index(target) for target in targets])

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
                   seed: int) -> str:
    """What a trained probe depends on: its backbone, classes, training images (by content) and schedule."""
    payload = {"format": FORMAT_VERSION, "backbone": backbone_identity, "classes": list(classes), "seed": seed,
               "schedule": schedule.__dict__, "images": sorted((e.key, e.label) for e in examples)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def train_recognizer(backbone: Backbone, cache_root: Path, examples: Sequence[Example], classes: Sequence[str],
                     schedule: Schedule, seed: int, store: Path | None = None,
                     max_pixels: int | None = None) -> Recognizer:
    """The probe of `examples` (real images, `label` = class index), loaded from `store` (a folder) when a probe
    of the same key is there, else trained and written there."""
    present = sorted({e.label for e in examples})
    if len(present) < 2:
        raise RecognitionError(f"the recognition probe needs real training images of at least 2 conditions; got "
                               f"{len(examples)} image(s) of {len(present)}")
    schedule = Schedule(**{**schedule.__dict__, "rho": 0.0})  # real images only, never synthetic ones
    cache = FeatureCache(cache_root, backbone)
    key = recognizer_key(backbone.identity, classes, examples, schedule, seed)
    file = Path(store) / f"{cache.folder.name}-{key}.safetensors" if store is not None else None

    def recognizer(probe: LinearProbes) -> Recognizer:
        return Recognizer(list(classes), probe.eval(), cache, backbone.name, len(examples), key, max_pixels)

    if file is not None and file.is_file():
        state = load_file(str(file))
        probe = LinearProbes(state["mean"], state["std"], len(classes), [seed])
        probe.load_state_dict(state)
        return recognizer(probe)
    features = cache.features(list(examples), lambda path: _load(path, max_pixels), schedule.batch_size)
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    probe = train_linear_probes(features, labels, len(examples), len(classes), schedule, [seed])
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as temporary:
            save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(temporary),
                      metadata={"classes": json.dumps(list(classes)), "backbone": backbone.identity,
                                "n_train": str(len(examples))})
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
                            config.seed, store=paths.eval / "recognition", max_pixels=config.data.max_image_pixels)


def recognition_accuracy(recognizer: Recognizer, records: Sequence, resamples: int, seed: int) -> dict:
    """The probe's accuracy on real held-out images of its classes (how far the grader itself can be trusted)."""
    usable = [r for r in records if r.label in recognizer.classes]
    if not usable:
        return {"n": 0}
    graded = recognizer.grade([Path(r.path) for r in usable], [r.label for r in usable])
    correct = np.array([recognised for recognised, _ in graded], float)
    return {"n": len(usable), "accuracy": bootstrap(np.mean, correct, resamples=resamples, seed=seed).as_dict()}


# --------------------------------------------------------------------------------------------- artefacts
def conditional_kid(real: Mapping[str, torch.Tensor], fake: torch.Tensor, fake_conditions: Sequence[str],
                    subsets: int, seed: int) -> tuple[float, dict[str, float]]:
    """KID of generated images against real images of their own target condition: per condition (at least 2
    images on each side), and their mean weighted by the generated images per condition (NaN when none)."""
    per_condition: dict[str, float] = {}
    weights: dict[str, int] = {}
    conditions = np.asarray(list(fake_conditions))
    for condition in sorted(set(fake_conditions)):
        rows = np.flatnonzero(conditions == condition)
        reference = real.get(condition)
        if reference is None or len(reference) < 2 or len(rows) < 2:
            continue
        per_condition[condition] = kid_from_features(reference.double(), fake[torch.from_numpy(rows)].double(),
                                                     subsets, seed)[0]
        weights[condition] = len(rows)
    if not weights:
        return float("nan"), per_condition
    total = sum(weights.values())
    return sum(per_condition[c] * weights[c] / total for c in weights), per_condition


def artefact_measure(recognizer: Recognizer, train_records: Sequence, images: Mapping[str, Mapping[str, str]],
                     targets: Mapping[str, str], root: Path, subsets: int, seed: int) -> dict:
    """{setting: {kid, per_condition, n}}: KID to the real training images of each target condition, on the
    recognition backbone's features (see the module docstring for why KID per condition)."""
    by_condition: dict[str, list[Path]] = {}
    for record in train_records:
        by_condition.setdefault(record.label, []).append(Path(record.path))
    real = {condition: recognizer.features(files) for condition, files in by_condition.items()}
    result = {}
    for name, by_unit in images.items():
        units = sorted(by_unit)
        if len(units) < 2:
            continue
        fake = recognizer.features([root / by_unit[unit] for unit in units])
        value, per_condition = conditional_kid(real, fake, [targets[unit] for unit in units], subsets, seed)
        result[name] = {"kid": value, "per_condition": per_condition, "n": len(units)}
    return result

