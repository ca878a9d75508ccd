"""UNet LoRA with peft, stored in the diffusers LoRA format.

`save_lora` writes `pytorch_lora_weights.safetensors` (keys `unet.<module>.lora_A.weight` ..., the layout
`StableDiffusionPipeline.save_lora_weights` produces) with the rank and alpha in the file's metadata, so plain
diffusers `pipe.load_lora_weights(folder)` loads it with the right scale (the authors' aligned LoRA was saved in a
format their loader silently ignored: docs/method.md section 11.1).
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from magic_align.config import LORA_TARGETS
from magic_align.diffusion.quiet import stable_diffusion_pipeline_class, stacking_adapters

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def lora_config(rank: int, alpha: float, targets: Sequence[str] = LORA_TARGETS, init: bool | str = "gaussian"):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init)


def attach_lora(
    unet,
    rank: int,
    alpha: float,
    adapter_name: str = "default",
    targets: Sequence[str] = LORA_TARGETS,
    init: bool | str = True,
) -> list:
    """Add a trainable LoRA adapter to every attention projection named in `targets`; returns its parameters.

    `init=True` (peft's default) starts with B = 0, so the model is unchanged until training moves it.
    """
    with stacking_adapters():  # a trainer's adapter may go on top of the run's preliminary LoRA
        unet.add_adapter(lora_config(rank, alpha, targets, init), adapter_name=adapter_name)
    if hasattr(unet, "set_adapter"):
        unet.set_adapter(adapter_name)
    parameters = adapter_parameters(unet, adapter_name)
    for param in parameters:
        param.requires_grad_(True)
    return parameters


def adapter_parameters(unet, adapter_name: str) -> list:
    """The LoRA weights (A and B) of one named adapter, in module order."""
    return [param for name, param in unet.named_parameters() if "lora_" in name and f".{adapter_name}." in name]


@contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """The UNet without its LoRA adapters inside the block (the model training started from), restored after it
    even when the block raises."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def lora_state_dict(unet, adapter_name: str = "default") -> dict:
    """The adapter's weights with diffusers' key names (no `unet.` prefix; `save_lora_weights` adds it)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return convert_state_dict_to_diffusers({key: value.detach().cpu().contiguous() for key, value in state.items()})


def save_lora(unet, folder: Path, adapter_name: str = "default") -> Path:
    """Write the adapter as `folder/pytorch_lora_weights.safetensors`; returns the file.

    Written into a temporary folder and moved into place, so a crash never leaves a half-written LoRA.
    """
    StableDiffusionPipeline = stable_diffusion_pipeline_class()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config[adapter_name]
    metadata = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
    }
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as staging:
        StableDiffusionPipeline.save_lora_weights(
            staging,
            unet_lora_layers=lora_state_dict(unet, adapter_name),
            safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )
        target = folder / LORA_WEIGHTS_NAME
        shutil.move(str(Path(staging) / LORA_WEIGHTS_NAME), str(target))
    return target


def lora_weights_file(path: Path) -> Path:
    """The weights file of a LoRA given as a folder or the file itself (clear error when absent)."""
    path = Path(path)
    file = path / LORA_WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA weights at {file} (expected a folder holding {LORA_WEIGHTS_NAME})")
    return file


def load_lora_adapters(pipe, folders: Sequence[Path], weights: Sequence[float] | None = None) -> list[str]:
    """Load LoRA folders into the pipeline as adapters `lora0`, `lora1`, ... and activate them all (stacked,
    weight 1 each unless `weights` says otherwise); returns the adapter names."""
    names = []
    for index, folder in enumerate(folders):
        file = lora_weights_file(Path(folder))
        name = f"lora{index}"
        # What `pipe.load_lora_weights` does, less its text-encoder half: our LoRAs are UNet-only, and asking
        # the text encoder for keys it cannot have only makes diffusers print a notice.
        state, network_alphas, metadata = pipe.lora_state_dict(
            str(file.parent), weight_name=file.name, return_lora_metadata=True
        )
        with stacking_adapters():
            pipe.load_lora_into_unet(
                state, network_alphas=network_alphas, unet=pipe.unet, adapter_name=name, metadata=metadata, _pipeline=pipe
            )
        names.append(name)
    pipe.set_adapters(names, adapter_weights=list(weights) if weights is not None else [1.0] * len(names))
    return names


def merge_lora(pipe) -> None:
    """Fold the active adapters into the base weights and drop the adapter layers (faster sampling)."""
    pipe.fuse_lora()
    pipe.unload_lora_weights()


def unload_lora(pipe) -> None:
    """Remove every adapter, restoring the base UNet."""
    pipe.unload_lora_weights()
