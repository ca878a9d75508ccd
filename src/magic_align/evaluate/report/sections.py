"""One builder per report section: each turns what it reads (a file's data, the ledger) into the plain dicts and
lists the template shows."""

from __future__ import annotations

import csv
import itertools
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from magic_align.config import RunConfig
from magic_align.evaluate.labels import AFTER_SETTINGS, BEFORE_SETTINGS, SettingLabels, setting_rank
from magic_align.evaluate.metrics import METRICS, SKIN_TYPE_GROUPS
from magic_align.evaluate.passrate import pass_rate_summary
from magic_align.evaluate.report.formatting import (
    format_difference,
    finite_number,
    format_duration,
    format_estimate,
    format_general,
    parse_seconds,
)
from magic_align.evaluate.report.inputs import ReportError, read_log_columns, read_manifest_rows, source_paths
from magic_align.evaluate.report.plots import EmbeddedImages, curve_metric_order, plot_training_log
from magic_align.evaluate.validity import confirmation, is_low
from magic_align.judges.agreement import compare
from magic_align.ledger import Ledger
from magic_align.run import RunPaths

MAX_AGREEMENT_PAIRS = 6  # judge-vs-judge comparisons shown (every pair of judges grows quadratically)
STAGE_ORDER = ("finetune", "dpo", "rft")  # training logs in pipeline order; others follow alphabetically


def display_name(checklists, condition: str) -> str:
    if checklists is not None and condition in checklists:
        return checklists[condition].display_name
    return condition


def pair_outcome_counts(pairs: Iterable, undecided: Mapping[int, int] | None = None) -> list[dict]:
    """Per round: pairs, one wins (the training signal), both win, both lose, ties, pairs from human reviews,
    and the verdicts left out because an item stayed undecided (`undecided`: round -> count).

    `pairs` are `ledger.PairRow`s (anything with round, outcome_a, outcome_b, tie, source)."""
    rounds: dict[int, dict] = {}

    def round_counts(round_index: int) -> dict:
        return rounds.setdefault(round_index, {"round": round_index, "pairs": 0, "one_wins": 0, "both_win": 0,
                                               "both_lose": 0, "human": 0, "undecided": 0})

    for round_index, count in (undecided or {}).items():
        round_counts(int(round_index))["undecided"] = int(count)
    for pair in pairs:
        counts = round_counts(int(pair.round))
        counts["pairs"] += 1
        if not pair.tie:
            counts["one_wins"] += 1
        elif pair.outcome_a == 1:
            counts["both_win"] += 1
        else:
            counts["both_lose"] += 1
        counts["human"] += int(pair.source == "human")
    result = []
    for round_index in sorted(rounds):
        counts = rounds[round_index]
        counts["ties"] = counts["both_win"] + counts["both_lose"]
        counts["signal_share"] = counts["one_wins"] / counts["pairs"] if counts["pairs"] else float("nan")
        result.append(counts)
    return result


def grid_from_alignment(data: dict, images: EmbeddedImages, checklists, per_condition: int,
                        labels: SettingLabels) -> dict:
    """Grids per target condition from the alignment comparison: source, then each setting's image."""
    settings = sorted({name for unit in data.get("units", []) for name in unit.get("images", {})} |
                      set(data.get("settings", {})), key=setting_rank)
    conditions: dict[str, list] = {}
    for index, unit in enumerate(data.get("units", [])):
        rows = conditions.setdefault(unit["target"], [])
        if len(rows) >= per_condition:
            continue
        where = f"eval/alignment.json units[{index}]"
        cells = []
        for name in settings:
            score = unit.get("scores", {}).get(name)
            cells.append({"uri": images.uri(unit.get("images", {}).get(name), where),
                          "score": score if finite_number(score) else None})
        rows.append({"source": images.uri(unit.get("source"), where), "source_label": unit.get("source_label"),
                     "cells": cells})
    return {"origin": "eval/alignment.json (held-out sources of the locked set, paired)", "columns": [_compared_label(data, s, labels) for s in settings],
            "n_items": data.get("n_items"),
            "conditions": [{"condition": c, "name": display_name(checklists, c), "rows": rows}
                           for c, rows in sorted(conditions.items())]}


def grid_from_manifests(config: RunConfig, paths: RunPaths, manifests: dict[str, Path], images: EmbeddedImages,
                        checklists, per_condition: int, problems: list[str], labels: SettingLabels) -> dict | None:
    """Grids from the synthetic sets: one before-alignment set and the after-alignment sets, matched by
    synthetic id (the same source and target: targets are drawn from the source id and index alone)."""
    before = [name for name in BEFORE_SETTINGS if name in manifests][:1]
    after = [name for name in AFTER_SETTINGS if name in manifests]
    chosen = before + after
    if not chosen:
        return None
    tables = {}
    for name in chosen:
        try:
            tables[name] = {row["synthetic_id"]: row for row in read_manifest_rows(manifests[name])}
        except ReportError as error:
            problems.append(str(error))
    chosen = [name for name in chosen if name in tables]
    if not chosen:
        return None
    ids = [i for i in tables[chosen[0]] if all(i in tables[name] for name in chosen)]
    sources = source_paths(config, paths, problems)
    conditions: dict[str, list] = {}
    for synthetic_id in ids:
        first = tables[chosen[0]][synthetic_id]
        rows = conditions.setdefault(first["target_label"], [])
        if len(rows) >= per_condition:
            continue
        cells = []
        for name in chosen:
            row = tables[name][synthetic_id]
            score = row.get("verdict_score")
            cells.append({"uri": images.uri(row["path"], f"{manifests[name].relative_to(paths.root)} {synthetic_id}"),
                          "score": float(score) if score not in (None, "") else None})
        source = sources.get(first["source_id"])
        rows.append({"source": images.uri(source, f"source {first['source_id']}") if source else None,
                     "source_label": first.get("source_label") or None, "cells": cells})
    origin = ", ".join(str(manifests[name].relative_to(paths.root)) for name in chosen)
    return {"origin": f"synthetic manifests ({origin}), matched by synthetic id",
            "columns": [labels(name) for name in chosen], "n_items": None,
            "conditions": [{"condition": c, "name": display_name(checklists, c), "rows": rows}
                           for c, rows in sorted(conditions.items())]}


def _compared_label(data: dict, name: str, labels: SettingLabels) -> str:
    """A model's name in the alignment comparison: as `magic compare` recorded it, else as the run says now."""
    recorded = (data.get("settings", {}).get(name) or {}).get("label")
    return recorded if isinstance(recorded, str) and recorded else labels(name)


def alignment_summary(data: dict, labels: SettingLabels) -> dict:
    """The judge's figures per model and per paired difference, each beside the independent measure (target
    recognition) and the artefact measure (KID per target condition) where `magic compare` recorded them. A judge
    gain counts as a gain (`gain`) only where its interval excludes 0 and the independent measure does not fall."""
    independent = _mapping(data.get("independent"))
    measured = {name: _mapping(entry) for name, entry in _mapping(independent.get("settings")).items()}
    recognised = {name: entry.get("recognised") for name, entry in measured.items()}
    probability = {name: entry.get("target_probability") for name, entry in measured.items()}
    kid = {name: _mapping(entry).get("kid") for name, entry in _mapping(_mapping(data.get("artefacts")).get("settings")).items()}
    settings = [{"name": name, "label": _compared_label(data, name, labels), "mean_items": entry.get("mean_items"),
                 "pass_share": entry.get("pass_share"), "n": entry.get("n", len(entry.get("images", [])) or None),
                 "recognised": recognised.get(name), "target_probability": probability.get(name), "kid": kid.get(name)}
                for name, entry in sorted(data.get("settings", {}).items(), key=lambda kv: setting_rank(kv[0]))]
    differences = []
    for name, entry in data.get("differences", {}).items():
        parts = [part.strip() for part in name.split(" - ", 1)]
        other = _mapping(_mapping(independent.get("differences")).get(name))
        excludes_zero = finite_number(entry.get("low")) and finite_number(entry.get("high")) \
            and (entry["low"] > 0 or entry["high"] < 0)
        status = confirmation(other.get("recognised")) if independent else "unmeasured"
        kid_change = kid[parts[0]] - kid[parts[1]] if len(parts) == 2 and all(
            finite_number(kid.get(part)) for part in parts) else None
        differences.append({
            "name": name, "estimate": entry, "units": entry.get("units"),
            "label": " vs ".join(_compared_label(data, part, labels) for part in parts),
            "excludes_zero": excludes_zero, "independent": other.get("recognised"), "confirmation": status,
            "gain": excludes_zero and entry["low"] > 0 and status != "contradicted",
            "blocked": excludes_zero and entry["low"] > 0 and status == "contradicted", "kid_change": kid_change,
            "kid_difference": _mapping(_mapping(data.get("artefacts")).get("differences")).get(name),
        })
    grader = independent.get("grader")
    real_test = _mapping(independent.get("real_test"))
    return {"settings": settings, "differences": differences, "units": len(data.get("units", [])),
            "by_skin": _grouped_rows(data.get("by_source_skin_group"), "source skin types"),
            "by_target": _grouped_rows(data.get("by_target"), "target"),
            "difference_names": [row["name"] for row in differences],
            "judge": data.get("judge"), "notes": [str(note) for note in data.get("notes", [])],
            "independent": bool(independent), "grader": grader, "grader_accuracy": real_test.get("accuracy"),
            "grader_degraded_accuracy": real_test.get("degraded_accuracy"),
            "artefact_measure": _mapping(data.get("artefacts")).get("measure")}


def _grouped_rows(groups: Any, title: str) -> list[dict]:
    """Rows of a breakdown that `magic compare` recorded (by source skin-type group, by target): one per group with
    its number of sources and each paired difference (comparisons written before 2026-12-05 have none)."""
    return [{"group": f"{title} {group}", "sources": _mapping(part).get("sources"),
             "differences": _mapping(_mapping(part).get("differences"))}
            for group, part in _mapping(groups).items()]


def _mapping(value: Any) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def validity_summary(data: dict, checklists, min_r: float) -> dict | None:
    """The judge's validity on the compared images (eval/alignment.json `validity`), low by `min_r` (today's
    setting, so a changed threshold applies without a new comparison)."""
    validity = _mapping(data.get("validity"))
    if not validity:
        return None
    conditions = [{**row, "name": display_name(checklists, row.get("condition", ""))}
                  for row in validity.get("per_condition", []) if isinstance(row, Mapping)]
    items = [{**row, "name": display_name(checklists, row.get("condition", "")),
              "text": _item_text(checklists, row.get("condition", ""), row.get("item", ""))}
             for row in validity.get("per_item", []) if isinstance(row, Mapping)]
    return {**validity, "per_condition": conditions, "per_item": items, "min_r": min_r,
            "low": is_low(validity.get("r"), min_r)}


def pass_rates_from_metrics(pass_rate: Mapping, checklists, labels: SettingLabels) -> list[dict]:
    """metrics.json's {setting: {grader: summary}} pivoted to one table per grader: settings as columns,
    overall and per-condition rows, and per-item rows."""
    graders: dict[str, dict[str, Mapping]] = {}
    for setting, by_grader in pass_rate.items():
        for grader, summary in (by_grader or {}).items():
            graders.setdefault(grader, {})[setting] = summary
    tables = []
    for grader, by_setting in graders.items():
        settings = sorted(by_setting, key=setting_rank)
        conditions = sorted({c for s in settings for c in by_setting[s].get("per_condition", {})})
        rows = [{"name": "all conditions", "strong": True,
                 "cells": [_pass_cell(by_setting[s]) for s in settings]}]
        for condition in conditions:
            rows.append({"name": display_name(checklists, condition), "strong": False,
                         "cells": [_pass_cell(by_setting[s].get("per_condition", {}).get(condition)) for s in settings]})
        items = []
        for condition in conditions:
            names = list(dict.fromkeys(name for s in settings
                                       for name in by_setting[s].get("per_item", {}).get(condition, {})))
            for name in names:
                items.append({"condition": display_name(checklists, condition), "item": name,
                              "text": _item_text(checklists, condition, name),
                              "cells": [by_setting[s].get("per_item", {}).get(condition, {}).get(name) for s in settings]})
        tables.append({"grader": grader, "settings": [labels(s) for s in settings], "rows": rows, "items": items})
    return tables


def _pass_cell(summary: Mapping | None) -> dict | None:
    if not summary:
        return None
    return {"n": summary.get("n"), "mean": summary.get("mean_items_met"), "share": summary.get("pass_share")}


def _item_text(checklists, condition: str, item_id: str) -> str:
    if checklists is None or condition not in checklists:
        return ""
    return next((item.text for item in checklists[condition].items if item.id == item_id), "")


def pass_rates_from_ledger(ledger, checklists, resamples: int, seed: int) -> list[dict]:
    """Pass rates of the sampled images per round and grader (each judge, and the expert reviews): round 0
    comes from the preliminary model, later rounds from the policy after each DPO round."""
    item_ids = {c.condition: [item.id for item in c.items] for c in checklists.conditions} if checklists else None

    def lined_up(condition: str, items: list) -> list:
        if checklists is not None and condition in checklists and len(items) == len(checklists[condition].items):
            return checklists[condition].apply_requires(list(items))
        return list(items)

    per_grader: dict[str, dict[int, tuple[list, list]]] = {}
    for round_index in ledger.rounds():
        latest: dict[tuple[str, str], Any] = {}
        for joined in ledger.verdicts(round=round_index):
            if not joined.sample.synthetic:
                continue
            key = (joined.verdict.judge_id, joined.sample.sample_id)
            if key not in latest or joined.verdict.created_at >= latest[key].verdict.created_at:
                latest[key] = joined
        for (judge_id, _), joined in sorted(latest.items()):
            condition = joined.verdict.condition or joined.sample.target_label
            columns = per_grader.setdefault(judge_id, {}).setdefault(round_index, ([], []))
            columns[0].append(condition)
            columns[1].append(lined_up(condition, joined.verdict.items))
        samples = {s.sample_id: s for s in ledger.samples(round_index)}
        for sample_id, review in ledger.latest_reviews(round=round_index).items():
            sample = samples.get(sample_id)
            if sample is None or not sample.synthetic:
                continue
            columns = per_grader.setdefault("human reviews", {}).setdefault(round_index, ([], []))
            columns[0].append(sample.target_label)
            columns[1].append(lined_up(sample.target_label, review.items))
    tables = []
    for grader, by_round in per_grader.items():
        summaries = {r: pass_rate_summary(c, v, item_ids, resamples, seed) for r, (c, v) in sorted(by_round.items())}
        pivot = {f"round {r}": {grader: summary} for r, summary in summaries.items()}
        table = pass_rates_from_metrics(pivot, checklists, SettingLabels())[0]
        table["settings"] = [f"round {r}" + (" (preliminary model)" if r == 0 else f" (after DPO round {r - 1})")
                             for r in summaries]
        tables.append(table)
    return tables


def judge_usage(ledger: Ledger) -> list[dict]:
    """Calls, answer statuses, tokens, cost and latency per judge, over every verdict in the ledger."""
    return [asdict(usage) for usage in ledger.judge_usage()]


def stage_table(ledger: Ledger) -> list[dict]:
    """Every row of the ledger's stage table, oldest update first, with the duration where the detail has one."""
    result = []
    for row in ledger.stages():
        seconds = parse_seconds(row.detail)
        result.append({"stage": row.stage, "status": row.status, "detail": row.detail,
                       "seconds": seconds, "duration": format_duration(seconds),
                       "updated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row.updated_at))})
    longest = max((r["seconds"] for r in result if r["seconds"]), default=0.0)
    for row in result:
        row["bar"] = round(100 * row["seconds"] / longest, 1) if row["seconds"] and longest else 0.0
    return result


def agreement_tables(ledger, checklists, configured: str | None, resamples: int, seed: int) -> list[dict]:
    """Each judge against the expert reviews (when there are reviews), and judges against each other."""
    judges = ledger.judge_ids()
    if configured in judges:  # the judge the model was trained on first
        judges = [configured] + [j for j in judges if j != configured]
    comparisons = []
    if ledger.reviews():
        comparisons += [(judge, "human") for judge in judges]
    comparisons += list(itertools.combinations(judges, 2))[:MAX_AGREEMENT_PAIRS]
    tables = []
    for judge_id, against in comparisons:
        report = compare(ledger, checklists, judge_id, None, against, None, None, resamples, seed)
        if not report.items:
            continue
        tables.append({
            "judge": judge_id, "against": "expert reviews" if against == "human" else against,
            "images": report.images, "skipped": report.skipped,
            "rows": [{"item": row.item, "n": row.n, "kappa": row.kappa.as_dict(), "agreement": row.agreement.as_dict(),
                      "tpr": row.tpr.as_dict(), "tnr": row.tnr.as_dict()} for row in report.items],
        })
    return tables


def classifier_tables(metrics: Mapping, labels: SettingLabels) -> list[dict]:
    """metrics.json's classifier rows grouped by (backbone, mode, group): one table each, settings as rows,
    metrics as columns (best value in bold), and accuracy per Fitzpatrick skin type where known."""
    groups: dict[tuple, list] = {}
    for index, row in enumerate(metrics.get("classifier", [])):
        if not isinstance(row, Mapping) or "setting" not in row:
            raise ReportError(f"eval/metrics.json: classifier[{index}] is not a classifier row (no 'setting')")
        groups.setdefault((row.get("backbone", "?"), row.get("mode", "?"), row.get("group", "full")), []).append(row)
    tables = []
    for (backbone, mode, group), rows in groups.items():
        best = {}
        for name in METRICS:
            values = [r.get(name, {}).get("value") for r in rows if isinstance(r.get(name), Mapping)]
            values = [v for v in values if finite_number(v)]
            best[name] = max(values) if len(set(values)) > 1 else None  # all equal: nothing stands out
        skin_types = sorted({k for r in rows for k in (r.get("by_skin_type") or {})}, key=lambda k: int(k))
        table_rows = []
        for row in rows:
            cells = []
            for name in METRICS:
                entry = row.get(name) if isinstance(row.get(name), Mapping) else None
                value = entry.get("value") if entry else None
                cells.append({"text": format_estimate(entry, 1, percent=True),
                              "best": best[name] is not None and finite_number(value) and value == best[name]})
            skins = [format_estimate((row.get("by_skin_type") or {}).get(k), 1, percent=True) for k in skin_types]
            label = labels.relabel(row["setting"], row["label"]) if row.get("label") else labels(row["setting"])
            table_rows.append({"label": label, "setting": row["setting"],
                               "n_real": row.get("n_real"), "n_synthetic": row.get("n_synthetic"),
                               "seeds": row.get("seeds"), "cells": cells, "skins": skins,
                               # the stated figure where the run has a locked set (the test split is for tuning)
                               "locked_accuracy": (row.get("locked") or {}).get("accuracy")})
        first = rows[0].get("by_skin_type") or {}
        tables.append({
            "backbone": backbone, "mode": str(mode).replace("_", " "), "group": group,
            "metrics": list(METRICS), "rows": table_rows,
            "skin_types": [{"key": k, "name": "unknown" if int(k) < 0 else f"type {k}", "n": first.get(k, {}).get("n")}
                           for k in skin_types],
            "skin_groups": skin_group_tables(rows, labels),
        })
    return tables


def skin_group_tables(rows: list, labels: SettingLabels) -> list[dict]:
    """Accuracy overall and per skin-type group (1-2, 3-4, 5-6) of one classifier table, with each synthetic
    setting's paired difference against real only: on the locked set first (the figures to state), then on the
    test split (tuning). A set no row was graded on is left out; older metrics.json files have no groups."""
    sets = []
    for key, name in (("locked", "locked set (stated figures)"), ("test", "test split (tuning)")):
        parts = [(row, row.get("locked") if key == "locked" else row) for row in rows]
        parts = [(row, part) for row, part in parts if isinstance(part, Mapping) and part.get("by_skin_group")]
        if not parts:
            continue
        groups = [g for g in SKIN_TYPE_GROUPS if any(g in part["by_skin_group"] for _, part in parts)]
        first = parts[0][1]["by_skin_group"]
        table_rows = []
        for row, part in parts:
            versus = part.get("vs_real") or {}
            label = labels.relabel(row["setting"], row["label"]) if row.get("label") else labels(row["setting"])
            table_rows.append({
                "label": label,
                "cells": [format_estimate(part.get("accuracy"), 1, percent=True)]
                         + [format_estimate(part["by_skin_group"].get(g), 1, percent=True) for g in groups],
                "differences": ([format_difference(versus.get("accuracy"))]
                                + [format_difference((versus.get("by_skin_group") or {}).get(g)) for g in groups])
                               if versus else None,
            })
        sets.append({"key": key, "name": name, "rows": table_rows,
                     "groups": [{"name": f"types {g}", "n": first.get(g, {}).get("n")} for g in groups]})
    return sets


def distance_rows(distances: Mapping, labels: SettingLabels) -> list[dict]:
    rows = []
    for setting, entry in sorted(distances.items(), key=lambda kv: setting_rank(kv[0])):
        if not isinstance(entry, Mapping):
            raise ReportError(f"eval/metrics.json: distances.{setting} is not an object {{fid, kid, ...}}")
        rows.append({"setting": labels(setting), "features": entry.get("features", "?"),
                     "n_real": entry.get("n_real"), "n_fake": entry.get("n_fake"),
                     "fid": format_estimate(entry.get("fid"), 2), "kid": format_estimate(entry.get("kid"), 4)})
    return rows


def training_curves(paths: RunPaths, problems: list[str]) -> list[dict]:
    logs = sorted(paths.logs.glob("**/metrics.csv")) if paths.logs.is_dir() else []

    def order(path: Path) -> tuple:
        stage = path.relative_to(paths.logs).parts[0]
        return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), str(path))

    curves = []
    for path in sorted(logs, key=order):
        name = path.parent.relative_to(paths.logs).as_posix()
        try:
            columns = read_log_columns(path)
        except (ReportError, OSError, UnicodeDecodeError, csv.Error) as error:
            problems.append(str(error))
            continue
        steps = columns.get("step", [])
        if not steps:
            continue
        last = {}
        for metric in curve_metric_order(columns):
            finite = [v for v in columns[metric] if math.isfinite(v)]
            if finite:
                last[metric] = finite[-1]
        curves.append({"name": name, "stage": name.split("/")[0], "steps": int(max(steps)), "rows": len(steps),
                       "plot": plot_training_log(name, columns),
                       "last": [{"metric": m, "value": format_general(v)} for m, v in last.items()]})
    return curves
