"""The GPU check (benchmarks/bench_sd21.py) runs on CPU at the reduced size and says so; its projection arithmetic."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds the benchmarks package
from benchmarks import bench_sd21  # noqa: E402
from magic_align.config import load_config  # noqa: E402


def test_sd21_gpu_check_runs_reduced_on_cpu_and_says_so():
    from magic_align.pipeline import judge_estimate

    text = bench_sd21.run(size="reduced", device="cpu")
    assert "REDUCED SD 2.1 base architecture (64 px" in text and "on CPU" in text and "not GPU figures" in text
    assert "`sd21-base-reduced`" in text
    sampler = re.search(r"= (\d+) run, guidance .*?\| ([\d.]+) images/s", text)
    assert sampler and int(sampler.group(1)) == 30 and float(sampler.group(2)) > 0
    # the DPO designs agree: same pairs, same updates, the second step's losses after the first update
    dpo_row = next(line for line in text.splitlines() if line.startswith("| sd21-base-reduced"))
    cells = [cell.strip() for cell in dpo_row.strip("|").split("|")]
    assert float(cells[8]) < 0.05  # max loss diff, bf16
    assert float(cells[4]) > 0 and float(cells[5]) > 0
    calls = judge_estimate(load_config("paper")).calls
    assert f"{calls:,} calls" in text
    assert re.search(r"\| \*\*total\*\* \| \| \*\*[\d.]+ (s|min|h)\*\*", text)


def test_sd21_gpu_check_chooses_full_size_only_on_a_gpu_unless_told():
    size, device = bench_sd21.choose(None, "cpu")
    assert size is bench_sd21.REDUCED and device.type == "cpu"
    size, _ = bench_sd21.choose("full", "cpu")
    assert size is bench_sd21.FULL and size.architecture == "sd21-base" and size.resolution == 512
    with pytest.raises(ValueError, match="full"):
        bench_sd21.choose("huge", "cpu")


def test_sd21_gpu_check_projection_scales_each_stage_from_the_preset_step_counts():
    config = load_config("paper")
    case = type("Case", (), {"pairs": 16, "steps": 30})()
    figures = {
        "lora": {"seconds": 2.0, "batch": 4},  # 0.5 s per image
        "sampler": {"images_per_s": 4.0},
        "dpo_case": case,
        "dpo": {"ours": {"seconds": 32.0}},  # 2 s per pair of 30 steps
        "rft": {"seconds": 8.0, "trajectories": 8, "steps": 15},  # 2 s per trajectory of 30 steps
    }
    rows = {stage: seconds for stage, _, seconds in bench_sd21.project(config, figures)}
    ft, sample = config.finetune, config.sample
    assert rows["finetune: LoRA"] == pytest.approx(ft.lora_steps * ft.lora_batch_size * 0.5)
    assert rows["sample"] == pytest.approx(sample.num_sources * sample.samples_per_unit / 4.0)
    assert rows["dpo"] == pytest.approx(config.dpo.iterations * config.dpo.pairs_per_step * 2.0)
    assert rows["rft"] == pytest.approx(config.rft.steps * config.rft.batch_size * 2.0)
    figures["lora"]["seconds"] = None  # a step that ran out of memory: its stages are n/a, the rest stay
    rows = {stage: seconds for stage, _, seconds in bench_sd21.project(config, figures)}
    assert rows["finetune: LoRA"] is None and rows["sample"] is not None
