import math

import pytest
import torch

from magic_align.train.dpo_loss import (clamped_log_ratio, controlled_signs, denoising_dpo_loss, dpo_loss,
                                         preference_signs)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_preference_signs_follow_the_outcomes_and_ties_are_zero():
    assert preference_signs(1, 0) == (1, -1)
    assert preference_signs(0, 1) == (-1, 1)
    assert preference_signs(1, 1) == (0, 0)  # both win
    assert preference_signs(0, 0) == (0, 0)  # both lose: never push both down (docs/method.md section 11.2)
    with pytest.raises(ValueError, match="outcome_a"):
        preference_signs(2, 0)


def test_loss_equals_a_hand_computation_with_clamp():
    # one pair, two steps; sample 0 preferred
    lp = torch.tensor([[[-1.00, -2.00], [-1.50, -0.70]]])
    ref = torch.tensor([[[-1.05, -1.00], [-1.40, -0.75]]])
    h = torch.tensor([[1, -1]])
    beta, clip = 0.5, 0.1
    lo, hi = math.log(0.9), math.log(1.1)
    expected = 0.0
    for t in range(2):
        r0 = min(max(lp[0, 0, t].item() - ref[0, 0, t].item(), lo), hi)
        r1 = min(max(lp[0, 1, t].item() - ref[0, 1, t].item(), lo), hi)
        expected += -log_sigmoid(beta * (r0 - r1))
    expected /= 2
    loss, stats = dpo_loss(lp, ref, h, beta, clip)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # step 0: log-ratios 0.05 and -0.10 -> margin 0.15 > 0; step 1: -1.0 and 0.05 -> margin -1.05 < 0
    assert stats.implicit_accuracy == pytest.approx(0.5)
    # ratios exp(0.05)=1.051, exp(-1.0)=0.368 (clamped), exp(-0.1)=0.905, exp(0.05)=1.051
    assert stats.clamped_share == pytest.approx(0.25)
    assert stats.mean_log_ratio == pytest.approx((0.05 - 1.0 - 0.10 + 0.05) / 4, abs=1e-6)
    assert stats.informative_pairs == 1


def test_loss_without_clamp_and_with_preference_on_the_second_sample():
    lp = torch.tensor([[[0.3], [-0.2]]])
    ref = torch.tensor([[[0.0], [0.0]]])
    loss, stats = dpo_loss(lp, ref, torch.tensor([[-1, 1]]), beta=2.0, clip=0)
    assert loss.item() == pytest.approx(-log_sigmoid(2.0 * (-0.3 + -0.2)), abs=1e-6)
    assert stats.clamped_share == 0.0
    assert stats.implicit_accuracy == 0.0


def test_gradient_matches_the_analytic_derivative():
    lp = torch.tensor([[[-1.0], [-1.2]]], requires_grad=True)
    ref = torch.tensor([[[-1.02], [-1.18]]])
    beta = 3.0
    loss, _ = dpo_loss(lp, ref, torch.tensor([[1, -1]]), beta, clip=0.1)
    loss.backward()
    margin = beta * ((-1.0 + 1.02) - (-1.2 + 1.18))
    sig = 1 / (1 + math.exp(-margin))
    # d/dlp0 of -log sigmoid(m) = -(1 - sigmoid(m)) * beta
    assert lp.grad[0, 0, 0].item() == pytest.approx(-(1 - sig) * beta, abs=1e-6)
    assert lp.grad[0, 1, 0].item() == pytest.approx((1 - sig) * beta, abs=1e-6)


def test_ties_give_zero_gradient_and_log2():
    generator = torch.Generator().manual_seed(1)
    lp = torch.randn(3, 2, 5, generator=generator, requires_grad=True)
    ref = torch.randn(3, 2, 5, generator=generator)
    h = torch.zeros(3, 2, dtype=torch.long)
    loss, stats = dpo_loss(lp, ref, h, beta=5.0, clip=0)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.count_nonzero(lp.grad) == 0
    assert stats.informative_pairs == 0 and math.isnan(stats.implicit_accuracy)


def test_a_tie_in_a_batch_leaves_the_other_pairs_gradient_alone():
    generator = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 2, 4, generator=generator)
    lp = (ref + 0.05 * torch.randn(2, 2, 4, generator=generator)).requires_grad_(True)  # ratios inside the clamp
    loss, _ = dpo_loss(lp, ref, torch.tensor([[1, -1], [0, 0]]), beta=1.0, clip=0.5)
    loss.backward()
    assert torch.count_nonzero(lp.grad[1]) == 0
    assert torch.count_nonzero(lp.grad[0]) > 0


def test_clamped_ratios_have_no_gradient():
    lp = torch.tensor([[[0.0], [0.0]]], requires_grad=True)
    ref = torch.tensor([[[-1.0], [0.0]]])  # ratio of sample 0 is e, far above 1 + clip
    loss, stats = dpo_loss(lp, ref, torch.tensor([[1, -1]]), beta=1.0, clip=0.2)
    loss.backward()
    assert lp.grad[0, 0, 0].item() == 0.0
    assert lp.grad[0, 1, 0].item() != 0.0
    assert stats.clamped_share == pytest.approx(0.5)


def test_clamp_in_log_space_survives_huge_gaps_and_rejects_bad_clip():
    value = clamped_log_ratio(torch.tensor([1000.0]), torch.tensor([-1000.0]), 0.1)
    assert value.item() == pytest.approx(math.log(1.1))
    with pytest.raises(ValueError, match="clip"):
        clamped_log_ratio(torch.zeros(1), torch.zeros(1), 1.5)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="log_prob_ref"):
        dpo_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2), 1.0, 0)
    with pytest.raises(ValueError, match="preference"):
        dpo_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(2, 2), 1.0, 0)


# ------------------------------------------------------------------------------ Diffusion-DPO (denoising)
def test_the_winner_penalty_counts_a_rise_of_the_winners_error_against_the_margin():
    # pair 0 prefers sample 0, whose error rose by 0.02 above the reference's (the loser's fell by 0.05);
    # pair 1 prefers sample 1, whose error fell by 0.03 (the loser's rose by 0.01): no penalty there
    error = torch.tensor([[0.40, 0.50], [0.31, 0.20]])
    reference = torch.tensor([[0.38, 0.55], [0.30, 0.23]])
    h = torch.tensor([[1, -1], [-1, 1]])
    beta, penalty = 100.0, 2.0
    # pair 0: 100 * ((-0.02 - 0.05) - 2 * 0.02) = -11; pair 1: 100 * (0.01 + 0.03) = 4
    expected = (-log_sigmoid(-11.0) - log_sigmoid(4.0)) / 2
    loss, stats = denoising_dpo_loss(error, reference, h, beta, winner_penalty=penalty)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert stats.winner_log_ratio == pytest.approx((-0.02 + 0.03) / 2, abs=1e-6)
    assert stats.implicit_accuracy == 0.5
    plain, _ = denoising_dpo_loss(error, reference, h, beta)  # without it: 100 * -0.07 = -7 and 4
    assert plain.item() == pytest.approx((-log_sigmoid(-7.0) - log_sigmoid(4.0)) / 2, abs=1e-5)
    # the penalty's gradient pushes the winner's error down: d loss / d error_winner is larger with it
    error.requires_grad_(True)
    denoising_dpo_loss(error, reference, h, beta, winner_penalty=penalty)[0].backward()
    with_penalty = error.grad[0, 0].item()
    error.grad = None
    denoising_dpo_loss(error, reference, h, beta)[0].backward()
    assert with_penalty > error.grad[0, 0].item() > 0
    # a tie has no winner: no penalty, log 2
    tie, _ = denoising_dpo_loss(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.1, 0.1]]), torch.tensor([[0, 0]]), 50.0,
                                winner_penalty=5.0)
    assert tie.item() == pytest.approx(math.log(2), abs=1e-6)


def test_denoising_loss_equals_a_hand_computation():
    # two pairs; pair 0 prefers sample 0, pair 1 prefers sample 1
    error = torch.tensor([[0.40, 0.50], [0.30, 0.20]])
    reference = torch.tensor([[0.42, 0.49], [0.30, 0.25]])
    h = torch.tensor([[1, -1], [-1, 1]])
    beta = 100.0
    # pair 0: the winner's error fell by 0.02, the loser's rose by 0.01 -> margin 100 * (0.02 + 0.01) = 3
    # pair 1: the winner's (sample 1) error fell by 0.05, the loser's stayed -> margin 100 * 0.05 = 5
    expected = (-log_sigmoid(3.0) - log_sigmoid(5.0)) / 2
    loss, stats = denoising_dpo_loss(error, reference, h, beta)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert stats.implicit_accuracy == 1.0
    assert stats.clamped_share == 0.0
    assert stats.mean_log_ratio == pytest.approx((0.02 - 0.01 + 0.0 + 0.05) / 4, abs=1e-6)
    assert stats.informative_pairs == 2


def test_denoising_gradient_lowers_the_winners_error_and_raises_the_losers():
    error = torch.tensor([[0.4, 0.4]], requires_grad=True)
    loss, _ = denoising_dpo_loss(error, torch.tensor([[0.4, 0.4]]), torch.tensor([[1, -1]]), beta=10.0)
    loss.backward()
    # at margin 0: dL/d error_winner = beta * sigmoid(0) = 5, dL/d error_loser = -5
    assert error.grad[0, 0].item() == pytest.approx(5.0, abs=1e-6)
    assert error.grad[0, 1].item() == pytest.approx(-5.0, abs=1e-6)


def test_denoising_ties_give_log2_and_no_gradient():
    error = torch.tensor([[0.3, 0.9]], requires_grad=True)
    loss, stats = denoising_dpo_loss(error, torch.tensor([[0.1, 0.1]]), torch.tensor([[0, 0]]), beta=50.0)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.count_nonzero(error.grad) == 0
    assert stats.informative_pairs == 0 and math.isnan(stats.implicit_accuracy)


def test_denoising_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="error_policy"):
        denoising_dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="error_ref"):
        denoising_dpo_loss(torch.zeros(1, 2), torch.zeros(2, 2), torch.zeros(1, 2), 1.0)
    with pytest.raises(ValueError, match="preference"):
        denoising_dpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(2, 2), 1.0)


def test_a_preference_control_swaps_winner_and_loser_and_never_makes_a_tie_informative():
    assert controlled_signs((1, -1), "none", 0, "p") == (1, -1)
    assert controlled_signs((1, -1), "flipped", 0, "p") == (-1, 1)
    assert controlled_signs((-1, 1), "flipped", 0, "p") == (1, -1)
    for control in ("flipped", "random"):
        assert controlled_signs((0, 0), control, 0, "p") == (0, 0)
    ids = [f"r0-u{i:05d}-k0~r0-u{i:05d}-k1" for i in range(2000)]
    swapped = [controlled_signs((1, -1), "random", 0, pair_id) == (-1, 1) for pair_id in ids]
    assert 900 < sum(swapped) < 1100  # about half, by a hash of the pair
    assert swapped == [controlled_signs((1, -1), "random", 0, pair_id) == (-1, 1) for pair_id in ids]  # reproducible
    assert swapped != [controlled_signs((1, -1), "random", 1, pair_id) == (-1, 1) for pair_id in ids]  # by seed
    # a pair swapped keeps its swap whichever sign it had: the control swaps pairs, not outcomes
    assert all(controlled_signs((-1, 1), "random", 0, pair_id) == ((1, -1) if swap else (-1, 1))
               for pair_id, swap in zip(ids, swapped))
    with pytest.raises(ValueError, match="expected none, flipped or random"):
        controlled_signs((1, -1), "inverted", 0, "p")
