"""MAGIC-DPO on the tiny model: the batched stored-reference design against the authors' loop structure,
ties, resume, two processes, and the saved LoRA in plain diffusers."""

import copy
import json
import math

import pytest
import torch
from interruption import killed_at_step, recording_weights

from magic_align.config import ModelConfig
from magic_align.diffusion.ddim import ddim_step_with_log_prob, guided_noise_prediction
from magic_align.diffusion.loading import load_pipeline
from magic_align.train.dpo import pair_epoch_seed
from magic_align.train.dpo_loss import dpo_loss
from magic_align.train.session import batch_indices
from magic_align.train.trajectory_likelihood import prepare_policy_unet, step_chunks, trajectory_log_probs

STEPS, STRENGTH, GUIDANCE, ETA = 10, 0.5, 3.0, 1.0


def tiny_pipe(folder):
    return load_pipeline(ModelConfig(source="local", pretrained=str(folder), resolution=64))


def tokenize(pipe, prompts):
    tokenizer = pipe.tokenizer
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def sample_trajectories(pipe, prompt_ids, seed, steps=STEPS, strength=STRENGTH, guidance=GUIDANCE, eta=ETA):
    """Trajectories drawn with the shared DDIM step (what the sampler stores): latents [N, T+1, ...], log-probs."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[steps - int(steps * strength):]
    generator = torch.Generator().manual_seed(seed)
    cond = pipe.text_encoder(prompt_ids)[0]
    uncond = pipe.text_encoder(tokenize(pipe, [""]))[0]
    x = torch.randn(prompt_ids.shape[0], 4, 16, 16, generator=generator)
    latents, log_probs = [x], []
    for t in timesteps:
        eps = guided_noise_prediction(pipe.unet, x, int(t), cond, uncond, guidance)
        out = ddim_step_with_log_prob(scheduler, eps, int(t), x, eta, generator=generator)
        x = out.prev_sample
        latents.append(x)
        log_probs.append(out.log_prob)
    return torch.stack(latents, 1), torch.stack(log_probs, 1), timesteps.clone(), cond, uncond


def perturb_lora(unet, seed=1, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def lora_grads(unet):
    return {name: p.grad.clone() for name, p in unet.named_parameters() if p.requires_grad}


def test_stored_reference_equals_a_frozen_reference_unet_stepwise(tiny_model_dir):
    clip = 0.3  # some ratios clamp, most do not: both paths of the loss are compared
    pipe = tiny_pipe(tiny_model_dir)
    ids = tokenize(pipe, ["a photo of red skin", "a photo of red skin"])
    latents, stored, timesteps, cond, uncond = sample_trajectories(pipe, ids, seed=3)
    reference_unet = copy.deepcopy(pipe.unet)  # the authors' design: a frozen copy of the initial model
    unet = prepare_policy_unet(pipe, rank=4, alpha=4, adapter_name="dpo")
    perturb_lora(unet)
    scheduler = pipe.scheduler
    signs = torch.tensor([[1, -1]])
    beta = 2.0
    length = timesteps.shape[0]

    # ours: all T steps of both samples in one pass, reference = the stored log-probs
    policy = trajectory_log_probs(unet, scheduler, latents, timesteps, cond, uncond, guidance=GUIDANCE, eta=ETA,
                                  reduction="mean")
    loss, _ = dpo_loss(policy[None], stored[None], signs, beta, clip)
    loss.backward()
    ours = lora_grads(unet)
    unet.zero_grad(set_to_none=True)

    # the authors' structure: one step at a time, policy and reference forwards at every step
    total = 0.0
    for i in range(length):
        t = int(timesteps[i])
        with torch.no_grad():
            eps_ref = guided_noise_prediction(reference_unet, latents[:, i], t, cond, uncond, GUIDANCE)
            ref = ddim_step_with_log_prob(scheduler, eps_ref, t, latents[:, i], ETA, prev_latents=latents[:, i + 1]).log_prob
        eps = guided_noise_prediction(unet, latents[:, i], t, cond, uncond, GUIDANCE)
        lp = ddim_step_with_log_prob(scheduler, eps, t, latents[:, i], ETA, prev_latents=latents[:, i + 1]).log_prob
        step_loss, _ = dpo_loss(lp[None, :, None], ref[None, :, None], signs, beta, clip)
        (step_loss / length).backward()
        total += step_loss.item() / length
    theirs = lora_grads(unet)

    assert loss.item() == pytest.approx(total, abs=1e-5)
    assert set(ours) == set(theirs) and ours
    moved = 0
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5, rtol=1e-4), name
        moved += int(ours[name].abs().max() > 0)
    assert moved > 0  # the comparison is not between two zero gradients


def test_disabled_adapter_reproduces_the_stored_log_probs(tiny_model_dir):
    pipe = tiny_pipe(tiny_model_dir)
    ids = tokenize(pipe, ["a photo of red skin"])
    latents, stored, timesteps, cond, uncond = sample_trajectories(pipe, ids, seed=5)
    unet = prepare_policy_unet(pipe, rank=4, alpha=4, adapter_name="dpo")
    perturb_lora(unet)
    kwargs = dict(guidance=GUIDANCE, eta=ETA, reduction="mean")
    with torch.no_grad():
        moved = trajectory_log_probs(unet, pipe.scheduler, latents, timesteps, cond, uncond, **kwargs)
        unet.disable_adapters()
        recomputed = trajectory_log_probs(unet, pipe.scheduler, latents, timesteps, cond, uncond, **kwargs)
        unet.enable_adapters()
    assert torch.allclose(recomputed, stored, atol=1e-5)
    assert not torch.allclose(moved, stored, atol=1e-3)


def pair_schedule(num_pairs, step, pairs_per_step, seed):
    return batch_indices(num_pairs, pairs_per_step, step, pair_epoch_seed(seed))


def test_pair_schedule_is_a_seeded_stream_of_permutations():
    first_pass = pair_schedule(5, 0, 3, seed=0) + pair_schedule(5, 1, 3, seed=0)[:2]
    assert sorted(first_pass) == [0, 1, 2, 3, 4]
    assert pair_schedule(5, 7, 3, seed=0) == pair_schedule(5, 7, 3, seed=0)
    assert [pair_schedule(5, s, 3, seed=1) for s in range(4)] != [pair_schedule(5, s, 3, seed=2) for s in range(4)]
    assert len(pair_schedule(2, 0, 5, seed=0)) == 5  # more pairs per step than pairs: wraps into the next pass


def test_step_chunks_split_a_trajectory_into_passes():
    assert step_chunks(5, 2) == [[0, 1], [2, 3], [4]]
    assert step_chunks(4, None) == step_chunks(4, 0) == [[0, 1, 2, 3]]
    assert step_chunks(3, 8) == [[0, 1, 2]]


def test_pair_schedule_is_the_seeded_permutation_of_each_pass():
    """Position p of DPO's stream is pair p % n of the permutation of pass p // n, seeded seed * 1_000_003 + pass
    (the sequence resumed checkpoints rely on)."""
    def by_hand(num_pairs, step, pairs_per_step, seed):
        positions = range(step * pairs_per_step, (step + 1) * pairs_per_step)
        return [
            int(torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed * 1_000_003 + p // num_pairs))[p % num_pairs])
            for p in positions
        ]

    for step in range(5):
        assert pair_schedule(4, step, 3, seed=2) == by_hand(4, step, 3, 2)


# ------------------------------------------------------------------------------------- run_dpo on a run
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from magic_align.config import load_config  # noqa: E402
from magic_align.train import dpo as dpo_module  # noqa: E402
from magic_align.train.session import TrainingError, read_metrics  # noqa: E402

UNITS = 4  # 4 units x 2 samples: 3 informative pairs and 1 tie


def run_overrides(runs_dir, name, model_dir, *extra):
    return [
        f"runs_dir='{runs_dir}'", f"name='{name}'", "model.source='local'", f"model.pretrained='{model_dir}'",
        "sample.steps=4", "sample.strength=1.0", "sample.guidance=3.0",
        "dpo.lr=0.02", "dpo.beta=5.0", "dpo.clip=0.5", "dpo.lr_scheduler='cosine'", "dpo.pairs_per_step=2",
        "dpo.iterations=4", "dpo.checkpoint_every=2", "dpo.log_with=['csv']", *extra,
    ]


@pytest.fixture(scope="module")
def prepared_run(tiny_model_dir, tmp_path_factory):
    """A run directory with round-0 trajectories (from the real sampler), samples and pairs in the ledger."""
    from magic_align.diffusion.sampler import SampleRequest, SamplingSettings, sample_batch
    from magic_align.diffusion.trajectories import write_shard
    from magic_align.ledger import Ledger, PairRow, SampleRow
    from magic_align.run import prepare_run

    runs = tmp_path_factory.mktemp("dpo-runs")
    config = load_config("tiny", run_overrides(runs, "base", tiny_model_dir))
    paths = prepare_run(config)
    pipe = tiny_pipe(tiny_model_dir)
    settings = SamplingSettings.from_config(config.sample, config.model)
    requests = [SampleRequest(f"r0-u{u}-k{k}", "a photo of red skin" if u % 2 else "a dark spot", seed=10 * u + k)
                for u in range(UNITS) for k in range(2)]
    results = sample_batch(pipe, requests, settings, resolution=64)
    shard = paths.trajectories(0) / "p00-00000.safetensors"
    write_shard(shard, [r.sample_id for r in results], torch.stack([r.latents for r in results]),
                torch.stack([r.log_probs for r in results]), results[0].timesteps,
                torch.stack([r.prompt_ids for r in results]), settings.header(pipe.scheduler))
    ledger = Ledger(paths.ledger)
    ledger.add_samples([
        SampleRow(r.sample_id, 0, r.sample_id[:-3], int(r.sample_id[-1]), f"x/{r.sample_id}.png", r.sample_id, "s", "a",
                  "b", "p", 0, shard.relative_to(paths.root).as_posix(), i)
        for i, r in enumerate(results)
    ])
    outcomes = [(1, 0), (0, 1), (0, 0), (1, 0)]  # unit 2 both lose: a tie, never trained on
    ledger.replace_pairs(0, [
        PairRow(f"r0-u{u}-k0~r0-u{u}-k1", 0, f"r0-u{u}", f"r0-u{u}-k0", f"r0-u{u}-k1", a, b, a == b, a, b, None, None, "paper")
        for u, (a, b) in enumerate(outcomes)
    ])
    ledger.close()
    return runs


def copy_run(prepared_run, name):
    shutil.copytree(prepared_run / "base", prepared_run / name)
    return prepared_run / name


def lora_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "pytorch_lora_weights.safetensors"))


def test_informative_pairs_leave_out_ties(prepared_run):
    from magic_align.ledger import Ledger
    from magic_align.run import RunPaths

    paths = RunPaths(prepared_run / "base")
    examples, ties = dpo_module.informative_pairs(Ledger(paths.ledger), paths, 0)
    assert ties == 1
    assert [e.signs for e in examples] == [(1, -1), (-1, 1), (1, -1)]
    assert all("u2" not in e.pair_id for e in examples)
    flipped, _ = dpo_module.informative_pairs(Ledger(paths.ledger), paths, 0, "flipped")
    assert [e.signs for e in flipped] == [(-1, 1), (1, -1), (-1, 1)]  # a negative control trains the opposite



def test_pairs_can_be_limited_to_sources_of_some_skin_types(prepared_run):
    from magic_align.ledger import Ledger
    from magic_align.run import RunPaths

    paths = RunPaths(prepared_run / "base")
    examples, _ = dpo_module.informative_pairs(Ledger(paths.ledger), paths, 0)
    sources = sorted({e.source_id for e in examples})
    assert sources and all(sources)  # every pair names its source image
    skin_type_of = {source: (5 if index == 0 else 1) for index, source in enumerate(sources)}
    dark = load_config("tiny", ["dpo.source_skin_types=[5, 6]"]).dpo
    kept, _ = dpo_module.training_pairs(paths, 0, dark, skin_type_of)
    assert kept == [e for e in examples if e.source_id == sources[0]]
    everyone = load_config("tiny").dpo
    assert dpo_module.training_pairs(paths, 0, everyone, None)[0] == examples  # None: every pair
    from magic_align.sample import of_source_skin_types

    unknown = {source: -1 for source in sources}  # types the dataset does not give are left out
    assert of_source_skin_types(examples, unknown, [1, 2, 3, 4, 5, 6]) == []
    with pytest.raises(dpo_module.TrainingError, match=r"dpo.source_skin_types = \[5, 6\] leaves none of the 3"):
        dpo_module.training_pairs(paths, 0, dark, unknown)


@pytest.fixture(scope="module")
def straight_run(prepared_run, tiny_model_dir):
    """One uninterrupted DPO run (4 steps of 2 pairs); several tests compare against it."""
    copy_run(prepared_run, "straight")
    return dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "straight", tiny_model_dir)))


def test_run_dpo_writes_a_lora_plain_diffusers_loads_and_that_changes_outputs(prepared_run, straight_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    output = straight_run
    assert output == prepared_run / "straight" / "aligned" / "dpo"
    assert (output / "round-0" / "pytorch_lora_weights.safetensors").is_file()
    for folder in (output, output / "round-0"):  # the results name the objective that made them
        assert json.loads((folder / "dpo.json").read_text())["objective"] == "trajectory"
    rows = read_metrics(prepared_run / "straight" / "logs" / "dpo" / "round-0" / "metrics.csv")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert {"loss", "implicit_accuracy", "clamped_share", "mean_log_ratio", "grad_norm", "lr"} <= set(rows[0])
    assert rows[0]["mean_log_ratio"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert rows[0]["grad_norm"] > 0
    assert rows[-1]["lr"] < rows[0]["lr"]  # the cosine schedule advanced

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None, requires_safety_checker=False)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, pipe.tokenizer.model_max_length, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(x, 501, encoder_hidden_states=embeds).sample
        pipe.load_lora_weights(str(output))
        after = pipe.unet(x, 501, encoder_hidden_states=embeds).sample
    assert (after - before).abs().max() > 1e-4


def test_an_interrupted_run_resumes_to_the_same_lora(prepared_run, straight_run, tiny_model_dir, monkeypatch):
    copy_run(prepared_run, "resumed")
    real_step = dpo_module.optimizer_step
    config = load_config("tiny", run_overrides(prepared_run, "resumed", tiny_model_dir))
    monkeypatch.setattr(dpo_module, "optimizer_step", killed_at_step(real_step, 3))  # after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        dpo_module.run_dpo(config)
    monkeypatch.setattr(dpo_module, "optimizer_step", real_step)
    assert not (prepared_run / "resumed" / "aligned" / "dpo").exists()
    resumed = dpo_module.run_dpo(config)

    expected, got = lora_tensors(straight_run), lora_tensors(resumed)
    assert set(expected) == set(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    rows = read_metrics(prepared_run / "resumed" / "logs" / "dpo" / "round-0" / "metrics.csv")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    reference = read_metrics(prepared_run / "straight" / "logs" / "dpo" / "round-0" / "metrics.csv")
    assert [row["loss"] for row in rows] == pytest.approx([row["loss"] for row in reference], abs=1e-6)


def test_checkpoints_of_other_settings_are_set_aside_and_the_round_trains_again(prepared_run, tiny_model_dir, capsys):
    """A finished round's checkpoint must not stand in for a run with another seed or pair set: it is moved aside
    (kept) and the round trains from the start, to exactly what a fresh run with the new settings gives."""
    run = copy_run(prepared_run, "refit")
    finished = lora_tensors(dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "refit", tiny_model_dir))))
    again = dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "refit", tiny_model_dir,
                                                                  "dpo.checkpoint_every=4", "dpo.log_with=[]",
                                                                  "dpo.steps_per_forward=2")))  # memory only
    assert all(torch.equal(finished[key], value) for key, value in lora_tensors(again).items())  # resumed, not redone
    folder = run / "checkpoints" / "dpo" / "round-0"
    assert not folder.with_name("round-0.other-settings").exists()

    capsys.readouterr()
    reseeded = lora_tensors(dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "refit", tiny_model_dir,
                                                                                  "dpo.seed=7"))))
    assert "kept in round-0.other-settings (their metrics beside them), training from the start" in capsys.readouterr().err
    assert (folder.with_name("round-0.other-settings") / "step-0000004").is_dir()  # the old run is kept
    old_metrics = read_metrics(run / "logs" / "dpo" / "round-0.other-settings" / "metrics.csv")  # with its metrics
    assert [row["step"] for row in old_metrics] == [1, 2, 3, 4]
    assert [row["step"] for row in read_metrics(run / "logs" / "dpo" / "round-0" / "metrics.csv")] == [1, 2, 3, 4]
    copy_run(prepared_run, "fresh-seed-7")
    fresh = lora_tensors(dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "fresh-seed-7",
                                                                               tiny_model_dir, "dpo.seed=7"))))
    assert all(torch.equal(fresh[key], reseeded[key]) for key in fresh)
    assert not all(torch.equal(finished[key], reseeded[key]) for key in fresh)

    # back to the first settings: their checkpoints come back and resume (nothing is trained again)
    capsys.readouterr()
    first_run = (folder.with_name("round-0.other-settings") / "step-0000004").stat().st_ino
    back = lora_tensors(dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "refit", tiny_model_dir))))
    said = capsys.readouterr().err
    assert "kept in round-0.other-settings-2" in said
    assert "resuming the checkpoints of these settings set aside earlier in round-0.other-settings" in said
    assert (folder / "step-0000004").stat().st_ino == first_run  # the very checkpoint, not a new one
    assert all(torch.equal(finished[key], back[key]) for key in finished)
    assert [row["step"] for row in read_metrics(run / "logs" / "dpo" / "round-0" / "metrics.csv")] == [1, 2, 3, 4]
    assert not folder.with_name("round-0.other-settings").exists()  # it is the round's folder again
    assert (folder.with_name("round-0.other-settings-2") / "step-0000004").is_dir()  # seed 7's run, kept

    from magic_align.ledger import Ledger, PairRow  # the same settings on other pairs: trained again as well

    with Ledger(run / "ledger.sqlite") as ledger:
        ledger.replace_pairs(0, [PairRow("r0-u0-k0~r0-u0-k1", 0, "r0-u0", "r0-u0-k0", "r0-u0-k1", 0, 1, False, 0, 1,
                                         None, None, "paper")])
    dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "refit", tiny_model_dir, "dpo.seed=7")))
    assert folder.with_name("round-0.other-settings-2").is_dir()
    assert (run / "logs" / "dpo" / "round-0.other-settings-2" / "metrics.csv").is_file()


def test_the_stored_log_probs_are_the_reference_only_when_the_preliminary_model_sampled_in_fp32():
    settings = load_config("tiny").dpo
    bf16 = load_config("tiny", ["dpo.mixed_precision='bf16'"]).dpo
    assert dpo_module.stored_log_probs_are_reference(settings, 0, {})
    assert not dpo_module.stored_log_probs_are_reference(settings, 1, {})  # sampled by the round-0 policy
    assert not dpo_module.stored_log_probs_are_reference(settings, 0, {"policy_lora": "x"})
    assert not dpo_module.stored_log_probs_are_reference(bf16, 0, {})  # recomputed under the same autocast
    # sampled in half precision: the stored log-probs carry its rounding, the fp32 policy's do not
    assert not dpo_module.stored_log_probs_are_reference(settings, 0, {"model_dtype": "float16"})
    assert dpo_module.stored_log_probs_are_reference(settings, 0, {"model_dtype": "float32"})


def test_stored_log_probs_of_another_reduction_or_model_are_refused():
    from magic_align.train.trajectory_likelihood import TrajectorySettings

    settings = load_config("tiny").dpo
    sampling = TrajectorySettings(steps=4, eta=1.0, guidance=3.0, negative_prompt="", reduction="mean")
    dpo_module.check_stored_reference(settings, sampling, {"model_hash": "a"}, "a", 0)
    dpo_module.check_stored_reference(settings, sampling, {}, "a", 0)  # an old header without a hash
    with pytest.raises(TrainingError, match="reduction 'sum'"):
        dpo_module.check_stored_reference(settings, TrajectorySettings(4, 1.0, 3.0, "", "sum"), {}, "a", 0)
    with pytest.raises(TrainingError, match="sample the round again"):
        dpo_module.check_stored_reference(settings, sampling, {"model_hash": "a"}, "b", 0)


@pytest.mark.slow
def test_recomputed_reference_equals_the_stored_one_in_round_zero(prepared_run, straight_run, tiny_model_dir,
                                                                   monkeypatch):
    copy_run(prepared_run, "recomputed")
    monkeypatch.setattr(dpo_module, "stored_log_probs_are_reference", lambda settings, round_index, header: False)
    recomputed = dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "recomputed", tiny_model_dir)))
    a, b = lora_tensors(straight_run), lora_tensors(recomputed)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_a_round_without_informative_pairs_is_a_clear_error(prepared_run, tiny_model_dir):
    from magic_align.ledger import Ledger

    root = copy_run(prepared_run, "ties-only")
    ledger = Ledger(root / "ledger.sqlite")
    ledger.replace_pairs(0, [p for p in ledger.pairs(0) if p.tie])
    ledger.close()
    with pytest.raises(TrainingError, match="no informative pair"):
        dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "ties-only", tiny_model_dir)))


def train_on_two_processes(prepared_run, name, tiny_model_dir, *extra):
    """`magic train dpo` under `accelerate launch --num_processes 2 --cpu` on a copy of the prepared run."""
    copy_run(prepared_run, name)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "magic_align", "train", "dpo", "tiny", "--round", "0"]
    for override in run_overrides(prepared_run, name, tiny_model_dir, *extra):
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return prepared_run / name / "aligned" / "dpo"


def assert_same_lora(one, two):
    a, b = lora_tensors(one), lora_tensors(two)
    assert set(a) == set(b)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(prepared_run, straight_run, tiny_model_dir):
    assert_same_lora(straight_run, train_on_two_processes(prepared_run, "two", tiny_model_dir))


# ------------------------------------------------------------------------------------ the shared loop
def test_metrics_logger_drops_rows_after_the_resumed_step_and_widens_for_new_columns(tmp_path):
    from magic_align.train.session import MetricsLogger

    logger = MetricsLogger(tmp_path, ["csv"])
    for step in (1, 2, 3):
        logger.log(step, {"loss": step / 10})
    logger.close()
    resumed = MetricsLogger(tmp_path, ["csv"], resume_step=2)
    resumed.log(3, {"loss": 0.5, "lr": 1e-3})
    resumed.close()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[2]["loss"] == 0.5 and rows[2]["lr"] == 1e-3
    assert rows[0]["loss"] == 0.1 and rows[0]["lr"] != rows[0]["lr"]  # NaN where the column did not exist yet
    fresh = MetricsLogger(tmp_path, ["csv"])  # no checkpoint: an earlier run's rows are gone
    fresh.close()
    assert not (tmp_path / "metrics.csv").exists()


def test_eight_bit_adam_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import builtins

    from magic_align.train.session import make_optimizer

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(TrainingError, match="bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, use_8bit=True)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2), requires_grad=False)], lr=1e-3)


def test_rounds_sample_judge_pair_and_continue_from_the_previous_lora(tmp_path, monkeypatch):
    config = load_config("tiny", [f"runs_dir='{tmp_path}'", "rounds=3"])
    calls = []
    monkeypatch.setattr(dpo_module, "run_sample", lambda c, round_index, policy_lora: calls.append(("sample", round_index, policy_lora)))
    monkeypatch.setattr(dpo_module, "run_judge", lambda c, round_index, console=None: calls.append(("judge", round_index)))
    monkeypatch.setattr(dpo_module, "run_pairs", lambda c, round_index: calls.append(("pairs", round_index)))
    monkeypatch.setattr(dpo_module, "run_dpo", lambda c, round_index, init_lora: calls.append(("dpo", round_index, init_lora)))
    dpo_module.run_rounds(config)
    aligned = tmp_path / "tiny" / "aligned" / "dpo"
    assert calls == [
        ("dpo", 0, None),
        ("sample", 1, aligned / "round-0"), ("judge", 1), ("pairs", 1), ("dpo", 1, aligned / "round-0"),
        ("sample", 2, aligned / "round-1"), ("judge", 2), ("pairs", 2), ("dpo", 2, aligned / "round-1"),
    ]


def test_lora_targets_choose_the_adapted_projections(tiny_model_dir):
    from magic_align.train.session import TrainingError

    unet = prepare_policy_unet(tiny_pipe(tiny_model_dir), rank=4, alpha=4, adapter_name="dpo",
                               targets=["attn2.to_k", "attn2.to_v"])
    trainable = {name.split(".lora_")[0] for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in trainable)
    everything = prepare_policy_unet(tiny_pipe(tiny_model_dir), rank=4, alpha=4, adapter_name="dpo")
    assert len({n for n, p in everything.named_parameters() if p.requires_grad}) > 2 * len(trainable)
    with pytest.raises(TrainingError, match="no attention layer matched"):
        prepare_policy_unet(tiny_pipe(tiny_model_dir), rank=4, alpha=4, adapter_name="dpo", targets=["attn9.to_x"])


# ------------------------------------------------------------------------ Diffusion-DPO (denoising objective)
DENOISING = ("dpo.objective='denoising'", "dpo.denoising_beta=2000.0", "dpo.iterations=6", "dpo.checkpoint_every=3")


@pytest.fixture(scope="module")
def denoising_run(prepared_run, tiny_model_dir):
    copy_run(prepared_run, "denoising")
    return dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "denoising", tiny_model_dir, *DENOISING)))


@torch.no_grad()
def winner_advantage(pipe, root, draws=12):
    """Mean over pairs and noise draws of (loser's error - winner's error) of the noise prediction at the pairs'
    final latents, at fixed timesteps and noises: it rises when a model prefers the winners more."""
    from diffusers import DDPMScheduler

    from magic_align.diffusion.trajectories import TrajectoryStore
    from magic_align.ledger import Ledger
    from magic_align.run import RunPaths

    paths = RunPaths(root)
    examples, _ = dpo_module.informative_pairs(Ledger(paths.ledger), paths, 0)
    store = TrajectoryStore(paths.trajectories(0))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(7)
    values = []
    for example in examples:
        batch = store.get(list(example.sample_ids))
        clean = batch.latents[:, -1]
        cond = pipe.text_encoder(batch.prompt_ids)[0]
        for _ in range(draws):
            noise = torch.randn(clean.shape[1:], generator=generator).expand_as(clean)
            t = torch.randint(0, int(batch.timesteps[0].max()) + 1, (1,), generator=generator).repeat(2)
            error = (pipe.unet(scheduler.add_noise(clean, noise, t), t, encoder_hidden_states=cond).sample - noise)
            error = error.pow(2).flatten(1).mean(1)
            winner = 0 if example.signs[0] == 1 else 1
            values.append(float(error[1 - winner] - error[winner]))
    return sum(values) / len(values)


def test_denoising_objective_learns_to_prefer_the_winners(prepared_run, denoising_run, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    assert denoising_run == prepared_run / "denoising" / "aligned" / "dpo"
    assert json.loads((denoising_run / "dpo.json").read_text())["objective"] == "denoising"
    rows = read_metrics(prepared_run / "denoising" / "logs" / "dpo" / "round-0" / "metrics.csv")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert rows[0]["mean_log_ratio"] == pytest.approx(0.0, abs=1e-7)
    assert rows[0]["grad_norm"] > 0

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None, requires_safety_checker=False)
    before = winner_advantage(pipe, prepared_run / "denoising")
    pipe.load_lora_weights(str(denoising_run))
    after = winner_advantage(pipe, prepared_run / "denoising")
    assert after > before + 1e-4, (before, after)


def test_the_flipped_preference_control_learns_to_prefer_the_losers_and_says_it_is_a_control(prepared_run,
                                                                                             tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    copy_run(prepared_run, "flipped")
    control = dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "flipped", tiny_model_dir, *DENOISING,
                                                                   "dpo.preference_control='flipped'")))
    assert json.loads((control / "dpo.json").read_text())["preference_control"] == "flipped"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None, requires_safety_checker=False)
    before = winner_advantage(pipe, prepared_run / "flipped")  # the judge's winners, as in the ledger
    pipe.load_lora_weights(str(control))
    after = winner_advantage(pipe, prepared_run / "flipped")
    assert after < before - 1e-4, (before, after)


@torch.no_grad()
def distance_from_initial(pipe, root, lora, draws=6, sample_ids=None):
    """Mean squared distance between the noise predictions with and without the DPO LoRA at the final latents of
    `sample_ids` (every sample: None), on fixed noises and timesteps: how far training moved the policy from the model
    it started from."""
    from diffusers import DDPMScheduler

    from magic_align.diffusion.trajectories import TrajectoryStore
    from magic_align.run import RunPaths

    store = TrajectoryStore(RunPaths(root).trajectories(0))
    batch = store.get(sample_ids or store.sample_ids())
    clean, cond = batch.latents[:, -1], pipe.text_encoder(batch.prompt_ids)[0]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(11)
    pipe.load_lora_weights(str(lora), adapter_name="dpo")
    total = 0.0
    for _ in range(draws):
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, int(batch.timesteps[0].max()) + 1, (clean.shape[0],), generator=generator)
        noisy = scheduler.add_noise(clean, noise, t)
        pipe.set_adapters(["dpo"], [1.0])
        trained = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
        pipe.set_adapters(["dpo"], [0.0])
        initial = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
        total += float((trained - initial).pow(2).mean())
    pipe.delete_adapters(["dpo"])
    return total / draws


def test_the_reference_weight_keeps_the_dpo_policy_near_the_initial_model(prepared_run, denoising_run, tiny_model_dir):
    """dpo.reference_weight adds the distance of the policy's noise predictions from the initial model's on the
    pairs' draws: logged beside the preference loss (zero at the first step, where the fresh adapter is the initial
    model), part of the logged loss, recorded in dpo.json, and a heavy weight leaves the policy closer to the initial
    model than Diffusion-DPO alone does."""
    from diffusers import StableDiffusionPipeline

    copy_run(prepared_run, "anchored")
    weight = 1e5
    anchored = dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "anchored", tiny_model_dir, *DENOISING,
                                                                    f"dpo.reference_weight={weight}")))
    assert json.loads((anchored / "dpo.json").read_text())["reference_weight"] == weight
    rows = read_metrics(prepared_run / "anchored" / "logs" / "dpo" / "round-0" / "metrics.csv")
    assert rows[0]["reference_distance"] == 0 and rows[-1]["reference_distance"] > 0
    for row in rows:
        assert row["loss"] == pytest.approx(row["preference_loss"] + weight * row["reference_distance"], rel=1e-5)
    free_rows = read_metrics(prepared_run / "denoising" / "logs" / "dpo" / "round-0" / "metrics.csv")
    assert "reference_distance" not in free_rows[0]

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None, requires_safety_checker=False)
    free = distance_from_initial(pipe, prepared_run / "denoising", denoising_run)
    assert 0 < distance_from_initial(pipe, prepared_run / "anchored", anchored) < free


def test_preserved_samples_are_those_of_units_where_every_sample_won():
    """Only a unit all of whose pairs are both-win ties gives its samples (each once); a unit with a loser, or whose
    samples all lost, gives none."""
    from types import SimpleNamespace

    def pair(unit, a, b, outcome_a, outcome_b):
        return SimpleNamespace(unit_id=unit, sample_a=a, sample_b=b, outcome_a=outcome_a, outcome_b=outcome_b)

    ledger = SimpleNamespace(pairs=lambda round_index: [
        pair("u0", "u0-k0", "u0-k1", 1, 1), pair("u0", "u0-k0", "u0-k2", 1, 1), pair("u0", "u0-k1", "u0-k2", 1, 1),
        pair("u1", "u1-k0", "u1-k1", 1, 1), pair("u1", "u1-k0", "u1-k2", 1, 0), pair("u1", "u1-k1", "u1-k2", 1, 0),
        pair("u2", "u2-k0", "u2-k1", 0, 0),
        pair("u3", "u3-k1", "u3-k0", 1, 1),
    ])
    assert dpo_module.preserved_samples(ledger, 0) == ["u0-k0", "u0-k1", "u0-k2", "u3-k0", "u3-k1"]


def both_win(root, unit_id, sample_b=None):
    """Make `unit_id`'s pair a both-win tie in the run's ledger (optionally naming another second sample)."""
    from dataclasses import replace

    from magic_align.ledger import Ledger

    ledger = Ledger(root / "ledger.sqlite")
    ledger.replace_pairs(0, [
        pair if pair.unit_id != unit_id else
        replace(pair, outcome_a=1, outcome_b=1, score_a=1, score_b=1, sample_b=sample_b or pair.sample_b)
        for pair in ledger.pairs(0)
    ])
    ledger.close()


def test_share_of_the_mean_gives_the_mean_over_processes_however_the_values_split():
    values = torch.tensor([0.3, 1.2, 0.5, 2.0, 0.1, 0.7, 0.9, 1.6])
    for processes in (1, 2, 3, 5, 8, 11):  # 3: shares of 3, 3 and 2; 11: three processes hold nothing
        shares = [values[rank::processes] for rank in range(processes)]
        parts = [dpo_module.share_of_the_mean(share, len(values), processes) for share in shares]
        assert float(torch.stack(parts).mean()) == pytest.approx(float(values.mean()), rel=1e-6), processes


def test_preserved_samples_are_drawn_within_the_timestep_range_and_checked_before_training(prepared_run, tiny_model_dir,
                                                                                          monkeypatch):
    """One preserved sample a step (of 2), re-noised within dpo.timestep_range as the pairs are; a preserved sample
    with no stored trajectory is refused before training starts."""
    from magic_align.diffusion.trajectories import TrajectoryStore
    from magic_align.run import RunPaths

    root = copy_run(prepared_run, "preserved-range")
    both_win(root, "r0-u2")
    real_noising, drawn = dpo_module.noised_with_target, []

    def noise_and_record(scheduler, clean, noise, timesteps):
        drawn.append([int(t) for t in timesteps])
        return real_noising(scheduler, clean, noise, timesteps)

    monkeypatch.setattr(dpo_module, "noised_with_target", noise_and_record)
    dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "preserved-range", tiny_model_dir, *DENOISING,
                                                         "dpo.timestep_range=[0.6, 0.9]", "dpo.preservation_weight=1.0",
                                                         "dpo.preservation_per_step=1")))
    store = TrajectoryStore(RunPaths(root).trajectories(0))
    visited = int(store.get(store.sample_ids()[:1]).timesteps[0].max())
    assert [len(rows) for rows in drawn] == [4, 1] * 6  # each iteration: 2 pairs x 2 samples, then 1 preserved
    assert all(int(0.6 * visited) <= t <= int(0.9 * visited) for rows in drawn for t in rows), (visited, drawn)

    missing = copy_run(prepared_run, "preserved-missing")
    both_win(missing, "r0-u2", sample_b="r0-u9-k1")
    with pytest.raises(dpo_module.TrainingError, match=r"no trajectory shard in .* holds sample r0-u9-k1"):
        dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "preserved-missing", tiny_model_dir,
                                                             *DENOISING, "dpo.preservation_weight=1.0")))
    assert not (missing / "checkpoints" / "dpo").exists()


def test_preservation_keeps_the_policy_near_the_initial_model_on_the_units_it_already_draws_well(prepared_run,
                                                                                                 denoising_run,
                                                                                                 tiny_model_dir):
    """dpo.preservation_weight adds the distance of the policy's noise predictions from the initial model's on the
    samples of the units where every sample won: logged, part of the logged loss, recorded in dpo.json, and a heavy
    weight leaves the policy closer to the initial model on those samples than Diffusion-DPO alone does. A run with
    no such unit is refused with the setting named."""
    from diffusers import StableDiffusionPipeline

    root = copy_run(prepared_run, "preserved")
    with pytest.raises(dpo_module.TrainingError, match=r"dpo.preservation_weight = 10.0, but no unit of round 0"):
        dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "preserved", tiny_model_dir, *DENOISING,
                                                             "dpo.preservation_weight=10.0")))
    assert not (root / "checkpoints" / "dpo").exists()  # refused before anything was loaded or written
    both_win(root, "r0-u2")
    weight = 1e5
    preserved = dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "preserved", tiny_model_dir,
                                                                     *DENOISING, f"dpo.preservation_weight={weight}")))
    summary = json.loads((preserved / "dpo.json").read_text())
    assert (summary["preservation_weight"], summary["preserved_samples"], summary["pairs"]) == (weight, 2, 3)
    rows = read_metrics(root / "logs" / "dpo" / "round-0" / "metrics.csv")
    assert rows[0]["preservation_distance"] == 0 and rows[-1]["preservation_distance"] > 0
    for row in rows:
        assert row["loss"] == pytest.approx(row["preference_loss"] + weight * row["preservation_distance"], rel=1e-5)

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None, requires_safety_checker=False)
    kept = ["r0-u2-k0", "r0-u2-k1"]
    free = distance_from_initial(pipe, prepared_run / "denoising", denoising_run, sample_ids=kept)
    assert 0 < distance_from_initial(pipe, root, preserved, sample_ids=kept) < free


def test_timestep_range_re_noises_pairs_only_within_it(prepared_run, tiny_model_dir, monkeypatch):
    """dpo.timestep_range = [0.6, 0.9]: every pair is re-noised to a timestep from 0.6 to 0.9 x the highest one its
    sampler visited (a dozen uniform draws over the whole range would all land there with probability 0.3 ** 12)."""
    from magic_align.diffusion.trajectories import TrajectoryStore
    from magic_align.run import RunPaths

    copy_run(prepared_run, "floored")
    real_noising, drawn = dpo_module.noised_with_target, []

    def noise_and_record(scheduler, clean, noise, timesteps):
        drawn.extend(int(t) for t in timesteps)
        return real_noising(scheduler, clean, noise, timesteps)

    monkeypatch.setattr(dpo_module, "noised_with_target", noise_and_record)
    dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "floored", tiny_model_dir, *DENOISING,
                                                         "dpo.timestep_range=[0.6, 0.9]")))
    store = TrajectoryStore(RunPaths(prepared_run / "floored").trajectories(0))
    visited = int(store.get(store.sample_ids()[:1]).timesteps[0].max())
    assert len(drawn) == 6 * 2 * 2  # 6 iterations x 2 pairs x both samples
    assert all(int(0.6 * visited) <= t <= int(0.9 * visited) for t in drawn), (visited, sorted(drawn))


def test_average_from_saves_the_mean_of_the_weights_from_that_iteration_on(prepared_run, tiny_model_dir, monkeypatch):
    """dpo.average_from = 4 of 6 iterations: the saved LoRA holds, for every trainable tensor, the mean of its values
    after iterations 4, 5 and 6 (not the last values); dpo.json records it."""
    copy_run(prepared_run, "averaged")
    recorded = []
    monkeypatch.setattr(dpo_module, "optimizer_step", recording_weights(dpo_module.optimizer_step, recorded))
    output = dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "averaged", tiny_model_dir, *DENOISING,
                                                                  "dpo.average_from=4")))
    assert json.loads((output / "dpo.json").read_text())["average_from"] == 4
    assert len(recorded) == 6
    means = [torch.stack(values).mean(0) for values in zip(*recorded[3:])]
    last = recorded[-1]
    saved = list(lora_tensors(output).values())
    assert len(saved) == len(means)
    moved = 0
    for mean, final in zip(means, last):
        assert any(value.shape == mean.shape and torch.allclose(value, mean, atol=1e-7) for value in saved)
        moved += not torch.allclose(mean, final)
    assert moved > 0  # the mean is not the last weights, so the test tells the two apart


def test_an_averaged_run_resumes_to_the_same_lora(prepared_run, tiny_model_dir, monkeypatch):
    """Killed after the step-3 checkpoint with the average begun at step 2, the rerun averages exactly what an
    uninterrupted run does: the average is checkpointed with the weights."""
    settings = (*DENOISING, "dpo.average_from=2")
    copy_run(prepared_run, "averaged-whole")
    whole = dpo_module.run_dpo(load_config("tiny", run_overrides(prepared_run, "averaged-whole", tiny_model_dir,
                                                                 *settings)))
    copy_run(prepared_run, "averaged-resumed")
    config = load_config("tiny", run_overrides(prepared_run, "averaged-resumed", tiny_model_dir, *settings))
    assert_same_tensors(whole, killed_then_resumed(config, 5, monkeypatch))
    # a rerun of the finished round resumes its last checkpoint, trains nothing, and saves the same mean again
    recorded = []
    monkeypatch.setattr(dpo_module, "optimizer_step", recording_weights(dpo_module.optimizer_step, recorded))
    again = dpo_module.run_dpo(config)
    assert recorded == []
    assert_same_tensors(whole, again)


def killed_then_resumed(config, kill_at: int, monkeypatch):
    """DPO killed before optimizer step `kill_at`, then run again: the folder of the LoRA the rerun wrote."""
    real_step = dpo_module.optimizer_step
    monkeypatch.setattr(dpo_module, "optimizer_step", killed_at_step(real_step, kill_at))
    with pytest.raises(KeyboardInterrupt):
        dpo_module.run_dpo(config)
    monkeypatch.setattr(dpo_module, "optimizer_step", real_step)
    return dpo_module.run_dpo(config)


def assert_same_tensors(expected_folder, got_folder):
    expected, got = lora_tensors(expected_folder), lora_tensors(got_folder)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_denoising_objective_resumes_to_the_same_lora(prepared_run, denoising_run, tiny_model_dir, monkeypatch):
    copy_run(prepared_run, "denoising-resumed")
    config = load_config("tiny", run_overrides(prepared_run, "denoising-resumed", tiny_model_dir, *DENOISING))
    assert_same_tensors(denoising_run, killed_then_resumed(config, 4, monkeypatch))  # after the step-3 checkpoint


@pytest.mark.slow
def test_denoising_objective_on_two_processes_matches_one(prepared_run, denoising_run, tiny_model_dir):
    """The noise and timestep of a pair are seeded by (step, pair), not by process, so the split changes nothing."""
    assert_same_lora(denoising_run, train_on_two_processes(prepared_run, "denoising-two", tiny_model_dir, *DENOISING))


def test_dpo_reports_progress_lines_and_ctrl_c_names_the_step_and_checkpoint(prepared_run, tiny_model_dir, monkeypatch):
    """Through the CLI, off a terminal: a line per step with the loss; Ctrl-C before step 3 exits 130 naming step 2
    and the step-2 checkpoint; the rerun says it continues and finishes."""
    from typer.testing import CliRunner

    from magic_align import cli

    copy_run(prepared_run, "progress")
    arguments = ["train", "dpo", "tiny", "--round", "0"]
    for override in run_overrides(prepared_run, "progress", tiny_model_dir):
        arguments += ["--set", override]
    monkeypatch.setenv("MAGIC_PROGRESS_EVERY", "1")
    real_step = dpo_module.optimizer_step
    monkeypatch.setattr(dpo_module, "optimizer_step", killed_at_step(real_step, 3))
    result = CliRunner().invoke(cli.app, arguments)
    assert result.exit_code == 130, result.output
    lines = result.output.strip().splitlines()
    assert any(line.startswith("dpo round 0 step 1/4 loss ") and " eta " in line for line in lines)
    assert any(line.startswith("dpo round 0 step 2/4 loss ") for line in lines)
    assert lines[-1] == ("interrupted: dpo round 0 stopped after step 2 of 4; its checkpoint at step 2 is kept: "
                         "rerun the same command to resume from it")

    monkeypatch.setattr(dpo_module, "optimizer_step", real_step)
    result = CliRunner().invoke(cli.app, arguments)
    assert result.exit_code == 0, result.output
    assert "dpo round 0: 2/4 steps already done, continuing" in result.output
    assert "dpo round 0 step 4/4 loss " in result.output


def test_bf16_scores_the_policy_against_a_reference_in_the_same_precision(prepared_run, tiny_model_dir):
    """The stored log-probs are fp32; under bf16 the reference is recomputed under the same autocast, so the first
    step's log-ratio is 0 (compared with the stored ones it is the bf16 rounding gap)."""
    from magic_align.run import RunPaths

    copy_run(prepared_run, "bf16")
    config = load_config("tiny", run_overrides(prepared_run, "bf16", tiny_model_dir, "dpo.mixed_precision='bf16'",
                                               "dpo.iterations=1"))
    dpo_module.run_dpo(config)
    (row,) = read_metrics(prepared_run / "bf16" / "logs" / "dpo" / "round-0" / "metrics.csv")
    assert row["mean_log_ratio"] == pytest.approx(0.0, abs=1e-6)

    # what the fix avoids: the same policy under bf16 against the stored fp32 log-probs
    from magic_align.diffusion.trajectories import TrajectoryStore

    store = TrajectoryStore(RunPaths(prepared_run / "bf16").trajectories(0))
    batch = store.get(["r0-u0-k0", "r0-u0-k1"])
    pipe = tiny_pipe(tiny_model_dir)
    pipe.scheduler.set_timesteps(4)  # the run's sample.steps
    cond = pipe.text_encoder(batch.prompt_ids)[0]
    negative = pipe.text_encoder(tokenize(pipe, [""]))[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = trajectory_log_probs(pipe.unet, pipe.scheduler, batch.latents, batch.timesteps[0], cond, negative,
                                    guidance=3.0, eta=1.0, reduction="mean")
    assert (bf16.float() - batch.log_probs).abs().mean() > 1e-4


def test_the_restored_checkpoints_are_the_furthest_along_and_what_a_start_left_is_kept_aside(tmp_path):
    from types import SimpleNamespace

    from magic_align.train.session import CHECKPOINT_PREFIX, TRAINING_STATE, set_aside_other_checkpoints

    def checkpoint(folder: Path, step: int, fingerprint: str) -> None:
        (folder / f"{CHECKPOINT_PREFIX}{step:07d}").mkdir(parents=True)
        (folder / f"{CHECKPOINT_PREFIX}{step:07d}" / TRAINING_STATE).write_text(json.dumps({"fingerprint": fingerprint}))

    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    directory, logs = tmp_path / "checkpoints" / "round-0", tmp_path / "logs" / "round-0"
    checkpoint(directory.with_name("round-0.other-settings-2"), 4, "A")  # lexically after -10
    checkpoint(directory.with_name("round-0.other-settings-10"), 2, "A")
    checkpoint(directory.with_name("round-0.other-settings"), 9, "B")
    logs.with_name("round-0.other-settings-2").mkdir(parents=True)
    (logs.with_name("round-0.other-settings-2") / "metrics.csv").write_text("step\n1\n")
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("step\n")  # a start of A that crashed before its first checkpoint
    (directory / ".step-0000001.partial").mkdir(parents=True)

    swap = set_aside_other_checkpoints(accelerator, directory, "A", logs=logs)
    assert swap.moved is None and swap.restored == directory.with_name("round-0.other-settings-2")
    assert (directory / f"{CHECKPOINT_PREFIX}0000004").is_dir()  # the furthest along, not the lexically first
    assert (logs / "metrics.csv").read_text() == "step\n1\n"  # its own metrics came back with it
    leftovers = directory.with_name("round-0.other-settings-3")  # the crashed start's leftovers, kept aside
    assert (leftovers / ".step-0000001.partial").is_dir()
    assert (logs.with_name("round-0.other-settings-3") / "metrics.csv").read_text() == "step\n"
