"""A fabricated run directory for the report tests (tests/test_report.py, tests/test_report_browser.py).

Every figure written here is chosen so that the tests can check the page against hand-computed values:
`EXPECTED` lists them. No model is loaded; images are small solid-colour PNGs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from magic_align.evaluate.validity import graded_images, validity_table

# Conditions of the built-in demo checklist; items 3-5 of both require item 1 (kept at 1 below).
ALPHA, BETA = "melanoma", "psoriasis"
SECOND_JUDGE = "openai:gpt-4o"
UNITS_PER_CONDITION = 2
ALIGNMENT_SETTINGS = ("i2i", "dpo", "rft")

# Round 0 verdicts of the configured judge (unit, k) -> items, 4 units x 2 samples.
ROUND0_ITEMS = {
    (0, 0): [1, 1, 1, 0, 0], (0, 1): [1, 0, 0, 0, 0],  # melanoma: 3 met (pass), 1 met (fail)
    (1, 0): [1, 1, 1, 1, 0], (1, 1): [1, 1, 0, 0, 0],  # psoriasis: 4 (pass), 2 (fail)
    (2, 0): [1, 1, 1, 1, 1], (2, 1): [1, 1, 1, 0, 0],  # melanoma: 5 (pass), 3 (pass)
    (3, 0): [0, 0, 0, 0, 0], (3, 1): [1, 0, 0, 0, 0],  # psoriasis: 0 (fail), 1 (fail)
}
ROUND1_ITEMS = {(0, 0): [1, 1, 1, 1, 1], (0, 1): [1, 1, 1, 1, 0]}  # melanoma after DPO round 0: both pass

EXPECTED = {
    # round 0, melanoma: pass 3 of 4 -> 75.0 %, mean items (3 + 1 + 5 + 3) / 4 = 3.00
    "round0_melanoma_share": "75.0",
    "round0_melanoma_mean": "3.00",
    # round 0, all: passes 3 + 1 = 4 of 8 -> 50.0 %; round 1: 2 of 2 -> 100.0 %
    "round0_share": "50.0",
    "round1_share": "100.0",
    # pairs: round 0 has 2 one-wins, 1 both-win, 1 both-lose; round 1 has 1 one-win
    "pairs": {0: (4, 2, 1, 1), 1: (1, 1, 0, 0)},
    "accuracy_real": "71.2 [69.0, 73.4]",
    "accuracy_dpo": "74.6 [72.1, 76.9]",
    "skin_type_3": "68.0 [60.0, 75.0]",
    "fid_dpo": "41.20 [38.00, 44.50]",
    "kid_dpo": "0.0312 [0.0280, 0.0350]",
    "passrate_dpo_share": "55.5 [50.0, 61.0]",
    "alignment_difference": "0.45 [0.20, 0.70]",
    "cost": "$0.0123",
    "tokens": "1,234",
    "stage_seconds": "12.5 s",
}


def _png(path: Path, colour: tuple[int, int, int], size: int = 24) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def estimate(value: float, low: float, high: float) -> dict:
    return {"value": value, "low": low, "high": high}


def classifier_row(setting: str, label: str, accuracy: dict, skin3: dict) -> dict:
    metric = {**accuracy, "std": 0.01, "seeds": 3}
    return {
        "backbone": "small-cnn", "mode": "linear_probe", "group": "full", "setting": setting, "label": label,
        "n_real": 48, "n_synthetic": 0 if setting == "real" else 48, "seeds": 3,
        "accuracy": metric, "f1": {**estimate(0.6, 0.55, 0.65), "std": 0.02, "seeds": 3},
        "precision": {**estimate(0.61, 0.56, 0.66), "std": 0.02, "seeds": 3},
        "recall": {**estimate(0.62, 0.57, 0.67), "std": 0.02, "seeds": 3},
        "by_skin_type": {"3": {**skin3, "n": 10}, "-1": {**estimate(0.5, 0.4, 0.6), "n": 4}},
        "by_skin_group": {"3-4": {**skin3, "n": 10}},
        "confusion": [[5, 1], [2, 4]], "per_seed": [],
        # the locked set: accuracy 10 points lower, and (for a synthetic setting) its paired difference to real
        "locked": {"accuracy": {**estimate(accuracy["value"] - 0.1, accuracy["low"] - 0.1, accuracy["high"] - 0.1)},
                   "by_skin_group": {"3-4": {**estimate(0.5, 0.4, 0.6), "n": 12}, "5-6": {**estimate(0.3, 0.2, 0.4),
                                                                                           "n": 12}},
                   **({} if setting == "real" else {"vs_real": {
                       "accuracy": estimate(0.034, -0.01, 0.08),
                       "by_skin_group": {"3-4": estimate(0.0, -0.05, 0.05), "5-6": estimate(-0.02, -0.06, 0.01)}}})},
    }


def pass_summary(share: dict, mean: dict, n: int) -> dict:
    return {
        "n": n, "mean_items_met": mean, "pass_share": share, "unanswered": 0,
        "per_condition": {ALPHA: {"n": n, "mean_items_met": mean, "pass_share": share}},
        "per_item": {ALPHA: {"dark_lesion": {**estimate(0.9, 0.8, 1.0), "n": n},
                             "border": {**estimate(0.4, 0.3, 0.5), "n": n}}},
    }


def build_report_run(tmp_path: Path, *, ledger: bool = True, evaluate: bool = True, alignment: bool = True,
                     logs: bool = True):
    """A run directory under tmp_path/runs/report with what the flags ask for; returns (config, paths)."""
    from magic_align.checklists.schema import load_checklists
    from magic_align.config import load_config
    from magic_align.judges import judge_identity
    from magic_align.judges.base import Verdict
    from magic_align.ledger import Ledger, PairRow, SampleRow
    from magic_align.run import prepare_run

    config = load_config("tiny", [f"runs_dir='{tmp_path / 'runs'}'", "name='report'", "evaluate.bootstrap=100",
                                  "judge.checklist='demo'"])
    paths = prepare_run(config)
    root = paths.root

    if ledger:
        judge_id, prompt_version = judge_identity(config, load_checklists("demo"))
        checklists = load_checklists("demo")
        store = Ledger(paths.ledger)
        rows = []
        for round_index, table in ((0, ROUND0_ITEMS), (1, ROUND1_ITEMS)):
            for (unit, k), items in table.items():
                target = ALPHA if unit % 2 == 0 else BETA
                relative = f"samples/round-{round_index}/images/u{unit}-k{k}.png"
                digest = _png(root / relative, (40 * unit + 20 * k, 60 + 100 * round_index, 90))
                sample = SampleRow(
                    sample_id=f"r{round_index}-u{unit}-k{k}", round=round_index, unit_id=f"u{unit}", k=k,
                    image_path=relative, image_sha256=digest, source_id=f"src-{unit}", source_label=BETA,
                    target_label=target, prompt="an image of <x> on human skin", seed=unit * 10 + k,
                )
                rows.append(sample)
                checklist = checklists[target]
                store.put_verdict(digest, judge_id, checklist.version, prompt_version,
                                  Verdict(items=items, rationales=[None] * 5, raw="", parse_status="ok",
                                          latency_s=0.5, input_tokens=10, output_tokens=2, cost_usd=0.0),
                                  condition=target)
                if round_index == 0:  # a second, paid judge that agrees on most items
                    other = list(items)
                    other[4] = 1 - other[4] if unit == 3 else other[4]
                    store.put_verdict(digest, SECOND_JUDGE, checklist.version, "v1",
                                      Verdict(items=other, rationales=[None] * 5, raw="", parse_status="ok",
                                              latency_s=1.0, input_tokens=154 if (unit, k) != (0, 0) else 156,
                                              output_tokens=20, cost_usd=0.0123 / 8),
                                      condition=target)
        store.add_samples(rows)
        store.add_review("r0-u0-k0", checklists[ALPHA].version, [1, 1, 1, 0, 0], "dr. a")
        store.add_review("r0-u1-k0", checklists[BETA].version, [1, 1, 1, 1, 1], "dr. a")

        def pair(round_index, unit, a, b, tie):
            return PairRow(pair_id=f"r{round_index}-u{unit}-k0~r{round_index}-u{unit}-k1", round=round_index,
                           unit_id=f"u{unit}", sample_a=f"r{round_index}-u{unit}-k0",
                           sample_b=f"r{round_index}-u{unit}-k1", outcome_a=a, outcome_b=b, tie=tie,
                           score_a=0, score_b=0, verdict_a=None, verdict_b=None, rule="paper")

        store.replace_pairs(0, [pair(0, 0, 1, 0, False), pair(0, 1, 0, 1, False), pair(0, 2, 1, 1, True),
                                pair(0, 3, 0, 0, True)])
        store.replace_pairs(1, [pair(1, 0, 1, 0, False)])
        store.set_stage("run:finetune", "abc", "done", "12.5 s")
        store.set_stage("judge:0", "def", "done", "8 images graded, 8 calls this run")
        store.set_stage("run:dpo/round-0", "ghi", "failed", "RuntimeError: out of memory")
        store.close()

    if evaluate:
        metrics = {
            "classes": [ALPHA, BETA],
            "mode": "linear_probe",
            "settings": {"real": {"status": "ok"}, "i2i": {"status": "ok"}, "magic-dpo": {"status": "ok"},
                         "magic-rft": {"status": "skipped", "note": "skipped: no aligned/rft (make it first)"}},
            "classifier": [
                classifier_row("real", "real", estimate(0.7123, 0.690, 0.734), estimate(0.66, 0.58, 0.74)),
                classifier_row("i2i", "+ I2I (unaligned)", estimate(0.7201, 0.700, 0.741), estimate(0.67, 0.59, 0.75)),
                classifier_row("magic-dpo", "+ MAGIC-DPO", estimate(0.7461, 0.721, 0.769), estimate(0.68, 0.60, 0.75)),
            ],
            "distances": {
                "i2i": {"fid": estimate(55.0, 50.0, 60.0), "kid": estimate(0.05, 0.04, 0.06), "features": "small-cnn",
                        "n_real": 48, "n_fake": 48},
                "magic-dpo": {"fid": estimate(41.2, 38.0, 44.5), "kid": estimate(0.0312, 0.028, 0.035),
                              "features": "small-cnn", "n_real": 48, "n_fake": 48},
            },
            "pass_rate": {
                "i2i": {"manifest": pass_summary(estimate(0.185, 0.15, 0.22), estimate(2.1, 1.9, 2.3), 48)},
                "magic-dpo": {"manifest": pass_summary(estimate(0.555, 0.50, 0.61), estimate(3.2, 3.0, 3.4), 48)},
            },
            "counts": {"train": 48, "test": 24, "few_shot": 0},
            "notes": ["FID/KID computed with small-cnn features"],
        }
        (root / "eval").mkdir(parents=True, exist_ok=True)
        (root / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=2))

    if alignment:
        units = []
        for index in range(2 * UNITS_PER_CONDITION):
            target = ALPHA if index % 2 == 0 else BETA
            source = f"data/sources/s{index}.png"
            _png(root / source, (200, 150, 120 + index))
            images, scores = {}, {}
            for offset, setting in enumerate(ALIGNMENT_SETTINGS):
                relative = f"eval/alignment/{setting}/u{index}.png"
                _png(root / relative, (30 * offset + 10 * index, 90, 40))
                images[setting] = relative
                scores[setting] = offset + index % 3
            # the judge's answers and the recognition probe's verdict per image, for the validity table
            items = {name: [1] * score + [0] * (5 - score) for name, score in scores.items()}
            recognition = {name: {"recognised": int(score >= 2), "target_probability": 0.2 * score}
                           for name, score in scores.items()}
            units.append({"unit": f"syn-s{index}-0", "source": source, "target": target, "source_label": BETA, "images": images,
                          "scores": scores, "items": items, "recognition": recognition})
        alignment_data = {
            "set": "locked", "judge": "rules:demo", "n_items": 5,
            "settings": {name: {"mean_items": estimate(2.0 + i * 0.45, 1.8 + i * 0.45, 2.2 + i * 0.45),
                                "images": [u["images"][name] for u in units]}
                         for i, name in enumerate(ALIGNMENT_SETTINGS)},
            "differences": {"dpo - i2i": {**estimate(0.45, 0.20, 0.70), "units": len(units)},
                            "rft - i2i": {**estimate(0.9, -0.1, 1.5), "units": len(units)}},
            "by_source_skin_group": {
                "1-2": {"sources": 3, "settings": {}, "differences": {"dpo - i2i": {**estimate(0.9, 0.2, 1.5), "units": 3},
                                                                       "rft - i2i": {**estimate(1.2, 0.4, 2.0), "units": 3}}},
                "5-6": {"sources": 1, "settings": {}, "differences": {"dpo - i2i": {**estimate(-1.0, -1.0, -1.0), "units": 1}}},
            },
            "by_target": {BETA: {"sources": 4, "settings": {}, "differences": {"dpo - i2i": {**estimate(0.45, 0.2, 0.7), "units": 4}}}},
            "units": units,
            "notes": ["rft: trained on fewer units"],
        }
        alignment_data["validity"] = validity_table(graded_images(alignment_data), None, resamples=100, seed=0, min_r=0.3)
        (root / "eval").mkdir(parents=True, exist_ok=True)
        (root / "eval" / "alignment.json").write_text(json.dumps(alignment_data, indent=2))

    if logs:
        dpo_log = root / "logs" / "dpo" / "round-0" / "metrics.csv"
        dpo_log.parent.mkdir(parents=True, exist_ok=True)
        lines = ["step,loss,implicit_accuracy,grad_norm,lr"]
        lines += [f"{s},{0.7 - 0.004 * s!r},{0.5 + 0.003 * s!r},{1.0 / s!r},0.0001" for s in range(1, 61)]
        lines.append("61,0.45")  # a row cut short by a live run: read as NaN, not an error
        dpo_log.write_text("\n".join(lines) + "\n")
        lora_log = root / "logs" / "finetune" / "lora" / "metrics.csv"
        lora_log.parent.mkdir(parents=True, exist_ok=True)
        lora_log.write_text("step,loss,grad_norm,lr\n1,0.9,2.0,0.0001\n2,0.8,1.5,0.0001\n3,0.7,1.2,0.0001\n")
    return config, paths


def expected_image_count() -> int:
    """<img> elements the full fabricated run gives: alignment grid (source + 3 settings per unit) + 2 plots."""
    return 2 * UNITS_PER_CONDITION * (1 + len(ALIGNMENT_SETTINGS)) + 2
