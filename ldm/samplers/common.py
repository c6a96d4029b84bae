"""What every sampler shares: the network's signature, the prediction conversion, noise, the step's end.

ddpm_space.py (the DDPM-space samplers) and sigma_space.py (the sigma-space ones) both import this
module; neither imports the other's helpers. registry.py lists them, one `Sampler` entry each.

    network       eps_fn(x_in, t) -> out    out is eps, v or x0: the model's `prediction_type`
    conversion    predict_x0_eps(out, x, prediction_type, alpha=..., sigma=...) -> (x0_pred, eps)
    noise         randn(shape, generator, dtype, device)      drawn as diffusers' randn_tensor draws it
    after a step  end_step(i, x, x0_pred, step_hook, callback)
    registry      Sampler(name, space, default_spacing, karras, run, ...): one entry per sampler

The three prediction types (what the network was trained to output), for a latent written as
x = alpha x0 + sigma eps:

    "epsilon"       out = eps                                   Ho et al. 2020 (SD 1.x, SD 2.x 512-base)
    "v_prediction"  out = v = alpha_n eps - sigma_n x0          Salimans & Ho 2022, sec. 4 (SD 2.x 768-v)
    "sample"        out = x0                                    the clean latent itself

alpha_n, sigma_n are the DDPM (variance-preserving) coefficients of the *network's input* x_in,
alpha_n^2 + sigma_n^2 = 1. A DDPM-space sampler holds x_in itself (alpha = alpha_n = sqrt(alpha_bar),
sigma = sigma_n = sqrt(1 - alpha_bar)); a sigma-space sampler holds x = x0 + sigma eps and feeds the
network x / sqrt(sigma^2 + 1), so there alpha = 1 and alpha_n = 1 / sqrt(sigma^2 + 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["PREDICTION_TYPES", "SPACES", "EpsFn", "Callback", "StepHook", "Sampler", "predict_x0_eps",
           "randn", "end_step", "check_prediction_type"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACES = ("ddpm", "sigma")  # the latent a sampler holds: x_t itself, or x_t / sqrt(alpha_bar) = x0 + sigma eps

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_in, t) -> eps, v or x0
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None  # (i, x, x0_pred) after step i
StepHook = Callable[[int, torch.Tensor], torch.Tensor] | None  # (i, x) -> the x to continue from


@dataclass(frozen=True)
class Sampler:
    """One registry entry (ldm.samplers.REGISTRY): everything the entry point needs to know about a sampler.

    run(eps_fn, x, t, grid, *, start, generator, eta, prediction_type, callback, step_hook) -> x_0 is
    the loop; `grid` is the sigmas when `grid_fn` returns them, else the Schedule.
    grid_fn(schedule, steps, spacing, karras) -> (t (N,), sigmas (N+1,) or None): the points it visits.
    """

    name: str
    space: str  # "ddpm" | "sigma" (see SPACES)
    default_spacing: str  # diffusers' default timestep_spacing for the matching scheduler
    karras: bool  # Karras et al.'s sigmas allowed (karras=True)
    run: Callable
    grid_fn: Callable
    summary: str  # one line: what it is, with the citation
    eta: bool = False  # takes DDIM's eta (stochasticity)
    prediction_types: tuple[str, ...] = PREDICTION_TYPES  # what the reference scheduler accepts
    check_steps: Callable[[object, int], None] | None = None  # extra limit on steps (LCM's grid has 50)

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"Sampler {self.name!r}: space={self.space!r}; allowed: {', '.join(SPACES)}")


def check_prediction_type(prediction_type, allowed=PREDICTION_TYPES, what: str = "") -> str:
    """prediction_type if it is one of `allowed`, else a one-line ValueError naming them."""
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type={prediction_type!r} is unknown{what}; valid: {', '.join(allowed)}")
    return prediction_type


def predict_x0_eps(model_out: torch.Tensor, x: torch.Tensor, prediction_type: str, *,
                   alpha: torch.Tensor | None, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's output as (x0_pred, eps): the one place eps, v and x0 predictions are converted.

    DDPM space: x = x_t = alpha x0 + sigma eps with alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t)
    (Ho et al. 2020, eq. 4). Sigma space: alpha=None, x = x0 + sigma eps with the network fed
    x / sqrt(sigma^2 + 1) (Karras et al. 2022). Each formula is written in the order of operations of
    the diffusers scheduler it mirrors, so the float32 results match it bit for bit.
    """
    if alpha is None:  # sigma space: x = x0 + sigma eps
        if prediction_type == "epsilon":
            x0 = x - sigma * model_out
        elif prediction_type == "v_prediction":  # x0 = alpha_n x_in - sigma_n v, with x_in = alpha_n x
            x0 = model_out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        elif prediction_type == "sample":
            x0 = model_out
        else:
            check_prediction_type(prediction_type)
        return x0, (x - x0) / sigma  # eps = the ODE slope dx/dsigma
    if prediction_type == "epsilon":  # 1. eq. 4 solved for x0
        return (x - sigma * model_out) / alpha, model_out
    if prediction_type == "v_prediction":  # 2. v = alpha eps - sigma x0, with x = alpha x0 + sigma eps
        return alpha * x - sigma * model_out, alpha * model_out + sigma * x
    if prediction_type == "sample":  # 3. x0 given; eq. 4 solved for eps
        return model_out, (x - alpha * model_out) / sigma
    check_prediction_type(prediction_type)
    raise AssertionError  # unreachable: check_prediction_type raised


def randn(shape, generator: torch.Generator | list[torch.Generator] | None, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """N(0, I) drawn exactly as diffusers' randn_tensor does: on the generator's device, then moved.

    A list of generators (one per batch row, as pipelines pass them) draws row b from generator[b].
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: pass one per row")
        return torch.cat([randn((1, *shape[1:]), g, dtype, device) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


def end_step(i: int, x: torch.Tensor, x0_pred: torch.Tensor, step_hook: StepHook, callback: Callback) -> torch.Tensor:
    """What every sampler does after step i: the step hook may replace x (plain-SD inpainting puts
    the known region back there), then the callback sees the result and the x_0 estimate."""
    if step_hook is not None:
        x = step_hook(i, x)
    if callback is not None:
        callback(i, x, x0_pred)
    return x
