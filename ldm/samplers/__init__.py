"""Samplers: turn a noise-predicting network into an image latent. One entry point, `sample`.

    from ldm import schedule, samplers
    sched = schedule.Schedule.sd1()
    x0 = samplers.sample("euler", eps_fn, noise, steps=25, schedule=sched, generator=g)

`eps_fn(x_t, t) -> out` is the network in DDPM parametrisation (x_t = sqrt(alpha_bar_t) x_0 +
sqrt(1 - alpha_bar_t) eps), with t a 0-dim float32 tensor (fractional for the sigma-space
samplers). `out` is what the network was trained to predict, its `prediction_type`: eps
("epsilon", SD 1.x), v ("v_prediction", SD 2.x 768-v) or x_0 ("sample"); every sampler converts it
with common.predict_x0_eps, written once. `noise` is the standard-normal draw; `sample`
multiplies it by the sampler's initial sigma itself. Each sampler passes eps_fn exactly the (x, t)
sequence that diffusers' pipeline passes its UNet for the matching scheduler (configured as SD 1.x
configures it), and draws its random noise from `generator` in the same order, shapes and dtypes,
so results match diffusers step for step.

One concept per file, each importing only the ones above it:

    common.py       what every sampler shares: the network's signature (EpsFn), the prediction
                    conversion (predict_x0_eps), noise drawn as diffusers draws it (randn), the step's
                    end (end_step), the registry's entry type (Sampler)
    ddpm_space.py   the samplers whose latent is x_t itself: DDIM, DDPM, PNDM/PLMS, DPM++ 2M, and LCM
                    (the few-step sampler of latent consistency models and LCM-LoRA), with their grids
    sigma_space.py  the sigma-space ones (Karras et al. 2022 / k-diffusion): Euler, Euler ancestral,
                    Heun, LMS, and their grid (sigma_grid)
    registry.py     REGISTRY, one entry per sampler, and what reads it: check, sampler_grid, the
                    starting latents (initial_latent, noised_latent) and the entry point `sample`
    __init__.py     this: the names above, importable as ldm.samplers.<name>

Adding a sampler is one entry: write its loop (in ddpm_space.py, or sigma_space.py if it works in
sigma space) and add one `Sampler(...)` line to REGISTRY in registry.py (name, space, default
spacing, Karras allowed, the loop, its grid). `sample`, SAMPLERS, DEFAULT_SPACING, the pipeline's
checks, the CLI's --scheduler choices and the tests that run every sampler all read the registry.

All samplers are pure: they read the grid, keep their history (PLMS's eps list, DPM's x0 list) in
local variables, never edit the caller's tensors, and need no set-up call.
"""
from ldm.samplers.common import (PREDICTION_TYPES, SPACES, Callback, EpsFn, Sampler, StepHook, check_prediction_type,
                                 end_step, predict_x0_eps, randn)
from ldm.samplers.ddpm_space import (LCM_ORIGINAL_STEPS, LCM_TIMESTEP_SCALING, alpha_sigma, ddim, ddim_step, ddpm,
                                     ddpm_grid, ddpm_step, dpm_grid, dpmpp_2m, lcm, lcm_boundary, lcm_grid,
                                     lcm_timesteps, pndm, pndm_transfer)
from ldm.samplers.sigma_space import denoise, euler, euler_ancestral, heun, lms, lms_coefficient, sigma_grid
from ldm.samplers.registry import (DEFAULT_SPACING, REGISTRY, SAMPLERS, SIGMA_SPACE, check, initial_latent,
                                   noised_latent, sample, sampler_grid)
from ldm.schedule import Schedule, img2img_start_step  # reached as samplers.<name> by the pipeline and the tests

__all__ = ["REGISTRY", "SAMPLERS", "PREDICTION_TYPES", "DEFAULT_SPACING", "sample", "check", "sampler_grid",
           "initial_latent", "noised_latent", "ddim", "ddpm", "pndm", "dpmpp_2m", "lcm", "euler", "euler_ancestral",
           "heun", "lms", "ddim_step", "ddpm_step", "pndm_transfer", "lcm_timesteps", "lcm_boundary", "sigma_grid"]
