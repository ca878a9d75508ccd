"""How the report and the alignment comparison name the synthetic settings (`magic evaluate`, `magic compare`).

An aligned model is named with the objective it was trained with, because the objectives give different
models: "MAGIC-DPO (trajectory, as in the paper)" is the paper's DPO on the denoising trajectory,
"MAGIC-DPO (Diffusion-DPO objective)" the preference on the noise-prediction error; MAGIC-RFT weighs either the
trajectory's likelihood or the denoising loss by the reward, with or without the per-unit baseline. The
objective is read from the model's own summary (`aligned/<method>/<method>.json`, written by the trainer),
else from the run's `config.toml`; a model whose objective is known nowhere keeps the plain name.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from typing import Mapping

from magic_align.run import RunPaths

# Friendly names for the synthetic settings of the evaluate stage and of the alignment comparison.
SETTING_LABELS = {
    "real": "real",
    "t2i": "+ T2I",
    "i2i": "I2I, before alignment",
    "unaligned": "before alignment",
    "magic-dpo": "MAGIC-DPO",
    "dpo": "MAGIC-DPO",
    "magic-rft": "MAGIC-RFT",
    "rft": "MAGIC-RFT",
    "aligned": "aligned (synthesize stage)",
}
BEFORE_SETTINGS = ("i2i", "unaligned", "t2i")  # "before alignment" columns, most comparable first
AFTER_SETTINGS = ("magic-dpo", "dpo", "magic-rft", "rft", "aligned")
SETTING_ORDER = ("real", "t2i", "i2i", "unaligned", "magic-dpo", "dpo", "magic-rft", "rft", "aligned")
# the settings made by an aligned model, and the training method (aligned/<method>/) each comes from
ALIGNED_METHODS = {"magic-dpo": "dpo", "dpo": "dpo", "magic-rft": "rft", "rft": "rft"}

# (method, objective) -> what it is; the paper's own objective says so
OBJECTIVE_NAMES = {
    ("dpo", "trajectory"): "trajectory, as in the paper",
    ("dpo", "denoising"): "Diffusion-DPO objective",
    ("rft", "trajectory"): "reward-weighted trajectory",
    ("rft", "denoising"): "reward-weighted denoising",
}


def setting_rank(name: str) -> tuple[int, str]:
    base = name.split("+")[0]
    return (SETTING_ORDER.index(base) if base in SETTING_ORDER else len(SETTING_ORDER), name)


@dataclass(frozen=True)
class TrainedObjective:
    """What an aligned model was trained with, and where that was read (a summary file or config.toml)."""

    method: str  # dpo | rft
    objective: str | None
    baseline: str | None = None  # RFT only: none | unit
    source: str | None = None
    control: str | None = None  # DPO only: a negative control's swapped preferences (flipped | random), else None

    @property
    def label(self) -> str:
        """"MAGIC-DPO (Diffusion-DPO objective)", "MAGIC-RFT (reward-weighted trajectory, as in the paper)", ...;
        the plain "MAGIC-DPO" when the objective is unknown."""
        plain = f"MAGIC-{self.method.upper()}"
        what = OBJECTIVE_NAMES.get((self.method, self.objective))
        if what is None:
            return plain
        if self.method == "rft":
            if self.baseline == "unit":
                what += ", unit baseline"
            elif self.objective == "trajectory" and self.baseline in (None, "none"):
                what += ", as in the paper"
        if self.control not in (None, "none"):  # never to be read as an aligned model
            what += f", {self.control}-preference control"
        return f"{plain} ({what})"

    def as_dict(self) -> dict:
        entry = {"method": self.method, "objective": self.objective, "source": self.source}
        if self.method == "rft":
            entry["baseline"] = self.baseline
        if self.control not in (None, "none"):
            entry["preference_control"] = self.control
        return entry


def trained_objective(paths: RunPaths, method: str) -> TrainedObjective:
    """The objective of `aligned/<method>/`: its summary's "objective" (and "baseline"), else the run's
    config.toml section `[<method>]`; unknown (None) when neither says."""
    summary = paths.aligned / method / f"{method}.json"
    found = _read_objective(summary, lambda text: json.loads(text))
    if found is not None:
        return TrainedObjective(method, found.get("objective"), found.get("baseline"),
                                summary.relative_to(paths.root).as_posix(), found.get("preference_control"))
    found = _read_objective(paths.config, lambda text: tomllib.loads(text).get(method))
    if found is not None:
        return TrainedObjective(method, found.get("objective"), found.get("baseline"), "config.toml",
                                found.get("preference_control"))
    return TrainedObjective(method, None)


def _read_objective(path, parse) -> Mapping | None:
    """The mapping `parse` finds in the file when it names an objective; None when the file is missing,
    unreadable or silent about it (the next source is tried)."""
    try:
        found = parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSONDecodeError and TOMLDecodeError are ValueErrors
        return None
    if isinstance(found, Mapping) and isinstance(found.get("objective"), str):
        return found
    return None


class SettingLabels:
    """Names of the synthetic settings of one run, the aligned ones with their objective."""

    def __init__(self, objectives: Mapping[str, TrainedObjective] | None = None) -> None:
        self.objectives = dict(objectives or {})

    @classmethod
    def of_run(cls, paths: RunPaths) -> "SettingLabels":
        return cls({method: trained_objective(paths, method) for method in sorted(set(ALIGNED_METHODS.values()))})

    def __call__(self, name: str) -> str:
        method = ALIGNED_METHODS.get(name)
        if method is not None and method in self.objectives:
            return self.objectives[method].label
        return SETTING_LABELS.get(name, name)

    def describe(self, name: str) -> dict:
        """{"label"} of a setting, with {"objective": {method, objective, baseline, source}} for an aligned model
        (what `magic compare` records in eval/alignment.json)."""
        entry = {"label": self(name)}
        method = ALIGNED_METHODS.get(name)
        if method is not None and method in self.objectives:
            entry["objective"] = self.objectives[method].as_dict()
        return entry

    def relabel(self, setting: str, text: str) -> str:
        """A label written elsewhere ("+ MAGIC-DPO (few-shot)" in eval/metrics.json) with the objective added to
        the aligned model's name, when it is not there yet."""
        method = ALIGNED_METHODS.get(setting.split("+")[0])
        if method is None or method not in self.objectives:
            return text
        plain, full = f"MAGIC-{method.upper()}", self.objectives[method].label
        return text if full in text else text.replace(plain, full, 1)

