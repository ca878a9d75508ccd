"""The running average of a trainer's weights over its last optimizer steps (stochastic weight averaging).

Izmailov et al. (2018, "Averaging Weights Leads to Wider Optima and Better Generalization") average the weights a
run passes through late in training instead of keeping the last ones. DPO and RFT on a few hundred pairs or
samples take many passes over the same data; the last weights carry the noise of the last batches, and the
average over the second half of training keeps what every step agreed on (on the demo, DPO's images drifted
half as far from the real ones, at some cost in items and in the classifier's gain: docs/demo.md).

`WeightAverage(parameters, start)` keeps, beside the trainable parameters, their mean over the optimizer steps
`start`, `start + 1`, ..., the step it was last told about (`update(step)` after each optimizer step); before
`start` it keeps nothing. `copy_to_parameters()` puts the mean into the parameters, which is what a trainer saves.
It is registered for checkpointing (`state_dict` / `load_state_dict`), so a resumed run averages exactly what an
uninterrupted one does.
"""

from __future__ import annotations

from typing import Sequence

import torch


class WeightAverage:
    """The mean of `parameters` over the optimizer steps from `start` on (1-based, as the trainers count them)."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], start: int) -> None:
        if start < 1:
            raise ValueError(f"start = {start}: the average begins at an optimizer step, 1 or later")
        self.parameters = list(parameters)
        self.start = start
        self.count = 0
        # fp32 beside any parameter dtype: a mean of hundreds of bf16 values loses its last bits otherwise
        self.mean = [torch.zeros_like(parameter, dtype=torch.float32) for parameter in self.parameters]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Count the parameters as they are after optimizer step `step` (a step before `start` is not counted)."""
        if step < self.start:
            return
        self.count += 1
        for mean, parameter in zip(self.mean, self.parameters):
            mean.add_(parameter.detach().float() - mean, alpha=1.0 / self.count)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        """Put the mean into the parameters (nothing to put before the first counted step: they stay as they are)."""
        if self.count == 0:
            return
        for mean, parameter in zip(self.mean, self.parameters):
            parameter.copy_(mean.to(parameter.dtype))

    def state_dict(self) -> dict:
        return {"start": self.start, "count": self.count, "mean": [mean.clone() for mean in self.mean]}

    def load_state_dict(self, state: dict) -> None:
        if state["start"] != self.start or len(state["mean"]) != len(self.mean):
            raise ValueError(f"the checkpoint's weight average starts at step {state['start']} over "
                             f"{len(state['mean'])} tensors; this run's at {self.start} over {len(self.mean)}")
        self.count = int(state["count"])
        for mean, saved in zip(self.mean, state["mean"]):
            mean.copy_(saved.to(mean.device, mean.dtype))
