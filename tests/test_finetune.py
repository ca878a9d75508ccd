"""Preliminary fine-tuning: textual inversion + UNet LoRA (train/finetune.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from magic_align.config import ModelConfig, load_config
from magic_align.train.finetune import (
    OBJECT_TEMPLATES,
    TokenRows,
    TokenTextEncoder,
    caption_templates,
    center_crop_resize,
    denoising_loss,
    image_to_tensor,
    run_finetune,
    scaled_lr,
)
from magic_align.train.session import batch_indices, phase_epoch_seed, step_seed

CONDITIONS = {"melanoma": "<mel>", "vitiligo": "<vit>"}


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def finetune_config(tmp_path, tiny_model_dir, two_condition_data):
    checklist, images, _ = two_condition_data

    def make(name: str = "ft", **overrides):
        settings = {
            "model.source": "local",
            "model.pretrained": str(tiny_model_dir),
            "model.resolution": 32,
            "data.kind": "folder",
            "data.images": str(images),
            "data.num_classes": 2,
            "judge.checklist": str(checklist),
            "finetune.ti_steps": 3,
            "finetune.ti_batch_size": 2,
            "finetune.ti_grad_accum": 2,
            "finetune.lora_steps": 4,
            "finetune.lora_batch_size": 2,
            "finetune.lora_lr": 1e-3,
            "finetune.checkpoint_every": 2,
            "finetune.log_with": ["csv"],
            **overrides,
        }
        text = [f"runs_dir={json.dumps(str(tmp_path / 'runs'))}", f"name={json.dumps(name)}"]
        text += [f"{key}={json.dumps(value)}" for key, value in settings.items()]
        return load_config("tiny", text)

    return make


def plain_pipeline(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None, requires_safety_checker=False)


# --------------------------------------------------------------------------------------- pure pieces
def test_caption_templates_add_the_run_prompt_once():
    templates = caption_templates("an image of {token} on human skin")
    assert templates[: len(OBJECT_TEMPLATES)] == list(OBJECT_TEMPLATES)
    assert templates[-1] == "an image of {} on human skin"
    assert caption_templates("a photo of a {token}") == list(OBJECT_TEMPLATES)  # already a template: not repeated
    assert all(t.format("<x>").count("<x>") == 1 for t in templates)


def test_scaled_lr():
    assert scaled_lr(5e-4, 4, 4, True) == pytest.approx(8e-3)
    assert scaled_lr(5e-4, 4, 4, False) == 5e-4


def test_batches_cover_every_item_once_per_epoch_and_are_reproducible():
    draws = [batch_indices(5, 2, draw, phase_epoch_seed(3, "ti")) for draw in range(5)]  # 10 positions = 2 epochs
    flat = [i for batch in draws for i in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))
    assert batch_indices(5, 2, 3, phase_epoch_seed(3, "ti")) == draws[3]
    assert flat != [i for d in range(5) for i in batch_indices(5, 2, d, phase_epoch_seed(4, "ti"))]


def test_batches_are_slices_of_the_phase_epoch_permutations():
    """The finetune/RFT draws: position p of the stream is item p % n of the permutation of epoch p // n, seeded
    by step_seed(seed, phase + "-epoch", epoch) (the sequence resumed checkpoints rely on)."""
    def by_hand(num_items, batch_size, draw, seed, phase):
        out = []
        for position in range(draw * batch_size, (draw + 1) * batch_size):
            epoch, offset = divmod(position, num_items)
            generator = torch.Generator().manual_seed(step_seed(seed, phase + "-epoch", epoch))
            out.append(int(torch.randperm(num_items, generator=generator)[offset]))
        return out

    for draw in range(6):
        assert batch_indices(5, 3, draw, phase_epoch_seed(7, "lora")) == by_hand(5, 3, draw, 7, "lora")
    assert batch_indices(2, 5, 1, phase_epoch_seed(7, "rft")) == by_hand(2, 5, 1, 7, "rft")  # spans 3 epochs


def test_center_crop_and_flip_by_hand():
    array = np.zeros((2, 4, 3), dtype=np.uint8)  # 4 wide, 2 high: the crop keeps columns 1 and 2
    array[:, 1] = 255
    cropped = center_crop_resize(Image.fromarray(array), 2)
    assert np.asarray(cropped)[:, 0].min() == 255 and np.asarray(cropped)[:, 1].max() == 0
    tensor = image_to_tensor(cropped)
    assert tensor.shape == (3, 2, 2) and tensor[0, 0, 0] == 1.0 and tensor[0, 0, 1] == -1.0
    flipped = image_to_tensor(cropped, flip=True)
    assert flipped[0, 0, 0] == -1.0 and flipped[0, 0, 1] == 1.0
    squashed = center_crop_resize(Image.fromarray(array), 2, center_crop=False)
    assert squashed.size == (2, 2)


def test_only_the_new_token_rows_learn(tiny_model_dir):
    """AdamW with weight decay through the spliced rows: the new rows move, every other row is bit-identical."""
    from magic_align.diffusion.loading import load_pipeline
    from magic_align.diffusion.tokens import add_tokens
    from magic_align.train.session import make_optimizer

    pipe = load_pipeline(ModelConfig(source="local", pretrained=str(tiny_model_dir)))
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    ids = add_tokens(tokenizer, text_encoder, list(CONDITIONS.values()), "skin")
    before = text_encoder.get_input_embeddings().weight.detach().clone()
    rows = TokenRows(ids, before[ids])
    encoder = TokenTextEncoder(text_encoder, rows)
    optimizer = make_optimizer(encoder.parameters(), lr=0.1, weight_decay=0.1)
    assert [p for p in encoder.parameters() if p.requires_grad] == [rows.rows]
    for _ in range(3):
        input_ids = tokenizer(["a photo of a <mel>", "<vit> on skin"], padding="max_length", return_tensors="pt").input_ids
        encoder(input_ids).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    rows.detach_hook()
    rows.write_into(text_encoder.get_input_embeddings())
    after = text_encoder.get_input_embeddings().weight.detach()
    others = torch.ones(len(after), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(after[others], before[others])
    assert not torch.allclose(after[ids], before[ids])


def test_denoising_loss_is_the_mse_to_the_noise():
    """With a UNet that predicts zero, the loss is the mean squared noise; a perfect one gives zero."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    class Zero(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states):
            return type("Out", (), {"sample": torch.zeros_like(sample)})

    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=generator)
    loss = denoising_loss(Zero(), scheduler, latents, torch.zeros(3, 2, 4), torch.Generator().manual_seed(5))
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def test_a_denoising_draw_is_what_the_loss_trains_on():
    """denoising_loss = the weighted MSE to the target of its own draw (noise first, then timesteps), by hand."""
    from diffusers import DDPMScheduler

    from magic_align.train.diffusion_losses import denoising_draw, weighted_error

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    class Scaled(torch.nn.Module):  # predicts 0.5 x its noisy input
        def forward(self, sample, timestep, encoder_hidden_states):
            return type("Out", (), {"sample": 0.5 * sample})

    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 301, (2,), generator=generator)
    noisy, target, drawn = denoising_draw(scheduler, latents, torch.Generator().manual_seed(5), max_timestep=300)
    assert torch.equal(drawn, timesteps) and torch.equal(target, noise)
    assert torch.allclose(noisy, scheduler.add_noise(latents, noise, timesteps))
    weights = torch.tensor([1.0, 3.0])
    by_hand = ((0.5 * noisy - noise).pow(2).flatten(1).mean(1) * weights).mean()
    assert weighted_error(0.5 * noisy, noise, weights).item() == pytest.approx(by_hand.item(), rel=1e-6)
    got = denoising_loss(Scaled(), scheduler, latents, torch.zeros(2, 2, 4), torch.Generator().manual_seed(5), weights,
                         max_timestep=300)
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------ the stage
def fixed_batch_loss(pipe, images_root: Path, tokens: dict[str, str], prompt_template: str) -> float:
    """The denoising loss of `pipe` on every training image at fixed timesteps and noise (same for any pipe)."""
    from diffusers import DDPMScheduler

    from magic_align.diffusion.sampler import tokenize_prompts
    from magic_align.train.diffusion_losses import encode_images

    pixels, captions = [], []
    for condition, token in tokens.items():
        for path in sorted((images_root / condition).glob("*.png")):
            pixels.append(image_to_tensor(center_crop_resize(Image.open(path).convert("RGB"), 32)))
            captions.append(prompt_template.format(token=token))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    total = 0.0
    with torch.no_grad():
        hidden = pipe.text_encoder(tokenize_prompts(pipe.tokenizer, captions))[0]
        for repeat in range(4):
            generator = torch.Generator().manual_seed(100 + repeat)
            latents = encode_images(pipe.vae, torch.stack(pixels), generator)
            total += denoising_loss(pipe.unet, scheduler, latents, hidden, generator).item()
    return total / 4


@pytest.mark.slow
def test_finetune_learns_and_loads_in_plain_diffusers(finetune_config, tiny_model_dir, tmp_path, capsys, monkeypatch):
    config = finetune_config("learn", **{"finetune.ti_steps": 12, "finetune.lora_steps": 25, "finetune.ti_lr": 5e-3})
    monkeypatch.setenv("MAGIC_PROGRESS_EVERY", "5")
    model_dir = run_finetune(config)
    reported = capsys.readouterr().err  # off a terminal: a line per 5 steps of each phase, and the last
    assert "finetune textual inversion step 10/12 loss " in reported and "step 12/12 loss " in reported
    assert "finetune lora step 25/25 loss " in reported and "finetune lora step 24/25" not in reported
    info = json.loads((model_dir / "model.json").read_text())
    assert info["tokens"] == CONDITIONS and info["lora"]["steps"] == 25
    for relative, digest in info["files"].items():
        import hashlib

        assert hashlib.sha256((model_dir / relative).read_bytes()).hexdigest() == digest

    # the training loss is logged per step; TI and LoRA curves fall (the LoRA one compared on fixed batches below)
    from magic_align.train.session import read_metrics

    assert len(read_metrics(config.run_dir / "logs" / "finetune" / "ti" / "metrics.csv")) == 12
    assert len(read_metrics(config.run_dir / "logs" / "finetune" / "lora" / "metrics.csv")) == 25

    # plain diffusers: the token files and the LoRA load with the stock loaders
    token_files = sorted((model_dir / "tokens").glob("*.safetensors"))
    assert len(token_files) == 2
    before = plain_pipeline(tiny_model_dir)
    skin_id = before.tokenizer("skin", add_special_tokens=False).input_ids
    skin = before.text_encoder.get_input_embeddings().weight[skin_id].mean(0)
    base_rows = before.text_encoder.get_input_embeddings().weight.detach().clone()
    with_tokens = plain_pipeline(tiny_model_dir)
    with_tokens.load_textual_inversion([str(f) for f in token_files])
    embeddings = with_tokens.text_encoder.get_input_embeddings().weight
    for token in CONDITIONS.values():
        row = embeddings[with_tokens.tokenizer.convert_tokens_to_ids(token)]
        assert not torch.allclose(row, skin, atol=1e-4), f"{token} did not move from its init word"
    assert torch.equal(embeddings[: len(base_rows)], base_rows)

    # the tokens alone versus init-word tokens: lower loss on the training images
    init_only = plain_pipeline(tiny_model_dir)
    init_only.load_textual_inversion([{t: skin.detach().reshape(1, -1)} for t in CONDITIONS.values()],
                                     token=list(CONDITIONS.values()))
    images_root = Path(config.data.images)
    loss_init = fixed_batch_loss(init_only, images_root, CONDITIONS, config.model.prompt_template)
    loss_tokens = fixed_batch_loss(with_tokens, images_root, CONDITIONS, config.model.prompt_template)
    with_tokens.load_lora_weights(str(model_dir / "lora"))
    loss_lora = fixed_batch_loss(with_tokens, images_root, CONDITIONS, config.model.prompt_template)
    assert loss_tokens < loss_init
    assert loss_lora < loss_tokens


def test_resume_equals_uninterrupted(finetune_config):
    straight = run_finetune(finetune_config("straight"))
    interrupted = finetune_config("interrupted")
    run_finetune(interrupted, stop_after=2)  # inside textual inversion (3 steps)
    assert not (interrupted.run_dir / "model" / "tokens").exists()
    run_finetune(interrupted, stop_after=2)  # ends textual inversion, one LoRA step
    assert not (interrupted.run_dir / "model" / "lora").exists()
    resumed = run_finetune(interrupted)
    for relative in ["lora/pytorch_lora_weights.safetensors", "tokens/mel.safetensors", "tokens/vit.safetensors"]:
        a, b = load_file(str(straight / relative)), load_file(str(resumed / relative))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{relative}:{key} differs after resume"
    # the logged curve has one row per step, without the rows of the interrupted run after its checkpoint
    from magic_align.train.session import read_metrics

    rows = read_metrics(interrupted.run_dir / "logs" / "finetune" / "lora" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


def test_lora_weight_decay_comes_from_the_config(finetune_config):
    """The LoRA phase's AdamW takes finetune.lora_weight_decay (the token rows none); a changed decay changes the
    settings fingerprint, so an old checkpoint is not continued with another decay."""
    from magic_align.train.finetune import settings_fingerprint

    config = finetune_config("decay", **{"finetune.lora_weight_decay": 0.25})
    run_finetune(config, stop_after=4)  # 3 textual-inversion steps, then 1 LoRA step: both phases checkpointed
    checkpoints = config.run_dir / "checkpoints" / "finetune"
    for phase, decay in (("ti", 0.0), ("lora", 0.25)):
        state = torch.load(next((checkpoints / phase).glob("step-*")) / "optimizer.bin", weights_only=False)
        assert [group["weight_decay"] for group in state["param_groups"]] == [decay], phase
    assert settings_fingerprint(config) != settings_fingerprint(finetune_config("decay"))


def test_changed_settings_refuse_the_old_checkpoint(finetune_config):
    from magic_align.train.finetune import FinetuneError

    run_finetune(finetune_config("changed"), stop_after=1)
    with pytest.raises(FinetuneError, match="other settings"):
        run_finetune(finetune_config("changed", **{"finetune.ti_lr": 1e-2}))


def test_denoising_loss_shares_noise_and_timestep_within_a_group_and_keeps_the_range():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from magic_align.train.diffusion_losses import denoising_loss

    seen = {}

    def recording_unet(noisy, timesteps, encoder_hidden_states):
        seen["noisy"], seen["timesteps"] = noisy.clone(), timesteps.clone()
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.ones(4, 4, 8, 8)  # equal latents: equal noisy inputs exactly when noise and timestep are shared
    hidden = torch.zeros(4, 3, 8)
    denoising_loss(recording_unet, scheduler, latents, hidden, torch.Generator().manual_seed(0),
                   max_timestep=300, groups=[7, 7, 2, 2])
    noisy, timesteps = seen["noisy"], seen["timesteps"]
    assert torch.equal(noisy[0], noisy[1]) and torch.equal(noisy[2], noisy[3])
    assert not torch.equal(noisy[0], noisy[2])
    assert timesteps[0] == timesteps[1] and timesteps[2] == timesteps[3]

    for seed in range(20):  # the range bound holds for every draw
        denoising_loss(recording_unet, scheduler, latents, hidden, torch.Generator().manual_seed(seed), max_timestep=300)
        assert int(seen["timesteps"].max()) <= 300
        assert len({tuple(row.flatten()[:5].tolist()) for row in seen["noisy"]}) == 4  # no groups: four draws


# ------------------------------------------------------------------------- per-token textual inversion
def test_per_token_phases_give_each_condition_its_own_images_and_budget():
    from magic_align.train.finetune import TrainingImage, phase_at, ti_phases

    images = [TrainingImage(Path(f"{i}.png"), "vitiligo" if i % 3 else "melanoma") for i in range(9)]
    paper = load_config("paper").finetune
    assert (paper.ti_schedule, paper.ti_steps_per_token, paper.ti_batch_size, paper.ti_grad_accum) == ("per_token", 500, 4, 4)
    phases = ti_phases(images, ["melanoma", "acne", "vitiligo"], paper)  # acne has no image: no phase
    assert [(p.condition, p.steps) for p in phases] == [("melanoma", 500), ("vitiligo", 500)]
    assert all(images[i].condition == p.condition for p in phases for i in p.images)
    assert sorted(i for p in phases for i in p.images) == list(range(9))
    assert phase_at(phases, 499) == (0, 499) and phase_at(phases, 500) == (1, 0) and phase_at(phases, 999) == (1, 499)
    joint = ti_phases(images, ["melanoma", "vitiligo"], load_config("tiny").finetune)
    assert [(p.condition, p.steps, len(p.images)) for p in joint] == [(None, 4, 9)]


def test_a_fresh_optimizer_state_keeps_the_finished_token_fixed():
    from magic_align.train.finetune import TokenRows, forget_optimizer_state

    def train(forget: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = TokenRows([5, 6], torch.zeros(2, 4))
        optimizer = torch.optim.AdamW(rows.parameters(), lr=0.1, weight_decay=0.0)
        for row in (0, 1):  # token 0's phase, then token 1's: the loss only ever sees the phase's own row
            if forget:
                forget_optimizer_state(optimizer)
            for _ in range(3):
                optimizer.zero_grad()
                (rows.rows[row] - 1.0).pow(2).sum().backward()
                optimizer.step()
            if row == 0:
                after_own_phase = rows.rows[0].detach().clone()
        return after_own_phase, rows.rows.detach()

    first, final = train(forget=True)
    assert torch.equal(final[0], first) and not torch.equal(final[1], torch.zeros(4))
    first, final = train(forget=False)
    assert not torch.equal(final[0], first)  # without it, momentum keeps moving the finished token


def test_per_token_run_trains_every_token_for_its_own_steps(finetune_config):
    from magic_align.train.session import read_metrics

    config = finetune_config("per-token", **{"finetune.ti_schedule": "per_token", "finetune.ti_steps_per_token": 2,
                                             "finetune.lora_steps": 0})
    model = run_finetune(config)
    rows = read_metrics(config.run_dir / "logs" / "finetune" / "ti" / "metrics.csv")
    assert [int(r["token"]) for r in rows] == [0, 0, 1, 1]  # melanoma's 2 steps, then vitiligo's 2
    info = json.loads((model / "model.json").read_text())["textual_inversion"]
    assert (info["schedule"], info["steps"]) == ("per_token", 2)
    mel, vit = (next(iter(load_file(str(model / "tokens" / f"{name}.safetensors")).values())) for name in ("mel", "vit"))
    assert not torch.equal(mel, vit)


def test_locked_set_settings_leave_the_fingerprint_alone():
    """The data settings that only choose the locked set never change a training image, so they must not refuse a
    finished run's checkpoints (a run made before data roles existed resumes at its last step)."""
    from magic_align.config import load_config
    from magic_align.train.finetune import settings_fingerprint

    plain = load_config("tiny")
    moved = load_config("tiny", ["data.locked_fraction=0.3", "data.procedural_locked_seed=77",
                                 "data.procedural_locked_per_class=3"])
    assert settings_fingerprint(moved) == settings_fingerprint(plain)
    assert settings_fingerprint(load_config("tiny", ["data.train_fraction=0.6"])) != settings_fingerprint(plain)
