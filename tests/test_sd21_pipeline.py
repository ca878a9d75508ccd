"""The Stable Diffusion 2.1 architecture end to end on CPU (diffusion/architectures.py).

The reduced SD 2.1 models keep every structural feature of the published ones (linear-projection transformers,
head counts 5/10/20/20, cross-attention 1024 from a 1024-wide CLIP text encoder behind a 77-token CLIPTokenizer,
the 8x VAE, the shipped scheduler configuration), so the paper's path runs here as it would on the real model:
finetune -> sample at strength 0.3 with 100 steps -> pairs -> DPO (both objectives) -> RFT -> synthesize, for the
epsilon base model and the v-prediction 768 model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from magic_align.config import ConfigError, ModelConfig, load_config
from magic_align.diffusion.architecture_specs import ARCHITECTURES, REDUCED_TEXT_LAYERS, REDUCED_UNET, REDUCED_VAE
from magic_align.diffusion.architectures import build_architecture_pipeline
from magic_align.diffusion.loading import load_pipeline

BASE, V = "sd21-base-reduced", "sd21-768-v-reduced"
RESOLUTION = 64  # both reduced models run at 64 px here (8 x 8 latents), to keep the suite fast
I2I_TIMESTEPS = list(range(291, 0, -10))  # 100 DDIM steps at strength 0.3 with SD's steps_offset 1
JUDGE_ID = "test:judge"


# --------------------------------------------------------------------------------------------- structure
def test_sd21_full_size_components_have_the_published_parameter_counts():
    """The configurations written out in architectures.py give the published models' sizes (built on the meta
    device: no memory, no time)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    base, v = ARCHITECTURES["sd21-base"], ARCHITECTURES["sd21-768-v"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**base.unet)
        vae = AutoencoderKL(**base.vae)
        text = CLIPTextModel(CLIPTextConfig(**base.text_encoder))
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text.parameters()) == 340_387_840
    # the 768-v model: the same weights' shapes; other sample size, attention upcast, v-prediction, DDIM config
    assert {key for key in base.unet if base.unet[key] != v.unet[key]} == {"sample_size", "upcast_attention"}
    assert {key for key in base.vae if base.vae[key] != v.vae[key]} == {"sample_size"}
    assert v.text_encoder == base.text_encoder
    assert {key for key in base.scheduler if base.scheduler[key] != v.scheduler[key]} == {"prediction_type"}
    assert (base.prediction_type, v.prediction_type) == ("epsilon", "v_prediction")
    assert (base.scheduler_class, v.scheduler_class) == ("PNDMScheduler", "DDIMScheduler")


@pytest.mark.parametrize("name", [BASE, V])
def test_sd21_reduced_models_keep_the_structure_and_change_only_widths_and_depth(name):
    architecture = ARCHITECTURES[name]
    full = ARCHITECTURES[name.removesuffix("-reduced")]
    changed = {key for key in full.unet if full.unet[key] != architecture.unet[key]}
    assert changed == set(REDUCED_UNET)
    assert {key for key in full.vae if full.vae[key] != architecture.vae[key]} == set(REDUCED_VAE)
    changed_text = {key for key in full.text_encoder if full.text_encoder[key] != architecture.text_encoder[key]}
    assert changed_text == {"num_hidden_layers", "vocab_size"}
    assert dict(architecture.scheduler) == dict(full.scheduler) and architecture.scheduler_class == full.scheduler_class

    pipe = build_architecture_pipeline(name, resolution=RESOLUTION)
    unet, text, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    heads = [block.attentions[0].transformer_blocks[0].attn1.heads for block in unet.down_blocks if hasattr(block, "attentions")]
    assert heads == [5, 10, 20]
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 20
    widths = {block.attentions[0].transformer_blocks[0].attn1.inner_dim // h for block, h in zip(unet.down_blocks, heads)}
    assert widths == {8}  # every head the same width, as in the full model (64)
    first = unet.down_blocks[0].attentions[0]
    assert isinstance(first.proj_in, torch.nn.Linear)  # use_linear_projection
    assert first.transformer_blocks[0].attn2.to_k.in_features == 1024  # cross-attention to the 1024-wide text
    assert first.transformer_blocks[0].attn1.upcast_attention == (name == V)
    assert text.config.hidden_size == 1024 and text.config.hidden_act == "gelu" and text.config.projection_dim == 512
    assert text.config.num_hidden_layers == REDUCED_TEXT_LAYERS
    assert type(tokenizer).__name__ == "CLIPTokenizer" and tokenizer.model_max_length == 77 and tokenizer.pad_token == "!"
    assert pipe.vae_scale_factor == 8 and vae.config.latent_channels == 4 and vae.config.scaling_factor == 0.18215
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, RESOLUTION, RESOLUTION)).latent_dist.mean
    assert latents.shape == (1, 4, RESOLUTION // 8, RESOLUTION // 8)
    assert pipe.scheduler.config.steps_offset == 1


def test_sd21_architecture_source_loads_with_a_ddim_schedule_and_round_trips_through_a_folder(tmp_path):
    from diffusers import DDIMScheduler

    from magic_align.diffusion.loading import model_hash
    from magic_align.diffusion.sampler import sampling_timesteps

    config = ModelConfig(source="architecture", pretrained=BASE, resolution=RESOLUTION)
    pipe = load_pipeline(config)
    assert type(pipe.scheduler) is DDIMScheduler  # the shipped PNDM configuration, as DDIM
    assert sampling_timesteps(pipe.scheduler, 100, 0.3).tolist() == I2I_TIMESTEPS
    assert pipe.scheduler.config.prediction_type == "epsilon"
    v_pipe = load_pipeline(ModelConfig(source="architecture", pretrained=V, resolution=RESOLUTION))
    assert v_pipe.scheduler.config.prediction_type == "v_prediction"
    assert model_hash(config) != model_hash(ModelConfig(source="architecture", pretrained=V, resolution=RESOLUTION))

    pipe.save_pretrained(tmp_path / "model")
    local = load_pipeline(ModelConfig(source="local", pretrained=str(tmp_path / "model")))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = local.tokenizer(["an image of red skin"], padding="max_length", return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and int(ids[0, -1]) == local.tokenizer.convert_tokens_to_ids("!")
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
        assert torch.equal(local.text_encoder(ids)[0], embeds)
        assert torch.equal(local.unet(x, 291, encoder_hidden_states=embeds).sample,
                           pipe.unet(x, 291, encoder_hidden_states=embeds).sample)
    assert local.unet.config.use_linear_projection and list(local.unet.config.attention_head_dim) == [5, 10, 20, 20]


def test_sd21_unknown_architecture_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="sd21-base-reduced"):
        load_config("tiny", [f"runs_dir='{tmp_path}'", "model.source='architecture'", "model.pretrained='sd21-huge'"])


# ----------------------------------------------------------------------------------- v-prediction sampling
def test_sd21_v_prediction_steps_equal_diffusers_ddim_and_img2img():
    """On the v-prediction model, each DDIM step with log-prob equals DDIMScheduler.step bit for bit on the model's
    own outputs, and the sampler (fp32 storage) makes the image diffusers' img2img pipeline makes."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from magic_align.diffusion.ddim import ddim_step_with_log_prob, guided_noise_prediction
    from magic_align.diffusion.sampler import SampleRequest, SamplingSettings, sample_batch, tokenize_prompts

    pipe = load_pipeline(ModelConfig(source="architecture", pretrained=V, resolution=RESOLUTION))
    scheduler = pipe.scheduler
    scheduler.set_timesteps(100)
    epsilon_reading = type(scheduler).from_config({**scheduler.config, "prediction_type": "epsilon"})
    epsilon_reading.set_timesteps(100)
    ids = tokenize_prompts(pipe.tokenizer, ["an image of red skin", "a white patch"])
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
        uncond = pipe.text_encoder(tokenize_prompts(pipe.tokenizer, [""]))[0]
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=generator)
        for t in (291, 151, 11, 1):
            v = guided_noise_prediction(pipe.unet, x, t, cond, uncond, 5.0)
            noise = torch.randn(x.shape, generator=generator)
            expected = scheduler.step(v, t, x, eta=1.0, variance_noise=noise).prev_sample
            ours = ddim_step_with_log_prob(scheduler, v, t, x, 1.0, variance_noise=noise)
            assert torch.equal(ours.prev_sample, expected), t
            # the v-parameterised mean differs from the one the epsilon formula would give for the same output
            as_epsilon = ddim_step_with_log_prob(epsilon_reading, v, t, x, 1.0, variance_noise=noise)
            assert not torch.allclose(as_epsilon.mean, ours.mean)
            x = expected

    rng = np.random.default_rng(0)
    sources = [Image.fromarray(rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["an image of red skin", "a white patch"]
    settings = SamplingSettings(steps=20, strength=0.3, eta=1.0, guidance=5.0, latent_dtype="float32")
    ours = sample_batch(pipe, [SampleRequest(f"s{i}", p, 7 + i, s) for i, (p, s) in enumerate(zip(prompts, sources))],
                        settings, resolution=RESOLUTION)
    assert ours[0].timesteps.tolist() == [251, 201, 151, 101, 51, 1]
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = i2i(prompt=prompts, image=sources, strength=0.3, num_inference_steps=20, guidance_scale=5.0, eta=1.0,
                     generator=[torch.Generator().manual_seed(7 + i) for i in range(2)], output_type="np").images
    for result, image in zip(ours, theirs):
        ours_pixels = np.asarray(result.image, dtype=np.float32) / 255
        assert np.abs(ours_pixels - image).max() <= 1 / 255 + 1e-6  # the same image up to 8-bit rounding


# ------------------------------------------------------------------------------------------- end to end
def run_overrides(runs_dir, name, architecture, *extra):
    return [
        f"runs_dir='{runs_dir}'", f"name='{name}'",
        "model.source='architecture'", f"model.pretrained='{architecture}'", f"model.resolution={RESOLUTION}",
        "data.num_classes=2", "data.procedural_per_class=4",
        "finetune.ti_steps=1", "finetune.ti_batch_size=1", "finetune.lora_steps=1", "finetune.lora_batch_size=1",
        "finetune.lora_lr=1e-2",
        "sample.steps=100", "sample.strength=0.3", "sample.guidance=5.0", "sample.num_sources=2",
        "sample.samples_per_unit=2", "sample.batch_size=4",
        "dpo.iterations=1", "dpo.pairs_per_step=1", "dpo.checkpoint_every=1", "dpo.lr=1e-2",
        "rft.steps=1", "rft.batch_size=2", "rft.real_batch_size=1", "rft.reward_epochs=1", "rft.checkpoint_every=1",
        "rft.lr=1e-2",
        "synthesize.size=64", "synthesize.batch_size=4",
        *extra,
    ]


def judge_in_ledger(config):
    """Verdicts from a stand-in judge: in each unit the first sample meets 4 of 5 items, the second none, so every
    pair has a winner under the paper's rule."""
    from magic_align.checklists.schema import load_checklists
    from magic_align.judges.base import Verdict
    from magic_align.ledger import Ledger
    from magic_align.run import RunPaths

    paths = RunPaths(config.run_dir)
    checklists = load_checklists(config.judge.checklist)
    ledger = Ledger(paths.ledger)
    samples = ledger.samples(0)
    for sample in samples:
        items = [1, 1, 1, 1, 0] if sample.k == 0 else [0, 0, 0, 0, 0]
        checklist = checklists[sample.target_label]
        ledger.put_verdict(sample.image_sha256, JUDGE_ID, checklist.version, "none", Verdict(items=items),
                           condition=sample.target_label)
    ledger.close()
    return samples


@pytest.fixture(scope="module", params=[BASE, V])
def sd21_run(request, tmp_path_factory):
    """finetune -> sample (100 steps at 0.3) -> verdicts -> pairs, on one reduced SD 2.1 model."""
    from magic_align.feedback import run_pairs
    from magic_align.sample import run_sample
    from magic_align.train.finetune import run_finetune

    runs = tmp_path_factory.mktemp(f"sd21-{request.param}")
    config = load_config("tiny", run_overrides(runs, "base", request.param))
    run_finetune(config)
    run_sample(config, round_index=0, progress=False)
    samples = judge_in_ledger(config)
    summary = run_pairs(config, round_index=0, judge_id=JUDGE_ID)
    assert summary.one_wins == summary.pairs == 2
    return request.param, runs, samples


def copy_run(runs, name):
    shutil.copytree(runs / "base", runs / name)


def test_sd21_sampling_stores_the_i2i_timesteps_of_the_paper(sd21_run):
    from magic_align.diffusion.trajectories import TrajectoryStore
    from magic_align.run import RunPaths

    architecture, runs, samples = sd21_run
    paths = RunPaths(runs / "base")
    store = TrajectoryStore(paths.trajectories(0))
    assert len(samples) == 4
    for sample in samples:
        batch = store.get([sample.sample_id])
        assert batch.timesteps[0].tolist() == I2I_TIMESTEPS
        assert tuple(batch.latents.shape[1:]) == (31, 4, RESOLUTION // 8, RESOLUTION // 8)
        assert tuple(batch.prompt_ids.shape[1:]) == (77,)
    header = store.header(samples[0].sample_id)
    expected = ARCHITECTURES[architecture].prediction_type
    assert header["scheduler"]["class"] == "DDIMScheduler" and header["scheduler"]["prediction_type"] == expected
    assert header["strength"] == 0.3 and header["steps"] == 100


@pytest.mark.parametrize("objective", ["trajectory", "denoising"])
def test_sd21_dpo_starts_at_the_reference_and_its_lora_loads_in_plain_diffusers(sd21_run, objective):
    from magic_align.train.dpo import run_dpo
    from magic_align.train.session import read_metrics

    architecture, runs, _ = sd21_run
    name = f"dpo-{objective}"
    copy_run(runs, name)
    extra = [f"dpo.objective='{objective}'"] + (["dpo.denoising_beta=100.0"] if objective == "denoising" else [])
    config = load_config("tiny", run_overrides(runs, name, architecture, *extra))
    output = run_dpo(config)
    rows = read_metrics(config.run_dir / "logs" / "dpo" / "round-0" / "metrics.csv")
    assert [row["step"] for row in rows] == [1]
    # the policy starts as the preliminary model, the reference of the loss: log-ratio 0 at the first step
    assert rows[0]["mean_log_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["grad_norm"] > 0
    if objective == "trajectory":  # the denoising objective's LoRA has the same format
        assert_loads_in_plain_diffusers(config, output)
    else:
        assert (output / "pytorch_lora_weights.safetensors").is_file()


def assert_loads_in_plain_diffusers(config, aligned):
    """Base model saved as a diffusers folder, then plain diffusers' loaders: the tokens and the LoRAs load and each
    changes what the img2img pipeline makes."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image
    from safetensors.torch import load_file

    from magic_align.diffusion.quiet import stacking_adapters

    model_dir = config.run_dir.parent / f"{config.model.pretrained}-folder"
    if not model_dir.exists():
        build_architecture_pipeline(config.model.pretrained, seed=config.model.seed, resolution=RESOLUTION).save_pretrained(model_dir)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    token_files = sorted((config.run_dir / "model" / "tokens").glob("*.safetensors"))
    assert token_files
    init = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("skin</w>")].clone()
    pipe.load_textual_inversion([str(path) for path in token_files])
    tokens = dict(item for path in token_files for item in load_file(str(path)).items())
    for token, embedding in tokens.items():
        token_id = pipe.tokenizer.convert_tokens_to_ids(token)
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], embedding[0])
    # one training step moves only the tokens of the conditions in its batch away from their init word
    token = next(token for token, embedding in tokens.items() if not torch.equal(embedding[0], init))

    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8))

    def make(prompt):
        with torch.no_grad():
            return pipe(prompt=prompt, image=source, strength=0.3, num_inference_steps=20, guidance_scale=5.0,
                        generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    with_token = make(f"an image of {token} on human skin")
    assert np.abs(with_token - make("an image of skin on human skin")).max() > 0  # the token's own embedding
    pipe.load_lora_weights(str(config.run_dir / "model" / "lora"), adapter_name="preliminary")
    with stacking_adapters():  # peft warns about the second adapter, which is stacked on purpose
        pipe.load_lora_weights(str(aligned), adapter_name="aligned")
    pipe.set_adapters(["preliminary", "aligned"], [1.0, 1.0])
    assert np.abs(make(f"an image of {token} on human skin") - with_token).max() > 1e-4


def test_sd21_rft_then_synthesize(sd21_run):
    from magic_align.synthesize import run_synthesize
    from magic_align.train.rft import run_rft

    architecture, runs, _ = sd21_run
    copy_run(runs, "rft")
    config = load_config("tiny", run_overrides(runs, "rft", architecture))
    output = run_rft(config, judge_id=JUDGE_ID)
    summary = json.loads((output / "rft.json").read_text())
    assert summary["trajectories"] == 4
    assert_loads_in_plain_diffusers(config, output)

    manifest = run_synthesize(config, lora=output, out_dir=config.run_dir / "synthetic" / "magic-rft", progress=False)
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    from magic_align.data.split import run_split
    from magic_align.run import RunPaths

    train = run_split(config, RunPaths(config.run_dir)).train
    assert len(rows) == len(train) > 0
    for row in rows:
        assert row["target_label"] != row["source_label"]
        assert float(row["strength"]) == 0.3
        from PIL import Image

        with Image.open(config.run_dir / row["path"]) as image:
            assert image.size == (64, 64)
    hashes = {hashlib.sha256((config.run_dir / row["path"]).read_bytes()).hexdigest() for row in rows}
    assert len(hashes) == len(rows)
