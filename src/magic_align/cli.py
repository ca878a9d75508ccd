"""The `magic` command. Thin by design: parse arguments, load the configuration, call one stage function.

Each stage lives in its own module with one entry function; this file only wires them to subcommands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from typer.core import TyperGroup

from magic_align import progress
from magic_align.config import ConfigError, RunConfig, dump_config, load_config
from magic_align.errors import MagicError
from magic_align.run import RunPaths, prepare_run

console = Console(stderr=True)


class MagicGroup(TyperGroup):
    """Turns every user-facing error (`MagicError`) into one line on stderr and exit code 2, and Ctrl-C into one
    line saying where the stage stopped and what a rerun does, with exit code 130 (the shell's code for SIGINT),
    in one place."""

    def invoke(self, ctx):
        progress.forget()
        try:
            return super().invoke(ctx)
        except (MagicError, FileNotFoundError) as error:
            console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            where = progress.interrupted() or (
                "stopped while no stage was counting steps (loading, saving or between phases); files are written "
                f"atomically, so nothing half-written counts as done: {progress.RERUN}"
            )
            console.print(f"[yellow]interrupted:[/yellow] {escape(where)}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=MagicGroup, no_args_is_help=True, add_completion=False,
    help="Align diffusion models with expert checklists (MAGIC).",
)
config_app = typer.Typer(no_args_is_help=True, help="Show the resolved configuration.")
app.add_typer(config_app, name="config")

ConfigArg = Annotated[str, typer.Argument(help="A TOML file or a preset name (paper, tiny, demo).")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a setting, e.g. --set sample.strength=0.5 (repeatable).")
]


def load(config: str, overrides: list[str] | None) -> RunConfig:
    """Load a configuration; a ConfigError reaches the user as one line through MagicGroup."""
    return load_config(config, overrides or [])


@config_app.command("show")
def config_show(config: ConfigArg = "paper", set_: SetOpt = None) -> None:
    """Print the resolved configuration as TOML (every key, with presets and overrides applied)."""
    typer.echo(dump_config(load(config, set_)))


# Stage commands are added below, one per stage module.


@app.command("evaluate")
def evaluate_command(
    config: ConfigArg,
    settings: Annotated[
        Optional[list[str]],
        typer.Option("--settings", help="Settings to compare (repeatable or comma-separated): real, t2i, i2i, "
                     "magic-dpo, magic-rft. Default: all; 'real' is always included."),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Classifier real vs real + synthetic, FID/KID and checklist pass rate -> run/eval/metrics.json."""
    from magic_align.evaluate.stage import run_evaluate

    run_config = load(config, set_)
    chosen = [part for text in settings or [] for part in text.split(",") if part.strip()] or None
    metrics = run_evaluate(run_config, chosen, progress=lambda text: console.print(text, highlight=False))
    for row in metrics["classifier"]:
        accuracy = row["accuracy"]
        typer.echo(f"{row['backbone']:<18} {row['group']:<9} {row['label']:<36} accuracy "
                   f"{accuracy['value']:.3f} [{accuracy['low']:.3f}, {accuracy['high']:.3f}]  "
                   f"F1 {row['f1']['value']:.3f}")
    for note in metrics["notes"]:
        typer.echo(f"note: {note}")
    if "sets" in metrics:
        typer.echo(f"sets: classifiers tested on the whole test split ({metrics['counts']['test']} images, tuning and "
                   "locked sets together, as in the paper); FID/KID and pass rates on images made from training "
                   "sources; the alignment figures a report states come from the locked set "
                   "(magic compare --set-name locked)")
    typer.echo(f"wrote {run_config.run_dir / 'eval' / 'metrics.json'}")


# ------------------------------------------------------------------------------- judge, pairs, agreement
RoundOpt = Annotated[int, typer.Option("--round", help="Sampling round (0 for the first).")]
JudgeIdOpt = Annotated[
    Optional[str], typer.Option("--judge", help="Judge id in the ledger (default: the configured judge).")
]


@app.command("judge")
def judge_command(
    config: ConfigArg,
    round_: RoundOpt = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Estimate calls, tokens and cost; ask nothing.")] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Ask again the answers stored as failed (unreadable); the new answer replaces each.")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Grade the round's samples against their checklists; every answer goes to the ledger as it arrives.
    Exits non-zero, with one line, when any image is left without a verdict (a rerun asks those)."""
    from magic_align.judge import run_judge

    run_config = load(config, set_)
    summary = run_judge(run_config, round_index=round_, dry_run=dry_run, console=console, retry_failed=retry_failed)
    output = Console()
    for table in summary.tables():
        output.print(table)
    if summary.stopped:  # the human backend: reviews still missing
        console.print(f"[yellow]stopped:[/yellow] {summary.stopped}", highlight=False)


@app.command("pairs")
def pairs_command(
    config: ConfigArg,
    round_: RoundOpt = 0,
    judge: JudgeIdOpt = None,
    export_dpo: Annotated[
        Optional[Path], typer.Option("--export-dpo", help="Also write the pairs as a Diffusion-DPO dataset folder.")
    ] = None,
    import_authors: Annotated[
        Optional[Path], typer.Option("--import-authors", help="Import the authors' feedback JSON and build pairs from it.")
    ] = None,
    export_authors: Annotated[
        Optional[Path], typer.Option("--export-authors", help="Also write the verdicts in the authors' feedback JSON layout.")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Build the round's preference pairs (and rewards) from the verdicts or reviews."""
    from magic_align.feedback import export_authors_feedback, export_dpo_dataset, import_authors_feedback, run_pairs

    run_config = load(config, set_)
    if import_authors is not None:
        judge = import_authors_feedback(run_config, import_authors, round_)
        console.print(f"imported {import_authors} as judge {judge}", highlight=False)
    summary = run_pairs(run_config, round_index=round_, judge_id=judge)
    Console().print(summary.table())
    if summary.undecided_note:
        console.print(f"[yellow]note:[/yellow] {summary.undecided_note}", highlight=False)
    if export_authors is not None:
        count = export_authors_feedback(run_config, export_authors, round_, judge_id=judge)
        console.print(f"wrote {count} prompts to {export_authors}", highlight=False)
    if export_dpo is not None:
        count = export_dpo_dataset(run_config, export_dpo, round_)
        console.print(f"wrote {count} pairs to {export_dpo}/metadata.jsonl (+ metadata.csv, images/)", highlight=False)


@app.command("agreement")
def agreement_command(
    config: ConfigArg,
    against: Annotated[str, typer.Option("--against", help="'human' (the reviews), another judge id, or 'recognition' "
                                         "(the judge's validity on the compared models' outputs).")] = "human",
    judge: JudgeIdOpt = None,
    round_: Annotated[Optional[int], typer.Option("--round", help="Only this round (default: all).")] = None,
    set_: SetOpt = None,
) -> None:
    """Per-item Cohen's kappa, agreement, TPR and TNR with bootstrap 95 % intervals; with `--against recognition`,
    the judge's validity on generated images (items met vs the independent recognition, from `magic compare`)."""
    from magic_align.evaluate.validity import describe, run_recognition_agreement, show_table
    from magic_align.judges.agreement import run_agreement

    run_config = load(config, set_)
    if against == "recognition":
        table = run_recognition_agreement(run_config)
        for part in show_table(table):
            Console().print(part)
        console.print(describe(table), highlight=False)
        return
    try:
        report = run_agreement(run_config, against=against, judge_id=judge, round_index=round_)
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(2) from None
    if not report.items:
        console.print(f"no image is graded by both {report.judge_id} and {against}", highlight=False)
        raise typer.Exit(1)
    Console().print(report.table())
    if report.skipped:
        console.print(f"{report.skipped} images skipped (older checklist version or failed answer)", highlight=False)


# ------------------------------------------------------------------------------------------------ data
data_app = typer.Typer(no_args_is_help=True, help="Datasets: check images and labels, build the train/test split.")
app.add_typer(data_app, name="data")


def _image_progress(description: str):
    """A rich progress bar plus the two callbacks the data functions take (total, advance)."""
    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)
    task = bar.add_task(description, total=None)
    return bar, (lambda total: bar.update(task, total=total)), (lambda step: bar.advance(task, step))


@data_app.command("check")
def data_check_command(config: ConfigArg, set_: SetOpt = None) -> None:
    """Name every unusable row (file, CSV row, reason); exit 1 when there is one, 2 when the data cannot be read."""
    from magic_align.data.check import run_data_check

    run_config = load(config, set_)
    bar, on_total, advance = _image_progress("checking images")

    def start(total: int) -> None:  # the bar appears once the dataset is read: a dataset that cannot be read is one line
        bar.start()
        on_total(total)

    try:
        report = run_data_check(run_config, prepare_run(run_config), progress=advance, on_total=start)
    finally:
        bar.stop()
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("split")
def data_split_command(
    config: ConfigArg,
    force: Annotated[bool, typer.Option("--force", help="Rebuild run/data/split.csv even if it exists.")] = False,
    set_: SetOpt = None,
) -> None:
    """Build (or show) the run's train/test split: the N largest classes, stratified, group-aware."""
    from magic_align.data.split import run_split

    run_config = load(config, set_)
    paths = prepare_run(run_config)
    bar, on_total, advance = _image_progress("checking images")
    with bar:
        split = run_split(run_config, paths, force=force, progress=advance, on_total=on_total)
    for name, (train, test) in split.counts().items():
        typer.echo(f"{name:<32} train {train:>5}  test {test:>5}")
    if split.skipped_classes:
        typer.echo(f"left out for having no checklist in {run_config.judge.checklist}: {', '.join(split.skipped_classes)}")
    few = f", few-shot {len(split.few_shot)}" if split.few_shot else ""
    typer.echo(f"{len(split.classes)} classes: train {len(split.train)}, test {len(split.test)}{few} -> {paths.data / 'split.csv'}")
    typer.echo(f"roles: train {len(split.train)}, tuning {len(split.tuning)} (for choosing settings), locked "
               f"{len(split.locked)} (for stated figures only)")


# ------------------------------------------------------------------------------------------- training
train_app = typer.Typer(no_args_is_help=True, help="Align the model on the feedback: DPO (and RFT).")
app.add_typer(train_app, name="train")


@train_app.command("dpo")
def train_dpo_command(
    config: ConfigArg,
    round_: Annotated[
        Optional[int],
        typer.Option("--round", help="Train on this round's pairs only. Default: every round of `rounds` "
                     "(sample, judge, pairs and train again from the current policy after the first)."),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """MAGIC-DPO on the stored trajectories and pairs -> run/aligned/dpo/ (a diffusers LoRA). Resumable."""
    from magic_align.train.dpo import round_output, run_dpo, run_rounds

    run_config = load(config, set_)
    if round_ is None:
        output = run_rounds(run_config)
    else:
        previous = round_output(RunPaths(run_config.run_dir), round_ - 1) if round_ > 0 else None
        output = run_dpo(run_config, round_index=round_, init_lora=previous)
    typer.echo(f"wrote {output}")


# ------------------------------------------------------------------------------------ sample, synthesize

@app.command("sample")
def sample_command(
    config: ConfigArg,
    round_: Annotated[int, typer.Option("--round", help="Sampling round (0 for the first).")] = 0,
    lora: Annotated[
        Optional[Path], typer.Option("--lora", help="An aligned LoRA folder stacked on the run's model (later rounds).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Sample I2I trajectories (K per source/target unit) into run/samples/round-K/ and the ledger; resumable."""
    from magic_align.sample import run_sample

    run_config = load(config, set_)
    summary = run_sample(run_config, round_index=round_, policy_lora=lora)
    typer.echo(
        f"round {summary.round}: {summary.units_sampled} units sampled ({summary.samples_written} samples, "
        f"{len(summary.shards)} shards), {summary.units_already_done} already done, {summary.units_skipped} skipped, "
        f"{summary.samples_recovered} recovered from shards; model {summary.model_hash or '-'}; {summary.seconds:.1f} s"
    )
    for problem in summary.problems[:20]:
        typer.echo(f"skipped: {problem}")


@app.command("synthesize")
def synthesize_command(
    config: ConfigArg,
    lora: Annotated[
        Optional[Path], typer.Option("--lora", help="The aligned LoRA folder (e.g. run/aligned/dpo); none: the run's model.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: run/synthetic).")] = None,
    set_: SetOpt = None,
) -> None:
    """Turn every training image into synthesize.per_image images of other conditions, with manifest.csv."""
    from magic_align.synthesize import synthesize

    run_config = load(config, set_)
    summary = synthesize(run_config, lora, out)
    typer.echo(
        f"{summary.written} synthetic images written, {summary.already_done} already there, "
        f"{summary.skipped_sources} unreadable sources skipped -> {summary.manifest}"
    )


@data_app.command("procedural")
def data_procedural_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to write images/ and procedural.csv into.")],
    per_class: Annotated[int, typer.Option("--per-class", min=1, help="Images per demo condition.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed; the same seed gives the same images.")] = 0,
    size: Annotated[int, typer.Option("--size", min=32, help="Image side in pixels.")] = 64,
    condition_free: Annotated[
        int, typer.Option("--condition-free", min=0, help="Also draw this many condition-free images (condition_free.csv).")
    ] = 0,
) -> None:
    """Draw the procedural demo dataset (six conditions, Fitzpatrick types 1-6, body-region cues)."""
    from magic_align.demo.procedural import generate_condition_free, generate_dataset

    started = time.perf_counter()
    csv_path = generate_dataset(out, per_class, seed, size=size)
    typer.echo(f"wrote {csv_path} ({per_class} images per condition, seed {seed}, {size} px)")
    if condition_free:
        free_path = generate_condition_free(out, condition_free, seed, size=size)
        typer.echo(f"wrote {free_path} ({condition_free} condition-free images)")
    typer.echo(f"images in {Path(out) / 'images'} ({time.perf_counter() - started:.1f} s)")


@data_app.command("demo-model")
def data_demo_model_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the diffusers pipeline (replaced when complete).")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the training data and initialisation.")] = 0,
    threads: Annotated[int, typer.Option("--threads", min=0, help="torch threads; 0 = torch's default, 1 on a busy machine.")] = 0,
    codec_from: Annotated[Optional[Path], typer.Option("--codec-from", help="Reuse the autoencoder of an earlier build (a model folder) instead of training it.")] = None,
) -> None:
    """Train the demo base model from scratch on condition-free procedural skin (several minutes on CPU)."""
    from magic_align.demo.model import DemoModelRecipe, train_demo_model

    if codec_from is not None and not (codec_from / "vae" / "config.json").is_file():
        raise typer.BadParameter(f"{codec_from} has no vae/config.json (expected a demo model folder)", param_hint="--codec-from")
    folder = train_demo_model(out, DemoModelRecipe(seed=seed, torch_threads=threads),
                              log=lambda m: console.print(m, highlight=False), codec_from=codec_from)
    typer.echo(f"demo base model in {folder}")


@app.command("report")
def report_command(
    config: ConfigArg,
    units: Annotated[int, typer.Option("--units", help="Image rows per condition in the grids.")] = 4,
    set_: SetOpt = None,
) -> None:
    """One self-contained HTML page about the run so far -> run/report/index.html (works on partial runs)."""
    from magic_align.evaluate.report import run_report

    run_config = load(config, set_)
    output = run_report(run_config, max_units_per_condition=units,
                        progress=lambda line: console.print(line, highlight=False, markup=False))
    typer.echo(f"wrote {output}")


# ---------------------------------------------------------------------------------------------- review
@app.command("review")
def review_command(
    config: ConfigArg,
    host: Annotated[
        Optional[str],
        typer.Option("--host", help="Address to listen on (default review.host, 127.0.0.1). Any non-loopback "
                     "address requires the token printed at start."),
    ] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Port (default review.port).")] = None,
    reviewer: Annotated[
        Optional[str], typer.Option("--reviewer", help="Name stored with each review (default: asked at login).")
    ] = None,
    judge_id: JudgeIdOpt = None,
    require_token: Annotated[
        bool,
        typer.Option("--require-token", help="Ask for the token on loopback too (default review.require_token): "
                     "on a machine shared with other users, e.g. reached through an SSH tunnel."),
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Serve the expert review page: confirm or correct the judge's verdicts; reviews go to the ledger."""
    from magic_align.review.app import run_review

    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port number from 1 to 65535")
    run_config = load(config, set_)
    try:
        run_review(run_config, host=host, port=port, reviewer=reviewer, judge_id=judge_id,
                   require_token=require_token or None, announce=typer.echo)
    except KeyboardInterrupt:
        # Stopping a server is its normal end, not an interrupted stage: every review was saved as it was sent.
        console.print("review page stopped; every saved review is in the ledger", highlight=False)


# ------------------------------------------------------------------------------- finetune and RFT

@app.command("finetune")
def finetune_command(
    config: ConfigArg,
    stop_after: Annotated[
        Optional[int], typer.Option("--stop-after", help="Stop after this many optimizer steps (resume later).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Textual inversion (one token per condition), then a UNet LoRA -> run/model/. Resumable."""
    from magic_align.train.finetune import run_finetune

    run_config = load(config, set_)
    model_dir = run_finetune(run_config, stop_after=stop_after)
    if (model_dir / "model.json").is_file() and stop_after is None:
        typer.echo(f"wrote {model_dir} (tokens/, lora/, model.json)")
    else:
        typer.echo(f"stopped with a checkpoint in {run_config.run_dir / 'checkpoints' / 'finetune'}; rerun to continue")


@train_app.command("rft")
def train_rft_command(
    config: ConfigArg,
    round_: Annotated[int, typer.Option("--round", help="Train on this round's trajectories (0 for the first).")] = 0,
    judge: JudgeIdOpt = None,
    set_: SetOpt = None,
) -> None:
    """MAGIC-RFT: fit the reward model, then reward-weighted likelihood -> run/aligned/rft/. Resumable."""
    from magic_align.train.rft import SUMMARY_FILE, run_rft

    run_config = load(config, set_)
    output = run_rft(run_config, round_index=round_, judge_id=judge)
    summary = json.loads((output / SUMMARY_FILE).read_text())
    model = summary["reward_model"]
    typer.echo(
        f"reward model: {model['images']['synthetic']} judged + {model['images']['real']} real images, "
        f"training MSE {model['final_mse']:.4f}; {summary['trajectories']} trajectories, mean reward "
        f"{summary['reward_mean']:.3f}, mean weight {summary['weight_mean']:.3f}"
    )
    typer.echo(f"wrote {output}")


@app.command("compare")
def compare_command(
    config: ConfigArg,
    settings: Annotated[
        Optional[str], typer.Option("--settings", help="Comma-separated models to compare: i2i, magic-dpo, magic-rft (default all).")
    ] = None,
    units: Annotated[Optional[int], typer.Option("--units", help="Held-out sources (default evaluate.alignment_units).")] = None,
    set_name: Annotated[
        str, typer.Option("--set-name", help="Which held-out set: 'tuning' (for choosing settings; "
                          "eval/alignment-tuning.json) or 'locked' (the figures a report states; eval/alignment.json).")
    ] = "tuning",
    set_: SetOpt = None,
) -> None:
    """Paired alignment comparison on held-out sources: mean checklist items met per model, with intervals."""
    from magic_align.evaluate.alignment import run_alignment_comparison

    run_config = load(config, set_)
    chosen = [name.strip() for name in settings.split(",") if name.strip()] if settings else None
    output = run_alignment_comparison(run_config, settings=chosen, units=units, console=console, set_name=set_name)
    typer.echo(f"wrote {output} ({set_name} set)")


def _stated_figures(paths: RunPaths) -> None:
    """The run's closing figures: the alignment comparison on the locked set only (a file from another set is
    refused, exit 2)."""
    from magic_align.evaluate.alignment import alignment_path, read_locked_alignment

    path = alignment_path(paths, "locked")
    if not path.is_file():
        return
    for name, estimate in read_locked_alignment(path).get("differences", {}).items():
        typer.echo(f"locked set: {name}: items met {estimate['value']:+.2f} "
                   f"[{estimate['low']:+.2f}, {estimate['high']:+.2f}]")


def _run_stages(run_config: RunConfig, force: bool):
    from magic_align.pipeline import run_all

    try:
        return run_all(run_config, force=force, console=console)
    except (MagicError, FileNotFoundError) as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        console.print("fix the problem and rerun: finished stages are skipped")
        raise typer.Exit(2) from None


@app.command("run")
def run_command(
    config: ConfigArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and the judge estimate; run nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Rerun stages even when done for this configuration.")] = False,
    set_: SetOpt = None,
) -> None:
    """Run every stage in order; a rerun skips the stages already done for the same configuration."""
    from magic_align.pipeline import dry_run_plan

    run_config = load(config, set_)
    if dry_run:
        Console().print(dry_run_plan(run_config))
        return
    paths = _run_stages(run_config, force)
    _stated_figures(paths)
    typer.echo(f"report: {(paths.report / 'index.html').resolve()}")


@app.command("demo")
def demo_command(
    force: Annotated[bool, typer.Option("--force", help="Rerun stages even when done.")] = False,
    set_: SetOpt = None,
) -> None:
    """The built-in demo: procedural skin conditions, the demo base model, the rules judge, every stage."""

    paths = _run_stages(load("demo", set_), force)
    _stated_figures(paths)
    typer.echo(f"report: {(paths.report / 'index.html').resolve()}")
