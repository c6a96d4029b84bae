"""The graders of chapters 6-9: flash attention, training, adapting, families (see ldm.exercises)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from ldm.exercises.common import Verdict, _compare, _verdict, meta_unet, shipped_pipeline
from ldm.schedule import Schedule


# ---- chapter 6: flash attention -------------------------------------------------------------------

def check_online_softmax(attend) -> Verdict:
    """Exercise 6.1: `attend(s, v, tile) -> o`, softmax(s) @ v for one query row, s (M,) and v (M, d),
    computed one tile of `tile` keys at a time with a running max, normaliser and accumulator. Checked in
    float64 against torch.softmax(s) @ v, on scores up to 1000 (where exp overflows) and a ragged last tile."""
    g = torch.Generator().manual_seed(0)
    cases = [("scores of size ~3", torch.randn(48, generator=g, dtype=torch.float64) * 3, 8),
             ("scores near 1000", torch.randn(50, generator=g, dtype=torch.float64) * 20 + 1000, 16),
             ("a rising row, 77 keys", torch.linspace(-5, 40, 77, dtype=torch.float64), 32)]
    for name, s, tile in cases:
        v = torch.randn((len(s), 4), generator=g, dtype=torch.float64)
        want = torch.softmax(s, dim=0) @ v
        verdict = _compare("6.1", f"{name}, tiles of {tile}", attend(s.clone(), v.clone(), tile), want, atol=1e-10)
        if not verdict:
            return verdict
    return _verdict("6.1", True, "equal to softmax(s) @ v on all three rows, the overflowing one included")


def check_head_dim_split(split) -> Verdict:
    """Exercise 6.2: `split(d) -> (D0, D1)`, the "split" head-dim tiles: the largest power of two <= d
    (at least 16) plus a remainder tile, a power of two of at least 16, that covers the rest (0 when
    nothing is left). Checked against the kernel's `head_dim_chunks(d, "split")` for d = 1 .. 256."""
    try:
        from ldm_kernels.flash_attention import head_dim_chunks
    except ImportError as err:  # the kernel needs triton
        return _verdict("6.2", False, f"the kernel's module does not import here ({err}); install triton")
    for d in range(1, 257):
        want = head_dim_chunks(d, "split")
        got = split(d)
        if tuple(got) != tuple(want):
            return _verdict("6.2", False, f"d = {d}: {tuple(got)}, the kernel uses {tuple(want)}")
    return _verdict("6.2", True, "equal to the kernel's tiles for every head dim from 1 to 256")


# ---- chapter 7: training --------------------------------------------------------------------------

def check_lr_schedule(lr) -> Verdict:
    """Exercise 7.1: `lr(step, base, warmup, min_lr_frac, total) -> float`, linear warmup over `warmup`
    steps, then cosine decay to min_lr_frac * base at `total`, against `ldm.recipe.lr_at` at every step of
    the shipped recipe's stage 2 and of a short run."""
    from ldm import recipe

    for base, warmup, frac, total in ((1e-3, 100, 0.1, 4400), (2e-3, 10, 0.0, 60)):
        cfg = SimpleNamespace(warmup=warmup, min_lr_frac=frac)
        for step in range(total + 1):
            want = recipe.lr_at(step, base, cfg, total)
            got = lr(step, base, warmup, frac, total)
            if not isinstance(got, (int, float)) or abs(got - want) > 1e-12 + 1e-9 * abs(want):
                return _verdict("7.1", False, f"warmup {warmup}, total {total}: step {step} gives {got!r}, "
                                              f"lr_at gives {want:.6g}")
    return _verdict("7.1", True, "equal to lr_at at every step of both schedules")


def check_ema(update) -> Verdict:
    """Exercise 7.2: `update(ema_params, params, decay, step)`, the exponential moving average with its
    warm-up, in place: e <- d e + (1 - d) p with d = min(decay, (1 + step) / (10 + step)). Followed over
    40 optimiser steps against `ldm.recipe.ema_update` on the same parameters."""
    from ldm import recipe

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(8, 8)
    ours, theirs = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for step in range(40):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
            recipe.ema_update(theirs, model, 0.999, step)
            update(list(ours.parameters()), list(model.parameters()), 0.999, step)
    worst = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters()))
    return _verdict("7.2", worst <= 1e-5, f"after 40 steps the averages differ by at most {worst:.3g} (allowed 1e-5)")


# ---- chapter 8: adapting --------------------------------------------------------------------------

CONV_LORA_MODULE = "input_blocks.1.0.in_layers.2"  # a ResBlock's first 3x3 convolution in the shipped UNet


def check_conv_lora_merge(merge, weight: float = 0.8) -> Verdict:
    """Exercise 8.1: `merge(W, down, up, alpha, m) -> W'`, a LoCon LoRA merged into a 3x3 convolution:
    W (out, in, 3, 3), down (r, in, 3, 3), up (out, r, 1, 1). Checked against the weight that
    `pipe.load_lora(file, m)` leaves in the shipped UNet's CONV_LORA_MODULE for a random rank-4 file."""
    from safetensors.torch import save_file

    import ldm
    from ldm import weights

    pipe = ldm.load(weights.SHIPPED, device="cpu", dtype=torch.float32)  # its own copy: the merge edits it
    conv = pipe.unet.get_submodule(CONV_LORA_MODULE)
    out_ch, in_ch = conv.weight.shape[:2]
    g = torch.Generator().manual_seed(0)
    rank, alpha = 4, 2.0
    down = torch.randn((rank, in_ch, 3, 3), generator=g) * 0.1
    up = torch.randn((out_ch, rank, 1, 1), generator=g) * 0.1
    key = "lora_unet_" + CONV_LORA_MODULE.replace(".", "_")
    W = conv.weight.detach().clone()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conv-lora.safetensors"
        save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                   f"{key}.alpha": torch.tensor(alpha)}, str(path))
        pipe.load_lora(path, weight)
        want = conv.weight.detach().clone()
    got = merge(W, down.clone(), up.clone(), alpha, weight)
    return _compare("8.1", f"the merged {CONV_LORA_MODULE}.weight", got, want, atol=1e-5)


def check_emphasis(apply) -> Verdict:
    """Exercise 8.2: `apply(z, weights) -> z'`, A1111's "Original" emphasis on chunks z (N, 77, C) with
    per-token weights (N, 77): scale each token's vector by its weight, then rescale each chunk so its
    mean is what it was. Checked against `ldm.prompt.apply_weights` on the shipped text encoder's
    chunks of a weighted prompt."""
    from ldm import prompt as prompt_syntax

    pipe = shipped_pipeline()
    ids, weights = prompt_syntax.tokenize(["a (red:1.4) circle above a [blue] square", "a ((green)) triangle"],
                                          pipe.tokenizer)  # (B, n, 77) each
    with torch.no_grad():
        z = pipe.text_encoder(ids.flatten(0, 1))  # (B n, 77, C)
    w = weights.flatten(0, 1).float()
    want = prompt_syntax.apply_weights(z, w)
    return _compare("8.2", "the weighted chunks", apply(z.clone(), w.clone()), want, atol=1e-5)


# ---- chapter 9: families --------------------------------------------------------------------------

def check_v_prediction(convert) -> Verdict:
    """Exercise 9.1: `convert(v, x_t, alpha, sigma) -> (x0, eps)` for a v-prediction model, with
    x_t = alpha x0 + sigma eps and v = alpha eps - sigma x0, against
    `ldm.samplers.common.predict_x0_eps(..., "v_prediction")` at five timesteps."""
    from ldm.samplers.common import predict_x0_eps

    sched = Schedule.sd1()
    g = torch.Generator().manual_seed(0)
    for t in (0, 250, 500, 750, 999):
        alpha, sigma = sched.alpha_bar[t].sqrt(), (1 - sched.alpha_bar[t]).sqrt()
        x, v = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
        want = predict_x0_eps(v, x, "v_prediction", alpha=alpha, sigma=sigma)
        got = convert(v.clone(), x.clone(), alpha, sigma)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return _verdict("9.1", False, f"convert returned {type(got).__name__}; expected the pair (x0, eps)")
        for name, a, b in (("x0", got[0], want[0]), ("eps", got[1], want[1])):
            verdict = _compare("9.1", f"{name} at t = {t}", a, b, atol=1e-5)
            if not verdict:
                return verdict
    return _verdict("9.1", True, "x0 and eps equal the library's at t = 0, 250, 500, 750 and 999")


FAMILY_RULE_NAMES = ("sd1", "sd1-inpaint", "sd2")


def check_family_rule(rule) -> Verdict:
    """Exercise 9.2: `rule(shapes) -> family name`, from a UNet's {key: shape} alone: "sd1", "sd1-inpaint"
    or "sd2". Checked on the full-size UNets of the three families' configs (built on the meta device,
    nothing allocated) and on the shipped model's UNet, an SD 1.x-shaped model 64 channels wide."""
    from ldm import families

    cases = [(name, families.get(name).configs["unet"]) for name in FAMILY_RULE_NAMES]
    cases.append(("sd1", shipped_pipeline().unet.cfg))
    for want, cfg in cases:
        shapes_ = {k: tuple(t.shape) for k, t in meta_unet(cfg).state_dict().items()}
        got = rule(shapes_)
        if got != want:
            width = cfg.model_channels
            return _verdict("9.2", False, f"a UNet of family {want} ({width} channels wide) was called {got!r}")
    return _verdict("9.2", True, "sd1, sd1-inpaint and sd2 told apart, and the shipped model read as sd1")
