"""Sigma-space samplers (Karras et al. 2022 / k-diffusion): Euler, Euler ancestral, Heun, LMS.

These samplers integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma on the
sigma-space latent x = x_0 + sigma eps, from sigma_max down to 0. The network was trained in DDPM
space, so the denoiser D scales its input back and asks for eps at the matching timestep:

    D(x; sigma) = x - sigma * eps_fn(x / sqrt(sigma^2 + 1), t(sigma))      (an eps-predicting network)

which is what diffusers' `scale_model_input` + interpolated timesteps do; a v- or x0-predicting
network is converted by common.predict_x0_eps, the one conversion every sampler uses.
Use them through `ldm.samplers.sample("euler", ...)` (their registry entries are in registry.py);
this module holds the grids and the loops, and imports its helpers from common.py.

Notation (shared with ddpm_space.py):

    symbol        code           meaning
    t             t              training timestep, 0 (clean) .. T-1 (noisiest); fractional here
    sigma_i       sigmas[i]      noise level of step i; sigmas[N] = 0
    x             x              sigma-space latent x_0 + sigma eps (the DDPM latent / sqrt(alpha_bar))
    D(x; sigma)   x0_pred        the denoiser's estimate of x_0 ("denoised")
    d             d              ODE slope (x - D) / sigma, i.e. the predicted eps
    eps_fn        eps_fn         the network: eps_fn(x_t, t) -> eps (or v, or x0: its prediction type)

Every sampler takes the whole grid (t, sigmas) and a start index `start` (img2img skips the first
steps), keeps any history it needs in local variables, and returns the final x (sigma = 0).
"""
from __future__ import annotations

from math import prod

import torch
from numpy.polynomial import Polynomial

from ldm.samplers.common import Callback, EpsFn, StepHook, end_step, predict_x0_eps, randn  # noqa: F401 (re-exported)
from ldm.schedule import Schedule, karras_sigmas

__all__ = ["sigma_grid", "denoise", "euler", "euler_ancestral", "heun", "lms", "lms_coefficient"]


def sigma_grid(schedule: Schedule, steps: int, spacing: str = "linspace", karras: bool = False):
    """The N timesteps (float32, (N,)) and N+1 sigmas (float32, (N+1,), ending in 0) of a sigma-space run.

    Sigma is interpolated at each (fractional) t; with karras=True the sigmas are replaced by
    Karras et al.'s rho = 7 ramp between the same end points, and t is recomputed from them.
    """
    t = schedule.timesteps(steps, spacing, rounded=False).float()  # (N,) as the reference stores them
    sigmas = schedule.sigma_at(t)  # (N,) float64
    if karras:
        sigmas = karras_sigmas(steps, sigmas[-1].item(), sigmas[0].item())
        t = schedule.t_at_sigma(sigmas).float()
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()  # (N+1,)
    return t, sigmas


def denoise(eps_fn: EpsFn, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor,
            prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(D(x; sigma), d): one network call on the scaled input, as an x_0 estimate and the ODE slope
    d = (x - D) / sigma (the eps estimate), through common.predict_x0_eps."""
    model_out = eps_fn(x / ((sigma**2 + 1) ** 0.5), t.to(x.device))  # DDPM-space input sqrt(alpha_bar) x
    return predict_x0_eps(model_out, x, prediction_type, alpha=None, sigma=sigma)


def euler(eps_fn: EpsFn, x: torch.Tensor, t: torch.Tensor, sigmas: torch.Tensor, *, start: int = 0,
          prediction_type: str = "epsilon", callback: Callback = None, step_hook: StepHook = None,
          **_) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 with S_churn = 0)."""
    for i in range(start, len(t)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_pred, d = denoise(eps_fn, x, sigma, t[i], prediction_type)  # 1. D(x_i; sigma_i), 2. slope dx/dsigma
        x = x + d * (sigma_next - sigma)  # 3. x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d
        x = end_step(i, x, x0_pred, step_hook, callback)
    return x


def euler_ancestral(eps_fn: EpsFn, x: torch.Tensor, t: torch.Tensor, sigmas: torch.Tensor, *, start: int = 0,
                    prediction_type: str = "epsilon", callback: Callback = None, step_hook: StepHook = None,
                    generator: torch.Generator | None = None, **_) -> torch.Tensor:
    """Euler ancestral (k-diffusion `sample_euler_ancestral`): step down to sigma_down, add noise sigma_up.

    sigma_up^2 + sigma_down^2 = sigma_next^2, and sigma_up is the DDPM posterior's noise (eta = 1).
    """
    for i in range(start, len(t)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_pred, d = denoise(eps_fn, x, sigma, t[i], prediction_type)  # 1. D(x_i; sigma_i) and its slope d
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5  # 2. split sigma_next
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        # 3. deterministic Euler step to sigma_down
        x = x + d * (sigma_down - sigma)
        noise = randn(x0_pred.shape, generator, x0_pred.dtype, x.device)  # 4. fresh noise, even at the end
        x = x + noise * sigma_up
        x = end_step(i, x, x0_pred, step_hook, callback)
    return x


def heun(eps_fn: EpsFn, x: torch.Tensor, t: torch.Tensor, sigmas: torch.Tensor, *, start: int = 0,
         prediction_type: str = "epsilon", callback: Callback = None, step_hook: StepHook = None,
         **_) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1, the deterministic sampler): 2 network calls per step.

    The last step (to sigma = 0) is a plain Euler step, as in the paper.
    """
    for i in range(start, len(t)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_pred, d = denoise(eps_fn, x, sigma, t[i], prediction_type)  # 1. D(x_i; sigma_i), 2. slope at sigma_i
        dt = sigma_next - sigma
        if sigma_next == 0:  # 3a. last step: Euler
            x = x + d * dt
        else:  # 3b. Euler predictor, then the trapezoid corrector with the slope at sigma_{i+1}
            x_euler = x + d * dt
            _, d_next = denoise(eps_fn, x_euler, sigma_next, t[i + 1], prediction_type)
            x = x + (d + d_next) / 2 * dt
        x = end_step(i, x, x0_pred, step_hook, callback)
    return x


def lms_coefficient(sigma_hist: list[float], k: int, sigma_from: float, sigma_to: float) -> float:
    """Integral over [sigma_from, sigma_to] of the k-th Lagrange basis polynomial on the nodes sigma_hist.

    sigma_hist[j] is the noise level j steps back (j = 0 is the current one). The polynomial has degree
    len(sigma_hist) - 1 <= 3, so its exact antiderivative is used (the reference integrates numerically).
    """
    others = [s for j, s in enumerate(sigma_hist) if j != k]
    basis = Polynomial.fromroots(others) / prod(sigma_hist[k] - s for s in others) if others else Polynomial([1.0])
    antiderivative = basis.integ()
    return float(antiderivative(sigma_to) - antiderivative(sigma_from))


def lms(eps_fn: EpsFn, x: torch.Tensor, t: torch.Tensor, sigmas: torch.Tensor, *, start: int = 0,
        prediction_type: str = "epsilon", callback: Callback = None, step_hook: StepHook = None, order: int = 4,
        **_) -> torch.Tensor:
    """Linear multistep (k-diffusion `sample_lms`): integrate the polynomial through the last `order` slopes.

    x_{i+1} = x_i + sum_k c_k d_{i-k},   c_k = int_{sigma_i}^{sigma_{i+1}} l_k(sigma) dsigma  (Lagrange basis l_k)
    """
    ds: list[torch.Tensor] = []  # slopes d_i, d_{i-1}, ... newest first
    for i in range(start, len(t)):
        sigma = sigmas[i]
        x0_pred, d = denoise(eps_fn, x, sigma, t[i], prediction_type)  # 1. D(x_i; sigma_i) and its slope
        ds = [d] + ds[: order - 1]  # 2. slope history, newest first
        hist = [float(sigmas[i - j]) for j in range(len(ds))]  # 3. the nodes sigma_i, sigma_{i-1}, ...
        coeffs = [lms_coefficient(hist, k, float(sigma), float(sigmas[i + 1])) for k in range(len(ds))]
        x = x + sum(c * d for c, d in zip(coeffs, ds))  # 4. x_{i+1}
        x = end_step(i, x, x0_pred, step_hook, callback)
    return x
