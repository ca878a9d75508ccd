"""`magic run`: every stage in order, skipping the ones whose outputs are complete for the same config.

Each stage records (in the ledger's `stages` table) a hash of the configuration it depends on: its own
sections plus the hash of the stage before it, so a change upstream reruns everything downstream and a
rerun after a crash continues at the first stage that did not finish. `--dry-run` prints the plan (stages,
sample and pair counts, judge calls, tokens and cost) without loading a model or touching the data.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Callable

from rich.console import Console
from rich.table import Table

from magic_align import feedback, judge, sample, synthesize
from magic_align.checklists.schema import ChecklistSet, load_checklists
from magic_align.config import RunConfig, digest_values
from magic_align.evaluate import alignment, report, stage as evaluate_stage
from magic_align.judge import estimate_call_tokens
from magic_align.judges.costs import price_usd
from magic_align.judges.privacy import sends_images
from magic_align.ledger import Ledger
from magic_align.run import RunPaths, prepare_run
from magic_align.train import dpo, finetune, rft


@dataclass
class Stage:
    name: str
    sections: tuple[str, ...]  # the config sections (dotted) whose values decide the stage's outputs
    action: Callable[[], object]
    description: str


def _section_values(config: RunConfig, sections: tuple[str, ...]) -> dict:
    values = {}
    dumped = config.model_dump(mode="json")
    for dotted in sections:
        node = dumped
        for part in dotted.split("."):
            node = node[part]
        values[dotted] = digest_values(dotted, node) if isinstance(node, dict) else node
    return values


def stage_hash(config: RunConfig, sections: tuple[str, ...], upstream: str) -> str:
    content = json.dumps({"upstream": upstream, "values": _section_values(config, sections)}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def plan_stages(config: RunConfig, console: Console) -> list[Stage]:
    """The stages of a run in order, each bound to its entry function (imported lazily: a dry run loads no model)."""
    paths = RunPaths(config.run_dir)
    base = ("model", "data", "judge.checklist")
    stages = [
        Stage("finetune", base + ("finetune",), lambda: finetune.run_finetune(config), "textual inversion + UNet LoRA"),
    ]
    for round_index in range(config.rounds):
        previous = dpo.round_output(paths, round_index - 1) if round_index else None
        stages += [
            Stage(
                f"sample/round-{round_index}",
                ("sample",),
                lambda r=round_index, p=previous: sample.run_sample(config, round_index=r, policy_lora=p),
                f"{config.sample.num_sources} units x {config.sample.samples_per_unit} samples with trajectories",
            ),
            Stage(
                f"judge/round-{round_index}",
                ("judge",),
                lambda r=round_index: judge.run_judge(config, round_index=r, console=console),
                f"{config.judge.backend} judge on {config.judge.checklist} checklists",
            ),
            Stage(
                f"pairs/round-{round_index}",
                ("pairs",),
                lambda r=round_index: feedback.run_pairs(config, round_index=r),
                f"{config.pairs.rule} pair rule",
            ),
        ]
        if "dpo" in config.align:
            stages.append(
                Stage(
                    f"dpo/round-{round_index}",
                    ("dpo",),
                    lambda r=round_index, p=previous: dpo.run_dpo(config, round_index=r, init_lora=p),
                    f"MAGIC-DPO, {config.dpo.iterations} iterations",
                )
            )
    if "rft" in config.align:
        stages.append(Stage("rft", ("rft",), lambda: rft.run_rft(config, round_index=0), "MAGIC-RFT on round-0 feedback"))
    aligned = paths.aligned / config.align[0] if config.align else None
    synthetic_dir = paths.synthetic / (f"magic-{config.align[0]}" if config.align else "i2i")
    stages += [
        Stage(
            "compare",
            ("evaluate.alignment_units", "evaluate.alignment_per_source", "evaluate.held_out_judge",
             "evaluate.recognition_backbone", "evaluate.recognition_augment"),
            # the run's stated figures: graded on the locked set, never on the tuning set that settings were chosen on
            lambda: alignment.run_alignment_comparison(config, console=console, set_name="locked"),
            f"{config.evaluate.alignment_units} held-out locked-set sources x {config.evaluate.alignment_per_source} "
            "through each model, judged (eval/alignment.json)",
        ),
        Stage(
            "synthesize",
            ("synthesize",),
            # into the folder the evaluate stage reads for this model, so its images are made once; a set of an
            # earlier model (the LoRA was retrained with other settings) is made again, as the evaluate stage does
            lambda: synthesize.run_synthesize(config, lora=aligned, out_dir=synthetic_dir, replace_stale=True),
            f"{config.synthesize.per_image} synthetic image(s) per training image with the {config.align[0] if config.align else 'unaligned'} model",
        ),
        Stage("evaluate", ("evaluate",), lambda: evaluate_stage.run_evaluate(config), "classifier, pass rate, FID/KID"),
        Stage("report", (), lambda: report.run_report(config), "report/index.html"),
    ]
    return stages


def run_all(config: RunConfig, force: bool = False, console: Console | None = None) -> RunPaths:
    """Run every stage in order; a stage already done for the same configuration is skipped."""
    console = console or Console(stderr=True)
    paths = prepare_run(config)
    ledger = Ledger(paths.ledger)
    upstream = ""
    for stage in plan_stages(config, console):
        digest = stage_hash(config, stage.sections, upstream)
        status = ledger.stage(f"run:{stage.name}")
        if not force and status is not None and status.status == "done" and status.config_hash == digest:
            console.print(f"[dim]skip {stage.name}: done for this configuration[/dim]")
            upstream = digest
            continue
        console.rule(f"[bold]{stage.name}[/bold]: {stage.description}")
        ledger.set_stage(f"run:{stage.name}", digest, "running")
        started = time.perf_counter()
        try:
            stage.action()
        except BaseException as error:
            ledger.set_stage(f"run:{stage.name}", digest, "failed", f"{type(error).__name__}: {error}")
            raise
        elapsed = time.perf_counter() - started
        ledger.set_stage(f"run:{stage.name}", digest, "done", f"{elapsed:.1f} s")
        console.print(f"[green]done[/green] {stage.name} in {elapsed:.1f} s")
        upstream = digest
    return paths


# -------------------------------------------------------------------------------------------- dry run
@dataclass(frozen=True)
class JudgeEstimate:
    calls: int
    per_call_input_tokens: int
    per_call_output_tokens: int
    remote: bool  # images go to a paid HTTP judge
    cost_usd: float | None  # None: no price for the model in judge.prices; 0 for local judges


def judge_estimate(config: RunConfig, checklists: ChecklistSet | None = None) -> JudgeEstimate:
    """Judge calls of a whole run (every round's samples, plus the held-out comparison of the unaligned and each
    aligned model) and their cost, from the configuration alone (`checklists`: its set, when already loaded)."""
    if checklists is None:
        checklists = load_checklists(config.judge.checklist)
    # the largest checklist of the set, on an image of the model's resolution
    per_call_in, per_call_out = max(
        estimate_call_tokens(None, checklist, config.model.resolution, config.model.resolution, config.judge)
        for checklist in checklists.conditions
    )
    samples_per_round = config.sample.num_sources * config.sample.samples_per_unit
    compared = config.evaluate.alignment_units * config.evaluate.alignment_per_source
    calls = samples_per_round * config.rounds + compared * (1 + len(config.align))
    remote = sends_images(config.judge)
    cost = price_usd(config.judge, per_call_in * calls, per_call_out * calls) if remote else 0.0
    return JudgeEstimate(calls, per_call_in, per_call_out, remote, cost)


def dry_run_plan(config: RunConfig) -> Table:
    """The plan as a table: stages, counts, estimated judge calls, tokens and cost. Loads no model or data."""
    checklists = load_checklists(config.judge.checklist)
    estimate = judge_estimate(config, checklists)
    per_call_in, per_call_out = estimate.per_call_input_tokens, estimate.per_call_output_tokens
    calls, remote, cost = estimate.calls, estimate.remote, estimate.cost_usd
    samples_per_round = config.sample.num_sources * config.sample.samples_per_unit
    pairs_per_unit = config.sample.samples_per_unit * (config.sample.samples_per_unit - 1) // 2

    table = Table(title=f"plan for run '{config.name}' -> {config.run_dir}")
    table.add_column("stage")
    table.add_column("what")
    ft = config.finetune
    ti = (f"{len(checklists.conditions)} tokens x {ft.ti_steps_per_token} TI steps each" if ft.ti_schedule == "per_token"
          else f"{len(checklists.conditions)} tokens, {ft.ti_steps} joint TI steps")
    table.add_row("finetune", f"{ti}, LoRA r{ft.lora_rank} x {ft.lora_steps} steps")
    for round_index in range(config.rounds):
        table.add_row(
            f"sample/round-{round_index}",
            f"{config.sample.num_sources} units x {config.sample.samples_per_unit} = {samples_per_round} images, "
            f"{config.sample.steps} DDIM steps at strength {config.sample.strength} "
            f"({round(config.sample.steps * config.sample.strength)} kept per trajectory)",
        )
        table.add_row(f"judge/round-{round_index}", f"{samples_per_round} calls to {config.judge.backend}:{config.judge.model}" if remote else f"{samples_per_round} images, {config.judge.backend} judge (no paid calls)")
        table.add_row(f"pairs/round-{round_index}", f"{config.sample.num_sources * pairs_per_unit} pairs, {config.pairs.rule} rule")
        if "dpo" in config.align:
            table.add_row(f"dpo/round-{round_index}", f"{config.dpo.iterations} iterations x {config.dpo.pairs_per_step} pairs, beta {config.dpo.beta}")
    if "rft" in config.align:
        table.add_row("rft", f"reward model + {config.rft.steps} reward-weighted steps")
    models = 1 + len(config.align)
    table.add_row("compare", f"{config.evaluate.alignment_units} locked-set sources x {config.evaluate.alignment_per_source} "
                  f"images x {models} models, judged")
    table.add_row("synthesize", f"{config.synthesize.per_image} per training image at {config.synthesize.size} px")
    table.add_row("evaluate", f"{', '.join(config.evaluate.backbones)}; {config.evaluate.seeds} seeds; rho {config.evaluate.rho}")
    table.add_row("report", str(RunPaths(config.run_dir).report / "index.html"))
    if remote:
        cost_text = f"${cost:,.2f}" if cost is not None else f"unknown (no price for {config.judge.model} in judge.prices)"
        table.caption = (
            f"judge estimate: {calls} calls, about {per_call_in * calls:,} input + {per_call_out * calls:,} output tokens, "
            f"cost {cost_text}"
        )
    else:
        table.caption = f"judge: {calls} images graded locally by the {config.judge.backend} judge, no cost"
    return table
