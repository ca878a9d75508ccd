"""Speed of the procedural demo domain: drawing images, writing the dataset, and the rules judge.

Drawing is timed in memory (`render_arrays`) and with files (`generate_dataset`: PNG encoding, md5, CSV). The
judge is timed per image (analysis once) and per (image, checklist) grading. Wall-clock on a shared 2-core
machine, so figures vary with what else runs.

    python -m benchmarks.run procedural
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from PIL import Image

from magic_align.checklists.schema import load_checklists
from magic_align.demo.procedural import CONDITIONS, generate_dataset, render_arrays
from magic_align.judges.rules import make_rules_judge

TARGET_DRAW_MS = 2.5  # what the demo's CPU prototype drew a 64 px image in, with numpy
PER_CLASS = 50


def run() -> str:
    labels = [c for c in CONDITIONS for _ in range(PER_CLASS)]
    started = time.perf_counter()
    arrays, _ = render_arrays(labels, seed=0)
    draw_ms = (time.perf_counter() - started) * 1000 / len(labels)

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        generate_dataset(Path(folder), per_class=PER_CLASS, seed=0)
        write_ms = (time.perf_counter() - started) * 1000 / len(labels)

    checklists = load_checklists("demo")
    judge = make_rules_judge(None, checklists)
    images = [Image.fromarray(a) for a in arrays]
    started = time.perf_counter()
    analyses = [judge.domain.analyse(image) for image in images]
    analyse_ms = (time.perf_counter() - started) * 1000 / len(images)
    started = time.perf_counter()
    for analysis, label in zip(analyses, labels):
        judge.grade_analysis(analysis, checklists[label])
    grade_ms = (time.perf_counter() - started) * 1000 / len(images)
    started = time.perf_counter()
    for image, label in zip(images[:120], labels[:120]):
        judge.grade(image, checklists[label])
    judge_ms = (time.perf_counter() - started) * 1000 / 120

    rows = [
        ("draw one 64 px image (in memory)", draw_ms, f"<= {TARGET_DRAW_MS}"),
        ("draw + PNG + md5 + CSV (generate_dataset)", write_ms, ""),
        ("rules judge: analyse one image", analyse_ms, ""),
        ("rules judge: grade one checklist from an analysis", grade_ms, ""),
        ("rules judge: `grade(image, checklist)` end to end", judge_ms, ""),
    ]
    lines = [
        "## Procedural demo domain and rules judge",
        "",
        f"{len(labels)} images ({PER_CLASS} per condition, 64 px); wall-clock ms per image.",
        "",
        "| step | ms / image | target |",
        "|---|---|---|",
        *[f"| {name} | {value:.2f} | {target} |" for name, value, target in rows],
        "",
        f"3,600 images (the prototype's demo dataset) would take about {3600 * write_ms / 1000:.0f} s to write.",
        "",
        "Command: `python -m benchmarks.run procedural`",
    ]
    return "\n".join(lines)
