"""The `rules` judge: grades checklist items by measuring pixels, for domains whose look is known exactly.

A *domain* (e.g. the built-in demo's, `demo/rules.py`) is a `RulesDomain` in the `rules_domains` registry
(`magic_align.plugins`, docs/extending.md), holding three things:

- `analyse(image) -> analysis`: everything measured once per image (skin tone, lesion masks, components...);
- `gate(analysis) -> ItemResult`: an image-quality gate; when it fails, every item fails. A pixel judge can be
  fooled by noise textures (docs/method.md section 11.2), so a domain must say what a plausible image looks like;
- `items[(condition, item_id)](analysis) -> ItemResult`: one rule per checklist item, each returning pass / fail
  and a rationale with the measured value ("ring contrast 0.31 >= 0.20").

The judge picks the domain registered under the checklist set's id (`demo` -> the demo domain). It is deterministic and
needs no prompt, so `prompt_version` is "none" and its id carries the domain version: a change of any rule
must bump the version, which makes new ledger keys.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from magic_align import plugins
from magic_align.checklists.schema import Checklist, ChecklistSet
from magic_align.config import ConfigError
from magic_align.judges.base import Verdict


@dataclass(frozen=True)
class ItemResult:
    passed: bool
    rationale: str


ItemRule = Callable[[Any], ItemResult]


@dataclass(frozen=True)
class RulesDomain:
    name: str
    version: str
    analyse: Callable[[Image.Image], Any]
    gate: Callable[[Any], ItemResult]
    items: dict[tuple[str, str], ItemRule] = field(default_factory=dict)
    describe: Callable[[Any], dict] = lambda analysis: {}  # measurements worth keeping in `Verdict.raw`


def register_domain(domain: RulesDomain) -> None:
    """Make a domain available to `make_rules_judge` under its name (the checklist set id it grades).

    The same as `magic_align.plugins.rules_domains.register(domain.name, domain)`; a plug-in may also register
    a "module:attribute" reference there, so that the domain's module is imported only when a run uses it."""
    plugins.rules_domains.register(domain.name, domain)


def get_domain(name: str) -> RulesDomain:
    domain = plugins.rules_domains.find(name)
    if domain is None:
        raise ConfigError(
            f"the rules judge has no measurement rules for checklist set {name!r}; known domains: "
            f"{plugins.rules_domains.names()}. Use a checklist set with a rules domain, or register one "
            "(docs/extending.md)"
        )
    return domain


class RulesJudge:
    """A `Judge` that measures images with a registered domain's rules."""

    prompt_version = "none"

    def __init__(self, domain: RulesDomain):
        self.domain = domain
        self.id = f"rules:{domain.name}-{domain.version}"

    def missing_rules(self, checklist: Checklist) -> list[str]:
        return [item.id for item in checklist.items if (checklist.condition, item.id) not in self.domain.items]

    def grade(self, image: Image.Image, checklist: Checklist) -> Verdict:
        """The synchronous core of `judge` (also used to judge many images without an event loop)."""
        started = time.perf_counter()
        missing = self.missing_rules(checklist)
        if missing:
            return Verdict(
                items=[None] * len(checklist.items),
                rationales=[None] * len(checklist.items),
                parse_status="failed",
                error=f"{self.id} has no rule for condition {checklist.condition!r}, items {missing}",
                latency_s=time.perf_counter() - started,
            )
        analysis = self.domain.analyse(image)
        return self.grade_analysis(analysis, checklist, started)

    def grade_analysis(self, analysis: Any, checklist: Checklist, started: float | None = None) -> Verdict:
        started = time.perf_counter() if started is None else started
        gate = self.domain.gate(analysis)
        if not gate.passed:
            results = [ItemResult(False, f"quality gate failed: {gate.rationale}") for _ in checklist.items]
        else:
            results = [self.domain.items[(checklist.condition, item.id)](analysis) for item in checklist.items]
        items = checklist.apply_requires([1 if result.passed else 0 for result in results])
        rationales = []
        for item, result, value in zip(checklist.items, results, items):
            text = result.rationale
            if result.passed and value == 0:  # failed only through its parent
                text = f"{text}; but requires {item.requires}, which failed"
            rationales.append(text)
        raw = {
            "gate": {"passed": gate.passed, "rationale": gate.rationale},
            "items": {item.id: {"passed": bool(v), "rationale": r} for item, v, r in zip(checklist.items, items, rationales)},
            "measurements": self.domain.describe(analysis),
        }
        return Verdict(
            items=items,
            rationales=rationales,
            raw=json.dumps(raw, sort_keys=True),
            parse_status="ok",
            latency_s=time.perf_counter() - started,
        )

    async def judge(self, image: Image.Image, checklist: Checklist) -> Verdict:
        return self.grade(image, checklist)


def make_rules_judge(cfg: Any, checklists: ChecklistSet) -> RulesJudge:
    """Build the rules judge for a checklist set; every item of every condition must have a rule.

    `cfg` is the `JudgeConfig` (unused today: the rules judge has no settings)."""
    judge = RulesJudge(get_domain(checklists.id))
    problems = [f"{c.condition}: {missing}" for c in checklists.conditions if (missing := judge.missing_rules(c))]
    if problems:
        raise ConfigError(
            f"the rules domain {judge.domain.name!r} has no rule for these checklist items: " + "; ".join(problems)
        )
    return judge


# ---------------------------------------------------------------------------------------------- validity
@dataclass
class ValidityTable:
    """How well the rules judge agrees with what the generator drew.

    own[c][item]: fraction of images of condition c that pass c's item; cross[c][d]: mean items met by images of
    condition c under the checklist of condition d (the diagonal is the own score)."""

    conditions: list[str]
    item_ids: dict[str, list[str]]
    own: dict[str, dict[str, float]]
    cross: dict[str, dict[str, float]]
    gate_pass: dict[str, float]
    per_condition: int

    def worst_own_item(self) -> float:
        return min(rate for items in self.own.values() for rate in items.values())

    def mean_other(self, condition: str) -> float:
        """Mean items met by images of `condition` under the other conditions' checklists."""
        others = [self.cross[condition][d] for d in self.conditions if d != condition]
        return sum(others) / len(others)

    def markdown(self) -> str:
        lines = [
            f"Own checklist: share of {self.per_condition} generated images per condition that pass each item "
            "(items in checklist order).",
            "",
            "| condition | quality gate | " + " | ".join(f"item {i + 1}" for i in range(5)) + " |",
            "|---|---|" + "---|" * 5,
        ]
        for c in self.conditions:
            cells = [f"{self.own[c][item]:.2f} ({item})" for item in self.item_ids[c]]
            lines.append(f"| {c} | {self.gate_pass[c]:.2f} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Mean items met (of 5) by images of a condition (rows) under each checklist (columns); the last column "
            "is the mean over the other conditions' checklists.",
            "",
            "| images \\ checklist | " + " | ".join(self.conditions) + " | mean of others |",
            "|---|" + "---|" * (len(self.conditions) + 1),
        ]
        for c in self.conditions:
            cells = [f"**{self.cross[c][d]:.2f}**" if c == d else f"{self.cross[c][d]:.2f}" for d in self.conditions]
            lines.append(f"| {c} | " + " | ".join(cells) + f" | {self.mean_other(c):.2f} |")
        return "\n".join(lines)


def validity_table(judge: RulesJudge, checklists: ChecklistSet, images: dict[str, list[Image.Image]]) -> ValidityTable:
    """Judge every image under every checklist of the set (each image is analysed once)."""
    conditions = [c for c in checklists.condition_names if c in images]
    own: dict[str, dict[str, float]] = {}
    cross: dict[str, dict[str, float]] = {}
    gate_pass: dict[str, float] = {}
    for condition in conditions:
        analyses = [judge.domain.analyse(image) for image in images[condition]]
        count = len(analyses)
        gate_pass[condition] = sum(judge.domain.gate(a).passed for a in analyses) / count
        cross[condition] = {}
        for other in conditions:
            checklist = checklists[other]
            verdicts = [judge.grade_analysis(a, checklist) for a in analyses]
            cross[condition][other] = sum(v.score for v in verdicts) / count
            if other == condition:
                own[condition] = {
                    item.id: sum(v.items[i] == 1 for v in verdicts) / count for i, item in enumerate(checklist.items)
                }
    return ValidityTable(
        conditions=conditions,
        item_ids={c: [item.id for item in checklists[c].items] for c in conditions},
        own=own,
        cross=cross,
        gate_pass=gate_pass,
        per_condition=min(len(v) for v in images.values()) if images else 0,
    )
