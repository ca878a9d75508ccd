"""Progress of the long stages and the Ctrl-C line (progress.py, cli.MagicGroup)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from magic_align import progress as progress_module
from magic_align.progress import ProgressSettingError, StageProgress, compact_duration, interrupted


class Clock:
    """A clock the test moves by hand: no sleeps, no timing."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


@pytest.fixture(autouse=True)
def no_stage_left():
    progress_module.forget()
    yield
    progress_module.forget()


def test_compact_duration_by_hand():
    assert compact_duration(45) == "45s"
    assert compact_duration(192) == "3m12s"
    assert compact_duration(2 * 3600 + 5 * 60 + 7) == "2h05m"


def test_plain_lines_every_n_steps_with_loss_rate_and_eta(monkeypatch):
    monkeypatch.delenv(progress_module.EVERY_VARIABLE, raising=False)
    console, buffer = plain_console()
    clock = Clock()
    reporter = StageProgress("dpo round 0", 10, every=4, console=console, clock=clock)
    for step in reporter.steps(range(10)):
        clock.now += 2.0
        reporter.advance(loss=0.5 + step / 100)
    lines = buffer.getvalue().splitlines()
    # the first step (the speed, early), every 4th, and the last
    assert lines == [
        "dpo round 0 step 1/10 loss 0.5 2.0 s/step eta 18s",
        "dpo round 0 step 4/10 loss 0.53 2.0 s/step eta 12s",
        "dpo round 0 step 8/10 loss 0.57 2.0 s/step eta 4s",
        "dpo round 0 step 10/10 loss 0.59 2.0 s/step",
    ]


def test_a_resumed_stage_says_so_and_times_only_its_own_steps():
    console, buffer = plain_console()
    clock = Clock()
    reporter = StageProgress("finetune lora", 100, completed=40, every=1000, console=console, clock=clock)
    with reporter:
        clock.now += 3.0
        reporter.advance(loss=1.25)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "finetune lora: 40/100 steps already done, continuing"
    assert lines[1] == "finetune lora step 41/100 loss 1.25 3.0 s/step eta 2m57s"  # 59 steps left x 3 s


def test_slow_steps_still_give_a_line_each_minute():
    console, buffer = plain_console()
    clock = Clock()
    with StageProgress("rft round 0", 1000, every=500, console=console, clock=clock) as reporter:
        reporter.advance()  # first line
        clock.now += 30.0
        reporter.advance()  # neither 500 steps nor a minute: silent
        clock.now += 31.0
        reporter.advance()  # a minute since the last line
    steps = [line.split()[4] for line in buffer.getvalue().splitlines()]
    assert steps == ["1/1000", "3/1000"]


def test_fast_items_show_a_rate_per_second():
    console, buffer = plain_console()
    clock = Clock()
    with StageProgress("sampling round 0", 8, unit="image", every=8, console=console, clock=clock) as reporter:
        clock.now += 0.5
        reporter.advance(4)
    assert buffer.getvalue().splitlines() == ["sampling round 0 image 4/8 8.0 image/s eta 0s"]


def test_every_comes_from_the_environment_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv(progress_module.EVERY_VARIABLE, "7")
    assert StageProgress("x", 1000).every == 7
    monkeypatch.delenv(progress_module.EVERY_VARIABLE)
    assert StageProgress("x", 1000).every == 50  # a twentieth of the total
    assert StageProgress("x", 5).every == 1
    monkeypatch.setenv(progress_module.EVERY_VARIABLE, "often")
    with pytest.raises(ProgressSettingError, match="MAGIC_PROGRESS_EVERY"):
        StageProgress("x", 10)


def test_a_terminal_gets_a_bar_with_the_loss_and_no_plain_lines():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with StageProgress("dpo round 0", 4, console=console) as reporter:
        reporter.advance(loss=0.6812)
        reporter.advance(loss=0.5)
    output = buffer.getvalue()
    assert "dpo round 0" in output and "2/4" in output and "loss 0.5" in output
    assert "s/step" not in output  # the plain line's rate is not used on a terminal


def test_a_disabled_reporter_prints_nothing_but_knows_where_it_is():
    console, buffer = plain_console()
    reporter = StageProgress("dpo round 0", 4, console=console, enabled=False, resume="rerun")
    with pytest.raises(KeyboardInterrupt):
        for _ in reporter.steps(range(4)):
            reporter.advance(loss=1.0)
            if reporter.completed == 3:
                raise KeyboardInterrupt
    assert buffer.getvalue() == ""
    assert interrupted() == "dpo round 0 stopped after step 3 of 4; rerun"


def test_interrupted_names_the_running_stage_and_closes_it():
    reporter = StageProgress("sampling round 1", 40, unit="image", completed=8, resume="finished units are skipped",
                             enabled=False)
    stored = []
    with pytest.raises(KeyboardInterrupt):
        with StageProgress("sampling round 1", 40, unit="image", completed=8, resume="finished units are skipped",
                           enabled=False, on_interrupt=lambda: stored.append(reporter)) as reporter:
            reporter.advance(4)
            raise KeyboardInterrupt
    assert stored  # the stage stored its finished work before ending
    assert interrupted() == "sampling round 1 stopped with 12 of 40 images done; finished units are skipped"
    assert interrupted() is None  # read once, then forgotten


def test_a_finished_stage_is_not_reported():
    with StageProgress("synthesizing", 2, unit="image", enabled=False) as reporter:
        reporter.advance(2)
    for _ in StageProgress("dpo round 0", 1, enabled=False).steps(range(1)):
        pass
    assert interrupted() is None


def test_other_errors_do_not_call_on_interrupt():
    called = []
    with pytest.raises(ValueError):
        with StageProgress("synthesizing", 2, unit="image", enabled=False, on_interrupt=lambda: called.append(1)):
            raise ValueError("boom")
    assert called == []


def test_resume_is_asked_when_ctrl_c_comes():
    state = {"checkpoint": None}
    reporter = StageProgress("rft round 0", 10, enabled=False,
                             resume=lambda: f"resume from step {state['checkpoint']}")
    reporter.start()
    reporter.advance(5)
    state["checkpoint"] = 4
    assert interrupted() == "rft round 0 stopped after step 5 of 10; resume from step 4"


# ----------------------------------------------------------------------------------------------- the CLI
def test_ctrl_c_in_a_command_exits_130_with_where_it_stopped(monkeypatch):
    """The CLI's handler, on a stage that fakes its work: one line with the stage and step, exit code 130."""
    from magic_align import cli

    def fake_finetune(config, stop_after=None):
        reporter = StageProgress("finetune lora", 6, completed=2, resume="its checkpoint at step 2 is kept")
        for _ in reporter.steps(range(2, 6)):
            reporter.advance(loss=0.25)
            if reporter.completed == 4:
                raise KeyboardInterrupt

    monkeypatch.setattr("magic_align.train.finetune.run_finetune", fake_finetune)
    monkeypatch.setenv(progress_module.EVERY_VARIABLE, "1")
    result = CliRunner().invoke(cli.app, ["finetune", "tiny"])
    assert result.exit_code == 130
    assert "finetune lora step 3/6 loss 0.25" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last == "interrupted: finetune lora stopped after step 4 of 6; its checkpoint at step 2 is kept"


def test_ctrl_c_before_any_stage_started_still_says_what_a_rerun_does(monkeypatch):
    from magic_align import cli

    def interrupted_while_loading(config, stop_after=None):
        raise KeyboardInterrupt

    monkeypatch.setattr("magic_align.train.finetune.run_finetune", interrupted_while_loading)
    result = CliRunner().invoke(cli.app, ["finetune", "tiny"])
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1].startswith("interrupted: stopped while no stage was counting steps")
    assert "rerun the same command" in result.output
