"""Simulated faults and probes for the training tests: wrap the optimizer step so that a chosen call raises
KeyboardInterrupt, or so that the weights after every step are recorded."""

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


def recording_weights(real_step, recorded: list):
    """`real_step` (a trainer's `optimizer_step(accelerator, optimizer, schedule, parameters, ...)`) that, after each
    call, appends a copy of the trainable weights (a list of tensors) to `recorded`."""

    def step_and_record(accelerator, optimizer, schedule, parameters, *args, **kwargs):
        result = real_step(accelerator, optimizer, schedule, parameters, *args, **kwargs)
        recorded.append([parameter.detach().clone() for parameter in parameters])
        return result

    return step_and_record
