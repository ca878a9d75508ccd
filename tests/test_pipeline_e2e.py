"""End to end: `magic run tiny` as a user types it, every stage in order, and the judge over HTTP on loopback.

The tiny preset grades its noise images with the tiny checklists (pixel statistics), so pairs have winners and
both trainers get a signal; a second `magic run tiny` must skip every stage. A second test stands the demo
domain's rules judge behind the OpenAI protocol and checks that the judge stage stores exactly what it measures.
"""

import json

import pytest
from typer.testing import CliRunner

from fake_openai_server import FakeChatServer, answer_like
from magic_align.config import load_config
from magic_align.ledger import Ledger
from magic_align.run import RunPaths

pytestmark = pytest.mark.slow


def tiny_run_config(tmp_path, server, *extra):
    return load_config(
        "tiny",
        [
            f"runs_dir='{tmp_path}'",
            "judge.backend='openai'",
            "judge.checklist='demo'",
            f"judge.base_url='{server.base_url}'",
            "judge.api_key_env='MAGIC_E2E_KEY'",
            "judge.image_size=64",
            "judge.concurrency=4",
            *extra,
        ],
    )


def test_magic_run_tiny_runs_every_stage_and_a_rerun_skips_them(tmp_path):
    from magic_align.cli import app
    from magic_align.pipeline import plan_stages

    runner = CliRunner()
    command = ["run", "tiny", "--set", f"runs_dir='{tmp_path}'"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output

    config = load_config("tiny", [f"runs_dir='{tmp_path}'"])
    ledger = Ledger(config.run_dir / "ledger.sqlite")
    names = [stage.name for stage in plan_stages(config, console=None)]
    assert all(ledger.stage(f"run:{name}").status == "done" for name in names)
    aligned = config.run_dir / "aligned"
    assert (aligned / "dpo" / "pytorch_lora_weights.safetensors").is_file()
    assert (aligned / "rft" / "pytorch_lora_weights.safetensors").is_file()
    pairs = ledger.pairs(0)
    assert pairs and any(not pair.tie for pair in pairs)  # the tiny checklists give winners on noise
    scores = {entry.verdict.score for entry in ledger.verdicts(round=0)}
    assert len(scores) > 1
    metrics = json.loads((config.run_dir / "eval" / "metrics.json").read_text())
    assert metrics["failures"] == []
    assert {"real", "i2i", "magic-dpo", "magic-rft"} <= {name for name, info in metrics["settings"].items()
                                                       if info["status"] == "ok"}
    alignment = json.loads((config.run_dir / "eval" / "alignment.json").read_text())
    assert set(alignment["settings"]) == {"i2i", "magic-dpo", "magic-rft"}
    assert alignment["set"] == "locked"  # the run's stated figures come from the locked set
    locked = config.run_dir / "data" / "procedural-locked"
    assert all((config.run_dir / unit["source"]).resolve().is_relative_to(locked.resolve()) for unit in alignment["units"])
    assert "magic-dpo - i2i" in alignment["differences"]
    assert "MAGIC-DPO" in (config.run_dir / "report" / "index.html").read_text()
    updated = {name: ledger.stage(f"run:{name}").updated_at for name in names}
    ledger.close()

    again = runner.invoke(app, command)  # everything is done for this configuration: nothing runs again
    assert again.exit_code == 0, again.output
    assert all(f"skip {name}" in again.output for name in names)
    ledger = Ledger(config.run_dir / "ledger.sqlite")
    assert {name: ledger.stage(f"run:{name}").updated_at for name in names} == updated
    ledger.close()

    # another alignment seed: DPO trains again (its old checkpoints kept aside, not resumed), and every stage after
    # it follows, the synthetic set of the old LoRA included
    before = (aligned / "dpo" / "pytorch_lora_weights.safetensors").read_bytes()
    reseeded = runner.invoke(app, command + ["--set", "dpo.seed=3"])
    assert reseeded.exit_code == 0, reseeded.output
    assert "skip finetune" in reseeded.output and "skip dpo" not in reseeded.output
    assert (aligned / "dpo" / "pytorch_lora_weights.safetensors").read_bytes() != before
    assert (config.run_dir / "checkpoints" / "dpo" / "round-0.other-settings").is_dir()
    ledger = Ledger(config.run_dir / "ledger.sqlite")
    assert all(ledger.stage(f"run:{name}").status == "done" for name in names)

    # DPO on the pairs of some skin types only: the sources' types come from the dataset itself
    import csv

    from magic_align.train.dpo import informative_pairs, run_dpo

    types = {}
    for row in csv.DictReader(open(next((config.run_dir / "data").rglob("procedural.csv")), newline="")):
        types[row["md5hash"]] = int(row["fitzpatrick_scale"])
    examples, _ = informative_pairs(ledger, RunPaths(config.run_dir), 0)
    ledger.close()
    wanted = [types[examples[0].source_id]]  # the procedural CSV names each image by its md5, the record id
    expected = [e for e in examples if types[e.source_id] in wanted]
    chosen = load_config("tiny", [f"runs_dir='{tmp_path}'", "dpo.seed=3", f"dpo.source_skin_types={wanted}"])
    summary = json.loads((run_dpo(chosen) / "dpo.json").read_text())
    assert summary["source_skin_types"] == wanted and summary["pairs"] == len(expected) < len(examples)

    from magic_align.train.rft import run_rft

    samples = Ledger(config.run_dir / "ledger.sqlite").samples(0)
    chosen = load_config("tiny", [f"runs_dir='{tmp_path}'", f"rft.source_skin_types={wanted}"])
    summary = json.loads((run_rft(chosen) / "rft.json").read_text())
    assert summary["source_skin_types"] == wanted
    assert summary["trajectories"] == len([s for s in samples if types[s.source_id] in wanted]) < len(samples)


def test_judge_stage_over_http_stores_what_the_rules_judge_measures(tmp_path, monkeypatch):
    """The openai path end to end on the demo domain: a loopback server whose answers come from the rules judge."""
    from magic_align.checklists.schema import load_checklists
    from magic_align.data.images import encode_png, sha256_file
    from magic_align.demo.procedural import CONDITIONS, render, to_pil
    from magic_align.judge import run_judge
    from magic_align.judges.rules import make_rules_judge
    from magic_align.ledger import SampleRow
    from magic_align.run import prepare_run

    import numpy as np

    checklists = load_checklists("demo")
    rules = make_rules_judge(None, checklists)

    monkeypatch.setenv("MAGIC_E2E_KEY", "sk-test")
    with FakeChatServer(answer=answer_like(rules, checklists)) as server:
        config = tiny_run_config(tmp_path, server)
        paths = prepare_run(config)
        rng = np.random.default_rng(3)
        rows, expected = [], {}
        for index, source in enumerate(CONDITIONS):
            target = CONDITIONS[(index + index % 2) % len(CONDITIONS)]  # some graded as themselves, some not
            image = to_pil(render(source, rng).image)
            path = paths.sample_images(0) / f"s{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(image))
            rows.append(SampleRow(
                sample_id=f"r0-u{index:05d}-k0", round=0, unit_id=f"u{index:05d}", k=0,
                image_path=path.relative_to(paths.root).as_posix(), image_sha256=sha256_file(path),
                source_id=f"src{index}", source_label=source, target_label=target, prompt="p", seed=index,
                shard="", shard_index=0, synthetic=True,
            ))
            expected[rows[-1].sample_id] = checklists[target].apply_requires(rules.grade(image, checklists[target]).items)
        Ledger(paths.ledger).add_samples(rows)

        summary = run_judge(config, round_index=0, show_progress=False)
        stored = {entry.sample.sample_id: list(entry.verdict.items) for entry in Ledger(paths.ledger).verdicts(round=0)}
        assert stored == expected
        assert len({tuple(items) for items in expected.values()}) > 1
        assert summary is not None
        calls = sum(server.calls.values())
        run_judge(config, round_index=0, show_progress=False)
        assert sum(server.calls.values()) == calls
