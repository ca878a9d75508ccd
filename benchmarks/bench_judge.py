"""Throughput and memory of the `openai` judge against the loopback chat-completions server.

The server (tests/fake_openai_server.py) answers every call after 200 ms, like a fast remote endpoint. The
judge grades 500 generated 128 x 128 images at concurrency 16 (and 50 images one at a time, which already shows
the ~5 images/s ceiling of 200 ms calls). Images are made on the fly by the workers, as the judge stage reads
them from disk, so memory measures the judge, not a preloaded image list. Peak Python memory (tracemalloc)
at 100 and 500 images shows whether it grows with the number of images.

    python -m benchmarks.run judge
"""

from __future__ import annotations

import asyncio
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_openai_server import FakeChatServer  # noqa: E402

from magic_align.checklists.schema import Checklist, ChecklistItem  # noqa: E402
from magic_align.config import JudgeConfig  # noqa: E402
from magic_align.judges.openai_judge import OpenAIJudge  # noqa: E402

LATENCY_S = 0.2
TARGET_IMAGES_PER_S = 25.0  # the project's bar for the judge at concurrency 16 with 0.2 s answers
IMAGE_SIDE = 128

CHECKLIST = Checklist(
    condition="psoriasis",
    display_name="Psoriasis",
    token="<psoriasis>",
    items=tuple(
        ChecklistItem(id=aspect, aspect=aspect, text=f"The {aspect} of the lesion is typical of psoriasis.")
        for aspect in ("location", "lesion", "shape", "color", "texture")
    ),
)


def make_image(index: int) -> Image.Image:
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, size=(IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


async def grade(judge: OpenAIJudge, count: int, concurrency: int) -> tuple[int, int]:
    """(answered, failed) after grading `count` images with `concurrency` workers."""
    next_index = iter(range(count))
    tally = {"ok": 0, "other": 0}

    async def worker() -> None:
        for index in next_index:
            verdict = await judge.judge(make_image(index), CHECKLIST)
            tally["ok" if verdict.parse_status == "ok" else "other"] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await judge.aclose()
    return tally["ok"], tally["other"]


def measure(count: int, concurrency: int, trace_memory: bool = False) -> dict:
    with FakeChatServer(latency_s=LATENCY_S, record_requests=False) as server:
        cfg = JudgeConfig(
            base_url=server.base_url, model="bench", concurrency=concurrency, image_size=IMAGE_SIDE, api_key_env="MAGIC_BENCH_NO_KEY"
        )
        judge = OpenAIJudge(cfg)
        if trace_memory:
            tracemalloc.start()
        started = time.perf_counter()
        answered, failed = asyncio.run(grade(judge, count, concurrency))
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace_memory else None
        if trace_memory:
            tracemalloc.stop()
        calls = server.total_calls
    return {
        "images": count, "concurrency": concurrency, "seconds": seconds, "rate": count / seconds,
        "answered": answered, "failed": failed, "calls": calls, "peak_mib": peak,
    }


def run() -> str:
    fast = measure(500, 16)
    serial = measure(50, 1)
    small = measure(100, 16, trace_memory=True)
    large = measure(500, 16, trace_memory=True)
    rows = [
        f"| {r['images']} | {r['concurrency']} | {r['rate']:.1f} | {r['seconds']:.1f} | {r['calls']} | {r['answered']} | "
        + ("" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}")
        + " |"
        for r in (fast, serial, small, large)
    ]
    verdict = "meets" if fast["rate"] >= TARGET_IMAGES_PER_S else "misses"
    growth = large["peak_mib"] / small["peak_mib"]
    return "\n".join(
        [
            "## Judge throughput (`openai` backend, loopback server, 200 ms per call)",
            "",
            "Command: `python -m benchmarks.run judge`. 128 x 128 noise images made on the fly, checklist of 5 items, "
            "paper prompt style, real HTTP on 127.0.0.1 (httpx client, threaded server in the same process); "
            "peak = Python heap (tracemalloc, which slows the run) including the server's side.",
            "",
            "| images | concurrency | images/s | seconds | HTTP calls | answered ok | peak MiB |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"At concurrency 16 the judge grades {fast['rate']:.1f} images/s ({verdict} the target of "
            f"{TARGET_IMAGES_PER_S:.0f}/s; the ideal at this latency is {16 / LATENCY_S:.0f}/s); one at a time "
            f"{serial['rate']:.1f}/s (ideal {1 / LATENCY_S:.0f}/s). Peak memory at 500 images is {growth:.2f}x "
            f"that at 100 images ({large['peak_mib']:.1f} vs {small['peak_mib']:.1f} MiB): flat in the number of images.",
        ]
    )


if __name__ == "__main__":
    print(run())
