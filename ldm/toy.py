"""A toy where the truth is known: a Gaussian mixture and its exact denoiser, to compare samplers honestly.

Data: x_0 ~ sum_k w_k N(mu_k, s_k^2 I) in D dimensions (default: 8 blobs on a ring in 2-D). Noised,
x_t = a x_0 + b eps with a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t), is again a mixture:
x_t ~ sum_k w_k N(a mu_k, (a^2 s_k^2 + b^2) I). So the best possible network, the posterior mean
(Tweedie / the MMSE denoiser), has a closed form:

    E[x_0 | x_t] = sum_k r_k(x_t) [ mu_k + a s_k^2 / (a^2 s_k^2 + b^2) (x_t - a mu_k) ]
    r_k(x_t)     = w_k N(x_t; a mu_k, (a^2 s_k^2 + b^2) I) / sum_j (...)        (responsibilities)
    eps*(x_t, t) = (x_t - a E[x_0 | x_t]) / b

With this eps_fn every sampler runs without a neural network, and what is left of the error is the
sampler's own discretisation error. `sliced_wasserstein` measures how far samples are from the true
mixture, using the exact quantiles of each 1-D projection (no second sample set, so no extra noise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ldm.schedule import Schedule

__all__ = ["GaussianMixture", "ring", "sliced_wasserstein"]


@dataclass(frozen=True)
class GaussianMixture:
    """sum_k weights[k] N(means[k], stds[k]^2 I); means (K, D), stds (K,), weights (K,) summing to 1. float64."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    schedule: Schedule = field(default_factory=Schedule.sd1)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws x_0, (n, D) float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at a (fractional) timestep: 1 / (1 + sigma(t)^2), sigma interpolated as the samplers do."""
        return 1 / (1 + self.schedule.sigma_at(t) ** 2)

    def posterior_mean(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] for x_t (n, D) at noise level alpha_bar (scalar): (n, D)."""
        a, b2 = alpha_bar**0.5, 1 - alpha_bar
        var = a**2 * self.stds**2 + b2  # (K,) variance of each noised component
        diff = x_t[:, None, :] - a * self.means[None]  # (n, K, D)
        log_r = (torch.log(self.weights) - 0.5 * self.dim * torch.log(2 * math.pi * var)
                 - 0.5 * (diff**2).sum(-1) / var)  # (n, K) log w_k N(x_t; a mu_k, var_k I)
        r = torch.softmax(log_r, dim=1)
        gain = (a * self.stds**2 / var)[None, :, None]  # (1, K, 1)
        x0_k = self.means[None] + gain * diff  # (n, K, D) per-component posterior mean
        return (r[..., None] * x0_k).sum(1)

    def eps_fn(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact eps-prediction network for this data: (x_t - sqrt(ab) E[x_0|x_t]) / sqrt(1 - ab)."""
        alpha_bar = self.alpha_bar_at(t.double())
        x = x_t.double()
        x0 = self.posterior_mean(x, alpha_bar)
        return ((x - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5).to(x_t.dtype)

    def v_fn(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact v-prediction network: v = sqrt(ab) eps - sqrt(1 - ab) x_0."""
        alpha_bar = self.alpha_bar_at(t.double())
        x = x_t.double()
        x0 = self.posterior_mean(x, alpha_bar)
        eps = (x - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5
        return (alpha_bar**0.5 * eps - (1 - alpha_bar) ** 0.5 * x0).to(x_t.dtype)

    def cdf_1d(self, u: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """CDF of the projection <x_0, direction> (a 1-D mixture) at points u (any shape)."""
        m = self.means @ direction  # (K,)
        z = (u[..., None] - m) / (self.stds * direction.norm())
        return (self.weights * 0.5 * (1 + torch.erf(z / math.sqrt(2)))).sum(-1)

    def quantile_1d(self, p: torch.Tensor, direction: torch.Tensor, grid: int = 2001) -> torch.Tensor:
        """Inverse of cdf_1d at probabilities p: the CDF on a fine grid, inverted by linear interpolation."""
        m, s = self.means @ direction, self.stds * direction.norm()
        u = torch.linspace(float((m - 10 * s).min()), float((m + 10 * s).max()), grid, dtype=torch.float64)
        F = self.cdf_1d(u, direction)  # (grid,) increasing
        j = torch.searchsorted(F, p).clamp(1, grid - 1)  # F[j-1] < p <= F[j]
        w = (p - F[j - 1]) / (F[j] - F[j - 1]).clamp(min=1e-300)
        return u[j - 1] + w.clamp(0, 1) * (u[j] - u[j - 1])


def ring(k: int = 8, radius: float = 1.0, std: float = 0.1, schedule: Schedule | None = None) -> GaussianMixture:
    """k blobs on a circle with unequal weights (proportional to 1..k), so a sampler must also get the mass right."""
    angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # (k, 2)
    weights = torch.arange(1, k + 1, dtype=torch.float64)
    return GaussianMixture(means, torch.full((k,), std, dtype=torch.float64), weights / weights.sum(),
                           schedule or Schedule.sd1())


def sliced_wasserstein(samples: torch.Tensor, mixture: GaussianMixture, n_proj: int = 32) -> float:
    """Mean over n_proj fixed unit directions of W1(projected samples, projected mixture), exact quantiles.

    With n exact samples it is about 1 / sqrt(n) times the data's spread (the noise floor); a biased
    sampler sits above that floor.
    """
    x = samples.double().reshape(len(samples), -1)  # (n, D)
    n, D = x.shape
    g = torch.Generator().manual_seed(1234)  # fixed directions, the same for every call
    dirs = torch.randn(n_proj, D, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # (n,) plotting positions
    total = 0.0
    for d in dirs:
        proj = (x @ d).sort().values  # (n,)
        total += (proj - mixture.quantile_1d(p, d)).abs().mean().item()
    return total / n_proj
