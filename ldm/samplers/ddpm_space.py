"""DDPM-space samplers (the latent is x_t itself): DDIM, DDPM, PNDM/PLMS, DPM-Solver++(2M) and LCM.

LCM is the few-step sampler of latent consistency models and LCM-LoRA. Use them through
`ldm.samplers.sample("ddim", ...)` (their registry entries are in registry.py); this module holds the
loops, their single steps and their grids, and imports its helpers from common.py. Every loop converts
the network's output (eps, v or x_0) with common.predict_x0_eps.

Notation (shared with sigma_space.py):

    symbol            code              meaning
    T                 T                 training timesteps (1000)
    N                 steps             sampling steps
    t, t_prev         t, t_prev         current / next (less noisy) timestep; t_prev < 0 means "done"
    beta_t            betas[t]          per-step noise variance of the forward process
    alpha_bar_t       ab_t              prod_{s<=t} (1 - beta_s)
    x_t               x                 the latent at timestep t
    eps               eps               predicted noise
    x_0|t             x0_pred           predicted clean latent given x_t
    sigma_t (DDIM)    std_dev           std of the noise DDIM adds (eta * DDPM posterior std)
    sigma, lambda     sigma, lam        sigma-space noise level; lambda = log(alpha/sigma), half log-SNR
    eta               eta               DDIM stochasticity: 0 deterministic, 1 = DDPM posterior
    c_skip, c_out     c_skip, c_out     LCM's boundary-condition weights of x_t and x0_pred

Every sampler takes the whole grid and a start index `start` (img2img skips the first steps), keeps
its history (PLMS's eps list, DPM's x0 list) in local variables, and returns the final x.
"""
from __future__ import annotations

import torch

from ldm.samplers.common import Callback, EpsFn, StepHook, end_step, predict_x0_eps, randn
from ldm.schedule import Schedule, karras_sigmas

__all__ = ["ddim", "ddpm", "pndm", "dpmpp_2m", "lcm", "ddim_step", "ddpm_step", "pndm_transfer", "alpha_sigma",
           "lcm_timesteps", "lcm_boundary", "ddpm_grid", "dpm_grid", "lcm_grid"]

LCM_ORIGINAL_STEPS = 50  # the grid LCM was distilled on: every T // 50-th timestep (diffusers' default)
LCM_TIMESTEP_SCALING = 10.0


def _vp(ab_t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The DDPM latent's coefficients at alpha_bar_t: x_t = alpha x0 + sigma eps (keywords of predict_x0_eps)."""
    return {"alpha": ab_t**0.5, "sigma": (1 - ab_t) ** 0.5}


# ---- DDIM ------------------------------------------------------------------------------------
def ddim_step(x, eps, x0_pred, ab_t, ab_prev, eta: float = 0.0, noise=None):
    """One DDIM update (Song et al. 2020, eq. 12 with sigma_t(eta) from eq. 16) -> x_{t_prev}."""
    variance = ((1 - ab_prev) / (1 - ab_t)) * (1 - ab_t / ab_prev)  # 1. DDPM posterior variance, eq. 16
    std_dev = eta * variance**0.5
    direction = (1 - ab_prev - std_dev**2) ** 0.5 * eps  # 2. "direction pointing to x_t"
    x_prev = ab_prev**0.5 * x0_pred + direction  # 3. eq. 12
    if eta > 0:
        x_prev = x_prev + std_dev * noise  # 4. random noise, sigma_t eps_t
    return x_prev


def ddim(eps_fn: EpsFn, x, t, sched: Schedule, *, start=0, eta=0.0, generator=None,
         prediction_type="epsilon", callback: Callback = None, step_hook: StepHook = None, **_):
    """DDIM (Song et al. 2020, eq. 12). Like diffusers, it steps from t to t - T // N whatever the spacing."""
    ratio = sched.num_train_timesteps // len(t)
    for i in range(start, len(t)):
        t_now, t_prev = int(t[i]), int(t[i]) - ratio
        ab_t = sched.alpha_bar[t_now]
        ab_prev = sched.alpha_bar[t_prev] if t_prev >= 0 else sched.alpha_bar_final
        out = eps_fn(x, t[i].float().to(x.device))
        x0_pred, eps = predict_x0_eps(out, x, prediction_type, **_vp(ab_t))
        noise = randn(out.shape, generator, out.dtype, x.device) if eta > 0 else None
        x = ddim_step(x, eps, x0_pred, ab_t, ab_prev, eta, noise)
        x = end_step(i, x, x0_pred, step_hook, callback)
    return x


# ---- DDPM ------------------------------------------------------------------------------------
def ddpm_step(x, x0_pred, ab_t, ab_prev, noise=None):
    """Ancestral step x_t -> x_{t_prev} ~ q(x_{t_prev} | x_t, x_0 = x0_pred) (Ho et al. 2020, eqs. 6-7)."""
    alpha_t = ab_t / ab_prev  # 1. the alpha of the (possibly multi-step) jump t -> t_prev
    beta_t = 1 - alpha_t
    mean = ((ab_prev**0.5 * beta_t) / (1 - ab_t)) * x0_pred + (alpha_t**0.5 * (1 - ab_prev) / (1 - ab_t)) * x  # eq. 7
    if noise is None:
        return mean
    variance = torch.clamp((1 - ab_prev) / (1 - ab_t) * beta_t, min=1e-20)  # 2. beta-tilde, eq. 7
    return mean + variance**0.5 * noise


def ddpm(eps_fn: EpsFn, x, t, sched: Schedule, *, start=0, generator=None,
         prediction_type="epsilon", callback: Callback = None, step_hook: StepHook = None, **_):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2 / eq. 11 via eqs. 6-7), on N of the T timesteps."""
    for i in range(start, len(t)):
        t_now = int(t[i])
        ab_t = sched.alpha_bar[t_now]
        ab_prev = sched.alpha_bar[int(t[i + 1])] if i + 1 < len(t) else torch.tensor(1.0)  # x_0 after the end
        out = eps_fn(x, t[i].float().to(x.device))
        x0_pred, _ = predict_x0_eps(out, x, prediction_type, **_vp(ab_t))
        noise = randn(out.shape, generator, out.dtype, x.device) if t_now > 0 else None
        x = ddpm_step(x, x0_pred, ab_t, ab_prev, noise)
        x = end_step(i, x, x0_pred, step_hook, callback)
    return x


# ---- PNDM / PLMS -----------------------------------------------------------------------------
def pndm_transfer(x, model_out, ab_t, ab_prev, prediction_type="epsilon"):
    """The transfer part phi(x_t, eps, t, t_prev) of PNDM (Liu et al. 2022, eq. 11): a DDIM step, rearranged.

    model_out is eps, or v (converted to eps here with x, as the reference does after combining v's).
    """
    eps = predict_x0_eps(model_out, x, prediction_type, **_vp(ab_t))[1]
    denom = ab_t * (1 - ab_prev) ** 0.5 + (ab_t * (1 - ab_t) * ab_prev) ** 0.5
    return (ab_prev / ab_t) ** 0.5 * x - (ab_prev - ab_t) * eps / denom


def pndm(eps_fn: EpsFn, x, t, sched: Schedule, *, start=0, prediction_type="epsilon",
         callback: Callback = None, step_hook: StepHook = None, **_):
    """PLMS, "pseudo linear multistep" (Liu et al. 2022, eq. 12), as SD 1.x ran it (diffusers, skip_prk_steps).

    Step `start` is a 2nd-order warm-up (two network calls, averaged output, Heun-like); later steps use
    the Adams-Bashforth combination of the last up to 4 outputs. Each step goes from t to t - T // N.
    """
    ratio = sched.num_train_timesteps // len(t)

    def ab(t_: int):  # alpha_bar, with alpha_bar_final past the end
        return sched.alpha_bar[t_] if t_ >= 0 else sched.alpha_bar_final

    history: list[torch.Tensor] = []  # network outputs at the grid points, oldest first
    for i in range(start, len(t)):
        t_now = int(t[i])
        out = eps_fn(x, t[i].float().to(x.device))  # 1. eps (or v) at (x_t, t)
        x0_pred, _ = predict_x0_eps(out, x, prediction_type, **_vp(ab(t_now)))
        if i == start and i + 1 < len(t):  # 2a. warm-up: DDIM to t_{i+1}, output there, redo with the mean
            t_next = int(t[i + 1])
            x_ddim = pndm_transfer(x, out, ab(t_now), ab(t_now - ratio), prediction_type)
            out_next = eps_fn(x_ddim, t[i + 1].float().to(x.device))
            x = pndm_transfer(x, (out_next + out) / 2, ab(t_next + ratio), ab(t_next), prediction_type)
            history = [out]
        else:  # 2b. linear multistep (Adams-Bashforth weights), newest output first
            history = (history + [out])[-4:]
            e = history[::-1]
            if len(e) == 1:
                out_prime = e[0]
            elif len(e) == 2:
                out_prime = (3 * e[0] - e[1]) / 2
            elif len(e) == 3:
                out_prime = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
            else:
                out_prime = (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])
            x = pndm_transfer(x, out_prime, ab(t_now), ab(t_now - ratio), prediction_type)
        x = end_step(i, x, x0_pred, step_hook, callback)
    return x


# ---- DPM-Solver++ (2M) -----------------------------------------------------------------------
def alpha_sigma(sigma):
    """VP coefficients of a sigma-space noise level: alpha = 1 / sqrt(1 + sigma^2), sigma_vp = sigma alpha."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def dpmpp_2m(eps_fn: EpsFn, x, t, sigmas, *, start=0, prediction_type="epsilon",
             callback: Callback = None, step_hook: StepHook = None, **_):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2, midpoint form), data prediction.

    First order (= DDIM) on the first step and on the last step (to sigma = 0), second order between.
    """
    x0_prev = None
    for i in range(start, len(t)):
        alpha_s, sigma_s = alpha_sigma(sigmas[i])
        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        out = eps_fn(x, t[i].float().to(x.device))
        x0_pred, _ = predict_x0_eps(out, x, prediction_type, alpha=alpha_s, sigma=sigma_s)  # 1. data prediction
        lam_s = torch.log(alpha_s) - torch.log(sigma_s)  # 2. half log-SNR; lambda_t = inf at sigma = 0
        lam_t = torch.log(alpha_t) - torch.log(sigma_t)
        h = lam_t - lam_s
        if x0_prev is None or i == len(t) - 1:  # 3a. first order: DPM-Solver++ 1 (eq. 9, = DDIM)
            x_next = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0_pred
        else:  # 3b. second order: extrapolate x0 linearly in lambda (r = h_prev / h)
            alpha_prev, sigma_prev = alpha_sigma(sigmas[i - 1])
            r = (lam_s - (torch.log(alpha_prev) - torch.log(sigma_prev))) / h
            D0, D1 = x0_pred, (1.0 / r) * (x0_pred - x0_prev)
            x_next = ((sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                      - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)
        x, x0_prev = x_next, x0_pred
        x = end_step(i, x, x0_pred, step_hook, callback)
    return x


# ---- LCM ---------------------------------------------------------------------------------------
def lcm_timesteps(schedule: Schedule, steps: int, original_steps: int = LCM_ORIGINAL_STEPS) -> torch.Tensor:
    """LCM's N timesteps, float64 (N,): N evenly spaced indices into the distillation grid
    k-1, 2k-1, ..., T-1 (k = T // original_steps), noisiest first. SD 1.x, 4 steps: 999, 759, 499, 259."""
    T = schedule.num_train_timesteps
    if not 1 <= original_steps <= T:
        raise ValueError(f"original_steps={original_steps} must be from 1 to num_train_timesteps={T}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= original_steps:
        raise ValueError(f"steps={steps!r} is not allowed for 'lcm': use an integer from 1 to {original_steps} "
                         f"(its distillation grid has {original_steps} timesteps; LCM wants 2 to 8)")
    k = T // original_steps
    origin = (torch.arange(original_steps, 0, -1, dtype=torch.float64) * k - 1)  # T-1, ..., 2k-1, k-1
    index = (torch.arange(steps, dtype=torch.float64) * (original_steps / steps)).floor().long()  # np.linspace
    return origin[index]


def lcm_boundary(t: int, sigma_data: float = 0.5, scaling: float = LCM_TIMESTEP_SCALING):
    """(c_skip, c_out) of the consistency parametrisation f(x, t) = c_skip x + c_out x0_pred (Song et al. 2023,
    eq. 3 with the EDM weights; LCM scales t by 10): c_skip = s^2 / ((10t)^2 + s^2), c_out = 10t / sqrt(...)."""
    scaled = torch.tensor(int(t)) * scaling  # float32, computed as the reference does
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def lcm(eps_fn: EpsFn, x, t, sched: Schedule, *, start=0, generator=None, prediction_type="epsilon",
        callback: Callback = None, step_hook: StepHook = None, **_):
    """Multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models", Alg. 1).

    Each step jumps to a clean estimate with the consistency function, then noises it afresh down to
    the next grid point; the last step returns the estimate itself (no noise after it).
    """
    for i in range(start, len(t)):
        t_now = int(t[i])
        ab_t = sched.alpha_bar[t_now]
        out = eps_fn(x, t[i].float().to(x.device))
        x0_pred, _ = predict_x0_eps(out, x, prediction_type, **_vp(ab_t))  # 1. x_0 from eps (or v, or x_0)
        c_skip, c_out = lcm_boundary(t_now)
        denoised = c_out * x0_pred + c_skip * x  # 2. consistency function f(x_t, t)
        if i + 1 < len(t):  # 3. q(x_{t_next} | x_0 = denoised) with fresh noise
            ab_next = sched.alpha_bar[int(t[i + 1])]
            noise = randn(out.shape, generator, denoised.dtype, x.device)
            x = ab_next.sqrt() * denoised + (1 - ab_next).sqrt() * noise
        else:
            x = denoised
        x = end_step(i, x, denoised, step_hook, callback)
    return x


# ---- grids ----------------------------------------------------------------------------------
def ddpm_grid(schedule: Schedule, steps: int, spacing: str, karras: bool = False):
    """The N integer timesteps (float32) of a DDPM-space sampler that walks the schedule itself; no sigmas."""
    return schedule.timesteps(steps, spacing).float(), None


def dpm_grid(schedule: Schedule, steps: int, spacing: str, karras: bool = False):
    """DPM-Solver's grid: N timesteps and N+1 sigmas (the last 0). With linspace/leading it takes N+1
    points and drops the last (t ~ 0), as diffusers does; trailing takes N."""
    if spacing == "trailing":
        t = schedule.timesteps(steps, spacing)
    else:
        if steps >= schedule.num_train_timesteps:
            raise ValueError(f"steps={steps} is not allowed for dpmpp_2m with spacing={spacing!r}: "
                             f"use 1 to {schedule.num_train_timesteps - 1}")
        t = schedule.timesteps(steps + 1, spacing)[:-1]
    if karras:  # Karras ramp over the whole table, t rounded back to integers (not for cosine)
        sigmas = karras_sigmas(steps, schedule.sigmas[0].item(), schedule.sigmas[-1].item())
        t = schedule.t_at_sigma(sigmas)
        t = t.round() if schedule.beta_schedule != "cosine" else t
    else:
        sigmas = schedule.sigma_at(t)
    return t.float(), torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def lcm_grid(schedule: Schedule, steps: int, spacing: str, karras: bool = False):
    """LCM walks its own grid (lcm_timesteps) whatever the spacing, like diffusers."""
    return lcm_timesteps(schedule, steps).float(), None
