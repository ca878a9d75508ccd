"""The judge stage's own overhead: ledger commits and the asyncio loop around the judge.

An in-process judge that waits 200 ms per image (like the loopback server of bench_judge, without HTTP)
grades 500 small PNGs at concurrency 1 and 16; the figures are what `run_judge` itself allows (image hashing,
decoding, one committed ledger row per answer), an upper bound for any backend. A rerun must ask nothing.
Peak Python memory (tracemalloc) is measured at 250 and 500 images to show it does not grow with the count.

    python -m benchmarks.run judge_stage
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
import tracemalloc
from pathlib import Path

from PIL import Image

from magic_align.config import load_config
from magic_align.judge import run_judge
from magic_align.judges.base import Verdict
from magic_align.ledger import Ledger, SampleRow
from magic_align.run import prepare_run

LATENCY_S = 0.2
TARGET_IMAGES_PER_S = 25.0  # the project's bar for the judge stage at concurrency 16 with 0.2 s answers


class SleepingJudge:
    id = "bench:sleeping"
    prompt_version = "none"

    def __init__(self) -> None:
        self.calls = 0

    async def judge(self, image, checklist) -> Verdict:
        self.calls += 1
        await asyncio.sleep(LATENCY_S)  # the network round trip this benchmark stands in for
        return Verdict(items=[1, 0, 1, 0, 1][: len(checklist.items)], input_tokens=400, output_tokens=15)


def _make_run(root: Path, images: int, concurrency: int):
    config = load_config(
        "tiny",
        [f"runs_dir='{root}'", "name='bench'", f"judge.concurrency={concurrency}", "judge.checklist='fitzpatrick20'"],
    )
    from magic_align.checklists.schema import load_checklists

    conditions = load_checklists("fitzpatrick20").condition_names
    paths = prepare_run(config)
    rows = []
    for index in range(images):
        relative = f"samples/round-0/images/{index:05d}.png"
        target = paths.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (index % 256, (index // 256) % 256, 7)).save(target)
        rows.append(
            SampleRow(
                sample_id=f"r0-{index:05d}", round=0, unit_id=f"u{index // 2:05d}", k=index % 2, image_path=relative,
                image_sha256=hashlib.sha256(target.read_bytes()).hexdigest(), source_id=f"real-{index}",
                source_label=conditions[0], target_label=conditions[index % len(conditions)], prompt="p", seed=index,
            )
        )
    Ledger(paths.ledger).add_samples(rows)
    return config


def _measure(images: int, concurrency: int) -> tuple[float, float, int, float]:
    """(images/s, peak MiB, calls on rerun, seconds of the rerun)."""
    with tempfile.TemporaryDirectory() as folder:
        config = _make_run(Path(folder), images, concurrency)
        judge = SleepingJudge()
        tracemalloc.start()
        started = time.perf_counter()
        run_judge(config, judge=judge, show_progress=False)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        again = SleepingJudge()
        started = time.perf_counter()
        run_judge(config, judge=again, show_progress=False)
        rerun = time.perf_counter() - started
        return images / elapsed, peak, again.calls, rerun


def run() -> str:
    rows = []
    for images, concurrency in ((500, 16), (250, 16), (50, 1)):
        rate, peak, rerun_calls, rerun_s = _measure(images, concurrency)
        rows.append((images, concurrency, rate, peak, rerun_calls, rerun_s))
    table = "\n".join(
        f"| {images} | {concurrency} | {rate:.1f} | {peak:.1f} | {calls} | {seconds:.2f} |"
        for images, concurrency, rate, peak, calls, seconds in rows
    )
    best = rows[0][2]
    ceiling = 16 / LATENCY_S
    verdict = "meets" if best >= TARGET_IMAGES_PER_S else "misses"
    return f"""## Judge stage overhead (`run_judge`, in-process judge with {LATENCY_S * 1000:.0f} ms latency)

Command: `python -m benchmarks.run judge_stage`. 64 x 64 PNGs, checklist `fitzpatrick20`, one committed ledger
row (synchronous = FULL) per answer; peak = Python heap (tracemalloc) during the first run.

| images | concurrency | images/s | peak MiB | calls on rerun | rerun s |
|---|---|---|---|---|---|
{table}

At concurrency 16 the stage reaches {best:.1f} images/s (ideal {ceiling:.0f}/s at this latency); the issue's
target for the whole judge path is {TARGET_IMAGES_PER_S:.0f} images/s, which the stage alone {verdict}. Memory at 250
vs 500 images shows whether it grows with the image count. A rerun makes no call.
"""
