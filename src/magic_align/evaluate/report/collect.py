"""Read everything the run directory holds so far into a `ReportContext`, one section at a time."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from magic_align.config import RunConfig, dump_config
from magic_align.evaluate.labels import SettingLabels
from magic_align.evaluate.report.formatting import format_difference, format_estimate, format_number
from magic_align.evaluate.report.inputs import (
    ReportError,
    find_manifests,
    load_report_checklists,
    read_alignment,
    read_json,
)
from magic_align.evaluate.report.plots import EmbeddedImages
from magic_align.evaluate.report.sections import (
    agreement_tables,
    alignment_summary,
    classifier_tables,
    distance_rows,
    grid_from_alignment,
    grid_from_manifests,
    judge_usage,
    pair_outcome_counts,
    pass_rates_from_ledger,
    pass_rates_from_metrics,
    stage_table,
    training_curves,
    validity_summary,
)
from magic_align.feedback import undecided_counts
from magic_align.judges import judge_identity
from magic_align.ledger import Ledger
from magic_align.run import RunPaths


@dataclass
class ReportContext:
    """Everything the template shows: `sections` holds the sections that have data; a section whose input
    does not exist yet is absent there and `missing[key]` says what would fill it."""

    title: str
    run_dir: str
    generated_at: str
    sections: dict[str, Any] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    headline: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # shown on the first screen, above the headline figures


def collect_report(config: RunConfig, max_units_per_condition: int = 4,
                   progress: Callable[[str], None] | None = None) -> ReportContext:
    """Read everything the run directory holds so far into a `ReportContext` (nothing is written)."""
    say = progress or (lambda _text: None)
    paths = RunPaths(config.run_dir)
    context = ReportContext(title=f"magic-align report: {config.name}", run_dir=str(paths.root.resolve()),
                            generated_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    problems = context.problems
    images = EmbeddedImages(paths.root, problems)
    checklists = load_report_checklists(config, problems)
    labels = SettingLabels.of_run(paths)  # the aligned models named with the objective they were trained with
    resamples, seed = config.evaluate.bootstrap, config.seed

    def section(key: str, build: Callable[[], Any], missing: str) -> Any:
        """Build one section; its failure becomes a problem line and leaves the others intact."""
        say(f"report: {key}")
        try:
            value = build()
        except Exception as error:
            problems.append(f"{key}: {error}")
            value = None
            missing = f"could not be read: {error}"
        if value in (None, [], {}):
            context.missing[key] = missing
            return None
        context.sections[key] = value
        return value

    # -- evaluate-stage outputs
    def read_input(path: Path, reader: Callable[[Path], Any]) -> Any:
        if not path.is_file():
            return None
        try:
            return reader(path)
        except (ReportError, OSError, UnicodeDecodeError) as error:
            problems.append(str(error))
            return None

    metrics = read_input(paths.eval / "metrics.json", read_json)
    if metrics is not None and not isinstance(metrics, dict):
        problems.append(f"{paths.eval / 'metrics.json'}: expected a JSON object, not {type(metrics).__name__}")
        metrics = None
    alignment = read_input(paths.eval / "alignment.json", read_alignment)

    def grids():
        if alignment is not None and alignment.get("units"):
            return grid_from_alignment(alignment, images, checklists, max_units_per_condition, labels)
        manifests = find_manifests(paths)
        return grid_from_manifests(config, paths, manifests, images, checklists, max_units_per_condition, problems,
                                   labels)

    section("grids", grids, "no alignment comparison (eval/alignment.json) and no synthetic sets before and after "
            "alignment yet (synthetic/<setting>/manifest.csv)")
    section("alignment", lambda: alignment_summary(alignment, labels) if alignment is not None else None,
            "no alignment comparison yet (eval/alignment.json)")
    section("validity", lambda: validity_summary(alignment, checklists, config.evaluate.validity_min_r)
            if alignment is not None else None,
            "no validity table yet: `magic compare` grades the models' outputs with the judge and the recognition probe")
    section("pass_rates", lambda: pass_rates_from_metrics(metrics.get("pass_rate") or {}, checklists, labels) if metrics else None,
            "no checklist pass rates of synthetic sets yet (magic evaluate writes them to eval/metrics.json)")
    section("classifier", lambda: classifier_tables(metrics, labels) if metrics else None,
            "no classifier results yet (magic evaluate)")
    section("distances", lambda: distance_rows(metrics.get("distances") or {}, labels) if metrics else None,
            "no FID / KID yet (magic evaluate)")
    if metrics:
        skipped = [f"{labels(name)}: {info.get('note', 'skipped')}"
                   for name, info in (metrics.get("settings") or {}).items()
                   if isinstance(info, Mapping) and info.get("status") == "skipped"]
        context.sections["evaluate_notes"] = skipped + [str(n) for n in metrics.get("notes", [])]
        context.sections["counts"] = metrics.get("counts")

    # -- the ledger
    ledger = None
    if paths.ledger.is_file():
        try:
            ledger = Ledger(paths.ledger)
        except Exception as error:
            problems.append(f"{paths.ledger}: {error}")
    no_ledger = f"no ledger yet ({paths.ledger.relative_to(paths.root)}: magic sample, magic judge, magic pairs)"
    configured = identity = None
    if ledger is not None and config.judge.backend != "human":
        try:
            identity = judge_identity(config, checklists) if checklists is not None else None
            configured = identity[0] if identity is not None else None
        except Exception:
            configured = None  # the report still shows every judge; it just cannot say which one trained
    context.sections["configured_judge"] = configured
    section("round_pass_rates",
            lambda: pass_rates_from_ledger(ledger, checklists, resamples, seed) if ledger else None,
            no_ledger if ledger is None else "no verdicts or reviews of sampled images yet (magic judge, magic review)")
    def pair_counts():
        undecided = undecided_counts(ledger, checklists, *identity) if identity and checklists is not None else None
        return pair_outcome_counts(ledger.pairs(), undecided)

    section("pairs", lambda: pair_counts() if ledger else None,
            no_ledger if ledger is None else "no preference pairs yet (magic pairs)")
    section("judge_usage", lambda: judge_usage(ledger) if ledger else None,
            no_ledger if ledger is None else "no judge verdicts yet (magic judge)")
    section("agreement",
            lambda: agreement_tables(ledger, checklists, configured, resamples, seed) if ledger and checklists else None,
            "no two graders of the same images yet (expert reviews from magic review, or a second judge)")
    section("stages", lambda: stage_table(ledger) if ledger else None,
            no_ledger if ledger is None else "no stage has recorded its status yet")
    if ledger is not None:
        context.sections["ledger_counts"] = {"samples": len(ledger.samples()), "rounds": len(ledger.rounds()),
                                             "reviews": len(ledger.reviews())}
        ledger.close()

    # -- training logs, configuration
    section("curves", lambda: training_curves(paths, problems),
            "no training logs yet (logs/<stage>/.../metrics.csv: magic finetune, magic train dpo / rft)")

    def config_text() -> dict:
        if paths.config.is_file():
            text, origin = paths.config.read_text(encoding="utf-8"), str(paths.config.relative_to(paths.root))
        else:
            text, origin = dump_config(config), "the configuration given to magic report (no config.toml in the run)"
        earlier = sorted(p.name for p in paths.root.glob("config.*.toml")) if paths.root.is_dir() else []
        return {"text": text, "origin": origin, "earlier": earlier}

    section("config", config_text, "")
    context.headline = _headline(context)
    context.warnings = _warnings(context)
    return context


def _headline(context: ReportContext) -> list[dict]:
    """A few figures for the top of the page, each from a section that exists."""
    cards = []
    alignment = context.sections.get("alignment")
    if alignment and alignment["differences"]:
        first = alignment["differences"][0]
        cards.append({"label": f"items met, {first['label']}",
                      "value": format_difference(first["estimate"], 2, percent=False),
                      "note": "95 % bootstrap interval, paired held-out sources of the locked set"})
        if first["independent"]:
            cards.append({"label": f"recognised as the target, {first['label']}",
                          "value": f"{format_difference(first['independent'], 1, percent=True)} pts",
                          "note": f"independent measure · judge gain {first['confirmation']}"
                          if first["confirmation"] != "contradicted" else "independent measure falls"})
    validity = context.sections.get("validity")
    if validity:
        cards.append({"label": "judge validity on generated images", "value": f"r = {format_estimate(validity['r'], 2)}",
                      "note": f"items met vs recognition, {validity.get('n')} images" + (" · LOW" if validity["low"] else "")})
    classifier = context.sections.get("classifier") or []
    if classifier:  # the first table: the first backbone on the full training set
        table = classifier[0]
        real = next((r for r in table["rows"] if r["setting"] == "real"), None)
        others = [r for r in table["rows"] if r["setting"] != "real"]
        locked = all(isinstance(r.get("locked_accuracy"), Mapping) for r in table["rows"])
        if real and others and locked:  # the stated figures: the locked set
            best = max(others, key=lambda r: r["locked_accuracy"]["value"])
            cards.append({"label": f"accuracy on the locked set, {table['backbone']} ({table['group']})",
                          "value": f"{format_number(real['locked_accuracy']['value'], 1, True)} → "
                                   f"{format_number(best['locked_accuracy']['value'], 1, True)} %",
                          "note": f"real → {best['label']}"})
        elif real and others:  # cells[0] is accuracy (METRICS order)
            best = max(others, key=lambda r: _leading_number(r["cells"][0]["text"]))
            cards.append({"label": f"accuracy, {table['backbone']} ({table['group']})",
                          "value": f"{real['cells'][0]['text'].split(' ')[0]} → {best['cells'][0]['text'].split(' ')[0]} %",
                          "note": f"real → {best['label']}"})
    pairs = context.sections.get("pairs")
    if pairs:
        total = sum(r["pairs"] for r in pairs)
        signal = sum(r["one_wins"] for r in pairs)
        cards.append({"label": "pairs with a winner", "value": f"{signal} / {total}",
                      "note": f"over {len(pairs)} round(s); ties give no gradient"})
    usage = context.sections.get("judge_usage")
    if usage:
        cost = sum(r["cost_usd"] or 0 for r in usage)
        answers = sum(r["answers"] for r in usage)
        attempts = sum(r.get("attempts") or 0 for r in usage)
        spent = f"${cost:.2f} in total" if cost >= 1 else f"${cost:.4f} in total"
        cards.append({"label": "judge answers stored", "value": f"{answers:,}",
                      "note": f"{spent}; {attempts:,} call(s) without an answer" if attempts else spent})
    return cards


def _warnings(context: ReportContext) -> list[str]:
    """What must be read before any figure: a judge that does not track the independent grader on generated
    images, and judge gains the independent measure contradicts."""
    found = []
    validity = context.sections.get("validity")
    if validity and validity["low"]:
        r = validity.get("r") or {}
        found.append(f"The judge's validity on generated images is low: items met and the independent recognition "
                     f"of the target correlate at r = {format_estimate(r, 2)} over {validity.get('n')} images "
                     f"(below {validity['min_r']:g}, or an interval reaching 0). Gains in items met may be the model "
                     "learning the judge rather than the condition; read them beside the independent measure.")
    alignment = context.sections.get("alignment") or {}
    for row in alignment.get("differences", []):
        if row["confirmation"] == "contradicted":
            found.append(f"{row['label']}: the judge's items met change by {format_estimate(row['estimate'], 2)}, but "
                         f"the share recognised as the target falls ({format_estimate(row['independent'], 3)}); "
                         "this is not shown as a gain.")
    return found


def _leading_number(text: str) -> float:
    try:
        return float(text.split(" ")[0])
    except ValueError:
        return -math.inf
