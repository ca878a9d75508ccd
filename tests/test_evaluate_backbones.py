"""Backbones: preprocessing, the offline EfficientNet-Lite0, the seeded small CNN, hub classes from local folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from magic_align.backbones import BackboneError, load_backbone, normalize, resize_and_crop


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_resize_and_crop_keeps_the_centre():
    # A wide image: left third red, middle third green, right third blue. The centre crop sees only green.
    array = np.zeros((64, 192, 3), dtype=np.uint8)
    array[:, :64, 0] = 255
    array[:, 64:128, 1] = 255
    array[:, 128:, 2] = 255
    crop = np.asarray(resize_and_crop(Image.fromarray(array), 32, crop_fraction=0.5))
    assert crop.shape == (32, 32, 3)
    assert crop[:, :, 1].min() > 200 and crop[:, :, 0].max() < 50 and crop[:, :, 2].max() < 50


def test_normalize_by_hand():
    batch = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(batch, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_small_cnn_is_seeded_and_shapes():
    images = [_image(80, 60, seed) for seed in range(3)]
    first = load_backbone("small-cnn", seed=1)
    again = load_backbone("small-cnn", seed=1)
    other = load_backbone("small-cnn", seed=2)
    features = first.features(images)
    assert features.shape == (3, first.dim)
    assert torch.allclose(features, again.features(images))
    assert first.identity == again.identity != other.identity
    assert not torch.allclose(features, other.features(images))
    assert first.preprocess(images).shape == (3, 3, first.image_size, first.image_size)


def test_efficientnet_lite0_loads_offline():
    backbone = load_backbone("efficientnet-lite0", image_size=64)
    features = backbone.features([_image(64, 64, 0), _image(70, 90, 1)])
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    # ImageNet weights, not a random init: the trunk's first conv is not at its default init scale.
    first_conv = backbone.model.network._conv_stem.weight
    assert first_conv.abs().max() > 1.0


@pytest.mark.parametrize("name", ["resnet-18", "dinov2", "vit-b16"])
def test_hub_backbones_load_from_a_local_folder(tmp_path, name):
    import transformers

    if name == "resnet-18":
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
        network = transformers.ResNetModel(config)
        dim = 16
    elif name == "dinov2":
        config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32, image_size=32, patch_size=8)
        network = transformers.Dinov2Model(config)
        dim = 16
    else:
        config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, image_size=32, patch_size=8)
        network = transformers.ViTModel(config, add_pooling_layer=False)
        dim = 16
    network.save_pretrained(tmp_path / name)
    backbone = load_backbone(name, image_size=32, pretrained=tmp_path / name)
    assert backbone.dim == dim
    assert backbone.features([_image(40, 40), _image(50, 30)]).shape == (2, dim)


def test_clear_errors():
    with pytest.raises(BackboneError, match="unknown backbone 'resnet-17'"):
        load_backbone("resnet-17")
    with pytest.raises(BackboneError, match="is not a folder"):
        load_backbone("resnet-18", pretrained="/nonexistent/resnet")
