"""What every grader shares: the Verdict it returns, tensor comparison, the shipped model and
pictures made from a context (see ldm.exercises)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ldm import images as imgs
from ldm import samplers

__all__ = ["Verdict", "shipped_pipeline", "generate_from_context", "meta_unet"]


@dataclass(frozen=True)
class Verdict:
    """What a grader found: `passed`, and `detail`, what it measured against the goal."""

    exercise: str
    passed: bool
    detail: str

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"Exercise {self.exercise}: {'passed' if self.passed else 'not yet'}. {self.detail}"


def _verdict(exercise: str, passed: bool, detail: str) -> Verdict:
    return Verdict(exercise, bool(passed), detail)


def _compare(exercise: str, what: str, got, want: torch.Tensor, atol: float, rtol: float = 0.0) -> Verdict:
    """`got` against `want`: a tensor of the same shape within atol + rtol |want|, element by element."""
    if not isinstance(got, torch.Tensor):
        return _verdict(exercise, False, f"{what}: expected a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        return _verdict(exercise, False, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    got = got.detach().to(want.dtype)
    if not torch.isfinite(got).all():
        return _verdict(exercise, False, f"{what}: holds NaN or inf where the reference is finite")
    err = (got - want).abs()
    ok = bool((err <= atol + rtol * want.abs()).all())
    return _verdict(exercise, ok, f"{what}: max |difference| from the reference {err.max().item():.3g} "
                                  f"(allowed {atol:g}{f' + {rtol:g} |x|' if rtol else ''})")


@functools.lru_cache(maxsize=1)
def shipped_pipeline():
    """The shipped shapes model, float32 on the CPU, loaded once per process (the picture graders use it)."""
    import ldm
    from ldm import weights

    return ldm.load(weights.SHIPPED, device="cpu", dtype=torch.float32)


def generate_from_context(pipe, context: torch.Tensor, seeds, *, steps: int = 25, scheduler: str = "euler",
                          guidance: float = 7.5) -> list:
    """Pictures from a context (B, T, C) instead of prompts: one per seed (image b from seed b's CPU
    generator, as the pipeline draws it), guided against the empty prompt's context."""
    seeds = list(seeds)
    context = context.to(pipe.dtype)
    if len(context) == 1:
        context = context.expand(len(seeds), -1, -1)
    uncond = pipe.encode_prompt([""] * len(seeds))  # (B, 77, C)
    eps_fn = pipe.eps_fn(torch.cat([uncond, context]), guidance)
    f, C = pipe.vae.cfg.downsample_factor, pipe.latent_channels
    h = w = pipe.default_size // f
    noise = torch.cat([torch.randn((1, C, h, w), generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        latents = samplers.sample(scheduler, eps_fn, noise, steps, pipe.schedule)
        return imgs.to_pil(pipe.decode(latents))


def meta_unet(cfg):
    """A UNet of config `cfg` on the meta device: its shapes and parameter counts, no memory."""
    from ldm.unet import UNetModel

    with torch.device("meta"):
        return UNetModel(cfg)
