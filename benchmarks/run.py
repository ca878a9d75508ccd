"""`make bench`: run every benchmarks/bench_*.py and write benchmarks/RESULTS.md.

Each benchmark module has `run() -> str` returning a markdown section (a heading, a table, the figures
against their targets). Run one with `python -m benchmarks.run sampler` (the part after `bench_`).
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"{os.cpu_count()} CPU cores ({cpu}), GPU: {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def main(names: list[str]) -> None:
    available = sorted(path.stem.removeprefix("bench_") for path in HERE.glob("bench_*.py"))
    chosen = names or available
    unknown = [name for name in chosen if name not in available]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; available: {available}")
    sections = {}
    for name in chosen:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        sections[name] = module.run().strip()
        print(sections[name], flush=True)
    previous = _read_sections() if names else {}
    previous.update(sections)
    header = (
        "# Benchmark results\n\n"
        f"Written by `make bench` (`python -m benchmarks.run`) on {datetime.date.today().isoformat()}.\n"
        f"Machine: {machine()}.\n"
    )
    body = "\n\n".join(f"<!-- {name} -->\n{text}" for name, text in sorted(previous.items()))
    RESULTS.write_text(header + "\n" + body + "\n")
    print(f"wrote {RESULTS}")


def _read_sections() -> dict[str, str]:
    if not RESULTS.exists():
        return {}
    sections: dict[str, str] = {}
    current = None
    for line in RESULTS.read_text().splitlines():
        if line.startswith("<!-- ") and line.endswith(" -->"):
            current = line[5:-4]
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


if __name__ == "__main__":
    main(sys.argv[1:])
