"""`magic run` planning: stage hashes and the offline dry run."""

from rich.console import Console

from magic_align.config import load_config
from magic_align.pipeline import dry_run_plan, stage_hash


def test_stage_hash_follows_its_sections_and_its_upstream():
    config = load_config("tiny")
    base = stage_hash(config, ("sample",), upstream="a")
    assert stage_hash(load_config("tiny", ["dpo.beta=2"]), ("sample",), upstream="a") == base
    assert stage_hash(load_config("tiny", ["sample.strength=0.9"]), ("sample",), upstream="a") != base
    assert stage_hash(config, ("sample",), upstream="b") != base  # an upstream change reruns downstream


def test_paper_dry_run_is_offline_and_counts_every_paid_call():
    config = load_config("paper")
    console = Console(record=True, width=200)
    console.print(dry_run_plan(config))
    text = console.export_text()
    calls = config.sample.num_sources * config.sample.samples_per_unit * config.rounds
    calls += config.evaluate.alignment_units * config.evaluate.alignment_per_source * (1 + len(config.align))
    assert f"{calls} calls" in text and "$" in text
    for stage in ("finetune", "sample/round-0", "judge/round-0", "pairs/round-0", "dpo/round-0", "rft", "report"):
        assert stage in text
    assert not config.run_dir.exists()  # a dry run creates nothing


def test_local_judge_dry_run_has_no_cost():
    console = Console(record=True, width=200)
    console.print(dry_run_plan(load_config("tiny")))
    assert "no cost" in console.export_text()


def test_a_stage_that_raised_is_recorded_failed_and_retried_by_the_next_run(tmp_path, monkeypatch):
    import pytest

    import magic_align.pipeline as pipeline
    from magic_align.evaluate.stage import EvaluateIncomplete
    from magic_align.ledger import Ledger

    config = load_config("tiny", [f"runs_dir='{tmp_path}'"])
    calls = []
    broken = {"evaluate": True}

    def evaluate():
        calls.append("evaluate")
        if broken["evaluate"]:
            raise EvaluateIncomplete(["magic-dpo: RuntimeError: CUDA out of memory"], tmp_path / "metrics.json")

    def plan(config, console):
        return [pipeline.Stage("synthesize", ("synthesize",), lambda: calls.append("synthesize"), "s"),
                pipeline.Stage("evaluate", ("evaluate",), evaluate, "e"),
                pipeline.Stage("report", (), lambda: calls.append("report"), "r")]

    monkeypatch.setattr(pipeline, "plan_stages", plan)
    with pytest.raises(EvaluateIncomplete):
        pipeline.run_all(config, console=Console(quiet=True))
    status = Ledger(config.run_dir / "ledger.sqlite").stage("run:evaluate")
    assert status.status == "failed" and "CUDA out of memory" in status.detail
    assert calls == ["synthesize", "evaluate"]  # the report waits for a complete evaluation

    broken["evaluate"] = False
    pipeline.run_all(config, console=Console(quiet=True))
    assert calls == ["synthesize", "evaluate", "evaluate", "report"]  # done stages skipped, the failed one retried
    assert Ledger(config.run_dir / "ledger.sqlite").stage("run:evaluate").status == "done"


def test_a_key_added_later_at_its_as_before_value_leaves_every_digest_as_it_was():
    """Upgrading must not redo a finished run: a stage hash computed without a later-added key (as the code before
    it did) equals the one with the key at its as-before value; any other value changes it."""
    import hashlib
    import json

    from magic_align.config import ADDED_KEYS

    config = load_config("tiny")
    for section in {dotted.split(".")[0] for dotted in ADDED_KEYS}:
        added = {dotted.split(".")[1] for dotted in ADDED_KEYS if dotted.startswith(f"{section}.")}
        dumped = config.model_dump(mode="json")[section]
        before = {name: value for name, value in dumped.items() if name not in added}  # what the older code hashed
        older = hashlib.sha256(json.dumps({"upstream": "u", "values": {section: before}}, sort_keys=True)
                               .encode()).hexdigest()[:16]
        assert stage_hash(config, (section,), "u") == older, section
    assert stage_hash(load_config("tiny", ["dpo.preference_control='flipped'"]), ("dpo",), "u") != \
        stage_hash(config, ("dpo",), "u")
    assert stage_hash(load_config("tiny", ["rft.balance='condition'"]), ("rft",), "u") != stage_hash(config, ("rft",), "u")
    assert stage_hash(load_config("tiny", ["dpo.source_skin_types=[5, 6]"]), ("dpo",), "u") != \
        stage_hash(config, ("dpo",), "u")
    denoising = load_config("tiny", ["dpo.objective='denoising'"])
    assert stage_hash(load_config("tiny", ["dpo.objective='denoising'", "dpo.reference_weight=10.0"]), ("dpo",), "u") != \
        stage_hash(denoising, ("dpo",), "u")
    assert stage_hash(load_config("tiny", ["dpo.objective='denoising'", "dpo.timestep_range=[0.0, 0.5]"]), ("dpo",), "u") != \
        stage_hash(denoising, ("dpo",), "u")
    assert stage_hash(load_config("tiny", ["dpo.objective='denoising'", "dpo.preservation_weight=10.0"]), ("dpo",), "u") != \
        stage_hash(denoising, ("dpo",), "u")
    assert stage_hash(load_config("tiny", ["dpo.objective='denoising'", "dpo.winner_penalty=5.0"]), ("dpo",), "u") != \
        stage_hash(denoising, ("dpo",), "u")
    assert stage_hash(load_config("tiny", ["dpo.average_from=2"]), ("dpo",), "u") != stage_hash(config, ("dpo",), "u")
    assert stage_hash(load_config("tiny", ["rft.average_from=2"]), ("rft",), "u") != stage_hash(config, ("rft",), "u")
