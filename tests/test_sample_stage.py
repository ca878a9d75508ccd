import pytest
import torch

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
