import pytest

from magic_align.config import load_config
from magic_align.diffusion.trajectories import TrajectoryStore
from magic_align.ledger import Ledger
from magic_align.run import RunPaths
from magic_align.sample import plan_units, run_sample


def tiny_config(tmp_path, *extra):
    return load_config("tiny", [f"runs_dir='{tmp_path}'", "sample.steps=10", "sample.strength=0.3", *extra])


@pytest.mark.slow
def test_sample_stage_writes_images_shards_and_ledger_rows_and_resumes(tmp_path):
    config = tiny_config(tmp_path, "sample.num_sources=2", "sample.shard_size=3")
    first = run_sample(config, progress=False)
    assert (first.units_sampled, first.samples_written) == (2, 4)
    paths = RunPaths(config.run_dir)
    rows = Ledger(paths.ledger).samples(0)
    assert [row.sample_id for row in rows] == ["r0-u00000-k0", "r0-u00000-k1", "r0-u00001-k0", "r0-u00001-k1"]
    for row in rows:
        assert (paths.root / row.image_path).is_file()
        assert row.target_label != row.source_label
        assert row.prompt == config.model.prompt_template.format(token=row.prompt.split()[3]) and row.synthetic
    assert len({row.seed for row in rows}) == 4
    store = TrajectoryStore(paths.trajectories(0))
    batch = store.get([row.sample_id for row in rows])
    assert batch.timesteps[0].tolist() == [201, 101, 1]
    assert batch.latents.shape == (4, 4, 4, 16, 16)
    assert store.header(rows[0].sample_id)["model_hash"] == first.model_hash
    for row in rows:  # the ledger points at the right shard row
        assert store.locate(row.sample_id) == (paths.root / row.shard, row.shard_index)

    # a rerun with more units samples only the new ones; the old ones are untouched
    before = {row.sample_id: row.image_sha256 for row in rows}
    config = tiny_config(tmp_path, "sample.num_sources=3", "sample.shard_size=3")
    second = run_sample(config, progress=False)
    assert (second.units_already_done, second.units_sampled, second.samples_written) == (2, 1, 2)
    rows = Ledger(paths.ledger).samples(0)
    assert len(rows) == 6 and {r.sample_id: r.image_sha256 for r in rows if r.sample_id in before} == before
    assert run_sample(config, progress=False).samples_written == 0

    # a crash between writing a shard and the ledger: rows come back from the shard headers
    paths.ledger.unlink()
    for suffix in ("-wal", "-shm"):
        (paths.root / f"ledger.sqlite{suffix}").unlink(missing_ok=True)
    recovered = run_sample(config, progress=False)
    assert (recovered.samples_recovered, recovered.samples_written) == (6, 0)
    assert {r.sample_id: r.image_sha256 for r in Ledger(paths.ledger).samples(0)} == {r.sample_id: r.image_sha256 for r in rows}


def test_units_are_deterministic_and_targets_differ(tmp_path):
    from magic_align.checklists.schema import load_checklists
    from magic_align.data.records import Record

    config = tiny_config(tmp_path, "sample.num_sources=7")
    checklists = load_checklists("demo")
    classes = checklists.condition_names
    train = [Record(id=f"img{i}", path=tmp_path / f"{i}.png", label=classes[i % len(classes)]) for i in range(5)]
    units = plan_units(config, train, classes, checklists, 0)
    assert units == plan_units(config, list(reversed(train)), classes, checklists, 0)
    assert units != plan_units(config, train, classes, checklists, 1)
    assert len(units) == 7 and all(u.target_label != u.source_label for u in units)
    assert len({u.source_id for u in units[:5]}) == 5  # every image once before any repeats
    assert all(checklists[u.target_label].token in u.prompt for u in units)


def test_few_shot_runs_sample_only_the_few_shot_subset_unless_unlabeled_sources_are_added(tmp_path):
    from PIL import Image

    from magic_align.checklists.schema import load_checklists
    from magic_align.data.split import run_split
    from magic_align.run import prepare_run
    from magic_align.sample import sampling_sources

    checklists = load_checklists("demo")
    full = tiny_config(tmp_path, "sample.num_sources=40")
    split = run_split(full, prepare_run(full))
    few_config = tiny_config(tmp_path, "name='few'", "sample.num_sources=40", "data.few_shot_fraction=0.25")
    few_split = run_split(few_config, prepare_run(few_config))
    few_ids = {record.id for record in few_split.few_shot}
    assert 0 < len(few_ids) < len(few_split.train)

    # the whole train split without few-shot; only the few-shot images (with their labels) with it
    assert {u.source_id for u in plan_units(full, sampling_sources(full, split), split.classes, checklists, 0)} - few_ids
    units = plan_units(few_config, sampling_sources(few_config, few_split), few_split.classes, checklists, 0)
    assert {u.source_id for u in units} == few_ids
    labels = {record.id: record.label for record in few_split.few_shot}
    assert all(u.source_label == labels[u.source_id] != u.target_label for u in units)
    sampled = tiny_config(tmp_path, "name='few'", "sample.num_sources=3", "sample.steps=4", "data.few_shot_fraction=0.25")
    run_sample(sampled, progress=False)
    rows = Ledger(RunPaths(sampled.run_dir).ledger).samples(0)
    assert len(rows) == 6 and {row.source_id for row in rows} <= few_ids

    # MAGIC-A: unlabeled extra images join the sources; any condition may be their target
    extra = tmp_path / "unlabeled"
    extra.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 90, 120)).save(extra / f"u{i}.png")
    magic_a = tiny_config(tmp_path, "name='few'", "sample.num_sources=40", "data.few_shot_fraction=0.25",
                          f"synthesize.extra_sources='{extra}'")
    units = plan_units(magic_a, sampling_sources(magic_a, few_split), few_split.classes, checklists, 0)
    extra_units = [u for u in units if u.source_id.startswith("extra-")]
    assert {u.source_id for u in units} - few_ids == {"extra-u0", "extra-u1", "extra-u2"}
    assert extra_units and all(u.source_label == "" and u.target_label in few_split.classes for u in extra_units)


@pytest.mark.slow
def test_a_round_sampled_under_other_settings_is_set_aside_and_sampled_again(tmp_path):
    from magic_align.ledger import PairRow
    from magic_align.sample import SampleError

    config = tiny_config(tmp_path, "sample.num_sources=2")
    run_sample(config, progress=False)
    paths = RunPaths(config.run_dir)
    ledger = Ledger(paths.ledger)
    old = {row.sample_id: row.image_sha256 for row in ledger.samples(0)}
    ledger.replace_pairs(0, [PairRow("a~b", 0, "r0-u00000", "r0-u00000-k0", "r0-u00000-k1", 1, 0, False,
                                     4, 2, None, None, "paper")])

    # more units is growth, not a change: nothing is set aside
    grown = run_sample(tiny_config(tmp_path, "sample.num_sources=3"), progress=False)
    assert grown.set_aside is None and (grown.units_already_done, grown.units_sampled) == (2, 1)

    changed = run_sample(tiny_config(tmp_path, "sample.num_sources=3", "sample.strength=0.5"), progress=False)
    assert changed.set_aside == "samples/round-0.other-settings"
    assert changed.set_aside_because == ["strength 0.3 -> 0.5"]
    assert (changed.units_already_done, changed.units_sampled) == (0, 3)
    rows = ledger.samples(0)
    assert len(rows) == 6 and all(row.image_sha256 != old.get(row.sample_id) for row in rows)
    assert {header["strength"] for header in TrajectoryStore(paths.trajectories(0)).headers.values()} == {0.5}
    assert ledger.pairs(0) == []  # the old samples' pairs went with them
    kept = paths.root / "samples" / "round-0.other-settings"
    assert {p.stem for p in (kept / "images").glob("*.png")} == set(old) | {"r0-u00002-k0", "r0-u00002-k1"}
    assert {header["strength"] for header in TrajectoryStore(kept / "trajectories").headers.values()} == {0.3}

    # the same settings again: done; back to the first ones: set aside under the next free name
    assert run_sample(tiny_config(tmp_path, "sample.num_sources=3", "sample.strength=0.5"), progress=False).set_aside is None
    back = run_sample(tiny_config(tmp_path, "sample.num_sources=3"), progress=False)
    assert back.set_aside == "samples/round-0.other-settings-2"
    assert {row.sample_id: row.image_sha256 for row in ledger.samples(0) if row.sample_id in old} == old

    # another sample seed plans other units; reviewed samples are never replaced under their reviews
    ledger.add_review("r0-u00000-k0", "v1", [1, 1, 0, 0, 1], reviewer="dr-a")
    with pytest.raises(SampleError, match=r"1 of its samples carry expert reviews"):
        run_sample(tiny_config(tmp_path, "sample.num_sources=3", "sample.seed=7"), progress=False)
    assert len(ledger.samples(0)) == 6 and not (paths.root / "samples" / "round-0.other-settings-3").exists()


def test_stale_round_names_the_policy_and_the_units_that_changed(tmp_path):
    import torch
    from safetensors.torch import save_file

    from magic_align.checklists.schema import load_checklists
    from magic_align.data.split import run_split
    from magic_align.diffusion.loading import model_hash, policy_files
    from magic_align.diffusion.trajectories import write_shard
    from magic_align.ledger import SampleRow
    from magic_align.run import prepare_run
    from magic_align.sample import sample_id, sampling_sources, stale_round

    config = tiny_config(tmp_path, "sample.num_sources=2")
    paths = prepare_run(config)
    split = run_split(config, paths)
    units = plan_units(config, sampling_sources(config, split), split.classes, load_checklists("tiny"), 1)
    lora = tmp_path / "policy.safetensors"
    save_file({"unet.w.lora_A.weight": torch.ones(2, 2)}, str(lora))

    # a round-1 shard written as run_sample writes it, by the policy in `lora`
    from magic_align.diffusion.sampler import SamplingSettings, derived_seed

    header = {**SamplingSettings.from_config(config.sample, config.model).choices(),
              "model_hash": model_hash(config.model, policy_files(paths, lora)),
              "resolution": config.model.resolution, "model_dtype": config.model.dtype}
    ids = [sample_id(units[0].unit_id, 0)]
    paths.trajectories(1).mkdir(parents=True)
    write_shard(paths.trajectories(1) / "p00-00000.safetensors", ids, torch.zeros(1, 2, 4, 8, 8),
                torch.zeros(1, 1), torch.tensor([1]), torch.zeros(1, 4, dtype=torch.long), header={**header, "samples": []})
    ledger = Ledger(paths.ledger)
    unit = units[0]
    ledger.add_samples([SampleRow(ids[0], 1, unit.unit_id, 0, "x.png", "a" * 64, unit.source_id, unit.source_label,
                                  unit.target_label, unit.prompt, derived_seed(config.sample.seed, 1, unit.index, 0),
                                  "s", 0, True)])
    assert stale_round(config, paths, units, 1, lora, ledger) == []

    save_file({"unet.w.lora_A.weight": torch.full((2, 2), 2.0)}, str(lora))  # the earlier round was retrained
    reasons = stale_round(config, paths, units, 1, lora, ledger)
    assert len(reasons) == 1 and reasons[0].startswith("the sampling policy (model hash)")

    save_file({"unet.w.lora_A.weight": torch.ones(2, 2)}, str(lora))
    reseeded = tiny_config(tmp_path, "sample.num_sources=2", "sample.seed=5")
    replanned = plan_units(reseeded, sampling_sources(reseeded, split), split.classes, load_checklists("tiny"), 1)
    reasons = stale_round(reseeded, paths, replanned, 1, lora, ledger)
    assert len(reasons) == 1 and reasons[0].startswith(f"the units (unit {unit.unit_id}")


@pytest.mark.slow
def test_a_crash_between_forgetting_and_moving_a_stale_round_does_not_bring_the_old_samples_back(tmp_path, monkeypatch):
    import magic_align.sample as sample_module
    from magic_align.diffusion.sampler import derived_seed

    run_sample(tiny_config(tmp_path, "sample.num_sources=2"), progress=False)
    paths = RunPaths(tiny_config(tmp_path).run_dir)
    ledger = Ledger(paths.ledger)
    for stage in ("run:finetune", "run:sample/round-0", "run:pairs/round-0", "run:dpo/round-0", "run:compare"):
        ledger.set_stage(stage, "h", "done")

    def crash(folder):
        raise OSError("disk gone")

    reseeded = tiny_config(tmp_path, "sample.num_sources=2", "sample.seed=7")  # only the units differ
    monkeypatch.setattr(sample_module, "set_aside", crash)
    with pytest.raises(OSError, match="disk gone"):
        run_sample(reseeded, progress=False)
    assert ledger.samples(0) == []  # the rows went first; the shards are still in place
    monkeypatch.undo()

    again = run_sample(reseeded, progress=False)
    assert again.samples_recovered == 0 and again.set_aside == "samples/round-0.other-settings"
    assert [row.seed for row in ledger.samples(0)] == [derived_seed(7, 0, unit, k) for unit in (0, 1) for k in (0, 1)]
    # the pipeline redoes what depended on the round; fine-tuning stays done
    assert {status.stage: status.status for status in ledger.stages()} == {
        "run:finetune": "done", "run:sample/round-0": "stale", "run:pairs/round-0": "stale",
        "run:dpo/round-0": "stale", "run:compare": "stale"}


def test_later_rounds_need_the_policy_they_are_sampled_by(tmp_path):
    from magic_align.sample import SampleError

    with pytest.raises(SampleError, match="round 1 is sampled by the policy aligned in round 0: pass --lora"):
        run_sample(tiny_config(tmp_path), round_index=1, progress=False)


@pytest.mark.slow
def test_a_later_round_is_kept_for_the_same_policy_and_set_aside_when_that_policy_was_retrained(tmp_path,
                                                                                                 tiny_model_dir):
    from lora_builders import save_constant_lora

    def policy(value: float):
        return save_constant_lora(config.model, value, tmp_path / "aligned" / "dpo" / "round-0")

    config = tiny_config(tmp_path, "sample.num_sources=2", "model.source='local'",
                         f"model.pretrained='{tiny_model_dir}'", "model.resolution=32")
    lora = policy(0.01)
    first = run_sample(config, round_index=1, policy_lora=lora, progress=False)
    assert first.samples_written == 4
    rerun = run_sample(config, round_index=1, policy_lora=lora, progress=False)  # as written: nothing stale
    assert (rerun.set_aside, rerun.units_already_done, rerun.samples_written) == (None, 2, 0)

    retrained = run_sample(config, round_index=1, policy_lora=policy(0.02), progress=False)
    assert retrained.set_aside == "samples/round-1.other-settings" and retrained.samples_written == 4
    assert retrained.set_aside_because[0].startswith("the sampling policy (model hash)")
