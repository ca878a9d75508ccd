"""A simulated kill for the resume tests: wrap the optimizer step so that a chosen call raises KeyboardInterrupt."""

from __future__ import annotations


def killed_at_step(real_step, step: int):
    """`real_step` that raises KeyboardInterrupt on its `step`-th call (1-based), i.e. after the checkpoints of the
    steps before it, and otherwise runs as usual."""
    calls = {"n": 0}

    def step_or_kill(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt(f"simulated kill before optimizer step {step}")
        return real_step(*args, **kwargs)

    return step_or_kill
