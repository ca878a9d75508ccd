"""The running mean of the trainable weights (train/weight_average.py), against values computed by hand."""

import pytest
import torch

from magic_align.train.weight_average import WeightAverage


def set_to(parameter, value):
    with torch.no_grad():
        parameter.fill_(value)


def test_the_mean_counts_the_steps_from_start_on_only():
    weight = torch.nn.Parameter(torch.zeros(2, 3))
    bias = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([weight, bias], start=3)
    for step, value in enumerate([10.0, 20.0, 1.0, 2.0, 6.0], start=1):
        set_to(weight, value)
        set_to(bias, -value)
        average.update(step)
    assert average.count == 3  # steps 3, 4 and 5
    average.copy_to_parameters()
    assert torch.equal(weight, torch.full((2, 3), 3.0))  # (1 + 2 + 6) / 3; steps 1 and 2 left out
    assert torch.equal(bias, torch.full((3,), -3.0))


def test_before_its_start_the_average_leaves_the_weights_alone():
    weight = torch.nn.Parameter(torch.full((2,), 5.0))
    average = WeightAverage([weight], start=10)
    average.update(9)
    average.copy_to_parameters()
    assert torch.equal(weight, torch.full((2,), 5.0))


def test_the_mean_of_bf16_weights_is_kept_in_fp32():
    weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
    average = WeightAverage([weight], start=1)
    values = [1.0, 1.0078125, 1.0078125]  # neighbouring bf16 values: their mean is not one
    for step, value in enumerate(values, start=1):
        set_to(weight, value)
        average.update(step)
    assert average.mean[0].dtype == torch.float32
    assert average.mean[0].item() == pytest.approx(sum(values) / 3, abs=1e-7)


def test_a_restored_average_goes_on_as_if_never_interrupted():
    weight = torch.nn.Parameter(torch.zeros(4))
    average = WeightAverage([weight], start=2)
    for step, value in enumerate([3.0, 4.0, 8.0], start=1):
        set_to(weight, value)
        average.update(step)
    saved = average.state_dict()

    restored = WeightAverage([weight], start=2)
    restored.load_state_dict(saved)
    set_to(weight, 12.0)
    restored.update(4)
    restored.copy_to_parameters()
    assert torch.equal(weight, torch.full((4,), 8.0))  # (4 + 8 + 12) / 3


def test_an_average_of_other_settings_is_refused():
    weight = torch.nn.Parameter(torch.zeros(4))
    saved = WeightAverage([weight], start=2).state_dict()
    with pytest.raises(ValueError, match="starts at step 2 over 1 tensors; this run's at 5 over 1"):
        WeightAverage([weight], start=5).load_state_dict(saved)
    with pytest.raises(ValueError, match="begins at an optimizer step"):
        WeightAverage([weight], start=0)
