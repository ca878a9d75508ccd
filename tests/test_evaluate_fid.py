"""FID/KID: a set against itself is about 0; added noise makes both grow; intervals bracket the value."""

import numpy as np
import pytest
from PIL import Image

from magic_align.backbones import BackboneError
from magic_align.evaluate.fid import image_distances, kid_subset_size, load_feature_module


def _images(n, seed, noise=0.0, base_seed=0):
    base = np.random.default_rng(base_seed)
    rng = np.random.default_rng(seed)
    images = []
    for index in range(n):
        # Smooth colour gradients with a per-image tint: varied, but a coherent "domain".
        tint = base.uniform(40, 200, 3)
        ramp = np.linspace(0, 60, 32)[None, :, None]
        array = tint[None, None, :] + ramp + base.normal(0, 10, (32, 32, 3))
        array = array + rng.normal(0, noise, array.shape)
        images.append(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)))
    return images


def test_fid_self_is_zero_and_grows_with_noise():
    real = _images(40, seed=0)
    results = [image_distances(real, _images(40, seed=1, noise=noise), "small-cnn", resamples=10, kid_subsets=10)
               for noise in (0.0, 20.0, 60.0)]
    self_fid = results[0].fid.value
    assert abs(self_fid) < 1e-3 * max(1.0, results[1].fid.value)
    assert results[0].fid.value < results[1].fid.value < results[2].fid.value
    assert results[0].kid.value < results[1].kid.value < results[2].kid.value
    noisy = results[2]
    assert noisy.fid.low <= noisy.fid.value * 1.5 and noisy.fid.high >= noisy.fid.low
    assert noisy.as_dict()["features"] == "small-cnn" and noisy.n_real == 40


def test_small_sets_and_errors():
    assert kid_subset_size(5000, 20) == 20 and kid_subset_size(5000, 3000) == 1000
    with pytest.raises(ValueError, match="at least 2 images"):
        image_distances(_images(1, 0), _images(5, 0), "small-cnn", resamples=0)
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:  # the project never installs it; the message must say what to use instead
        with pytest.raises(BackboneError, match="torch-fidelity.*efficientnet-lite0"):
            load_feature_module("inception")


def test_precomputed_real_features_give_the_same_result():
    from magic_align.evaluate.fid import extract_features

    module = load_feature_module("small-cnn")
    real, fake = _images(12, seed=0), _images(12, seed=1, noise=30.0)
    fresh = image_distances(real, fake, module, resamples=3, kid_subsets=3).as_dict()
    reused = image_distances(real, fake, module, resamples=3, kid_subsets=3,
                             real_features=extract_features(real, module)).as_dict()
    assert fresh == reused


def test_fid_image_size_sets_the_backbone_input_and_is_refused_for_inception():
    from magic_align.config import ConfigError, load_config
    from magic_align.evaluate.fid import extract_features

    small = load_feature_module("small-cnn", image_size=32)
    assert small.input_size == 32
    assert load_feature_module("small-cnn").input_size == 64
    assert extract_features(_images(3, seed=0), small).shape[0] == 3
    with pytest.raises(ConfigError, match="fid_image_size"):
        load_config("tiny", ["evaluate.fid_features='inception'", "evaluate.fid_image_size=128"])
