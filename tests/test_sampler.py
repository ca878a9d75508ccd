import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from magic_align.config import ModelConfig
from magic_align.diffusion.ddim import ddim_step_with_log_prob, guided_noise_prediction
from magic_align.diffusion.loading import load_pipeline
from magic_align.diffusion.sampler import (
    SampleRequest,
    SamplingSettings,
    embed_prompt_ids,
    sample_batch,
    sampling_timesteps,
    tokenize_prompts,
)
from magic_align.diffusion.trajectories import TrajectoryError, TrajectoryStore, load_shard, read_header, write_shard


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(ModelConfig(source="local", pretrained=str(tiny_model_dir)))


def sources(count, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]


def requests(count=2, seed0=10):
    return [
        SampleRequest(f"s{i}", ["an image of red skin", "a white patch"][i % 2], seed0 + i, image)
        for i, image in enumerate(sources(count))
    ]


def test_timesteps_match_diffusers_img2img(pipe):
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    assert sampling_timesteps(scheduler, 100, 0.3).tolist() == list(range(291, 0, -10))
    assert sampling_timesteps(scheduler, 10, 0.5).tolist() == [401, 301, 201, 101, 1]
    assert sampling_timesteps(scheduler, 10, 1.0).tolist() == list(range(901, 0, -100))
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.scheduler.set_timesteps(100)
    expected, count = i2i.get_timesteps(100, 0.3, "cpu")
    assert sampling_timesteps(scheduler, 100, 0.3).tolist() == expected.tolist() and count == 30
    with pytest.raises(ValueError, match="no step"):
        sampling_timesteps(scheduler, 10, 0.05)


def test_sampler_equals_diffusers_img2img_pipeline(pipe):
    settings = SamplingSettings(steps=10, strength=0.3, latent_dtype="float32")
    reqs = requests(2)
    ours = sample_batch(pipe, reqs, settings)
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    theirs = i2i(
        prompt=[r.prompt for r in reqs],
        image=[r.source for r in reqs],
        strength=0.3,
        num_inference_steps=10,
        guidance_scale=5.0,
        eta=1.0,
        generator=[torch.Generator().manual_seed(r.seed) for r in reqs],
        output_type="latent",
    ).images
    for row, result in enumerate(ours):
        # diffusers encodes sources one at a time, we batch them: equal up to float rounding
        assert torch.allclose(result.latents[-1], theirs[row], atol=1e-4)


def test_every_step_equals_diffusers_step_for_the_same_noise_and_stored_timesteps_are_those_used(pipe):
    settings = SamplingSettings(steps=10, strength=0.5, latent_dtype="float32")
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(int(torch.as_tensor(args[1]).flatten()[0])))
    try:
        results = sample_batch(pipe, requests(2), settings)
    finally:
        hook.remove()
    used = sorted(set(seen), reverse=True)
    assert results[0].timesteps.tolist() == used == [401, 301, 201, 101, 1]

    # replay: the same generators in the same order (posterior, initial noise), then diffusers' own step
    reqs = requests(2)
    generators = [torch.Generator().manual_seed(r.seed) for r in reqs]
    randn_tensor((2, 4, 16, 16), generator=generators)  # VAE posterior sample
    randn_tensor((2, 4, 16, 16), generator=generators)  # initial noise
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    latents = torch.stack([r.latents for r in results])
    ids = tokenize_prompts(pipe.tokenizer, [r.prompt for r in reqs])
    with torch.no_grad():
        cond = embed_prompt_ids(pipe.text_encoder, ids)
        uncond = embed_prompt_ids(pipe.text_encoder, tokenize_prompts(pipe.tokenizer, ["", ""]))
        for i, t in enumerate(results[0].timesteps.tolist()):
            eps = guided_noise_prediction(pipe.unet, latents[:, i], t, cond, uncond, 5.0)
            expected = scheduler.step(eps, t, latents[:, i], eta=1.0, generator=generators).prev_sample
            assert torch.allclose(latents[:, i + 1], expected, atol=1e-5), (t, (latents[:, i + 1] - expected).abs().max())


@pytest.mark.parametrize("latent_dtype,tolerance", [("float32", 1e-5), ("float16", 1e-3)])
def test_stored_log_probs_equal_those_recomputed_from_stored_latents(pipe, tmp_path, latent_dtype, tolerance):
    settings = SamplingSettings(steps=10, strength=0.5, latent_dtype=latent_dtype)
    results = sample_batch(pipe, requests(2), settings)
    assert results[0].latents.dtype == getattr(torch, latent_dtype)
    path = write_shard(
        tmp_path / "p00-00000.safetensors",
        [r.sample_id for r in results],
        torch.stack([r.latents for r in results]),
        torch.stack([r.log_probs for r in results]),
        results[0].timesteps,
        torch.stack([r.prompt_ids for r in results]),
        header=settings.header(pipe.scheduler),
        latent_dtype=latent_dtype,
    )
    batch = TrajectoryStore(tmp_path).get(["s1", "s0"])
    assert batch.timesteps[0].tolist() == [401, 301, 201, 101, 1]
    count, steps = batch.log_probs.shape
    # all T steps of both samples in one batched forward pass, one timestep per row (as the trainers do)
    flat_t = batch.timesteps.reshape(-1)
    current = batch.latents[:, :-1].reshape(count * steps, 4, 16, 16)
    following = batch.latents[:, 1:].reshape(count * steps, 4, 16, 16)
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(read_header(path)["steps"])
    with torch.no_grad():
        cond = embed_prompt_ids(pipe.text_encoder, batch.prompt_ids).repeat_interleave(steps, dim=0)
        uncond = embed_prompt_ids(pipe.text_encoder, tokenize_prompts(pipe.tokenizer, [""]))
        eps = guided_noise_prediction(pipe.unet, current, flat_t, cond, uncond, 5.0)
    recomputed = ddim_step_with_log_prob(scheduler, eps, flat_t, current, 1.0, prev_latents=following).log_prob
    assert torch.allclose(recomputed.reshape(count, steps), batch.log_probs, atol=tolerance, rtol=tolerance)
    # and the order asked for is kept
    assert torch.equal(batch.log_probs[0], results[1].log_probs)


def test_samples_depend_on_their_seed_not_their_batch(pipe):
    settings = SamplingSettings(steps=10, strength=0.3, latent_dtype="float32")
    image = sources(1)[0]
    pair = sample_batch(pipe, [SampleRequest("a", "a red dot", 1, image), SampleRequest("b", "a red dot", 2, image)], settings)
    alone = sample_batch(pipe, [SampleRequest("b", "a red dot", 2, image)], settings)
    assert not torch.allclose(pair[0].latents[-1], pair[1].latents[-1])  # K samples of a unit differ
    assert torch.allclose(pair[1].latents[-1], alone[0].latents[-1], atol=1e-4)
    assert pair[0].image.size == (64, 64)


def test_text_to_image_at_strength_one_runs_every_step(pipe):
    settings = SamplingSettings(steps=4, strength=1.0)
    results = sample_batch(pipe, [SampleRequest("t", "a red dot", 3, None)], settings)
    assert results[0].timesteps.tolist() == [751, 501, 251, 1]
    assert results[0].latents.shape == (5, 4, 16, 16) and results[0].log_probs.shape == (4,)
    assert torch.isfinite(results[0].log_probs).all()


def test_shard_reader_errors_name_the_problem(tmp_path):
    latents = torch.zeros(2, 3, 4, 2, 2)
    args = (latents, torch.zeros(2, 2), torch.tensor([11, 1]), torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(TrajectoryError, match="duplicate"):
        write_shard(tmp_path / "a.safetensors", ["x", "x"], *args, header={})
    with pytest.raises(TrajectoryError, match="expected \\[2, 2\\]"):
        write_shard(tmp_path / "a.safetensors", ["x", "y"], latents, torch.zeros(2, 3), *args[2:], header={})
    path = write_shard(tmp_path / "p00-00000.safetensors", ["x", "y"], *args, header={"steps": 10})
    assert load_shard(path).latents.dtype == torch.float32
    with pytest.raises(TrajectoryError, match="no sample"):
        load_shard(path, ["z"])
    with pytest.raises(TrajectoryError, match="'z'"):
        TrajectoryStore(tmp_path).get(["z"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a shard")
    with pytest.raises(TrajectoryError, match="bad.safetensors"):
        TrajectoryStore(tmp_path)
