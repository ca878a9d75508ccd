import math

import pytest
import torch
from diffusers import DDIMScheduler

from magic_align.diffusion.ddim import (
    alpha_products,
    ddim_step_with_log_prob,
    gaussian_log_prob,
    guided_noise_prediction,
)
from magic_align.diffusion.loading import sd21_ddim_scheduler


def sd_scheduler(set_alpha_to_one=False, prediction_type="epsilon", steps=100):
    scheduler = sd21_ddim_scheduler(set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler


def test_gaussian_log_prob_matches_a_hand_computation():
    value = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    mean = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    std = torch.tensor([[[2.0]], [[0.5]]]).reshape(2, 1)

    def density(x, m, s):
        return -((x - m) ** 2) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)

    row0 = [density(0.5, 0, 2.0), density(-1.0, 0, 2.0)]
    row1 = [density(2.0, 1, 0.5), density(0.0, 1, 0.5)]
    mean_expected = torch.tensor([sum(row0) / 2, sum(row1) / 2])
    sum_expected = torch.tensor([sum(row0), sum(row1)])
    assert torch.allclose(gaussian_log_prob(value, mean, std, "mean"), mean_expected, atol=1e-6)
    assert torch.allclose(gaussian_log_prob(value, mean, std, "sum"), sum_expected, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(value, mean, std, "max")


def test_step_log_prob_matches_the_papers_formula_by_hand():
    scheduler = sd_scheduler()
    t = 291
    latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    nxt = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    a_t = scheduler.alphas_cumprod[t].item()
    a_p = scheduler.alphas_cumprod[t - 10].item()
    eta = 1.0
    x0 = (latents - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    mu = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma**2) * eps
    per_element = [
        -((x - m) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
        for x, m in zip(nxt.flatten().tolist(), mu.flatten().tolist())
    ]
    out = ddim_step_with_log_prob(scheduler, eps, t, latents, eta, prev_latents=nxt)
    assert out.log_prob.shape == (1,)
    assert out.log_prob.item() == pytest.approx(sum(per_element) / len(per_element), rel=1e-5)
    assert torch.equal(out.prev_sample, nxt)
    out_sum = ddim_step_with_log_prob(scheduler, eps, t, latents, eta, prev_latents=nxt, reduction="sum")
    assert out_sum.log_prob.item() == pytest.approx(sum(per_element), rel=1e-5)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_step_equals_diffusers_for_the_same_noise(set_alpha_to_one, prediction_type, eta):
    scheduler = sd_scheduler(set_alpha_to_one, prediction_type)
    gen = torch.Generator().manual_seed(0)
    for t in (991, 291, 11, 1):  # 1 is the last step: t' < 0 uses final_alpha_cumprod
        latents = torch.randn(3, 4, 8, 8, generator=gen)
        model_out = torch.randn(3, 4, 8, 8, generator=gen)
        noise = torch.randn(3, 4, 8, 8, generator=gen)
        expected = scheduler.step(model_out, t, latents, eta=eta, variance_noise=noise).prev_sample
        ours = ddim_step_with_log_prob(scheduler, model_out, t, latents, eta, variance_noise=noise)
        assert torch.equal(ours.prev_sample, expected), t
        # the same with one timestep per row (all equal here)
        rows = ddim_step_with_log_prob(scheduler, model_out, torch.full((3,), t), latents, eta, variance_noise=noise)
        assert torch.equal(rows.prev_sample, expected), t


def test_generators_per_row_draw_what_diffusers_draws():
    scheduler = sd_scheduler()
    latents = torch.randn(2, 4, 8, 8)
    model_out = torch.randn(2, 4, 8, 8)
    expected = scheduler.step(
        model_out, 291, latents, eta=1.0, generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    ).prev_sample
    ours = ddim_step_with_log_prob(
        scheduler, model_out, 291, latents, 1.0, generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    )
    assert torch.equal(ours.prev_sample, expected)


def test_per_row_timesteps_equal_separate_steps():
    scheduler = sd_scheduler()
    timesteps = torch.tensor([291, 151, 11, 1])
    latents = torch.randn(4, 4, 8, 8)
    model_out = torch.randn(4, 4, 8, 8)
    noise = torch.randn(4, 4, 8, 8)
    batched = ddim_step_with_log_prob(scheduler, model_out, timesteps, latents, 1.0, variance_noise=noise)
    for row, t in enumerate(timesteps.tolist()):
        single = ddim_step_with_log_prob(
            scheduler, model_out[row : row + 1], t, latents[row : row + 1], 1.0, variance_noise=noise[row : row + 1]
        )
        expected = scheduler.step(model_out[row : row + 1], t, latents[row : row + 1], eta=1.0, variance_noise=noise[row : row + 1])
        assert torch.equal(batched.prev_sample[row : row + 1], expected.prev_sample)
        assert torch.allclose(batched.log_prob[row], single.log_prob[0], rtol=1e-6, atol=1e-6)


def test_scoring_the_drawn_sample_gives_its_log_prob_and_other_samples_score_lower():
    scheduler = sd_scheduler()
    latents = torch.randn(2, 4, 8, 8)
    model_out = torch.randn(2, 4, 8, 8)
    drawn = ddim_step_with_log_prob(scheduler, model_out, 501, latents, 1.0, generator=torch.Generator().manual_seed(0))
    scored = ddim_step_with_log_prob(scheduler, model_out, 501, latents, 1.0, prev_latents=drawn.prev_sample)
    assert torch.allclose(drawn.log_prob, scored.log_prob)
    # the mean is the mode: it scores higher than any drawn sample
    at_mean = ddim_step_with_log_prob(scheduler, model_out, 501, latents, 1.0, prev_latents=drawn.mean)
    assert (at_mean.log_prob > drawn.log_prob).all()


def test_final_alpha_follows_set_alpha_to_one():
    for flag in (False, True):
        scheduler = sd_scheduler(set_alpha_to_one=flag)
        _, alpha_prev = alpha_products(scheduler, torch.tensor([1, 11]), torch.device("cpu"))
        assert alpha_prev[0].item() == pytest.approx(1.0 if flag else scheduler.alphas_cumprod[0].item())
        assert alpha_prev[1].item() == pytest.approx(scheduler.alphas_cumprod[1].item())


def test_eta_zero_and_missing_steps_are_clear_errors():
    scheduler = sd_scheduler()
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="eta > 0"):
        ddim_step_with_log_prob(scheduler, x, 291, x, 0.0)
    fresh = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_log_prob(fresh, x, 291, x, 1.0)
    with pytest.raises(ValueError, match="one value per row"):
        ddim_step_with_log_prob(scheduler, x, torch.tensor([291, 281]), x, 1.0)


class RecordingUNet(torch.nn.Module):
    """eps = x * t / 1000 + mean of the text embeddings: enough to check how guidance combines calls."""

    dtype = torch.float32

    def forward(self, sample, timestep, encoder_hidden_states):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, 1, 1, 1)
        text = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return type("Out", (), {"sample": sample * t / 1000 + text})()


def test_guided_noise_prediction_combines_uncond_and_cond():
    unet = RecordingUNet()
    latents = torch.randn(2, 4, 2, 2)
    cond = torch.full((2, 3, 5), 2.0)
    uncond = torch.zeros(1, 3, 5)
    t = torch.tensor([291, 11])
    guided = guided_noise_prediction(unet, latents, t, cond, uncond, guidance=5.0)
    eps_u = latents * t.reshape(-1, 1, 1, 1) / 1000
    eps_c = eps_u + 2.0
    assert torch.allclose(guided, eps_u + 5.0 * (eps_c - eps_u))
    assert torch.allclose(guided_noise_prediction(unet, latents, t, cond, uncond, guidance=1.0), eps_c)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_last_step_to_alpha_one_is_deterministic_with_log_prob_zero_and_finite_gradients(prediction_type):
    # set_alpha_to_one: t = 1 steps to a_t' = 1, so sigma = 0 whatever eta; the log-prob must not be NaN
    scheduler = sd_scheduler(set_alpha_to_one=True, prediction_type=prediction_type)
    latents = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    model_out = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(2), requires_grad=True)
    a_t = scheduler.alphas_cumprod[1].item()
    if prediction_type == "epsilon":
        x0 = (latents - math.sqrt(1 - a_t) * model_out) / math.sqrt(a_t)
    else:
        x0 = math.sqrt(a_t) * latents - math.sqrt(1 - a_t) * model_out
    for reduction in ("mean", "sum"):
        drawn = ddim_step_with_log_prob(scheduler, model_out, 1, latents, 1.0, variance_noise=torch.randn(2, 4, 2, 2),
                                        reduction=reduction)
        assert float(drawn.std) == 0.0
        assert torch.allclose(drawn.prev_sample, x0, atol=1e-5)  # mu = sqrt(1) x0 + sqrt(1 - 1 - 0) eps
        assert torch.equal(drawn.log_prob, torch.zeros(2))
    # scored per row next to a step that has a density: only the degenerate row is 0
    rows = torch.tensor([1, 291])
    scored = ddim_step_with_log_prob(scheduler, model_out, rows, latents, 1.0, prev_latents=torch.zeros(2, 4, 2, 2))
    assert scored.log_prob[0].item() == 0.0 and torch.isfinite(scored.log_prob[1]) and scored.log_prob[1].item() != 0.0
    scored.log_prob.sum().backward()
    assert torch.isfinite(model_out.grad).all()


def test_v_prediction_log_prob_at_the_schedule_end_matches_a_hand_computation():
    # set_alpha_to_one = False: t = 1 steps to t' = -9, which takes a_0 (final_alpha_cumprod)
    scheduler = sd_scheduler(prediction_type="v_prediction")
    latents = torch.tensor([[[[0.3, -1.2]]]])
    v = torch.tensor([[[[0.5, 0.25]]]])
    nxt = torch.tensor([[[[0.1, -0.9]]]])
    a_t, a_p = scheduler.alphas_cumprod[1].item(), scheduler.alphas_cumprod[0].item()
    eta = 0.5
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    densities = []
    for x, vv, n in zip([0.3, -1.2], [0.5, 0.25], [0.1, -0.9]):
        x0 = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * vv
        eps = math.sqrt(a_t) * vv + math.sqrt(1 - a_t) * x
        mu = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma**2) * eps
        densities.append(-((n - mu) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi))
    out = ddim_step_with_log_prob(scheduler, v, 1, latents, eta, prev_latents=nxt, reduction="sum")
    assert out.log_prob.item() == pytest.approx(sum(densities), rel=1e-4)
    out = ddim_step_with_log_prob(scheduler, v, 1, latents, eta, prev_latents=nxt, reduction="mean")
    assert out.log_prob.item() == pytest.approx(sum(densities) / 2, rel=1e-4)
