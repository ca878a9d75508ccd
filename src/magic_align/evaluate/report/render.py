"""The report page: the context rendered through `evaluate/templates/report.html` (Jinja2, autoescaped)."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from magic_align.evaluate.report.collect import ReportContext
from magic_align.evaluate.report.formatting import (finite_number, format_difference, format_estimate, format_general,
                                                   format_number)

TEMPLATES = Path(__file__).parent.parent / "templates"  # evaluate/templates/, shipped as package data


def render_report(context: ReportContext) -> str:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,  # a template typo is an error in the tests, not a silently empty cell
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["est"] = format_estimate
    environment.filters["num"] = format_number
    environment.filters["diff"] = format_difference
    environment.filters["general"] = lambda v: format_general(v) if finite_number(v) else "–"
    environment.filters["thousands"] = lambda v: f"{int(v):,}" if finite_number(v) else "–"
    return environment.get_template("report.html").render(c=context, s=context.sections, m=context.missing)
