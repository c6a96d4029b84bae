"""What a generation can be told: one dataclass with every option and its default, checked in one place.

    opts = Options.from_kwargs({"steps": 25, "scheduler": "euler", "seed": 0})   # pipe.generate's keywords
    opts = check(opts, pipe, mode="txt2img", n_prompts=1)    # every value checked, the pipeline's defaults in

`Pipeline.generate / img2img / inpaint / __call__` take these as keywords (their API is unchanged)
and call `check` before any work is done, so a bad value fails in milliseconds with one line that
names it and what is allowed, not after the prompt was encoded. What a value may be depends on the
pipeline: the sizes on its VAE and UNet, the steps on its schedule, clip_skip on its text encoder,
the prediction type on its family (ldm.families) and the sampler (ldm.samplers.REGISTRY).
Precision (dtype, vae_dtype) and the attention backend belong to the loaded networks: ldm.load.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from ldm import samplers

__all__ = ["Options", "check", "PREVIEWS", "PROMPT_SYNTAXES", "MODES"]

PREVIEWS = (None, "cheap", "vae")
PROMPT_SYNTAXES = ("plain", "a1111")  # plain: the tokenizer's 75 tokens, as diffusers; a1111: ldm.prompt
MODES = ("txt2img", "img2img", "inpaint")


@dataclass(frozen=True)
class Options:
    """Every option of a generation, with its default (img2img's strength default is 0.75, set there)."""

    # the prompt
    negative_prompt: str | list[str] | None = None  # one for all prompts, or one per prompt; None: no negative
                                                     # prompt (SD 1.x/2.x encode "", SDXL's branch is zeros)
    clip_skip: int = 1  # A1111's count: 1 = the text encoder's last layer, 2 = the one before
    prompt_syntax: str = "plain"  # "plain" (as diffusers) or "a1111" (weights, BREAK, past 75 tokens)
    # the images
    num_images: int = 1  # per prompt
    seed: int | list[int] | None = None  # image b gets seed + b; a list: one per image; None: random
    height: int | None = None  # pixels; None: the model's default size (txt2img), or the image's
    width: int | None = None
    # SDXL's size conditioning (ldm.conditioning), each (h, w) or (top, left) in pixels
    original_size: tuple[int, int] | None = None  # None: (height, width)
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None  # None: (height, width)
    # the sampler (ldm.samplers)
    steps: int = 25
    scheduler: str = "euler"  # a name in ldm.samplers.SAMPLERS
    guidance: float = 7.5  # classifier-free guidance scale; 1: no unconditional pass
    spacing: str | None = None  # None: the pipeline's (a diffusers folder's), else the sampler's default
    karras: bool = False  # Karras sigmas (the samplers whose registry entry allows them)
    eta: float = 0.0  # DDIM's stochasticity
    prediction_type: str | None = None  # None: the pipeline's (its family's or its folder's)
    strength: float = 1.0  # img2img / inpainting: 1 redraws from noise, 0 keeps the image
    # what comes back
    previews: str | None = None  # None, "cheap" (the family's linear RGB map per step) or "vae"
    tile: bool | None = None  # decode the VAE in tiles: None = above ldm.memory.AUTO_TILE_LATENT
    progress: bool = True  # a tqdm bar
    callback: Callable | None = None  # callback(i, x, x0_pred) after each step

    @classmethod
    def from_kwargs(cls, kwargs: dict, **fixed) -> "Options":
        """Options from a generate()-style keyword dict; an unknown keyword is a one-line TypeError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unexpected keyword argument{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))}; allowed: {', '.join(names)}")
        return cls(**{**kwargs, **fixed})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_guidance(guidance) -> None:
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance) \
            or guidance < 0:
        raise ValueError(f"guidance={guidance!r} must be a finite number >= 0 (1: no guidance; SD uses ~7.5)")


def check_size(height, width, multiple: int, smallest: int) -> None:
    """Both sides: integers, multiples of the VAE's factor, at least one latent pixel at the UNet's deepest level."""
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v) or v < smallest or v % multiple:
            raise ValueError(f"{name}={v!r} must be a multiple of {multiple} pixels (the VAE's downsampling) "
                             f"and at least {smallest} (one latent pixel at the UNet's deepest level)")


def check_prompt_options(clip_skip, prompt_syntax, layers: int) -> None:
    """clip_skip (A1111's count, 1..layers) and prompt_syntax (PROMPT_SYNTAXES)."""
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax={prompt_syntax!r} must be one of {PROMPT_SYNTAXES}")
    if not _is_int(clip_skip) or not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip={clip_skip!r} must be an int in [1, {layers}] "
                         "(A1111's count: 1 = the last layer, 2 = the one before)")


MAX_SIZE_NUMBER = 16384  # pixels: four times SDXL's largest training bucket side, far past any image ldm makes


def check_size_conditioning(opts: Options, pipe) -> None:
    """original_size / crops_coords_top_left / target_size: pairs of ints in range, and only for a family
    whose conditioner reads them (SDXL's); one-line ValueErrors naming the value and what is allowed."""
    given = {name: getattr(opts, name) for name in ("original_size", "crops_coords_top_left", "target_size")}
    default = {"original_size": None, "crops_coords_top_left": (0, 0), "target_size": None}
    if not getattr(pipe.conditioner, "takes_sizes", False):
        for name, v in given.items():
            if (tuple(v) if isinstance(v, (tuple, list)) else v) != default[name]:
                raise ValueError(f"{name}={v!r}: the {pipe.family.name} family ({pipe.family.title}) takes no "
                                 f"size conditioning; it is SDXL's (leave it out)")
        return
    for name, v in given.items():
        low = 0 if name == "crops_coords_top_left" else 1
        ok = v is None and name != "crops_coords_top_left" or isinstance(v, (tuple, list)) and len(v) == 2 \
            and all(_is_int(n) and low <= n <= MAX_SIZE_NUMBER for n in v)
        if not ok:
            what = "(top, left)" if low == 0 else "(height, width)"
            raise ValueError(f"{name}={v!r} must be {what}: two integers from {low} to {MAX_SIZE_NUMBER} pixels"
                             + ("" if low == 0 else ", or None for the image's size"))


def check(opts: Options, pipe, mode: str, n_prompts: int) -> Options:
    """The one place a generation's options are checked: one-line ValueErrors that name the value and
    what is allowed. Returns the options with the pipeline's defaults filled in (spacing,
    prediction_type), as the run will use them."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    # 1. the prompt
    negatives = [opts.negative_prompt] if isinstance(opts.negative_prompt, (str, type(None))) else opts.negative_prompt
    if not (isinstance(negatives, (list, tuple)) and negatives
            and all(isinstance(n, (str, type(None))) for n in negatives)):
        raise ValueError(f"negative_prompt={opts.negative_prompt!r} must be None (no negative prompt), a str, "
                         f"or a non-empty list of str")
    if isinstance(opts.negative_prompt, (list, tuple)) and len(negatives) != n_prompts:
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {n_prompts} prompts; "
                         f"give one str or one per prompt")
    check_prompt_options(opts.clip_skip, opts.prompt_syntax, pipe.text_encoder.config.num_hidden_layers)
    check_size_conditioning(opts, pipe)
    # 2. the images
    if not _is_int(opts.num_images) or opts.num_images < 1:
        raise ValueError(f"num_images={opts.num_images!r} must be an integer >= 1 (images per prompt)")
    B = n_prompts * opts.num_images
    seed = opts.seed
    if isinstance(seed, (list, tuple)):
        if len(seed) != B or not all(_is_int(s) and s >= 0 for s in seed):
            raise ValueError(f"seed={seed!r}: a list needs one int per image ({B})")
    elif seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63 - B):
        raise ValueError(f"seed={seed!r} must be a non-negative int (or a list of ints, one per image)")
    check_size(opts.height, opts.width, pipe.vae.cfg.downsample_factor, pipe.min_size)
    # 3. the sampler: the pipeline's own checks, then the registry's (spacing, Karras, eta, prediction type)
    check_guidance(opts.guidance)
    if opts.scheduler not in samplers.REGISTRY:
        raise ValueError(f"scheduler={opts.scheduler!r} is unknown; valid: {', '.join(samplers.SAMPLERS)}")
    pipe.schedule.check_steps(opts.steps)
    if not (isinstance(opts.strength, (int, float)) and 0.0 <= opts.strength <= 1.0):
        raise ValueError(f"strength={opts.strength!r} is outside [0, 1]: 1 redraws everything, 0 nothing")
    if not isinstance(opts.karras, bool):
        raise ValueError(f"karras={opts.karras!r} must be True or False")
    prediction_type = pipe.check_prediction_type(opts.prediction_type)
    spacing = opts.spacing if opts.spacing is not None else pipe.spacing
    samplers.check(opts.scheduler, opts.steps, pipe.schedule, spacing, opts.karras, opts.eta, prediction_type)
    # 4. what comes back
    if opts.previews not in PREVIEWS:
        raise ValueError(f"previews={opts.previews!r} must be one of {PREVIEWS}")
    if opts.tile not in (None, True, False):
        raise ValueError(f"tile={opts.tile!r} must be None (automatic), True or False")
    if opts.callback is not None and not callable(opts.callback):
        raise ValueError(f"callback={opts.callback!r} must be callable as callback(i, x, x0_pred), or None")
    return dataclasses.replace(opts, prediction_type=prediction_type, spacing=spacing)
