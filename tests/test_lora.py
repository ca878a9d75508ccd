import pytest
import torch
from safetensors import safe_open

from magic_align.config import ModelConfig
from magic_align.diffusion.loading import load_pipeline
from magic_align.diffusion.lora import (
    LORA_WEIGHTS_NAME,
    adapters_disabled,
    attach_lora,
    load_lora_adapters,
    merge_lora,
    save_lora,
    unload_lora,
)
from magic_align.diffusion.tokens import add_tokens, load_tokens, save_tokens


def unet_output(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    text = torch.randn(2, 6, 32, generator=gen)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([291, 11]), encoder_hidden_states=text).sample


def randomise_lora(unet):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def test_lora_round_trip_through_plain_diffusers(tiny_model_dir, tmp_path):
    local = ModelConfig(source="local", pretrained=str(tiny_model_dir))
    trained = load_pipeline(local)
    base_out = unet_output(trained)
    params = attach_lora(trained.unet, rank=4, alpha=8)
    assert params and all(p.requires_grad for p in params)
    assert torch.equal(unet_output(trained), base_out)  # B = 0 at init: the model is unchanged
    randomise_lora(trained.unet)
    trained_out = unet_output(trained)
    assert not torch.allclose(trained_out, base_out)
    file = save_lora(trained.unet, tmp_path / "lora")
    assert file.name == LORA_WEIGHTS_NAME
    with safe_open(str(file), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.startswith("unet.") for key in keys)
    assert {part for key in keys for part in ("to_q", "to_k", "to_v", "to_out.0") if part in key} == {"to_q", "to_k", "to_v", "to_out.0"}

    # plain diffusers, no project code: the same outputs (alpha 8 / rank 4 read from the metadata)
    plain = load_pipeline(local)
    plain.load_lora_weights(str(tmp_path / "lora"))
    assert torch.allclose(unet_output(plain), trained_out, atol=1e-5)

    # our loader, merge and unload
    ours = load_pipeline(local)
    load_lora_adapters(ours, [tmp_path / "lora"])
    assert torch.allclose(unet_output(ours), trained_out, atol=1e-5)
    merge_lora(ours)
    assert not any("lora_" in name for name, _ in ours.unet.named_parameters())
    assert torch.allclose(unet_output(ours), trained_out, atol=1e-4)
    again = load_pipeline(local)
    load_lora_adapters(again, [tmp_path / "lora"])
    unload_lora(again)
    assert torch.allclose(unet_output(again), base_out, atol=1e-6)


def test_adapters_disabled_gives_the_base_unet_and_restores_the_lora(tiny_model_dir):
    pipe = load_pipeline(ModelConfig(source="local", pretrained=str(tiny_model_dir), resolution=64))
    base = unet_output(pipe)
    attach_lora(pipe.unet, rank=4, alpha=8)
    randomise_lora(pipe.unet)
    adapted = unet_output(pipe)
    assert (adapted - base).abs().max() > 1e-4
    with adapters_disabled(pipe.unet):
        assert torch.allclose(unet_output(pipe), base, atol=1e-6)
    assert torch.equal(unet_output(pipe), adapted)
    with pytest.raises(RuntimeError):
        with adapters_disabled(pipe.unet):
            raise RuntimeError("a failure inside the block")
    assert torch.equal(unet_output(pipe), adapted)  # back on after the failure too


def test_missing_lora_folder_is_named(tiny_model_dir, tmp_path):
    pipe = load_pipeline(ModelConfig(source="local", pretrained=str(tiny_model_dir)))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        load_lora_adapters(pipe, [tmp_path / "nothing"])


def test_tokens_round_trip_through_plain_load_textual_inversion(tiny_model_dir, tmp_path):
    local = ModelConfig(source="local", pretrained=str(tiny_model_dir))
    pipe = load_pipeline(local)
    skin_ids = pipe.tokenizer("skin", add_special_tokens=False).input_ids
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, ["<xxxacnxxx>", "<xxxpsoxxx>"], init_word="skin")
    weights = pipe.text_encoder.get_input_embeddings().weight
    assert torch.allclose(weights[ids[0]], weights[skin_ids].mean(0))
    with torch.no_grad():
        weights[ids[1]] += 1.0  # as if trained
    files = save_tokens(pipe.tokenizer, pipe.text_encoder, ["<xxxacnxxx>", "<xxxpsoxxx>"], tmp_path / "tokens")
    assert len(files) == 2

    plain = load_pipeline(local)
    for file in files:
        plain.load_textual_inversion(str(file))
    prompt = "an image of <xxxpsoxxx> on human skin"
    ours = load_pipeline(local)
    assert sorted(load_tokens(ours, tmp_path / "tokens")) == ["<xxxacnxxx>", "<xxxpsoxxx>"]
    for other in (plain, ours):
        assert other.tokenizer(prompt).input_ids == pipe.tokenizer(prompt).input_ids
        loaded = other.text_encoder.get_input_embeddings().weight[other.tokenizer.convert_tokens_to_ids("<xxxpsoxxx>")]
        assert torch.allclose(loaded, weights[ids[1]])
    with pytest.raises(ValueError, match="already exist"):
        add_tokens(ours.tokenizer, ours.text_encoder, ["<xxxacnxxx>"])


def test_run_policy_loads_tokens_preliminary_and_extra_lora(tiny_model_dir, tmp_path):
    from magic_align.config import load_config
    from magic_align.diffusion.loading import load_run_policy
    from magic_align.run import RunPaths

    config = load_config("tiny", [f"runs_dir='{tmp_path}'", "model.source='local'", f"model.pretrained='{tiny_model_dir}'"])
    paths = RunPaths(config.run_dir)
    bare = load_run_policy(config, paths)
    bare_out = unet_output(bare)

    trainer = load_pipeline(config.model)
    add_tokens(trainer.tokenizer, trainer.text_encoder, ["<xxxacnxxx>"])
    save_tokens(trainer.tokenizer, trainer.text_encoder, ["<xxxacnxxx>"], paths.model / "tokens")
    attach_lora(trainer.unet, rank=4, alpha=4)
    randomise_lora(trainer.unet)
    save_lora(trainer.unet, paths.model / "lora")
    preliminary_out = unet_output(trainer)

    policy = load_run_policy(config, paths)
    assert "<xxxacnxxx>" in policy.tokenizer.get_vocab()
    assert torch.allclose(unet_output(policy), preliminary_out, atol=1e-5)
    assert policy.magic_model_hash != bare.magic_model_hash

    aligned = load_pipeline(config.model)
    attach_lora(aligned.unet, rank=4, alpha=4)
    with torch.no_grad():
        for name, param in aligned.unet.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    save_lora(aligned.unet, tmp_path / "aligned")
    stacked = load_run_policy(config, paths, extra_lora=tmp_path / "aligned")
    stacked_out = unet_output(stacked)
    assert not torch.allclose(stacked_out, preliminary_out) and not torch.allclose(stacked_out, bare_out)
    assert stacked.magic_model_hash not in {policy.magic_model_hash, bare.magic_model_hash}


NOISE_SCRIPT = """
import sys
from pathlib import Path

import torch

from magic_align.config import load_config
from magic_align.diffusion.loading import load_pipeline, load_run_policy
from magic_align.diffusion.lora import attach_lora, save_lora
from magic_align.diffusion.tokens import add_tokens, save_tokens
from magic_align.run import RunPaths

root = Path(sys.argv[1])
config = load_config("tiny", [f"runs_dir='{root}'"])
paths = RunPaths(config.run_dir)
trainer = load_pipeline(config.model)
add_tokens(trainer.tokenizer, trainer.text_encoder, ["<xxxacnxxx>"])
save_tokens(trainer.tokenizer, trainer.text_encoder, ["<xxxacnxxx>"], paths.model / "tokens")
attach_lora(trainer.unet, rank=4, alpha=4)
save_lora(trainer.unet, paths.model / "lora")
attach_lora(trainer.unet, rank=4, alpha=4, adapter_name="aligned")  # a trainer's adapter on top of the run's
save_lora(trainer.unet, root / "aligned", adapter_name="aligned")
load_run_policy(config, paths, extra_lora=root / "aligned")  # tokens + two stacked LoRAs
load_pipeline(config.model, dtype=torch.bfloat16)  # each module cast on its own
print("done")
"""


def test_loading_and_stacking_print_no_library_notices(tmp_path):
    """In a fresh process (the libraries warn once per process): none of the notices about things we don't use."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", NOISE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr
    for notice in ("requires torchvision", "No LoRA keys", "peft_config", "multivariate normal",
                   "should be kept in float32"):
        assert notice not in result.stderr, result.stderr
