"""MAGIC-RFT: reward model, reward-weighted likelihood, and the stage on a tiny run (train/rft.py)."""

from __future__ import annotations

import hashlib
import shutil
import json
from pathlib import Path

import pytest
import torch
from interruption import killed_at_step, recording_weights

from magic_align.config import ModelConfig, load_config
from magic_align.train.reward_model import RewardHead, fit_reward_head
from magic_align.train.rft import (condition_balanced_weights, real_labels, reward_weighted_nll, trajectory_weight,
                                   unit_baselined_weights)


# ------------------------------------------------------------------------------------------------ math
def test_trajectory_weight_by_hand():
    reward = torch.tensor([0.0, 0.5, 1.0, 1.3, -0.2])
    assert trajectory_weight(reward, 1.0).tolist() == [0.0, 0.5, 1.0, 1.0, 0.0]
    assert trajectory_weight(reward, 2.0).tolist() == [0.0, 0.25, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        trajectory_weight(reward, 0.0)


def test_unit_baseline_subtracts_each_units_mean_weight():
    weights = torch.tensor([0.9, 0.3, 0.6, 0.2, 0.2, 0.7])
    units = ["a", "a", "a", "b", "b", "c"]
    # unit a: mean 0.6 -> 0.3, -0.3, 0.0; unit b: equal weights cancel; unit c alone: nothing to compare with
    assert unit_baselined_weights(weights, units).tolist() == pytest.approx([0.3, -0.3, 0.0, 0.0, 0.0, 0.0])
    assert weights.tolist() == pytest.approx([0.9, 0.3, 0.6, 0.2, 0.2, 0.7])  # the input is left alone
    with pytest.raises(ValueError, match="unit ids"):
        unit_baselined_weights(weights, units[:3])


def test_reward_weighted_nll_by_hand():
    log_probs = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])
    weights = torch.tensor([0.5, 1.0])
    # -(0.5 * (-1 - 3) + 1.0 * (-2 - 2)) / 4 = -(-2 - 4) / 4 = 1.5
    assert reward_weighted_nll(log_probs, weights).item() == pytest.approx(1.5)
    with pytest.raises(ValueError):
        reward_weighted_nll(log_probs, torch.ones(3))


def test_the_checkpoint_fingerprint_names_samples_and_reward_head_not_the_last_bits_of_weights(tmp_path):
    """A resume scores the samples again; a weight that moves in its last bit must not make the round's own
    checkpoints look foreign, while another reward head or other samples must."""
    from magic_align.train.reward_model import RewardModel
    from magic_align.train.rft import WeightedTrajectory, training_data_digest

    torch.manual_seed(0)
    RewardModel(None, RewardHead(8, 2, hidden=4), ["a", "b"], "none").save(tmp_path / "fit")
    RewardModel(None, RewardHead(8, 2, hidden=4), ["a", "b"], "none").save(tmp_path / "another-fit")
    items = [WeightedTrajectory(f"s{i}", "a", 0.5, 0.1 * i + 1e-9, f"u{i // 2}") for i in range(4)]
    jittered = [WeightedTrajectory(t.sample_id, t.condition, t.reward, float(torch.tensor(t.weight).nextafter(
        torch.tensor(2.0))), t.unit_id) for t in items]
    fit = tmp_path / "fit"
    assert training_data_digest(fit, items) == training_data_digest(fit, jittered)
    assert training_data_digest(fit, items) != training_data_digest(fit, items[:3])
    assert training_data_digest(fit, items) != training_data_digest(tmp_path / "another-fit", items)


def test_real_labels_positive_and_one_negative_per_image():
    images = [(Path("a.png"), "x", 1), (Path("b.png"), "y", 2), (Path("c.png"), "x", 3)]
    labelled = real_labels(images, ["x", "y", "z"], 0.0, seed=0)
    positives = [item for item in labelled if item.kind == "real"]
    negatives = [item for item in labelled if item.kind == "real-negative"]
    assert [(p.path.name, p.condition, p.label) for p in positives] == [("a.png", "x", 1.0), ("b.png", "y", 1.0), ("c.png", "x", 1.0)]
    assert len(negatives) == 3
    for positive, negative in zip(positives, negatives):
        assert negative.path == positive.path and negative.condition != positive.condition and negative.label == 0.0
    assert all(item.kind == "real" for item in real_labels(images, ["x", "y", "z"], None, seed=0))


# ------------------------------------------------------------------------------------------ reward model
def test_reward_head_fits_a_separable_toy_set():
    """Two feature clusters, two conditions: reward 1 where the cluster matches the condition, else 0. The head
    must learn the interaction (the features alone do not tell the label), so the condition input matters."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 16, generator=generator) * 3
    cluster = torch.arange(80) % 2
    features = centres[cluster] + 0.3 * torch.randn(80, 16, generator=generator)
    condition = (torch.arange(80) // 2) % 2
    labels = (cluster == condition).float()
    fit = fit_reward_head(features, condition, labels, 2, epochs=150, lr=1e-2, batch_size=16, hidden=32, seed=0)
    assert fit.losses[-1] < fit.losses[0] / 5
    with torch.no_grad():
        prediction = fit.head(features, condition)
    assert prediction[labels == 1].min() > 0.8 and prediction[labels == 0].max() < 0.2
    with torch.no_grad():  # the same image, the two conditions: opposite rewards
        same = features[:1].repeat(2, 1)
        scores = fit.head(same, torch.tensor([0, 1]))
    assert abs(scores[0] - scores[1]) > 0.6


def test_untrained_head_ignores_the_condition_and_outputs_a_probability():
    head = RewardHead(8, 3, hidden=4)
    features = torch.randn(5, 8)
    with torch.no_grad():
        a, b = head(features, torch.zeros(5, dtype=torch.long)), head(features, torch.full((5,), 2))
    assert torch.equal(a, b) and ((a > 0) & (a < 1)).all()


# ------------------------------------------------------------------------------ the weighted-likelihood step
STEPS, GUIDANCE, ETA = 4, 3.0, 1.0


def sampled_trajectories(pipe, prompts, seed):
    from magic_align.diffusion.sampler import SampleRequest, SamplingSettings, sample_batch

    settings = SamplingSettings(steps=STEPS, strength=1.0, eta=ETA, guidance=GUIDANCE, latent_dtype="float32")
    requests = [SampleRequest(f"s{i}", prompt, seed=seed + i) for i, prompt in enumerate(prompts)]
    return sample_batch(pipe, requests, settings, resolution=32), settings


def test_a_weighted_step_raises_high_reward_trajectories_relative_to_low(tiny_model_dir):
    from magic_align.diffusion.loading import load_pipeline
    from magic_align.diffusion.sampler import embed_prompt_ids, tokenize_prompts
    from magic_align.train.trajectory_likelihood import prepare_policy_unet, trajectory_log_probs

    gains = {}
    for weights in ([1.0, 0.0], [0.0, 1.0]):
        pipe = load_pipeline(ModelConfig(source="local", pretrained=str(tiny_model_dir)))
        results, _ = sampled_trajectories(pipe, ["a red patch on skin", "a dark spot"], seed=3)
        unet = prepare_policy_unet(pipe, rank=4, alpha=4, adapter_name="rft")
        scheduler = pipe.scheduler
        scheduler.set_timesteps(STEPS)
        with torch.no_grad():
            cond = embed_prompt_ids(pipe.text_encoder, torch.stack([r.prompt_ids for r in results]))
            uncond = embed_prompt_ids(pipe.text_encoder, tokenize_prompts(pipe.tokenizer, [""]))

        def log_probs():
            rows = [
                trajectory_log_probs(unet, scheduler, r.latents[None].float(), r.timesteps, cond[i : i + 1], uncond,
                                     guidance=GUIDANCE, eta=ETA, reduction="mean")
                for i, r in enumerate(results)
            ]
            return torch.cat(rows)  # [2, T]

        with torch.no_grad():
            before = log_probs().mean(1)
        optimizer = torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=0.05)
        reward_weighted_nll(log_probs(), torch.tensor(weights)).backward()
        optimizer.step()
        with torch.no_grad():
            after = log_probs().mean(1)
        gains[tuple(weights)] = after - before
    high_first, high_second = gains[(1.0, 0.0)], gains[(0.0, 1.0)]
    assert high_first[0] > 0 and high_second[1] > 0  # the weighted trajectory became more likely
    assert high_first[0] - high_first[1] > 0  # ... more than the unweighted one
    assert high_second[1] - high_second[0] > 0


# ------------------------------------------------------------------------------------------ the stage
def rft_overrides(runs_dir, name, model_dir, checklist, images, *extra):
    return [
        f"runs_dir={json.dumps(str(runs_dir))}", f"name={json.dumps(name)}",
        "model.source='local'", f"model.pretrained={json.dumps(str(model_dir))}", "model.resolution=32",
        "data.kind='folder'", f"data.images={json.dumps(str(images))}", "data.num_classes=2",
        f"judge.checklist={json.dumps(str(checklist))}",
        "finetune.ti_steps=1", "finetune.ti_grad_accum=1", "finetune.lora_steps=2", "finetune.lora_lr=1e-2",
        f"sample.steps={STEPS}", "sample.strength=1.0", f"sample.guidance={GUIDANCE}",
        "rft.steps=4", "rft.batch_size=2", "rft.real_batch_size=2", "rft.lr=1e-2", "rft.reward_epochs=20",
        "rft.checkpoint_every=2", *extra,
    ]


@pytest.fixture
def rft_run(tiny_model_dir, two_condition_data, tmp_path):
    """A finetuned tiny run with round-0 trajectories (real sampler, run policy), PNGs, samples and verdicts."""
    from magic_align.checklists.schema import load_checklists
    from magic_align.diffusion.loading import load_run_policy
    from magic_align.diffusion.trajectories import write_shard
    from magic_align.judges.base import Verdict
    from magic_align.ledger import Ledger, SampleRow
    from magic_align.run import prepare_run
    from magic_align.train.finetune import run_finetune

    checklist, images, tokens = two_condition_data
    runs = tmp_path / "runs"

    def make(name):
        return load_config("tiny", rft_overrides(runs, name, tiny_model_dir, checklist, images))

    config = make("base")
    run_finetune(config)
    paths = prepare_run(config)
    pipe = load_run_policy(config, paths)
    targets = ["melanoma", "vitiligo", "melanoma", "vitiligo"]
    prompts = [config.model.prompt_template.format(token=tokens[t]) for t in targets]
    results, settings = sampled_trajectories(pipe, prompts, seed=11)
    shard = paths.trajectories(0) / "p00-00000.safetensors"
    write_shard(shard, [r.sample_id for r in results], torch.stack([r.latents for r in results]),
                torch.stack([r.log_probs for r in results]), results[0].timesteps,
                torch.stack([r.prompt_ids for r in results]), settings.header(pipe.scheduler), latent_dtype="float32")
    checklists = load_checklists(str(checklist))
    ledger = Ledger(paths.ledger)
    rows = []
    for index, (result, target) in enumerate(zip(results, targets)):
        relative = f"samples/round-0/images/{result.sample_id}.png"
        (paths.root / relative).parent.mkdir(parents=True, exist_ok=True)
        result.image.save(paths.root / relative)
        digest = hashlib.sha256((paths.root / relative).read_bytes()).hexdigest()
        rows.append(SampleRow(result.sample_id, 0, f"u{index // 2}", index % 2, relative, digest, f"real-{index}",
                              "melanoma", target, prompts[index], 11 + index, shard.relative_to(paths.root).as_posix(),
                              index))
        items = [1, 1] if index < 2 else [0, 0]
        ledger.put_verdict(digest, "test:judge", checklists[target].version, "none", Verdict(items=items), condition=target)
    ledger.add_samples(rows)
    ledger.close()
    return config, make


@pytest.mark.slow
def test_run_rft_writes_a_lora_that_loads_in_plain_diffusers(rft_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    from magic_align.train.session import read_metrics
    from magic_align.train.rft import run_rft

    config, _ = rft_run
    output = run_rft(config, judge_id="test:judge")
    assert output == config.run_dir / "aligned" / "rft"
    summary = json.loads((output / "rft.json").read_text())
    assert summary["trajectories"] == 4 and 0 <= summary["reward_min"] <= summary["reward_max"] <= 1
    assert (summary["objective"], summary["baseline"]) == ("trajectory", "none")
    assert summary["reward_model"]["images"] == {"synthetic": 4, "real": 4, "real-negative": 4}
    assert (output / "reward" / "reward_head.safetensors").is_file()
    rows = read_metrics(config.run_dir / "logs" / "rft" / "round-0" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["real_denoising"] > 0 for r in rows)

    # plain diffusers: base model + tokens + preliminary LoRA + RFT LoRA, stacked at weight 1
    model = config.run_dir / "model"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion([str(f) for f in sorted((model / "tokens").glob("*.safetensors"))])
    pipe.load_lora_weights(str(model / "lora"), adapter_name="preliminary")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer(["an image of <mel> on human skin"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
        before = pipe.unet(x, 501, encoder_hidden_states=embeds).sample
        pipe.load_lora_weights(str(output), adapter_name="rft")
        pipe.set_adapters(["preliminary", "rft"], [1.0, 1.0])
        after = pipe.unet(x, 501, encoder_hidden_states=embeds).sample
    assert (after - before).abs().max() > 1e-4

    # a rerun reuses the fitted reward model and the finished checkpoint: the same LoRA
    from safetensors.torch import load_file

    first = load_file(str(output / "pytorch_lora_weights.safetensors"))
    run_rft(config, judge_id="test:judge")
    again = load_file(str(output / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_run_rft_without_verdicts_says_what_to_run(tiny_model_dir, two_condition_data, tmp_path):
    from magic_align.train.session import TrainingError
    from magic_align.train.rft import run_rft

    checklist, images, _ = two_condition_data
    config = load_config("tiny", rft_overrides(tmp_path / "runs", "empty", tiny_model_dir, checklist, images))
    with pytest.raises(TrainingError, match="magic sample"):
        run_rft(config, judge_id="test:judge")


@pytest.mark.slow
def test_an_interrupted_rft_run_resumes_to_the_same_lora(rft_run, monkeypatch, capsys):
    import shutil

    from safetensors.torch import load_file

    from magic_align import progress
    from magic_align.train import rft as rft_module
    from magic_align.train.rft import run_rft

    config, make = rft_run
    for name in ("straight", "resumed"):
        shutil.copytree(config.run_dir, config.run_dir.parent / name)
    straight = run_rft(make("straight"), judge_id="test:judge")

    real_step = rft_module.optimizer_step
    monkeypatch.setattr(rft_module, "optimizer_step", killed_at_step(real_step, 3))  # after the step-2 checkpoint
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run_rft(make("resumed"), judge_id="test:judge")
    # both phases report progress off a terminal, and Ctrl-C knows the step and the checkpoint to resume from
    reported = capsys.readouterr().err
    assert "rft reward model epoch 1/" in reported and " mse " in reported
    assert "rft round 0 step 1/" in reported and " loss " in reported
    stopped = progress.interrupted()
    assert stopped.startswith("rft round 0 stopped after step 2 of ") and "checkpoint at step 2 is kept" in stopped
    monkeypatch.setattr(rft_module, "optimizer_step", real_step)
    assert not (config.run_dir.parent / "resumed" / "aligned" / "rft" / "pytorch_lora_weights.safetensors").exists()
    resumed = run_rft(make("resumed"), judge_id="test:judge")
    expected = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    got = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # the finished checkpoint never stands in for a run with another seed or weighting: it is kept aside
    rounds = config.run_dir.parent / "resumed" / "checkpoints" / "rft"
    for index, change in enumerate(({"seed": 5}, {"reward_power": 3.0}), start=1):
        other = make("resumed")
        other = other.model_copy(update={"rft": other.rft.model_copy(update=change)})
        retrained = load_file(str(run_rft(other, judge_id="test:judge") / "pytorch_lora_weights.safetensors"))
        assert not all(torch.equal(expected[key], retrained[key]) for key in expected)
        assert (rounds / ("round-0.other-settings" + ("" if index == 1 else f"-{index}"))).is_dir()


def test_the_rft_policy_starts_as_the_preliminary_model(rft_run):
    """The trainable LoRA goes on top of the preliminary one (the authors' code dropped it: docs/method.md
    section 11.1). At step 0 the policy scores the stored trajectories exactly as the sampling policy (tokens +
    preliminary LoRA) did; dropping the LoRA would not."""
    from magic_align.diffusion.loading import load_pipeline, load_run_policy
    from magic_align.diffusion.sampler import embed_prompt_ids, tokenize_prompts
    from magic_align.diffusion.tokens import load_tokens
    from magic_align.diffusion.trajectories import TrajectoryStore
    from magic_align.run import RunPaths
    from magic_align.train.trajectory_likelihood import prepare_policy_unet, trajectory_log_probs

    config, _ = rft_run
    paths = RunPaths(config.run_dir)
    store = TrajectoryStore(paths.trajectories(0))
    batch = store.get(store.sample_ids())

    def scored(pipe, unet):
        pipe.scheduler.set_timesteps(STEPS)
        with torch.no_grad():
            cond = embed_prompt_ids(pipe.text_encoder, batch.prompt_ids)
            uncond = embed_prompt_ids(pipe.text_encoder, tokenize_prompts(pipe.tokenizer, [""]))
            return trajectory_log_probs(unet, pipe.scheduler, batch.latents, batch.timesteps[0], cond, uncond,
                                        guidance=GUIDANCE, eta=ETA, reduction="mean")

    policy = load_run_policy(config, paths)
    assert torch.allclose(scored(policy, prepare_policy_unet(policy, 4, 4, adapter_name="rft")), batch.log_probs, atol=1e-4)
    without_lora = load_pipeline(config.model)
    load_tokens(without_lora, paths.model / "tokens")
    assert not torch.allclose(scored(without_lora, without_lora.unet), batch.log_probs, atol=1e-3)


@pytest.mark.slow
def test_the_denoising_objective_weighs_final_latents_by_reward(rft_run, monkeypatch):
    """rft.objective = "denoising": reward-weighted epsilon loss on each sample's final latent. With every weight
    zero (and no real-image term) nothing is learned; with the rewards, the LoRA moves."""
    from safetensors.torch import load_file

    import magic_align.train.rft as rft_module
    from magic_align.train.session import read_metrics

    config, _ = rft_run
    config = config.model_copy(deep=True)
    config.rft.objective = "denoising"
    config.rft.beta_real = 0.0
    metrics = config.run_dir / "logs" / "rft" / "round-0" / "metrics.csv"

    with monkeypatch.context() as patch:
        patch.setattr(rft_module, "trajectory_weight", lambda reward, power: torch.zeros_like(reward))
        output = rft_module.run_rft(config, judge_id="test:judge")
    rows = read_metrics(metrics)
    assert rows and all(r["grad_norm"] == 0 and r["weighted_nll"] == 0 and r["mean_weight"] == 0 for r in rows)
    lora = load_file(str(output / "pytorch_lora_weights.safetensors"))
    assert all(not value.any() for key, value in lora.items() if "lora_B" in key or "lora.up" in key)

    for folder in ("checkpoints", "logs", "aligned"):
        shutil.rmtree(config.run_dir / folder / "rft", ignore_errors=True)
    output = rft_module.run_rft(config, judge_id="test:judge")
    rows = read_metrics(metrics)
    assert all(r["grad_norm"] > 0 and r["weighted_nll"] > 0 for r in rows)
    lora = load_file(str(output / "pytorch_lora_weights.safetensors"))
    assert any(value.any() for key, value in lora.items() if "lora_B" in key or "lora.up" in key)


@pytest.mark.slow
def test_the_reference_weight_keeps_the_policy_near_the_preliminary_model(rft_run):
    """rft.reference_weight adds the distance of the policy's noise predictions to the preliminary model's: it is
    logged, zero at the first step (the fresh adapter is the preliminary model), part of the logged loss, and a
    heavy weight leaves the trained policy closer to the preliminary model than no weight does."""
    from diffusers import DDPMScheduler

    import magic_align.train.rft as rft_module
    from magic_align.diffusion.loading import load_run_policy
    from magic_align.diffusion.sampler import embed_prompt_ids
    from magic_align.diffusion.trajectories import TrajectoryStore
    from magic_align.run import RunPaths
    from magic_align.train.diffusion_losses import denoising_draw, weighted_error
    from magic_align.train.session import read_metrics

    config, _ = rft_run
    paths = RunPaths(config.run_dir)
    store = TrajectoryStore(paths.trajectories(0))
    batch = store.get(store.sample_ids())

    def trained(weight):
        for folder in ("checkpoints", "logs", "aligned"):
            shutil.rmtree(config.run_dir / folder / "rft", ignore_errors=True)
        changed = config.model_copy(deep=True)
        changed.rft.objective, changed.rft.beta_real, changed.rft.reference_weight = "denoising", 0.0, weight
        output = rft_module.run_rft(changed, judge_id="test:judge")
        return output, read_metrics(config.run_dir / "logs" / "rft" / "round-0" / "metrics.csv")

    def distance_to_preliminary(output):
        plain, aligned = load_run_policy(config, paths), load_run_policy(config, paths, extra_lora=output)
        scheduler = DDPMScheduler.from_config(plain.scheduler.config)
        noisy, _, timesteps = denoising_draw(scheduler, batch.latents[:, -1], torch.Generator().manual_seed(3))
        with torch.no_grad():
            cond = embed_prompt_ids(plain.text_encoder, batch.prompt_ids)
            return weighted_error(aligned.unet(noisy, timesteps, encoder_hidden_states=cond).sample,
                                  plain.unet(noisy, timesteps, encoder_hidden_states=cond).sample).item()

    output, free_rows = trained(0.0)
    assert "reference_distance" not in free_rows[0]
    free = distance_to_preliminary(output)  # measured now: the next training writes the same folder
    output, rows = trained(1e4)
    assert rows[0]["reference_distance"] == 0 and rows[-1]["reference_distance"] > 0
    for row in rows:
        assert row["loss"] == pytest.approx(row["weighted_nll"] + 1e4 * row["reference_distance"], rel=1e-5)
    assert 0 < distance_to_preliminary(output) < free


@pytest.mark.slow
def test_average_from_saves_the_mean_of_the_rft_weights(rft_run, monkeypatch):
    """rft.average_from = 3 of 4 steps: the saved LoRA holds the mean of each trainable tensor after steps 3 and 4
    (not the last values), and rft.json records it."""
    import magic_align.train.rft as rft_module
    from safetensors.torch import load_file

    config, _ = rft_run
    recorded = []
    monkeypatch.setattr(rft_module, "optimizer_step", recording_weights(rft_module.optimizer_step, recorded))
    changed = config.model_copy(deep=True)
    changed.rft.objective, changed.rft.average_from = "denoising", 3
    output = rft_module.run_rft(changed, judge_id="test:judge")
    assert json.loads((output / "rft.json").read_text())["average_from"] == 3
    assert len(recorded) == 4
    saved = list(load_file(str(output / "pytorch_lora_weights.safetensors")).values())
    means = [torch.stack(values).mean(0) for values in zip(*recorded[2:])]
    assert len(saved) == len(means)
    for mean in means:
        assert any(value.shape == mean.shape and torch.allclose(value, mean, atol=1e-7) for value in saved)
    assert any(not torch.allclose(mean, last) for mean, last in zip(means, recorded[-1]))


@pytest.mark.slow
def test_trajectory_rewards_reuse_the_reward_models_features(rft_run, monkeypatch):
    from magic_align.diffusion.trajectories import TrajectoryStore
    from magic_align.run import RunPaths
    from magic_align.train.rft import fit_reward_model, score_trajectories

    config, _ = rft_run
    paths = RunPaths(config.run_dir)
    model, _, known = fit_reward_model(config, paths, 0, "test:judge", "cpu")
    assert len(known) == 4  # the four judged samples
    store = TrajectoryStore(paths.trajectories(0))
    fresh = score_trajectories(config, paths, 0, model, store)
    calls = []
    original = model.backbone.features
    monkeypatch.setattr(model.backbone, "features", lambda images: calls.append(len(images)) or original(images))
    reused = score_trajectories(config, paths, 0, model, store, known)
    assert calls == []  # no backbone pass: every sample's features were known
    assert [t.reward for t in reused] == pytest.approx([t.reward for t in fresh], abs=1e-6)


def test_image_features_run_each_image_once_and_keep_the_order(tmp_path):
    from PIL import Image

    from magic_align.train.rft import LabelledImage, image_features

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(paths[-1])

    class Backbone:
        dim = 1
        seen = 0

        def features(self, images):
            Backbone.seen += len(images)
            return torch.tensor([[float(image.getpixel((0, 0))[0])] for image in images])

    items = [LabelledImage(paths[0], "a", 1.0, "real"), LabelledImage(paths[0], "b", 0.0, "real-negative"),
             LabelledImage(paths[2], "a", 0.4, "synthetic"), LabelledImage(paths[1], "b", 1.0, "real")]
    features = image_features(Backbone(), items, max_pixels=10_000, batch_size=2)
    assert features[:, 0].tolist() == [0.0, 0.0, 80.0, 40.0]
    assert Backbone.seen == 3  # the real image and its negative share one backbone pass


def test_unit_baseline_makes_each_units_weights_sum_to_zero(rft_run):
    from magic_align.diffusion.trajectories import TrajectoryStore
    from magic_align.ledger import Ledger
    from magic_align.run import RunPaths
    from magic_align.train.rft import fit_reward_model, score_trajectories

    config, _ = rft_run
    config = config.model_copy(deep=True)
    paths = RunPaths(config.run_dir)
    model, _, known = fit_reward_model(config, paths, 0, "test:judge", "cpu")
    store = TrajectoryStore(paths.trajectories(0))
    plain = score_trajectories(config, paths, 0, model, store, known)
    config.rft.baseline = "unit"
    centred = score_trajectories(config, paths, 0, model, store, known)
    with Ledger(paths.ledger) as ledger:
        unit_of = {s.sample_id: s.unit_id for s in ledger.samples(0)}
    sums: dict[str, float] = {}
    for item in centred:
        sums[unit_of[item.sample_id]] = sums.get(unit_of[item.sample_id], 0.0) + item.weight
    assert len(sums) < len(centred)  # units hold several samples
    assert all(abs(total) < 1e-6 for total in sums.values())
    assert [t.reward for t in centred] == pytest.approx([t.reward for t in plain])
    assert any(abs(a.weight - b.weight) > 1e-6 for a, b in zip(centred, plain))


def test_unit_baseline_trains_whole_units_on_shared_draws(rft_run, monkeypatch):
    import magic_align.train.rft as rft_module

    config, _ = rft_run
    config = config.model_copy(deep=True)
    config.rft.objective = "denoising"
    config.rft.baseline = "unit"
    config.rft.beta_real = 0.0
    config.rft.batch_size = 4
    drawn, weighted = [], []
    real_draw, real_error = rft_module.denoising_draw, rft_module.weighted_error

    def recording_draw(*args, **kwargs):
        drawn.append(kwargs.get("groups"))
        return real_draw(*args, **kwargs)

    def recording_error(prediction, target, weights=None):
        weighted.append(weights)
        return real_error(prediction, target, weights)

    monkeypatch.setattr(rft_module, "denoising_draw", recording_draw)
    monkeypatch.setattr(rft_module, "weighted_error", recording_error)
    rft_module.run_rft(config, judge_id="test:judge")
    calls = list(zip(drawn, weighted))  # one draw and one weighted error per step (no reference term here)
    assert calls and len(drawn) == len(weighted)
    for groups, weights in calls:  # units of 2 samples: every group twice, and each unit's weights sum to zero
        assert groups is not None and len(groups) == 4
        assert all(groups.count(group) == 2 for group in groups)
        for group in set(groups):
            assert abs(float(sum(w for g, w in zip(groups, weights.tolist()) if g == group))) < 1e-6


def test_the_reward_fingerprint_names_run_images_relative_to_the_run_so_a_copied_run_reuses_its_reward_model(tmp_path):
    from magic_align.config import load_config
    from magic_align.train.rft import LabelledImage, reward_fingerprint

    config = load_config("tiny", [f"runs_dir='{tmp_path}'"])
    outside = tmp_path / "dataset" / "real.png"

    def labels(root: Path, label: float = 1.0) -> list:
        return [LabelledImage(root / "samples" / "round-0" / "images" / "a.png", "acne", label, "synthetic"),
                LabelledImage(outside, "acne", 1.0, "real")]

    first, copy = tmp_path / "runs" / "demo", tmp_path / "elsewhere" / "demo-copy"
    assert reward_fingerprint(config, labels(first), first) == reward_fingerprint(config, labels(copy), copy)
    assert reward_fingerprint(config, labels(first), first) != reward_fingerprint(config, labels(first, 0.0), first)
    moved_outside = [labels(first)[0], LabelledImage(tmp_path / "other" / "real.png", "acne", 1.0, "real")]
    assert reward_fingerprint(config, labels(first), first) != reward_fingerprint(config, moved_outside, first)
    reseeded = load_config("tiny", [f"runs_dir='{tmp_path}'", "rft.seed=3"])
    assert reward_fingerprint(config, labels(first), first) != reward_fingerprint(reseeded, labels(first), first)


def test_condition_balanced_weights_give_every_condition_the_overall_mean_weight_by_hand():
    # acne drawn well (0.8, 0.6), psoriasis badly (0.1, 0.3), vitiligo never (0, 0); overall mean 0.3
    weights = torch.tensor([0.8, 0.1, 0.6, 0.3, 0.0, 0.0])
    conditions = ["acne", "psoriasis", "acne", "psoriasis", "vitiligo", "vitiligo"]
    balanced = condition_balanced_weights(weights, conditions)
    # acne: mean 0.7 -> x 0.3/0.7; psoriasis: mean 0.2 -> x 1.5; vitiligo: all 0 stays 0
    assert balanced.tolist() == pytest.approx([0.8 * 3 / 7, 0.15, 0.6 * 3 / 7, 0.45, 0.0, 0.0])
    assert balanced[[0, 2]].mean() == pytest.approx(balanced[[1, 3]].mean())  # the same share for each condition
    assert balanced[0] > balanced[2] and balanced[3] > balanced[1]  # the better sample of a condition still weighs more
    assert weights.tolist() == pytest.approx([0.8, 0.1, 0.6, 0.3, 0.0, 0.0])  # the input is left as it was
    with pytest.raises(ValueError, match="expected \\[N\\] and N"):
        condition_balanced_weights(weights, conditions[:2])


def test_condition_balance_is_refused_with_the_unit_baseline():
    from magic_align.config import ConfigError, load_config

    assert load_config("tiny", ["rft.balance='condition'"]).rft.balance == "condition"
    with pytest.raises(ConfigError, match="balance = 'condition' scales the plain weights"):
        load_config("tiny", ["rft.balance='condition'", "rft.baseline='unit'"])
