"""Noise schedules: betas -> alpha_bar -> sigma, the timestep grids a sampler walks, Karras sigmas.

Forward diffusion (Ho et al. 2020, eq. 4) noises a clean latent x_0 in one shot:

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,     eps ~ N(0, I),  t = 0 .. T-1

with alpha_bar_t = prod_{s<=t} (1 - beta_s). Dividing by sqrt(alpha_bar_t) gives the same
process in "sigma space" (Karras et al. 2022, the variance-exploding view):

    x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps,      sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)

and SNR_t = alpha_bar_t / (1 - alpha_bar_t) = 1 / sigma_t^2. For SD 1.x ("scaled_linear" betas
from 0.00085 to 0.012, T = 1000) sigma runs from 0.0292 at t = 0 to 14.6146 at t = 999.

A sampler with N steps visits N of the T training timesteps. Which ones is the *spacing*:

    leading   t_i = (N-1-i) * (T // N) + steps_offset      SD 1.x's DDIM/PNDM default
    trailing  t_i = round(T - i * T / N) - 1               starts at T-1 exactly
    linspace  t_i = linspace(T-1, 0, N)[i]                 rounded for DDPM-space samplers

Sigma-space samplers interpolate sigma at (possibly fractional) t linearly, and go back from a
sigma to a fractional t by linear interpolation in log sigma, exactly as diffusers does.

Every table here is float32 and computed in the same order as diffusers' schedulers (float32
linspace, float32 cumprod), so timesteps and sigmas match the reference bit for bit; the
interpolations run in float64, as numpy does there. Reference: Ho et al. 2020 (DDPM) for the
forward process, Nichol & Dhariwal 2021 for the cosine schedule, Karras et al. 2022 eq. 5 for the
Karras sigmas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

__all__ = ["Schedule", "BETA_SCHEDULES", "SPACINGS", "karras_sigmas", "img2img_start_step"]

BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008.

    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), capped at max_beta (diffusers' "squaredcos_cap_v2").
    """
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho).

    Returns float64 (n,); rho = 7 spends more steps at low noise than a log-linear ramp would.
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def img2img_start_step(steps: int, strength: float) -> int:
    """img2img: how many of the `steps` to skip so that only `strength` of the schedule is run.

    strength 1.0 starts from (almost) pure noise at step 0; 0.0 skips every step (the image comes back
    unchanged). Same rounding as diffusers' img2img pipeline: int(steps * strength) steps are run.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength!r} is outside [0, 1]: 1 noises the image fully, 0 not at all")
    return max(steps - min(int(steps * strength), steps), 0)


@dataclass(frozen=True)
class Schedule:
    """The training noise schedule: T betas and everything derived from them. Defaults are SD 1.x.

    Tensors are computed once (cached) and are float32 of shape (T,), indexed by the integer
    timestep t = 0 .. T-1 (t = 0 is the least noisy).
    """

    num_train_timesteps: int = 1000  # T
    beta_schedule: str = "scaled_linear"  # one of BETA_SCHEDULES
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1  # added to "leading" timesteps (SD 1.x: 1, so the grid ends at t = 1)
    set_alpha_to_one: bool = False  # alpha_bar "after" t = 0 for DDIM/PNDM: 1, or alpha_bar_0 (SD 1.x)

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={self.beta_schedule!r} is unknown; valid: {', '.join(BETA_SCHEDULES)}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps} must be at least 2")

    @classmethod
    def sd1(cls) -> "Schedule":
        """Stable Diffusion 1.x: scaled_linear betas 0.00085 -> 0.012 over 1000 steps, steps_offset 1."""
        return cls()

    @classmethod
    def tiny(cls) -> "Schedule":
        """A short schedule (T = 100) with the same shape of curve, for quick tests."""
        return cls(num_train_timesteps=100, beta_start=0.00085 * 10, beta_end=0.012 * 10)

    # ---- the tables, (T,) float32 -----------------------------------------------------------
    @cached_property
    def betas(self) -> torch.Tensor:
        T = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":  # linear in sqrt(beta), the LDM choice
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32) ** 2
        if self.beta_schedule == "linear":  # Ho et al. 2020
            return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        return cosine_betas(T)

    @cached_property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @cached_property
    def alpha_bar(self) -> torch.Tensor:
        """alpha_bar_t = prod_{s<=t} alpha_s: the signal fraction left at timestep t."""
        return torch.cumprod(self.alphas, dim=0)

    @cached_property
    def alpha_bar_final(self) -> torch.Tensor:
        """alpha_bar at "t = -1", where DDIM and PNDM land after their last step."""
        return torch.tensor(1.0) if self.set_alpha_to_one else self.alpha_bar[0]

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing in t."""
        return ((1 - self.alpha_bar) / self.alpha_bar) ** 0.5

    @cached_property
    def log_sigmas(self) -> torch.Tensor:
        """log sigma_t, float32 from numpy's float32 log, as the reference computes it (t <-> sigma)."""
        return torch.from_numpy(np.log(self.sigmas.numpy()))

    @cached_property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) = 1 / sigma_t^2."""
        return self.alpha_bar / (1 - self.alpha_bar)

    # ---- timestep grids ---------------------------------------------------------------------
    def check_steps(self, steps: int) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps={steps!r} is not allowed: use an integer from 1 to "
                             f"num_train_timesteps={self.num_train_timesteps}")

    def timesteps(self, steps: int, spacing: str = "leading", rounded: bool = True) -> torch.Tensor:
        """The N = `steps` timesteps a sampler visits, noisiest first: float64 (N,).

        rounded=False keeps linspace's fractional values (the sigma-space samplers use them).
        """
        self.check_steps(steps)
        T, N = self.num_train_timesteps, steps
        if spacing == "leading":  # multiples of T // N, shifted by steps_offset
            t = torch.arange(N - 1, -1, -1, dtype=torch.float64) * (T // N) + self.steps_offset
        elif spacing == "trailing":  # counts down from T by T / N, so the first step is t = T - 1
            delta = (T - T / N) - T  # numpy.arange's step: the difference of its first two values
            t = (T + torch.arange(math.ceil(T / (T / N)), dtype=torch.float64) * delta).round() - 1
        elif spacing == "linspace":  # both ends included: T - 1 ... 0 (numpy.linspace's arithmetic)
            t = torch.arange(N, dtype=torch.float64) * ((T - 1) / (N - 1)) if N > 1 else torch.zeros(1, dtype=torch.float64)
            t[-1] = T - 1 if N > 1 else 0.0
            t = t.flip(0)
            t = t.round() if rounded else t
        else:
            raise ValueError(f"spacing={spacing!r} is unknown; valid: {', '.join(SPACINGS)}")
        return t

    # ---- t <-> sigma ------------------------------------------------------------------------
    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at fractional timesteps t, linear interpolation of the table (numpy.interp): float64."""
        last = self.num_train_timesteps - 1
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, last)
        table = self.sigmas.double()
        j = t.floor().long()  # left neighbour; w = 0 returns the table entry exactly
        w = t - j
        return torch.where(w == 0, table[j], (table[(j + 1).clamp(max=last)] - table[j]) * w + table[j])

    def t_at_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma: linear interpolation in log sigma, clipped to [0, T-1].

        The inverse of sigma_at up to the choice of interpolation (diffusers' `_sigma_to_t`): float64.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigma = torch.log(sigma.clamp(min=1e-10))  # (n,)
        log_sigmas = self.log_sigmas  # (T,) float32, increasing
        low = ((log_sigmas.double()[:, None] <= log_sigma).sum(0) - 1).clamp(0, self.num_train_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo.double() - log_sigma) / (lo - hi).double()).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    # ---- the forward process ----------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) (Ho et al. 2020 eq. 4): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.
        t: one integer timestep (the samplers' img2img start), or a tensor (B,) with one per image of x0
        (training draws a t per image)."""
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            shape = (-1,) + (1,) * (x0.dim() - 1)                    # (B, 1, 1, 1): one level per image
            alpha_bar_t = self.alpha_bar.to(x0.device)[t.to(x0.device)].view(shape).to(x0.dtype)
        else:
            alpha_bar_t = self.alpha_bar[int(t)].to(x0.dtype)
        return alpha_bar_t**0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * noise
