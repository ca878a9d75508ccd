"""FID and KID between real and synthetic images, through torchmetrics, with pluggable features.

Features: "inception" (torchmetrics' FID Inception; needs the optional torch-fidelity package and its
weights, which it downloads on first use, so it is for connected machines), any backbone of
`backbones.py` ("efficientnet-lite0" works offline; "small-cnn" is for tests). Values from different
feature extractors are not comparable; the extractor is recorded next to every value.

Each image set is run through the extractor once (`extract_features`); the point values and the bootstrap
intervals feed those features to torchmetrics' metrics through an identity feature module, so the intervals
cost no further network passes (and a real set shared by several comparisons is extracted once).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from magic_align.backbones import Backbone, BackboneError, load_backbone, normalize, to_uint8_tensor
from magic_align.stats import Estimate, percentile_interval

INCEPTION_SIZE = 299


class FeatureModule(nn.Module):
    """uint8 images [N, 3, S, S] -> backbone features [N, D], frozen; the `feature=` module for torchmetrics."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.network = backbone.model.eval()
        self.num_features = backbone.dim
        self.input_size = backbone.image_size

    def train(self, mode: bool = True) -> "FeatureModule":
        return super().train(False)  # a feature extractor never leaves eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(normalize(images.to(self.backbone.device), self.backbone.mean, self.backbone.std)).float()


class PrecomputedFeatures(nn.Module):
    """Identity: lets torchmetrics compute FID/KID on features extracted earlier (bootstrap resamples)."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def load_feature_module(name: str, device: str | torch.device = "cpu", image_size: int | None = None) -> nn.Module:
    """The extractor for `evaluate.fid_features`: "inception" or a backbone name (at `image_size` px when given,
    else the backbone's own input size)."""
    if name == "inception":
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise BackboneError(
                "fid_features = 'inception' needs the torch-fidelity package and the FID Inception weights "
                "(downloaded on first use); neither is available here. Use fid_features = 'efficientnet-lite0' "
                "(offline; values are not comparable with published Inception FIDs)"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except Exception as error:  # the weights download failed (offline)
            raise BackboneError(f"could not load the FID Inception weights ({error}); use fid_features = "
                                "'efficientnet-lite0' offline") from None
        module.num_features = 2048
        module.input_size = INCEPTION_SIZE
        return module.to(device)
    return FeatureModule(load_backbone(name, device, image_size=image_size))


def images_to_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> uint8 [N, 3, size, size], the whole image squeezed to a square (no crop: FID compares
    whole images)."""
    return to_uint8_tensor([image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC) for image in images],
                           size, crop_fraction=1.0)


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' FID on precomputed features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), reset_real_features=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid_subset_size(n_real: int, n_fake: int, cap: int = 1000) -> int:
    """torchmetrics' default subset size is 1000; small sets use all of their smaller side."""
    return max(2, min(cap, n_real, n_fake))


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int, seed: int = 0) -> tuple[float, float]:
    """torchmetrics' KID (mean, std over subsets) on precomputed features."""
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "KID keeps all features in memory": known, features are small here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=kid_subset_size(len(real), len(fake)))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng():  # KID draws subsets from torch's global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


@dataclass
class DistanceResult:
    fid: Estimate
    kid: Estimate
    kid_std: float
    features: str
    n_real: int
    n_fake: int

    def as_dict(self) -> dict:
        return {"fid": self.fid.as_dict(), "kid": self.kid.as_dict(), "kid_std_over_subsets": self.kid_std,
                "features": self.features, "n_real": self.n_real, "n_fake": self.n_fake}


def extract_features(images: Sequence[Image.Image], module: nn.Module, batch_size: int = 32) -> torch.Tensor:
    """[len(images), D] float64 features of `images` through the extractor, in batches, on the CPU."""
    size = getattr(module, "input_size", INCEPTION_SIZE)
    with torch.no_grad():
        return torch.cat([module(images_to_batch(images[start : start + batch_size], size)).detach().double().cpu()
                          for start in range(0, len(images), batch_size)])


def image_distances(
    real_images: Sequence[Image.Image],
    fake_images: Sequence[Image.Image],
    features: str | nn.Module = "efficientnet-lite0",
    *,
    resamples: int = 100,
    kid_subsets: int = 50,
    seed: int = 0,
    confidence: float = 0.95,
    batch_size: int = 32,
    real_features: torch.Tensor | None = None,
) -> DistanceResult:
    """FID and KID of `fake_images` against `real_images`, with percentile bootstrap intervals over images
    (both sets resampled with replacement; `resamples` = 0 gives no interval). `real_features`, when given,
    are `extract_features(real_images, module)` from an earlier call, so one real set compared with several
    synthetic sets goes through the extractor once."""
    if len(real_images) < 2 or len(fake_images) < 2:
        raise ValueError(f"FID needs at least 2 images per set; got {len(real_images)} real and {len(fake_images)} "
                         "synthetic")
    module = load_feature_module(features) if isinstance(features, str) else features
    name = features if isinstance(features, str) else type(features).__name__
    real = extract_features(real_images, module, batch_size) if real_features is None else real_features
    fake = extract_features(fake_images, module, batch_size)
    fid_value = fid_from_features(real, fake)
    kid_value, kid_std = kid_from_features(real, fake, kid_subsets, seed)

    # Written out rather than through scipy.stats.bootstrap: the two sets are drawn alternately from one
    # generator and each resample's KID has its own subset seed, which scipy's batched draws cannot reproduce.
    rng = np.random.default_rng(seed)
    fid_draws, kid_draws = [], []
    for index in range(resamples):
        real_draw = real[torch.from_numpy(rng.integers(0, len(real), len(real)))]
        fake_draw = fake[torch.from_numpy(rng.integers(0, len(fake), len(fake)))]
        fid_draws.append(fid_from_features(real_draw, fake_draw))
        kid_draws.append(kid_from_features(real_draw, fake_draw, max(1, kid_subsets // 10), seed + index + 1)[0])
    return DistanceResult(
        fid=percentile_interval(fid_value, [d for d in fid_draws if np.isfinite(d)], confidence),
        kid=percentile_interval(kid_value, [d for d in kid_draws if np.isfinite(d)], confidence),
        kid_std=kid_std,
        features=name,
        n_real=len(real),
        n_fake=len(fake),
    )
