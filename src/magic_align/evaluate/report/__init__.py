"""`magic report`: one self-contained HTML page, `run/report/index.html`, about everything a run has made so far.

The page reads only the run directory, never a model: the ledger (samples, verdicts, reviews, pairs, stage
status), `eval/metrics.json` (the evaluate stage), `eval/alignment.json` (the alignment comparison, format
in docs/formats.md), the synthetic manifests, the training logs (`logs/<stage>/.../metrics.csv`) and the
resolved `config.toml`. Every image and plot is embedded as base64 (images as small JPEG thumbnails,
plots as PNG drawn with matplotlib's Agg backend), and the CSS is inline, so the one file works when mailed
or opened without network.

Each section is collected on its own. A section whose input does not exist yet says so; a section whose
input is malformed says what is wrong (file and field) in a "problems" box at the top, and the other
sections are still written, so a partial or damaged run still gets a useful report.

The code is split by job: `inputs` reads the run's files, `sections` turns each input into a section's tables,
`plots` draws and embeds images, `collect` assembles the sections, `render` writes the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from magic_align.config import RunConfig
from magic_align.evaluate.report.collect import ReportContext, collect_report
from magic_align.evaluate.report.formatting import format_duration, format_estimate, format_number, parse_seconds
from magic_align.evaluate.report.inputs import ReportError, read_log_columns
from magic_align.evaluate.report.plots import smooth
from magic_align.evaluate.report.render import render_report
from magic_align.evaluate.report.sections import pair_outcome_counts
from magic_align.run import RunPaths, atomic_write_text


def run_report(config: RunConfig, max_units_per_condition: int = 4,
               progress: Callable[[str], None] | None = None) -> Path:
    """Write `run/report/index.html` from what the run directory holds now; returns its path.

    `progress` receives one line per section and, at the end, each problem found (the page lists them too)."""
    paths = RunPaths(config.run_dir)
    if not paths.root.is_dir():
        raise ReportError(f"the run directory {paths.root} does not exist; run a stage first (or check runs_dir / name)")
    context = collect_report(config, max_units_per_condition, progress)
    output = paths.report / "index.html"
    atomic_write_text(output, render_report(context))
    if progress is not None:
        for problem in context.problems:
            progress(f"problem: {problem}")
    return output


__all__ = ["ReportContext", "ReportError", "collect_report", "format_duration", "format_estimate", "format_number",
           "pair_outcome_counts", "parse_seconds", "read_log_columns", "render_report", "run_report", "smooth"]
