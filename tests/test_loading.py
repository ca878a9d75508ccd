import pytest
import torch
from diffusers import DDIMScheduler

from magic_align.config import ModelConfig
from magic_align.diffusion.loading import ModelLoadError, build_tiny_pipeline, load_pipeline, model_hash


def test_tiny_pipeline_is_small_seeded_and_has_cross_attention():
    first, again, other = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    params = sum(p.numel() for p in first.unet.parameters())
    assert 300_000 < params < 2_000_000
    assert any("attn2" in name for name, _ in first.unet.named_modules())  # cross-attention to the prompt
    assert first.vae_scale_factor == 4
    for a, b in zip(first.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(first.unet.parameters()), next(other.unet.parameters()))
    # the local tokenizer covers prompt text without unknown tokens and fits the prompt in its context
    ids = first.tokenizer("an image of human skin").input_ids
    assert ids[0] == first.tokenizer.bos_token_id and ids[-1] == first.tokenizer.eos_token_id
    assert first.tokenizer.decode(ids, skip_special_tokens=True).strip() == "an image of human skin"
    assert len(ids) <= first.tokenizer.model_max_length


def test_local_folder_loads_the_same_weights_with_a_ddim_scheduler(tiny_model_dir):
    pipe = load_pipeline(ModelConfig(source="local", pretrained=str(tiny_model_dir)))
    reference = build_tiny_pipeline(0)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.set_alpha_to_one
    for a, b in zip(pipe.unet.parameters(), reference.unet.parameters()):
        assert torch.equal(a, b)
    assert not pipe.unet.training and not any(p.requires_grad for p in pipe.unet.parameters())


def test_tiny_source_and_dtype():
    pipe = load_pipeline(ModelConfig(source="tiny", resolution=64), dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    assert isinstance(pipe.scheduler, DDIMScheduler)


def test_missing_hub_model_says_what_to_download():
    config = ModelConfig(source="hub", pretrained="nobody/not-a-model", revision="abc123")
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(config, local_files_only=True)
    message = str(error.value)
    assert "hf download nobody/not-a-model --revision abc123\n" in message
    assert "hf download nobody/not-a-model --revision abc123 --local-dir /path/to/folder" in message
    assert "huggingface-cli" not in message
    assert "model.source=local" in message


def test_local_folder_without_model_index_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*model_index.json"):
        load_pipeline(ModelConfig(source="local", pretrained=str(tmp_path)))


def test_model_hash_changes_with_model_and_weights(tmp_path, tiny_model_dir):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"one")
    tiny = ModelConfig(source="tiny")
    base = model_hash(tiny)
    assert base == model_hash(ModelConfig(source="tiny"))
    assert base != model_hash(ModelConfig(source="tiny", seed=1))
    with_weights = model_hash(tiny, [weights])
    assert with_weights != base
    weights.write_bytes(b"two")
    assert model_hash(tiny, [weights]) != with_weights
    assert len(model_hash(ModelConfig(source="local", pretrained=str(tiny_model_dir)))) == 12
    assert model_hash(ModelConfig(pretrained="a/b", revision="1")) != model_hash(ModelConfig(pretrained="a/b", revision="2"))


def test_a_folder_saved_in_fp16_loads_whole_in_the_asked_dtype(tmp_path):
    # the demo model ships in fp16; every module, the text encoder included, must come back in float32
    pipe = build_tiny_pipeline(seed=0)
    pipe.to(torch.float16)
    pipe.save_pretrained(tmp_path / "fp16", safe_serialization=True)
    loaded = load_pipeline(ModelConfig(source="local", pretrained=str(tmp_path / "fp16")))
    assert {loaded.unet.dtype, loaded.vae.dtype, loaded.text_encoder.dtype} == {torch.float32}
