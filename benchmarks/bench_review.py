"""Review page latency on a large ledger: every page recomputes the queue and the agreement from the ledger,
so this checks that stays interactive (target: under 300 ms per page, the limit at which keyboard review
still feels immediate) for a run of 2 400 samples graded by two judges, with 600 reviews stored.

    python -m benchmarks.run review
"""

from __future__ import annotations

import hashlib
import re
import statistics
import tempfile
import time
from pathlib import Path

SAMPLES = 2400
REVIEWS = 600
REPEATS = 7
TARGET_MS = 300.0


def _build(root: Path):
    from PIL import Image

    from magic_align.checklists.schema import load_checklists
    from magic_align.config import load_config
    from magic_align.judges.base import Verdict
    from magic_align.ledger import Ledger, SampleRow
    from magic_align.run import prepare_run

    config = load_config("demo", [f"runs_dir='{root}'"])
    paths = prepare_run(config)
    ledger = Ledger(paths.ledger)
    checklists = load_checklists(config.judge.checklist)
    conditions = checklists.conditions
    rows = []
    folder = paths.root / "samples" / "round-0" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(SAMPLES):
        relative = f"samples/round-0/images/{index:05d}.png"
        Image.new("RGB", (8, 8), (index % 256, (index // 256) % 256, 90)).save(paths.root / relative)
        checklist = conditions[index % len(conditions)]
        rows.append(SampleRow(f"r0-u{index // 2:05d}-k{index % 2}", 0, f"u{index // 2:05d}", index % 2, relative,
                              hashlib.sha256((paths.root / relative).read_bytes()).hexdigest(), f"real-{index}",
                              checklist.condition, checklist.condition, "p", index))
    ledger.add_samples(rows)
    for index, row in enumerate(rows):
        checklist = checklists[row.target_label]
        items = [(index >> bit) & 1 for bit in range(5)]
        other = list(items)
        other[index % 5] = 1 - other[index % 5] if index % 3 == 0 else other[index % 5]
        ledger.put_verdict(row.image_sha256, "judge:a", checklist.version, "p", Verdict(items=items), checklist.condition)
        ledger.put_verdict(row.image_sha256, "judge:b", checklist.version, "p", Verdict(items=other), checklist.condition)
        if index < REVIEWS:
            ledger.add_review(row.sample_id, checklist.version, other, "bench")
    return config, rows


def _median_ms(call) -> float:
    timings = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        response = call()
        timings.append((time.perf_counter() - start) * 1000)
        assert response.status_code in (200, 303), response.status_code
    return statistics.median(timings)


def run() -> str:
    from fastapi.testclient import TestClient

    from magic_align.review.app import create_app

    with tempfile.TemporaryDirectory() as scratch:
        config, rows = _build(Path(scratch))
        client = TestClient(create_app(config, reviewer="bench", judge_id="judge:a"))
        start = time.perf_counter()
        assert client.get("/").status_code == 200
        cold_ms = (time.perf_counter() - start) * 1000  # builds the queue and agreement from the ledger
        sample_id = rows[REVIEWS + 1].sample_id
        page = client.get(f"/review/{sample_id}").text
        form = {
            "csrf_token": re.search(r'name="csrf_token" value="([^"]+)"', page).group(1),
            "checklist_version": re.search(r'name="checklist_version" value="([^"]+)"', page).group(1),
            "item": ["1", "3"],
        }
        figures = [
            ("first GET / (cold: queue and agreement built from the ledger)", cold_ms),
            ("GET / (queue, agreement per aspect)", _median_ms(lambda: client.get("/"))),
            ("GET /review/{id} (one image)", _median_ms(lambda: client.get(f"/review/{sample_id}"))),
            ("POST /review/{id} (save, redirect)", _median_ms(
                lambda: client.post(f"/review/{sample_id}", data=form, follow_redirects=False))),
            (f"GET /gallery/{rows[0].target_label}", _median_ms(lambda: client.get(f"/gallery/{rows[0].target_label}"))),
            ("GET /image/{id}", _median_ms(lambda: client.get(f"/image/{sample_id}"))),
        ]
    lines = [
        "## Review page",
        "",
        f"Median of {REPEATS} requests through FastAPI's test client, on a ledger of {SAMPLES} samples (6 conditions), "
        f"{2 * SAMPLES} verdicts from two judges and {REVIEWS} reviews. Target: under {TARGET_MS:.0f} ms per page. The queue is rebuilt only when samples or verdicts change, "
        "the agreement per aspect when reviews change; the first page after a change pays the cold figure.",
        "",
        "| request | median ms | target met |",
        "|---|---:|---|",
    ]
    for name, value in figures:
        lines.append(f"| {name} | {value:.1f} | {'yes' if value < TARGET_MS else 'no'} |")
    lines += ["", "Command: `python -m benchmarks.run review`"]
    return "\n".join(lines)
