"""The Gaussian-mixture toy: its exact denoiser is right, and every sampler lands on the mixture."""
import math

import pytest
import torch

from ldm import samplers, toy
from ldm.schedule import Schedule


def test_posterior_mean_is_tweedie():
    """E[x_0 | x_t] = (x_t + (1 - ab) grad log p_t(x_t)) / sqrt(ab), with p_t the noised mixture's density."""
    m = toy.ring()
    x_t = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.2
    for ab in [0.98, 0.5, 0.05]:
        ab = torch.tensor(ab, dtype=torch.float64)
        x = x_t.clone().requires_grad_(True)
        var = ab * m.stds**2 + (1 - ab)  # (K,)
        diff = x[:, None, :] - ab**0.5 * m.means[None]
        log_p = torch.logsumexp(torch.log(m.weights) - torch.log(2 * math.pi * var) - 0.5 * (diff**2).sum(-1) / var, 1)
        (score,) = torch.autograd.grad(log_p.sum(), x)
        tweedie = (x_t + (1 - ab) * score) / ab**0.5
        torch.testing.assert_close(m.posterior_mean(x_t, ab), tweedie, rtol=1e-10, atol=1e-10)


def test_eps_and_v_networks_agree():
    m = toy.ring()
    x_t, t = torch.randn(32, 2, dtype=torch.float64), torch.tensor(400.0)
    ab = m.alpha_bar_at(t)
    x0 = m.posterior_mean(x_t, ab)
    torch.testing.assert_close(m.eps_fn(x_t, t), (x_t - ab**0.5 * x0) / (1 - ab) ** 0.5, rtol=1e-12, atol=1e-12)
    v = m.v_fn(x_t, t)  # x_0 = sqrt(ab) x_t - sqrt(1 - ab) v
    torch.testing.assert_close(ab**0.5 * x_t - (1 - ab) ** 0.5 * v, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.alpha_bar_at(torch.tensor(400.0)), Schedule.sd1().alpha_bar[400].double(),
                               rtol=1e-6, atol=0)


def test_sliced_wasserstein_sees_the_truth_and_a_shift():
    m = toy.ring()
    exact = m.sample(1000, torch.Generator().manual_seed(0))
    floor = toy.sliced_wasserstein(exact, m)
    assert floor < 0.03
    assert toy.sliced_wasserstein(exact + 0.2, m) > 0.1
    assert toy.sliced_wasserstein(exact * 1.3, m) > 3 * floor


# LCM is left out: it expects a consistency-distilled model, whose output at any t is a *sample*
# of x_0. Fed the exact denoiser (the posterior *mean*), each step jumps to that mean and re-noises,
# so it lands near the mixture's centres but blurred (0.108 at 25 steps, against a 0.06 bar).
@pytest.mark.parametrize("name", [n for n in samplers.SAMPLERS if n != "lcm"])
def test_every_sampler_lands_on_the_mixture(name):
    m = toy.ring()
    noise = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    err = {steps: toy.sliced_wasserstein(samplers.sample(name, m.eps_fn, noise, steps,
                                                         generator=torch.Generator().manual_seed(1)), m)
           for steps in (5, 25)}
    assert err[25] < 0.06  # the floor for 500 exact samples is about 0.025
    assert err[25] < err[5]  # the error falls as steps grow


def test_v_prediction_runs_to_the_same_place():
    m = toy.ring()
    noise = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = samplers.sample("euler", m.eps_fn, noise, 10)
    b = samplers.sample("euler", m.v_fn, noise, 10, prediction_type="v_prediction")
    # the samplers' sigmas and t are float32, so eps and v conversions round differently: ~1e-7 apart
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
