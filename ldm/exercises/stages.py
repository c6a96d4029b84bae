"""The graders of chapters 1-5: text, noise and samplers, the UNet, the VAE, the pipeline (see ldm.exercises)."""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from ldm import judge, samplers, shapes
from ldm.exercises.common import Verdict, _compare, _verdict, generate_from_context, meta_unet, shipped_pipeline
from ldm.schedule import Schedule


# ---- chapter 1: text ----------------------------------------------------------------------------

CONTEXT_PROMPTS = ["a red circle above a blue square", "a small green triangle in the top left", ""]


def check_context(build) -> Verdict:
    """Exercise 1.1: `build(parts, ids) -> context (B, 77, C)` from the text encoder's parts alone.

    `parts.text_model` holds the token and position embeddings, the encoder's layers and the final
    layer norm (ldm/clip.py); `parts.config` the config. The whole model is not handed over, so the
    answer cannot just call it. Compared with the shipped text encoder's context for three prompts."""
    pipe = shipped_pipeline()
    te = pipe.text_encoder
    ids = pipe.tokenizer(CONTEXT_PROMPTS)  # (3, 77)
    parts = SimpleNamespace(text_model=te.text_model, config=te.config)
    with torch.no_grad():
        want = te(ids)
        got = build(parts, ids)
    return _compare("1.1", "the context of three prompts", got, want, atol=1e-5)


def grade_colour_swap(edit, seeds=range(8)) -> Verdict:
    """Exercise 1.2: edit ONE position of the context of "a red circle" so that the shipped model
    paints a blue circle on at least 6 of the 8 seeds.

    `edit(red, blue) -> context` gets the contexts (77, C) of "a red circle" and "a blue circle" and
    returns the edited (77, C) context; the grader generates from it (25 Euler steps, guidance 7.5) and
    asks the judge for "a blue circle"."""
    pipe = shipped_pipeline()
    red, blue = pipe.encode_prompt(["a red circle", "a blue circle"])  # (77, C) each
    edited = edit(red.clone(), blue.clone())
    if not isinstance(edited, torch.Tensor) or tuple(edited.shape) != tuple(red.shape):
        shape = tuple(edited.shape) if isinstance(edited, torch.Tensor) else type(edited).__name__
        return _verdict("1.2", False, f"edit returned {shape}; expected a tensor of shape {tuple(red.shape)}")
    changed = (edited.to(red.dtype) != red).any(dim=-1).nonzero().flatten().tolist()
    if len(changed) != 1:
        return _verdict("1.2", False, f"the edit changes {len(changed)} positions ({changed[:8]}"
                                      f"{' ...' if len(changed) > 8 else ''}); the goal is exactly one")
    pictures = generate_from_context(pipe, edited[None], seeds)
    blue_circles = sum(bool(judge.score(im, "a blue circle")["all"]) for im in pictures)
    need = math.ceil(0.75 * len(pictures))
    return _verdict("1.2", blue_circles >= need,
                    f"position {changed[0]} changed; the judge reads a blue circle in {blue_circles} of "
                    f"{len(pictures)} pictures (goal: {need})")


# ---- chapter 2: noise and samplers --------------------------------------------------------------

def check_ddim_step(step) -> Verdict:
    """Exercise 2.1: `step(x, eps, x0_pred, ab_t, ab_prev) -> x_prev`, DDIM's deterministic update
    (Song et al. 2020, eq. 12 with sigma_t = 0), against `ldm.samplers.ddim_step` at timesteps from the
    noisiest to the last one (where ab_prev is the schedule's final alpha_bar)."""
    sched = Schedule.sd1()
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for t, t_prev in ((999, 949), (501, 451), (101, 51), (1, -1)):
        x, eps, x0 = (torch.randn((2, 4, 8, 8), generator=g) for _ in range(3))
        ab_t = sched.alpha_bar[t]
        ab_prev = sched.alpha_bar[t_prev] if t_prev >= 0 else sched.alpha_bar_final
        want = samplers.ddim_step(x, eps, x0, ab_t, ab_prev)
        verdict = _compare("2.1", f"the step {t} -> {max(t_prev, 0)}", step(x.clone(), eps.clone(), x0.clone(), ab_t, ab_prev),
                           want, atol=1e-5)
        if not verdict:
            return verdict
        worst = max(worst, (step(x, eps, x0, ab_t, ab_prev) - want).abs().max().item())
    return _verdict("2.1", True, f"four steps from t = 999 to the last: max |difference| {worst:.3g}")


FIRST_STEPS_PROMPT = "a green triangle"


@functools.lru_cache(maxsize=1)
def _first_steps_truth() -> tuple[int, int]:
    pipe = shipped_pipeline()
    res = pipe.generate(FIRST_STEPS_PROMPT, steps=20, scheduler="euler", guidance=7.5, seed=0, previews="vae",
                        progress=False)
    verdicts = [judge.score(p[0], FIRST_STEPS_PROMPT) for p in res.previews]
    colour = next((i for i, v in enumerate(verdicts) if v["color"]), -1)
    everything = next((i for i, v in enumerate(verdicts) if v["all"]), -1)
    return colour, everything


def check_first_steps(colour_step: int, shape_step: int) -> Verdict:
    """Exercise 2.2: "a green triangle", seed 0, 20 Euler steps, guidance 7.5. After which step (0 is the
    first) does the x0 prediction, decoded, first show the right colour, and after which the right colour
    and shape (the judge's "all")? Answer with the two step indices."""
    colour, everything = _first_steps_truth()
    notes = []
    for name, got, want in (("colour", colour_step, colour), ("colour and shape", shape_step, everything)):
        if not isinstance(got, int) or isinstance(got, bool):
            notes.append(f"{name}: answer with a step index (an int), not {got!r}")
        elif got != want:
            notes.append(f"{name}: step {got} is too {'early' if got < want else 'late'}")
    if notes:
        return _verdict("2.2", False, "; ".join(notes))
    return _verdict("2.2", True, f"the colour is there after step {colour}, colour and shape after step {everything}")


FEW_STEPS_PROMPTS = ["a blue square in the top left", "a small purple triangle",
                     "a yellow circle on a black background", "a green square in the bottom right"]


def grade_few_steps(scheduler: str, guidance: float) -> Verdict:
    """Exercise 2.3: with only 4 steps, pick the sampler and the guidance so that the judge finds
    everything asked in at least 6 of 8 pictures (the four FEW_STEPS_PROMPTS, seeds 0-7)."""
    pipe = shipped_pipeline()
    prompts = FEW_STEPS_PROMPTS * 2
    pictures = pipe(prompts, steps=4, scheduler=scheduler, guidance=guidance, seed=0, progress=False)
    right = sum(bool(judge.score(im, p)["all"]) for im, p in zip(pictures, prompts))
    return _verdict("2.3", right >= 6, f"{scheduler} at guidance {guidance:g}, 4 steps: the judge finds everything "
                                       f"asked in {right} of {len(prompts)} pictures (goal: 6)")


# ---- chapter 3: the UNet --------------------------------------------------------------------------

def _unet_configs():
    from ldm.unet import UNetConfig

    return {"SD 1.x": UNetConfig(), "the shipped model": shipped_pipeline().unet.cfg, "UNetConfig.tiny()": UNetConfig.tiny()}


def check_skip_channels(in_channels) -> Verdict:
    """Exercise 3.1: `in_channels(cfg) -> list[int]`, the channels each output block's first ResBlock
    takes in (the running map plus one skip), from the UNetConfig alone. Checked against the models that
    SD 1.x's config, the shipped model's and UNetConfig.tiny() build."""
    for name, cfg in _unet_configs().items():
        model = meta_unet(cfg)
        want = [block[0].in_layers[0].num_channels for block in model.output_blocks]
        got = in_channels(cfg)
        if list(got) != want:
            return _verdict("3.1", False, f"{name}: {list(got)}, the model has {want}")
    return _verdict("3.1", True, "right for SD 1.x, the shipped model and the tiny config")


def check_timestep_embedding(embed) -> Verdict:
    """Exercise 3.2: `embed(t, dim) -> (len(t), dim)`, the sinusoidal timestep embedding (cosines first,
    frequencies 10000^(-i / (dim/2))), against `ldm.unet.timestep_embedding` for SD 1.x's 320 and the
    shipped model's 64."""
    from ldm.unet import timestep_embedding

    t = torch.tensor([0, 1, 10, 250, 999])
    for dim in (320, 64):
        verdict = _compare("3.2", f"dim {dim}", embed(t, dim), timestep_embedding(t, dim), atol=1e-4)
        if not verdict:
            return verdict
    return _verdict("3.2", True, verdict.detail)


def check_text_weights(count) -> Verdict:
    """Exercise 3.3: `count(cfg) -> int`, how many weights read the text context: the to_k and to_v
    matrices of every cross-attention layer (attn2), from the UNetConfig alone. Checked against the
    models of SD 1.x's config, the shipped model's and UNetConfig.tiny()."""
    found = []
    for name, cfg in _unet_configs().items():
        model = meta_unet(cfg)
        want = sum(p.numel() for n, p in model.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n)
        got = count(cfg)
        if got != want:
            return _verdict("3.3", False, f"{name}: {got!r}, the model has {want:,}")
        found.append(f"{name} {want:,}")
    return _verdict("3.3", True, "; ".join(found))


# ---- chapter 4: the VAE ---------------------------------------------------------------------------

def check_scaling_factor(measure, n: int = 128) -> Verdict:
    """Exercise 4.1: `measure(vae, x) -> float`, the scaling factor measured on pictures x (n, 3, 64, 64)
    in [-1, 1] the way SD's was: one over the standard deviation of the encoder's latents. Checked on
    128 new scenes against the same measurement by the grader (within 1%)."""
    vae = shipped_pipeline().vae
    x = shapes.batch(n, seed=10_000)[0]
    with torch.no_grad():
        want = 1 / vae.encode(x).mean.std().item()
        got = measure(vae, x)
    try:
        got = float(got)
    except (TypeError, ValueError):
        return _verdict("4.1", False, f"measure returned {type(got).__name__}; expected a number")
    ok = math.isfinite(got) and abs(got - want) <= 0.01 * want
    return _verdict("4.1", ok, f"measured {got:.4f}; one over the latents' std on these pictures is {want:.4f} "
                               f"(the model's stored factor: {vae.cfg.scaling_factor:.4f})")


def check_downsample(down) -> Verdict:
    """Exercise 4.2: `down(x, conv) -> y`, the VAE's Downsample written with the stride-2 3x3 `conv`'s
    weights, against the shipped VAE's own first Downsample, on an even and an odd size."""
    module = shipped_pipeline().vae.encoder.down[0].downsample
    g = torch.Generator().manual_seed(0)
    for size in (16, 15):
        x = torch.randn((2, module.conv.in_channels, size, size), generator=g)
        with torch.no_grad():
            want = module(x)
            got = down(x, module.conv)
        verdict = _compare("4.2", f"a {size}x{size} input", got, want, atol=1e-5)
        if not verdict:
            return verdict
    return _verdict("4.2", True, verdict.detail)


# ---- chapter 5: the pipeline ----------------------------------------------------------------------

def grade_negative_prompt(negative_prompt: str, guidance: float = 7.5, seeds=range(8)) -> Verdict:
    """Exercise 5.1: "a red shape" leaves the shape open, and the shipped model mostly paints squares and
    circles for it. With the prompt fixed, choose a negative prompt (that does not name the triangle) and
    a guidance so that the largest shape the judge reads is a triangle on at least 6 of the 8 seeds."""
    if not isinstance(negative_prompt, str) or "triangle" in negative_prompt.lower():
        return _verdict("5.1", False, f"negative_prompt={negative_prompt!r}: the goal is a string that does not "
                                      f"name the triangle")
    pipe = shipped_pipeline()
    seeds = list(seeds)
    pictures = pipe(["a red shape"] * len(seeds), seed=seeds, negative_prompt=negative_prompt, guidance=guidance,
                    progress=False)
    largest = [found[0].shape if (found := judge.read(im)) else "nothing" for im in pictures]
    right = largest.count("triangle")
    need = math.ceil(0.75 * len(seeds))
    return _verdict("5.1", right >= need, f"negative {negative_prompt!r} at guidance {guidance:g}: the largest shape "
                                          f"is a triangle in {right} of {len(seeds)} pictures (goal: {need}); "
                                          f"read: {', '.join(largest)}")


STRENGTH_START = shapes.Scene((shapes.Shape("circle", "red", "small", "top left", 20.0, 20.0, 10.0),), "black", None)
STRENGTH_PROMPT = "a blue circle"
STRENGTH_KEEPS = "a small blue circle in the top left on a black background"


def _strength_ok(strength: float) -> bool:
    from PIL import Image

    pipe = shipped_pipeline()
    start = Image.fromarray(shapes.render(STRENGTH_START))
    out = pipe.img2img(STRENGTH_PROMPT, start, strength=strength, steps=20, seed=1, progress=False).images[0]
    return bool(judge.score(out, STRENGTH_KEEPS)["all"])


def check_strength_range(lowest: float, highest: float) -> Verdict:
    """Exercise 5.2: img2img of a small red circle in the top left on black (STRENGTH_START) with the
    prompt "a blue circle", seed 1, 20 steps. For which strengths (multiples of 0.05) does the result keep
    the circle's size, place and background and make it blue? Answer the lowest and the highest."""
    for name, v in (("lowest", lowest), ("highest", highest)):
        if not isinstance(v, (int, float)) or not 0 < v <= 1 or abs(v * 20 - round(v * 20)) > 1e-6:
            return _verdict("5.2", False, f"{name}={v!r}: a multiple of 0.05 in (0, 1] is the answer")
    if lowest > highest:
        return _verdict("5.2", False, f"lowest {lowest} is above highest {highest}")
    notes = []
    if not _strength_ok(lowest):
        notes.append(f"at {lowest:.2f} the picture is not yet a small blue circle in the top left on black")
    elif lowest > 0.05 + 1e-9 and _strength_ok(round(lowest - 0.05, 2)):
        notes.append(f"{lowest - 0.05:.2f} works too: lowest is lower")
    if not _strength_ok(highest):
        notes.append(f"at {highest:.2f} the picture no longer keeps the small blue circle in the top left on black")
    elif highest < 1 - 1e-9 and _strength_ok(round(highest + 0.05, 2)):
        notes.append(f"{highest + 0.05:.2f} works too: highest is higher")
    if notes:
        return _verdict("5.2", False, "; ".join(notes))
    return _verdict("5.2", True, f"from strength {lowest:.2f} to {highest:.2f} the circle turns blue and stays "
                                 f"where it was; below, it keeps a colour of its own; above, the model redraws it")
