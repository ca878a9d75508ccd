"""The demo base model: a small latent diffusion model that knows skin but not the demo conditions.

It is a real Stable Diffusion pipeline in diffusers format (AutoencoderKL + UNet2DConditionModel +
CLIPTextModel + CLIPTokenizer + DDIMScheduler), only tiny, trained from scratch on CPU on condition-free
procedural images (healthy skin and low-contrast generic lesions, `demo.procedural.generate_condition_free`)
with generic captions ("a photo of skin", "a photo of a skin lesion"), and on unlabeled lesions captioned by
how they look ("a photo of a small round dark spot on skin"), as Stable Diffusion knows colours and shapes.
The names of the six demo conditions never appear, so finetune has to learn their tokens and LoRA, and
DPO / RFT align them.

Recipe (what the demo's CPU prototype found to work): VAE (16, 32, 64) channels, 4x downsampling
(64 px -> 4 x 16 x 16), trained on 32 px random crops with MSE + 0.5 L1 + a tiny KL; latent scale = 1 / std;
UNet (32, 64, 128) with cross-attention only at the two lowest resolutions; a 2-layer CLIP text encoder of width 64 on a small
word-level vocabulary built here; UNet and text encoder trained jointly with AdamW, warm-up + cosine and EMA,
10 % empty captions so classifier-free guidance works.

The trained model ships in `magic_align/demo/demo-base/` (fp16 safetensors, < 15 MB). `demo_model_dir()`
returns it; if it is missing, the model is trained once into `~/.cache/magic-align/demo-base`.
Rebuild: `magic data demo-model --out DIR`. `DEMO_MODEL_SOURCE` is the model source `demo` (`model.source`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from magic_align.demo.procedural import CONDITIONS, condition_free_labels, render_arrays
from magic_align.diffusion.loading import ModelSource, folder_identity, load_local_folder, sd21_ddim_scheduler

MAX_TOKENS = 16
HIDDEN = 64

# The words the tokenizer knows as whole tokens; anything else falls back to byte-level pieces, and
# textual inversion adds its tokens on top.
VOCABULARY_WORDS = """
a an the of on in with and or at to by for from near over under without this that is are
photo image picture close up closeup view clinical dermoscopic dermatology medical
human skin lesion lesions patch patches spot spots mark rash area surface texture tone colour color
healthy normal clear smooth light dark pale white red pink brown tan black blue green grey gray purple
small large big tiny round oval irregular regular single multiple many several few cluster ring rings
border centre center edge raised flat scaly scale dry
face head scalp forehead cheek neck trunk chest back abdomen arm arms leg legs hand hands foot feet
limb limbs extremities elbow knee
type fitzpatrick i ii iii iv v vi 1 2 3 4 5 6
person patient body part
""".split()

CAPTIONS_HEALTHY = ("a photo of skin", "a photo of healthy skin", "an image of healthy human skin", "an image of skin")
CAPTIONS_LESION = (
    "a photo of a skin lesion",
    "an image of a lesion on human skin",
    "a photo of a lesion on skin",
    "an image of a skin lesion on human skin",
)
REGION_PHRASES = {"face": "on the face", "trunk": "on the trunk", "extremities": "on the arm"}

# What an unlabeled lesion looks like, in everyday visual words (never a condition name): Stable Diffusion
# knows "a red ring" or "white patches" from its captions but not what erythema multiforme or vitiligo is, and
# so does the demo base model. Without these words every lesion caption was the same, the text pathway of the
# UNet learned nothing but "lesion or not", and the condition tokens of finetune had nothing to steer.
# Each caption names a random subset of the parts (see `describe_lesion`), so every word is learned on its own.
LESION_LOOKS = {
    "melanoma": {"size": ("large",), "shape": ("irregular",), "colour": ("dark", "dark brown", "black and brown"),
                 "noun": ("spot", "patch"), "detail": ("with an irregular border",)},
    "nevus": {"size": ("small",), "shape": ("round",), "colour": ("dark", "brown"), "noun": ("spot",),
              "detail": ()},
    "acne": {"size": ("small",), "shape": ("many", "several", "a cluster of"), "colour": ("red", "pink"),
             "noun": ("spots",), "detail": ()},
    "erythema-multiforme": {"size": (), "shape": ("round",), "colour": ("red",), "noun": ("ring", "rings"),
                            "detail": ("with a dark centre", "with a pale ring")},
    "psoriasis": {"size": ("large",), "shape": ("oval",), "colour": ("red",), "noun": ("patch",),
                  "detail": ("with white scale", "with dry white scale")},
    "vitiligo": {"size": ("large", "few"), "shape": ("irregular",), "colour": ("white", "pale white"),
                 "noun": ("patches", "patch"), "detail": ()},
}
DESCRIBED_FRACTION = 0.75  # the rest of the unlabeled lesions keep a generic caption


@dataclass(frozen=True)
class DemoModelRecipe:
    seed: int = 0
    images: int = 3000
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_crop: int = 32
    # extra autoencoder images: condition-free skin with random shapes in random colours, so the codec keeps
    # saturated reds, whites and thin rings that condition-free skin alone never shows it
    shape_images: int = 1500
    # unlabeled lesions for the denoiser: images of the six conditions captioned by their looks or as "a skin
    # lesion", drawn from their own random stream (never the demo dataset's images): the model has seen
    # lesions and knows colours and shapes, never the conditions' names
    unlabeled_lesion_images: int = 6000
    # how many of the UNet's three resolutions (counted from the lowest) carry attention; 3 puts self- and
    # cross-attention at 16 x 16 too, where a ring or a row of scale streaks is laid out
    unet_attention_levels: int = 2
    unet_steps: int = 6000
    decoder_steps: int = 400
    unet_batch: int = 32
    unet_lr: float = 8e-4
    warmup: int = 50
    ema_decay: float = 0.998
    empty_caption_fraction: float = 0.1
    # 0 leaves torch's default; 1 is much faster on a machine whose cores are busy with other work
    # (spinning OpenMP threads waste most of their time there)
    torch_threads: int = 0


# ------------------------------------------------------------------------------------------ components
def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (the GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_vocabulary(words: list[str] = VOCABULARY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small byte-level BPE vocabulary: every byte (alone and word-final) plus merges learned on `words`.

    Merges are learned the usual way (repeatedly merge the most frequent adjacent pair; ties broken by the
    pair itself, so the result is deterministic) until every word is one symbol. Because BPE applies merges
    in the order they were learned, each listed word then tokenizes to exactly one token."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    # the listed words are lowercase ASCII, so their bytes are their characters
    segmented = [list(word[:-1]) + [word[-1] + "</w>"] for word in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for parts in segmented:
            for pair in zip(parts, parts[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for index, parts in enumerate(segmented):
            merged, position = [], 0
            while position < len(parts):
                if position + 1 < len(parts) and (parts[position], parts[position + 1]) == best:
                    merged.append(parts[position] + parts[position + 1])
                    position += 2
                else:
                    merged.append(parts[position])
                    position += 1
            segmented[index] = merged
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def build_tokenizer(max_length: int = MAX_TOKENS):
    from transformers import CLIPTokenizer

    vocab, merges = build_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_components(vocab_size: int, bos: int, eos: int, seed: int = 0, attention_levels: int = 2) -> dict:
    """Randomly initialised VAE, UNet, text encoder and the DDIM scheduler of the demo model.

    `attention_levels`: how many of the UNet's resolutions, from the lowest up, have attention blocks."""
    if not 0 <= attention_levels <= 3:
        raise ValueError(f"attention_levels must be 0-3, got {attention_levels}")
    down_blocks = tuple("CrossAttnDownBlock2D" if level >= 3 - attention_levels else "DownBlock2D" for level in range(3))
    up_blocks = tuple(block.replace("Down", "Up") for block in reversed(down_blocks))
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=down_blocks,
        up_block_types=up_blocks,
        cross_attention_dim=HIDDEN,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=4 * HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    scheduler = sd21_ddim_scheduler()
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "scheduler": scheduler}


def describe_lesion(looks: dict[str, tuple[str, ...]], rng: np.random.Generator) -> str:
    """A caption from a random subset of a lesion's looks, e.g. "a photo of round small dark spot on skin"."""
    def pick(part: str, chance: float) -> str:
        options = looks[part]
        return options[int(rng.integers(0, len(options)))] if options and rng.uniform() < chance else ""

    noun = looks["noun"][int(rng.integers(0, len(looks["noun"])))]
    words = [pick("shape", 0.6), pick("size", 0.5), pick("colour", 0.8), noun]
    phrase = " ".join(word for word in words if word)
    detail = pick("detail", 0.5)
    return f"a photo of {phrase}{' ' + detail if detail else ''} on skin"


def captions_for(labels: list[str], regions: list[str], rng: np.random.Generator,
                 looks: list[str | None] | None = None) -> list[str]:
    """Captions; half of them name the body region so a prompt can ask for one. `looks[i]` names the drawer of
    an unlabeled lesion (a key of `LESION_LOOKS`): most of those are described by how they look."""
    captions = []
    for index, (label, region) in enumerate(zip(labels, regions)):
        pool = CAPTIONS_LESION if label == "generic-lesion" else CAPTIONS_HEALTHY
        caption = pool[int(rng.integers(0, len(pool)))]
        look = looks[index] if looks is not None else None
        if look is not None and rng.uniform() < DESCRIBED_FRACTION:
            caption = describe_lesion(LESION_LOOKS[look], rng)
        if rng.uniform() < 0.5:
            caption = f"{caption} {REGION_PHRASES[region]}"
        captions.append(caption)
    return captions


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------- training
def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


UNLABELED_STREAM = 7  # random streams of the base model's own images, apart from the dataset's
SHAPES_STREAM = 8


def random_shapes(arrays: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Copies of `arrays` with 1-5 soft-edged discs, rings or dot clusters in random colours painted on.

    Teaches the autoencoder colours and thin structures in general, not any condition's look."""
    out = arrays.astype(np.float32).copy()
    size = arrays.shape[1]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for image in out:
        for _ in range(int(rng.integers(1, 6))):
            colour = rng.uniform(0, 255, 3)
            if rng.uniform() < 0.5:  # saturated: one channel pushed to an extreme
                colour[int(rng.integers(0, 3))] = rng.choice([0.0, 255.0])
            cy, cx = rng.uniform(8, size - 8, 2)
            ry, rx = rng.uniform(2, 16, 2)
            angle = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
            v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
            distance = np.sqrt(u * u + v * v)
            kind = rng.integers(0, 3)
            if kind == 0:  # filled disc
                alpha = np.clip((1.0 - distance) * min(rx, ry), 0, 1)
            elif kind == 1:  # ring
                alpha = np.clip((0.25 - np.abs(distance - 0.8)) * min(rx, ry) * 2, 0, 1)
            else:  # cluster of small dots
                alpha = np.zeros_like(xx)
                for _ in range(int(rng.integers(3, 9))):
                    py, px = cy + rng.uniform(-ry, ry), cx + rng.uniform(-rx, rx)
                    radius = rng.uniform(1.5, 3.5)
                    alpha = np.maximum(alpha, np.clip(radius - np.sqrt((yy - py) ** 2 + (xx - px) ** 2), 0, 1))
            image[:] = image * (1 - alpha[..., None]) + colour * alpha[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def train_vae(vae, images: torch.Tensor, recipe: DemoModelRecipe, log: Callable[[str], None]) -> None:
    """Train the autoencoder on random crops (4x cheaper than full images; it is fully convolutional)."""
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    vae.train()
    count, size = images.shape[0], images.shape[-1]
    crop = recipe.vae_crop
    started = time.time()
    for step in range(recipe.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.vae_lr * cosine_with_warmup(step, recipe.vae_steps, recipe.warmup)
        index = torch.randint(0, count, (recipe.vae_batch,), generator=generator)
        top, left = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=generator))
        batch = images[index, :, top : top + crop, left : left + crop]
        if torch.rand((), generator=generator) < 0.5:
            batch = batch.flip(-1)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        kl = posterior.kl().mean() / batch[0].numel()
        loss = F.mse_loss(reconstruction, batch) + 0.5 * F.l1_loss(reconstruction, batch) + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == recipe.vae_steps - 1:
            log(f"  vae step {step + 1}/{recipe.vae_steps}  loss {loss.item():.4f}  ({time.time() - started:.0f} s)")
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([vae.encode(images[i : i + batch]).latent_dist.mode() for i in range(0, len(images), batch)])


def refine_decoder(vae, images: torch.Tensor, latents: torch.Tensor, recipe: DemoModelRecipe, log: Callable[[str], None]) -> None:
    """Train the decoder alone on the frozen encoder's latents (as SD's improved VAE decoders were made).

    The latent space, and so the UNet trained on it, stays valid; only the pixels drawn from it get sharper.
    Crops are aligned to the 4x grid: a latent crop of crop/4 decodes to the matching pixel crop."""
    generator = torch.Generator().manual_seed(recipe.seed + 4)
    optimizer = torch.optim.AdamW(vae.decoder.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    for module in (vae.post_quant_conv, vae.decoder):
        module.train()
    factor = images.shape[-1] // latents.shape[-1]
    crop = recipe.vae_crop // factor
    started = time.time()
    for step in range(recipe.decoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.vae_lr * cosine_with_warmup(step, recipe.decoder_steps, recipe.warmup)
        index = torch.randint(0, len(latents), (recipe.vae_batch,), generator=generator)
        top, left = (int(v) for v in torch.randint(0, latents.shape[-1] - crop + 1, (2,), generator=generator))
        target = images[index, :, top * factor : (top + crop) * factor, left * factor : (left + crop) * factor]
        reconstruction = vae.decode(latents[index, :, top : top + crop, left : left + crop]).sample
        loss = F.mse_loss(reconstruction, target) + 0.5 * F.l1_loss(reconstruction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == recipe.decoder_steps - 1:
            log(f"  decoder step {step + 1}/{recipe.decoder_steps}  loss {loss.item():.4f}  ({time.time() - started:.0f} s)")
    vae.eval()


def train_denoiser(unet, text_encoder, scheduler, latents: torch.Tensor, token_ids: torch.Tensor, empty_ids: torch.Tensor,
                   recipe: DemoModelRecipe, log: Callable[[str], None]) -> None:
    """Train UNet and text encoder jointly on epsilon prediction, with EMA weights copied in at the end."""
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe.unet_lr, weight_decay=1e-4)
    ema = [p.detach().clone() for p in parameters]
    alphas = scheduler.alphas_cumprod.float()
    unet.train()
    text_encoder.train()
    started = time.time()
    for step in range(recipe.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.unet_lr * cosine_with_warmup(step, recipe.unet_steps, recipe.warmup)
        index = torch.randint(0, len(latents), (recipe.unet_batch,), generator=generator)
        x0 = latents[index]
        if torch.rand((), generator=generator) < 0.5:
            x0 = x0.flip(-1)
        ids = token_ids[index].clone()
        empty = torch.rand(recipe.unet_batch, generator=generator) < recipe.empty_caption_fraction
        ids[empty] = empty_ids
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.unet_batch,), generator=generator)
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        states = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=states).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        # EMA only after warm-up: the first steps are far from anything worth averaging
        decay = 0.0 if step < recipe.warmup else recipe.ema_decay
        with torch.no_grad():
            for average, parameter in zip(ema, parameters):
                average.mul_(decay).add_(parameter.detach(), alpha=1 - decay)
        if step % 50 == 0 or step == recipe.unet_steps - 1:
            log(f"  unet step {step + 1}/{recipe.unet_steps}  loss {loss.item():.4f}  ({time.time() - started:.0f} s)")
    with torch.no_grad():
        for average, parameter in zip(ema, parameters):
            parameter.copy_(average)
    unet.eval()
    text_encoder.eval()


def train_demo_model(out_dir: Path, recipe: DemoModelRecipe | None = None, log: Callable[[str], None] = _stderr,
                     codec_from: Path | None = None) -> Path:
    """Train the demo base model from scratch and save it (fp16 safetensors, diffusers format) to `out_dir`.

    `codec_from` takes the autoencoder (and its latent scale) of an earlier build of the same recipe instead of
    training it again: the codec does not depend on captions or the denoiser, and is most of the time
    (docs/demo.md has the measured times)."""
    from diffusers import StableDiffusionPipeline

    recipe = recipe or DemoModelRecipe()
    out_dir = Path(out_dir)
    started = time.time()
    if recipe.torch_threads:
        torch.set_num_threads(recipe.torch_threads)
    torch.manual_seed(recipe.seed)
    log(f"demo base model: drawing {recipe.images} condition-free and {recipe.unlabeled_lesion_images} unlabeled lesion images")
    labels = condition_free_labels(recipe.images, recipe.seed)
    arrays, drawings = render_arrays(labels, recipe.seed, size=64, stream=2)
    lesion_rng = np.random.default_rng([recipe.seed, UNLABELED_STREAM])
    lesion_labels = [CONDITIONS[int(i)] for i in lesion_rng.integers(0, len(CONDITIONS), recipe.unlabeled_lesion_images)]
    lesion_arrays, lesion_drawings = render_arrays(lesion_labels, recipe.seed, size=64, stream=UNLABELED_STREAM)
    arrays = np.concatenate([arrays, lesion_arrays])
    drawings = drawings + lesion_drawings
    looks = [None] * len(labels) + list(lesion_labels)  # how each unlabeled lesion looks, for its caption
    labels = labels + ["generic-lesion"] * len(lesion_labels)  # captions never name the condition
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    tokenizer = build_tokenizer()
    components = build_components(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, recipe.seed,
                                  recipe.unet_attention_levels)
    vae, unet, text_encoder, scheduler = (components[k] for k in ("vae", "unet", "text_encoder", "scheduler"))

    codec_images = None  # what the autoencoder trains on, when it is trained here
    if codec_from is not None:
        from diffusers import AutoencoderKL

        log(f"demo base model: reusing the autoencoder of {codec_from}")
        vae = AutoencoderKL.from_pretrained(Path(codec_from) / "vae", torch_dtype=torch.float32)
        scaling = float(vae.config.scaling_factor)
        latents = encode_latents(vae, images) * scaling
    else:
        shapes = random_shapes(arrays[: recipe.shape_images], np.random.default_rng([recipe.seed, SHAPES_STREAM]))
        codec_images = torch.cat([images, torch.from_numpy(shapes).permute(0, 3, 1, 2).float() / 127.5 - 1.0])
        log(f"demo base model: training the autoencoder ({recipe.vae_steps} steps on {recipe.vae_crop} px crops)")
        train_vae(vae, codec_images, recipe, log)
        latents = encode_latents(vae, images)
        scaling = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
        latents = latents * scaling
    vae_seconds = time.time() - started

    rng = np.random.default_rng([recipe.seed, 3])
    captions = captions_for(labels, [d.region for d in drawings], rng, looks)
    encode = lambda texts: tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    token_ids, empty_ids = encode(captions), encode([""])[0]
    log(f"demo base model: training the UNet and text encoder ({recipe.unet_steps} steps, latent scale {scaling:.3f})")
    train_denoiser(unet, text_encoder, scheduler, latents, token_ids, empty_ids, recipe, log)
    if recipe.decoder_steps and codec_images is not None:
        log(f"demo base model: refining the decoder on the frozen latents ({recipe.decoder_steps} steps)")
        refine_decoder(vae, codec_images, encode_latents(vae, codec_images), recipe, log)

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to(torch.float16)
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    pipeline.save_pretrained(staging, safe_serialization=True)
    total = time.time() - started
    (staging / "training.json").write_text(
        json.dumps(
            {
                "recipe": asdict(recipe),
                "latent_scaling_factor": scaling,
                "seconds": {"vae": round(vae_seconds, 1), "total": round(total, 1)},
                "codec_from": str(codec_from) if codec_from is not None else None,
                "torch_threads": torch.get_num_threads(),
                "trained_on": "condition-free procedural images (healthy skin, generic lesions) and unlabeled lesions "
                "of the six conditions captioned by how they look (colour, shape, size words) or only as skin "
                "lesions; no condition name or token",
            },
            indent=2,
        )
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)  # the folder appears only when complete
    log(f"demo base model: saved to {out_dir} in {total:.0f} s")
    return out_dir


# ------------------------------------------------------------------------------------------- location
def packaged_demo_model_dir() -> Path:
    return Path(str(resources.files("magic_align.demo") / "demo-base"))


def cache_demo_model_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "magic-align" / "demo-base"


def demo_model_dir(model_cfg: object | None = None, log: Callable[[str], None] = _stderr) -> Path:
    """The folder of the demo base model (loadable with `StableDiffusionPipeline.from_pretrained`).

    The packaged copy if present; otherwise a cached copy, trained on first use (several minutes).
    `model_cfg` (the run's `ModelConfig`) is accepted for the loader's call and not needed: there is one
    demo model."""
    packaged = packaged_demo_model_dir()
    if (packaged / "model_index.json").exists():
        return packaged
    cached = cache_demo_model_dir()
    if not (cached / "model_index.json").exists():
        log(
            f"the packaged demo base model is missing ({packaged}); training it once into {cached} "
            "(about an hour on 2 CPU cores)"
        )
        train_demo_model(cached, log=log)
    return cached


# registered as the model source "demo" by `magic_align.demo.register`
DEMO_MODEL_SOURCE = ModelSource(
    load=lambda model_cfg, dtype: load_local_folder(demo_model_dir(model_cfg), dtype),
    identity=lambda model_cfg: b"demo:" + folder_identity(demo_model_dir(model_cfg)),
)
