"""The registry of samplers and the one entry point that reads it, `sample`.

REGISTRY holds one `Sampler(...)` entry per sampler (common.Sampler: name, space, default spacing,
Karras sigmas allowed, the loop, its grid). Everything else asks it: `check` (the settings a sampler
takes, with one-line errors), `sampler_grid` (the points it visits), `initial_latent` and
`noised_latent` (the latent it starts from, for text-to-image and img2img), and `sample`, which runs
the loop. SAMPLERS, DEFAULT_SPACING, the pipeline's checks, the CLI's --scheduler choices and the
tests that run every sampler read it too.
"""
from __future__ import annotations

import torch

from ldm.samplers import sigma_space
from ldm.samplers.common import Callback, EpsFn, Sampler, StepHook, check_prediction_type
from ldm.samplers.ddpm_space import (alpha_sigma, ddim, ddpm, ddpm_grid, dpm_grid, dpmpp_2m, lcm, lcm_grid,
                                     lcm_timesteps, pndm)
from ldm.schedule import SPACINGS, Schedule, img2img_start_step

__all__ = ["REGISTRY", "SAMPLERS", "SIGMA_SPACE", "DEFAULT_SPACING", "sample", "check", "sampler_grid",
           "initial_latent", "noised_latent"]

# ---- the registry: one entry per sampler ---------------------------------------------------------
# name, space, default spacing (diffusers' default for the matching scheduler: SD 1.x's config names
# none), Karras sigmas allowed, the loop, its grid, a one-line summary; then what is not the default.
REGISTRY: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", "ddpm", "leading", False, ddim, ddpm_grid, "DDIM (Song et al. 2020, eq. 12)", eta=True),
    Sampler("ddpm", "ddpm", "leading", False, ddpm, ddpm_grid, "DDPM ancestral sampling (Ho et al. 2020, Alg. 2)"),
    Sampler("pndm", "ddpm", "leading", False, pndm, ddpm_grid, "PLMS, SD 1.x's original (Liu et al. 2022, eq. 12)",
            prediction_types=("epsilon", "v_prediction")),
    Sampler("euler", "sigma", "linspace", True, sigma_space.euler, sigma_space.sigma_grid,
            "Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1)"),
    Sampler("euler_a", "sigma", "linspace", True, sigma_space.euler_ancestral, sigma_space.sigma_grid,
            "Euler ancestral (k-diffusion)", prediction_types=("epsilon", "v_prediction")),
    Sampler("heun", "sigma", "linspace", True, sigma_space.heun, sigma_space.sigma_grid,
            "Heun, 2nd order, 2 calls per step (Karras et al. 2022, Alg. 1: the deterministic sampler)"),
    Sampler("lms", "sigma", "linspace", True, sigma_space.lms, sigma_space.sigma_grid,
            "linear multistep (k-diffusion)"),
    Sampler("dpmpp_2m", "ddpm", "linspace", True, dpmpp_2m, dpm_grid, "DPM-Solver++(2M) (Lu et al. 2022, Alg. 2)"),
    Sampler("lcm", "ddpm", "leading", False, lcm, lcm_grid, "latent consistency, 2-8 steps (Luo et al. 2023, Alg. 1)",
            check_steps=lambda schedule, steps: lcm_timesteps(schedule, steps)),  # steps <= LCM_ORIGINAL_STEPS
)}

SAMPLERS = tuple(REGISTRY)
SIGMA_SPACE = tuple(n for n, s in REGISTRY.items() if s.space == "sigma")
DEFAULT_SPACING = {n: s.default_spacing for n, s in REGISTRY.items()}


# ---- the entry point ----------------------------------------------------------------------------
def sampler_grid(name: str, schedule: Schedule, steps: int, spacing: str | None = None, karras: bool = False):
    """(t, sigmas): the N timesteps a sampler calls eps_fn at, and (for sigma-space and DPM) N+1 sigmas."""
    entry = REGISTRY[name]
    return entry.grid_fn(schedule, steps, spacing or entry.default_spacing, karras)


def initial_latent(name: str, noise: torch.Tensor, sigmas: torch.Tensor | None, spacing: str) -> torch.Tensor:
    """x at the first step from a standard-normal draw: noise times the sampler's init_noise_sigma.

    1 for the DDPM-space samplers; sigma_max for sigma-space ones, or sqrt(sigma_max^2 + 1) with
    "leading" spacing (diffusers' convention).
    """
    if REGISTRY[name].space != "sigma":
        return noise
    sigma_max = sigmas.max()
    return noise * (sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5)


def noised_latent(name: str, x0: torch.Tensor, noise: torch.Tensor, i: int, t: torch.Tensor,
                  sigmas: torch.Tensor | None, schedule: Schedule) -> torch.Tensor:
    """x0 noised to the level of grid point i, in the sampler's own latent space (q(x_t | x_0)).

    (t, sigmas) is sampler_grid's output; i = len(t) means "after the last step": x0 itself.
    Sigma space: x0 + sigma_i noise; DDPM space on a sigma grid (DPM++): alpha x0 + sigma_vp noise at
    sigma_i; DDPM space on the schedule: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise at t_i
    (diffusers' add_noise).
    """
    if i == len(t):
        return x0
    if REGISTRY[name].space == "sigma":  # x = x_0 + sigma eps
        return x0 + noise * sigmas[i].to(x0.dtype)
    if sigmas is not None:  # x = alpha x_0 + sigma_vp eps at sigma_i
        alpha, sigma_vp = alpha_sigma(sigmas[i].to(x0.dtype))
        return alpha * x0 + sigma_vp * noise
    return schedule.add_noise(x0, noise, int(t[i]))


def check(name, steps, schedule, spacing=None, karras=False, eta=0.0, prediction_type="epsilon") -> Sampler:
    """The registry entry of `name`, after checking that it takes these settings (one-line ValueErrors)."""
    if name not in REGISTRY:
        raise ValueError(f"sampler {name!r} is unknown; valid: {', '.join(SAMPLERS)}")
    entry = REGISTRY[name]
    schedule.check_steps(steps)
    if entry.check_steps is not None:
        entry.check_steps(schedule, steps)
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"spacing={spacing!r} is unknown; valid: {', '.join(SPACINGS)}")
    if karras and not entry.karras:
        raise ValueError(f"karras=True is not available for {name!r}; it works with: "
                         f"{', '.join(n for n, s in REGISTRY.items() if s.karras)}")
    if not eta >= 0:
        raise ValueError(f"eta={eta!r} must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise)")
    if eta > 0 and not entry.eta:
        raise ValueError(f"eta={eta!r} only applies to {', '.join(repr(n) for n, s in REGISTRY.items() if s.eta)}, "
                         f"not {name!r}; leave eta=0")
    check_prediction_type(prediction_type)
    if prediction_type not in entry.prediction_types:
        raise ValueError(f"prediction_type={prediction_type!r} is not available for {name!r}; valid: "
                         f"{', '.join(entry.prediction_types)}")
    return entry


def sample(name: str, eps_fn: EpsFn, noise: torch.Tensor, steps: int, schedule: Schedule | None = None, *,
           generator: torch.Generator | list[torch.Generator] | None = None, callback: Callback = None,
           spacing: str | None = None,
           karras: bool = False, eta: float = 0.0, prediction_type: str = "epsilon",
           init: torch.Tensor | None = None, strength: float = 1.0, step_hook: StepHook = None) -> torch.Tensor:
    """Run sampler `name` for `steps` steps and return the final latent x_0 (same shape as noise).

    name: one of SAMPLERS. noise: N(0, I) of the latent's shape (scaled here by the initial sigma).
    schedule: defaults to Schedule.sd1(). generator: the source of the noise DDPM, Euler ancestral,
    LCM and DDIM with eta > 0 add during sampling (a list: one generator per batch row). callback(i, x, x0_pred)
    runs after step i (0..N-1) with the new latent and the x_0 estimate that drove the step.
    spacing: None picks the reference's default for that sampler (DEFAULT_SPACING); LCM ignores it. karras: Karras
    sigmas (the entries with karras=True). eta: DDIM only. prediction_type: what eps_fn returns, "epsilon",
    "v_prediction" or "sample" (the entry's prediction_types).
    img2img: pass init (the encoded image latent, already times the VAE's scaling factor) and strength in [0, 1];
    the first img2img_start_step(steps, strength) steps are skipped and `noise` is added to init at the first
    step that runs (q(x_t | x_0)). With strength 0 no step runs and init comes back unchanged.
    step_hook(i, x) -> x: runs after step i, before the callback; the sampler continues from what it
    returns (plain-SD inpainting pastes the known region back there, noised with `noised_latent`).
    """
    schedule = schedule or Schedule.sd1()
    entry = check(name, steps, schedule, spacing, karras, eta, prediction_type)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength!r} is outside [0, 1]: 1 noises the image fully, 0 not at all")
    if init is not None and init.shape != noise.shape:
        raise ValueError(f"init has shape {tuple(init.shape)} but noise has {tuple(noise.shape)}; they must match")
    spacing = spacing or entry.default_spacing
    t, sigmas = entry.grid_fn(schedule, steps, spacing, karras)
    start = 0
    if init is None:
        x = initial_latent(name, noise, sigmas, spacing)
    else:
        start = img2img_start_step(steps, strength)
        if start == len(t):
            return init.clone()
        x = noised_latent(name, init, noise, start, t, sigmas, schedule)
    grid = sigmas if sigmas is not None else schedule  # the loop walks the sigmas, or the schedule's alpha_bar
    return entry.run(eps_fn, x, t, grid, start=start, eta=eta, generator=generator,
                     prediction_type=prediction_type, callback=callback, step_hook=step_hook)
