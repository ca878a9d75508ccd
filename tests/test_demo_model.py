"""The demo base model: its tokenizer, its schedule, the shipped asset (plain diffusers, <= 15 MB) and the
rebuild path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from magic_align.demo.model import (
    VOCABULARY_WORDS,
    DemoModelRecipe,
    build_tokenizer,
    build_vocabulary,
    captions_for,
    cosine_with_warmup,
    demo_model_dir,
    packaged_demo_model_dir,
    train_demo_model,
)
from magic_align.demo.procedural import CONDITIONS

ASSET_LIMIT_BYTES = 15 * 1024 * 1024


def test_every_vocabulary_word_is_one_token():
    tokenizer = build_tokenizer()
    for word in VOCABULARY_WORDS:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))  # <start> word <end>


def test_vocabulary_is_deterministic_and_small():
    first, second = build_vocabulary(), build_vocabulary()
    assert first == second
    vocab, merges = first
    assert all(word + "</w>" in vocab for word in VOCABULARY_WORDS)
    assert all(a + b in vocab for a, b in merges)
    assert len(vocab) < 1000  # a 64-wide embedding of < 1000 rows keeps the text encoder tiny


def test_unknown_words_fall_back_to_bytes_and_added_tokens_are_single():
    tokenizer = build_tokenizer()
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("zyxw").input_ids)
    assert len(pieces) > 3 and tokenizer.unk_token_id not in tokenizer("zyxw").input_ids[1:-1]
    before = len(tokenizer)
    assert tokenizer.add_tokens(["<demo-melanoma>"]) == 1
    ids = tokenizer("an image of <demo-melanoma> on human skin").input_ids
    assert len(tokenizer) == before + 1 and ids.count(before) == 1 and len(ids) == 9


def test_cosine_with_warmup_hand_values():
    assert cosine_with_warmup(0, 110, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 110, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 110, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(60, 110, 10) == pytest.approx(0.5)
    assert cosine_with_warmup(110, 110, 10) == pytest.approx(0.0)


def test_captions_are_generic():
    rng = np.random.default_rng(0)
    captions = captions_for(["healthy", "generic-lesion"] * 20, ["face", "trunk", "extremities", "face"] * 10, rng)
    assert any("lesion" in c for c in captions) and any("lesion" not in c for c in captions)
    assert any(c.endswith("on the arm") for c in captions)
    text = " ".join(captions)
    assert not any(condition.split("-")[0] in text for condition in CONDITIONS)


def test_unlabeled_lesions_are_described_by_their_looks_never_their_names():
    from magic_align.demo.model import LESION_LOOKS, VOCABULARY_WORDS

    assert set(LESION_LOOKS) == set(CONDITIONS)
    rng = np.random.default_rng(0)
    looks = list(CONDITIONS) * 40
    captions = captions_for(["generic-lesion"] * len(looks), ["trunk"] * len(looks), rng, looks)
    described = [c for c in captions if c.endswith("on skin") or "on skin on the" in c]
    assert 0.6 < len(described) / len(captions) < 0.9  # most described, some generic
    for condition in CONDITIONS:
        mine = [c for c, look in zip(captions, looks) if look == condition]
        assert any(LESION_LOOKS[condition]["colour"][0] in c or LESION_LOOKS[condition]["noun"][0] in c for c in mine)
    text = " ".join(captions)
    assert not any(part in text for condition in CONDITIONS for part in condition.split("-"))
    assert {word for c in captions for word in c.split()} <= set(VOCABULARY_WORDS)  # whole words of the tokenizer


# -------------------------------------------------------------------------------------- shipped asset
def test_shipped_model_is_fp16_and_small():
    folder = packaged_demo_model_dir()
    assert (folder / "model_index.json").exists(), f"the demo base model is missing from {folder}"
    total = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert total <= ASSET_LIMIT_BYTES, f"{total / 2**20:.1f} MB"
    for weights in folder.rglob("*.safetensors"):
        with safe_open(str(weights), framework="pt") as handle:
            dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
        assert dtypes == {"F16"}, (weights, dtypes)
    assert demo_model_dir() == folder


def test_shipped_model_loads_with_plain_diffusers_and_draws_64_px():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(packaged_demo_model_dir()), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    result = pipe("a photo of a skin lesion", num_inference_steps=4, guidance_scale=3.0, height=64, width=64,
                  generator=generator, output_type="np")
    image = result.images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert image.std() > 0.01  # not a constant image
    info = json.loads((packaged_demo_model_dir() / "training.json").read_text())
    assert "no condition name or token" in info["trained_on"]
    vocabulary = pipe.tokenizer.get_vocab()
    assert not any(token.startswith("<demo-") for token in vocabulary)  # finetune has to learn the conditions


@pytest.mark.slow
def test_rebuild_trains_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    recipe = DemoModelRecipe(images=16, shape_images=8, unlabeled_lesion_images=8, vae_steps=2, vae_batch=4,
                             unet_steps=2, unet_batch=4, warmup=1, decoder_steps=2)
    messages: list[str] = []
    folder = train_demo_model(tmp_path / "demo-base", recipe, log=messages.append)
    assert any("autoencoder" in m for m in messages) and not (tmp_path / "demo-base.partial").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    assert pipe.vae.config.scaling_factor > 0
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert json.loads((folder / "training.json").read_text())["recipe"]["unet_steps"] == 2

    # --codec-from: the autoencoder (weights and latent scale) comes from that build; only the denoiser trains
    messages.clear()
    again = train_demo_model(tmp_path / "demo-base-2", recipe, log=messages.append, codec_from=folder)
    assert any("reusing the autoencoder" in m for m in messages)
    assert not any("training the autoencoder" in m or "refining the decoder" in m for m in messages)
    from safetensors.torch import load_file

    before = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(again / "vae" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert StableDiffusionPipeline.from_pretrained(str(again)).vae.config.scaling_factor == pipe.vae.config.scaling_factor


def test_the_demo_preset_loads_the_packaged_model_through_its_model_source():
    from diffusers import StableDiffusionPipeline

    from magic_align.config import load_config
    from magic_align.diffusion.loading import load_pipeline

    pipe = load_pipeline(load_config("demo").model)
    packaged = StableDiffusionPipeline.from_pretrained(str(packaged_demo_model_dir()), dtype=torch.float32)
    assert packaged_demo_model_dir().parent.name == "demo"  # shipped inside the demo plug-in
    for name in ("unet", "vae", "text_encoder"):
        loaded, reference = getattr(pipe, name).state_dict(), getattr(packaged, name).state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[key], reference[key]) for key in loaded)
