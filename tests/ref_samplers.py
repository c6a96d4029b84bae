"""Reference sampling loops: diffusers' schedulers configured as SD 1.x, driven like its pipelines.

`reference_run` mimics StableDiffusionPipeline / StableDiffusionImg2ImgPipeline around a scheduler:
init_noise_sigma, scale_model_input, the eta/generator step kwargs, img2img's get_timesteps +
add_noise. It records every (x, t) the "UNet" receives, so a test can check that ldm.samplers
calls eps_fn with exactly the same sequence. `reference_tensors()` stores a few trajectories
(see tests/reference/generate.py); the "weights" are empty, the denoiser is `smooth_eps` below.
"""
from __future__ import annotations

import inspect

import torch

SD1 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
           steps_offset=1)


def make_scheduler(name: str, spacing: str | None = None, karras: bool = False,
                   prediction_type: str = "epsilon", **config):
    """The diffusers scheduler behind an ldm sampler name, with SD 1.x's scheduler config."""
    import diffusers as d

    cls = {"ddim": d.DDIMScheduler, "ddpm": d.DDPMScheduler, "pndm": d.PNDMScheduler,
           "euler": d.EulerDiscreteScheduler, "euler_a": d.EulerAncestralDiscreteScheduler,
           "heun": d.HeunDiscreteScheduler, "lms": d.LMSDiscreteScheduler,
           "dpmpp_2m": d.DPMSolverMultistepScheduler, "lcm": d.LCMScheduler}[name]
    kw = dict(SD1, prediction_type=prediction_type, **config)
    if name in ("ddim", "pndm"):
        kw["set_alpha_to_one"] = False
    if name in ("ddim", "ddpm"):
        kw["clip_sample"] = False
    if name == "pndm":
        kw["skip_prk_steps"] = True
    if spacing is not None:
        kw["timestep_spacing"] = spacing
    if karras:
        kw["use_karras_sigmas"] = True
    return cls(**kw)


def reference_run(name, eps_fn, noise, steps, *, spacing=None, karras=False, prediction_type="epsilon",
                  eta=0.0, generator=None, init=None, strength=1.0, **config):
    """(final latent, [(x, t) passed to eps_fn, ...]) from the diffusers loop."""
    sched = make_scheduler(name, spacing, karras, prediction_type, **config)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if init is None:
        x = noise * sched.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        x = sched.add_noise(init, noise, timesteps[:1].repeat(init.shape[0]))
    params = set(inspect.signature(sched.step).parameters)
    extra = {}
    if "eta" in params:
        extra["eta"] = eta
    if "generator" in params:
        extra["generator"] = generator
    calls = []
    for t in timesteps:
        inp = sched.scale_model_input(x, t)
        calls.append((inp.clone(), float(t)))
        out = eps_fn(inp, torch.as_tensor(t).float())
        x = sched.step(out, t, x, **extra).prev_sample
    return x, calls


def smooth_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a UNet: smooth, nonlinear in x and t, O(1) outputs."""
    s = t.to(x.dtype) / 1000.0
    return torch.tanh(0.7 * x + torch.sin(3.0 * s)) * (0.5 + s) + 0.2 * x * torch.cos(5.0 * s)


STORED = [  # (sampler, steps, spacing, karras, eta): trajectories kept in the reference file
    ("ddim", 7, None, False, 0.0), ("ddim", 7, "trailing", False, 0.5), ("ddpm", 7, None, False, 0.0),
    ("pndm", 7, None, False, 0.0), ("euler", 7, None, False, 0.0), ("euler", 7, None, True, 0.0),
    ("euler_a", 7, None, False, 0.0), ("heun", 7, None, False, 0.0), ("lms", 7, None, True, 0.0),
    ("dpmpp_2m", 7, None, False, 0.0), ("dpmpp_2m", 7, None, True, 0.0),
]


def stored_key(name, steps, spacing, karras, eta) -> str:
    return f"{name}.{steps}.{spacing or 'default'}.{'karras' if karras else 'plain'}.eta{eta}"


def reference_tensors() -> dict[str, torch.Tensor]:
    """Inputs (noise, seed) and outputs (the t sequence, the x sequence, the final latent) per STORED run."""
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    out = {"inputs.noise": noise, "inputs.seed": torch.tensor(7)}
    for name, steps, spacing, karras, eta in STORED:
        key = stored_key(name, steps, spacing, karras, eta)
        g = torch.Generator().manual_seed(7)
        final, calls = reference_run(name, smooth_eps, noise, steps, spacing=spacing, karras=karras,
                                     eta=eta, generator=g)
        out[f"outputs.{key}.final"] = final
        out[f"outputs.{key}.t"] = torch.tensor([t for _, t in calls], dtype=torch.float64)
        out[f"outputs.{key}.x"] = torch.stack([x for x, _ in calls])
    return out
