"""The chapters' exercises stay solvable: a reference solution of each passes its grader, a wrong answer fails.

The graders live in ldm/exercises/; each notebook calls them on a learner's attempt (the cell tagged
`"ldm": {"exercise": "N.k"}`). The reference solutions are here, out of the learners' sight, and go
through exactly the function the notebook calls. `test_every_exercise_has_a_cell_and_a_solution` keeps
the three lists (chapters, notebooks, solutions) in step.
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm import exercises

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


# ---- reference solutions ------------------------------------------------------------------------

def context_by_hand(parts, ids):
    tm = parts.text_model
    positions = torch.arange(ids.shape[1])
    x = tm.embeddings.token_embedding.weight[ids] + tm.embeddings.position_embedding.weight[positions]
    for layer in tm.encoder.layers:
        x = layer(x)
    return tm.final_layer_norm(x)


def swap_the_colour_word(red, blue):
    red[2] = blue[2]  # position 2 holds "red" / "blue" (0 is BOS, 1 is "a")
    return red


def ddim_step(x, eps, x0_pred, ab_t, ab_prev):
    return ab_prev ** 0.5 * x0_pred + (1 - ab_prev) ** 0.5 * eps


def first_steps():
    pipe = exercises.shipped_pipeline()
    res = pipe.generate(exercises.FIRST_STEPS_PROMPT, steps=20, scheduler="euler", guidance=7.5, seed=0,
                        previews="vae", progress=False)
    from ldm import judge
    scores = [judge.score(p[0], exercises.FIRST_STEPS_PROMPT) for p in res.previews]
    return (next(i for i, s in enumerate(scores) if s["color"]), next(i for i, s in enumerate(scores) if s["all"]))


def skip_channels(cfg):
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    skips = [cfg.model_channels]  # input block 0: the first conv
    for level, width in enumerate(widths):
        skips += [width] * cfg.num_res_blocks
        if level < len(widths) - 1:
            skips.append(width)  # the Downsample keeps the width
    out, h = [], widths[-1]  # the middle block's width
    for level, width in reversed(list(enumerate(widths))):
        for _ in range(cfg.num_res_blocks + 1):
            out.append(h + skips.pop())
            h = width
    return out


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def text_weights(cfg):
    total = 0
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    for level, width in enumerate(widths):
        if 2 ** level in cfg.attention_resolutions:  # a SpatialTransformer in every block of this level
            layers = cfg.num_res_blocks + (cfg.num_res_blocks + 1)  # input blocks, output blocks
            depth = cfg.transformer_depth if isinstance(cfg.transformer_depth, int) else cfg.transformer_depth[level]
            total += layers * depth * 2 * cfg.context_dim * width
    depth = cfg.transformer_depth if isinstance(cfg.transformer_depth, int) else cfg.transformer_depth[-1]
    total += depth * 2 * cfg.context_dim * widths[-1]  # the middle block
    return total


def scaling_factor(vae, x):
    with torch.no_grad():
        return 1 / vae.encode(x).mean.std().item()


def downsample(x, conv):
    return F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)


def online_softmax(s, v, tile):
    m = torch.tensor(float("-inf"), dtype=s.dtype)
    l, a = torch.zeros((), dtype=s.dtype), torch.zeros(v.shape[1], dtype=s.dtype)
    for j in range(0, len(s), tile):
        m_new = torch.maximum(m, s[j:j + tile].max())
        alpha = torch.exp(m - m_new)
        p = torch.exp(s[j:j + tile] - m_new)
        l, a, m = alpha * l + p.sum(), alpha * a + p @ v[j:j + tile], m_new
    return a / l


def head_dim_split(d):
    d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d0
    return (d0, 0) if rest <= 0 else (d0, max(16, 1 << (rest - 1).bit_length()))


def lr(step, base, warmup, min_lr_frac, total):
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema(ema_params, params, decay, step):
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema_params, params):
        e.mul_(d).add_(p.detach(), alpha=1 - d)


def conv_lora_merge(W, down, up, alpha, m):
    r = down.shape[0]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(W.shape)  # (out, r) @ (r, in*3*3)
    return W + m * alpha / r * delta


def emphasis(z, weights):
    before = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[..., None]
    return z * (before / z.mean(dim=(1, 2), keepdim=True))


def v_to_x0_eps(v, x, alpha, sigma):
    return alpha * x - sigma * v, alpha * v + sigma * x


def family_rule(shapes):
    if shapes["input_blocks.0.0.weight"][1] == 9:
        return "sd1-inpaint"
    proj_in = next(shape for key, shape in shapes.items() if key.endswith("proj_in.weight"))
    return "sd2" if len(proj_in) == 2 else "sd1"


SOLUTIONS = {
    "1.1": lambda: exercises.check_context(context_by_hand),
    "1.2": lambda: exercises.grade_colour_swap(swap_the_colour_word),
    "2.1": lambda: exercises.check_ddim_step(ddim_step),
    "2.2": lambda: exercises.check_first_steps(*first_steps()),
    "2.3": lambda: exercises.grade_few_steps("dpmpp_2m", 1.5),
    "3.1": lambda: exercises.check_skip_channels(skip_channels),
    "3.2": lambda: exercises.check_timestep_embedding(timestep_embedding),
    "3.3": lambda: exercises.check_text_weights(text_weights),
    "4.1": lambda: exercises.check_scaling_factor(scaling_factor),
    "4.2": lambda: exercises.check_downsample(downsample),
    "5.1": lambda: exercises.grade_negative_prompt("square", guidance=10),
    "5.2": lambda: exercises.check_strength_range(0.2, 0.8),
    "6.1": lambda: exercises.check_online_softmax(online_softmax),
    "6.2": lambda: exercises.check_head_dim_split(head_dim_split),
    "7.1": lambda: exercises.check_lr_schedule(lr),
    "7.2": lambda: exercises.check_ema(ema),
    "8.1": lambda: exercises.check_conv_lora_merge(conv_lora_merge),
    "8.2": lambda: exercises.check_emphasis(emphasis),
    "9.1": lambda: exercises.check_v_prediction(v_to_x0_eps),
    "9.2": lambda: exercises.check_family_rule(family_rule),
}


@pytest.mark.parametrize("exercise", sorted(SOLUTIONS))
def test_reference_solution_passes(exercise):
    verdict = SOLUTIONS[exercise]()
    assert verdict.exercise == exercise
    assert verdict.passed, repr(verdict)


# ---- wrong answers: each grader can say no ------------------------------------------------------

def _no_final_norm(parts, ids):
    x = parts.text_model.embeddings(ids)
    for layer in parts.text_model.encoder.layers:
        x = layer(x)
    return x


def _swap_padding(red, blue):
    red[5:] = blue[5:]
    return red


WRONG = {
    "1.1": lambda: exercises.check_context(_no_final_norm),
    "1.2": lambda: exercises.grade_colour_swap(_swap_padding),  # changes 72 positions: refused before generating
    "2.1": lambda: exercises.check_ddim_step(lambda x, eps, x0, ab_t, ab_prev: ab_prev ** 0.5 * x0),
    "2.2": lambda: exercises.check_first_steps(0, 0),
    "2.3": lambda: exercises.grade_few_steps("euler", 7.5),
    "3.1": lambda: exercises.check_skip_channels(lambda cfg: [cfg.model_channels] * 3 * len(cfg.channel_mult)),
    "3.2": lambda: exercises.check_timestep_embedding(
        lambda t, dim: torch.cat([timestep_embedding(t, dim)[:, dim // 2:], timestep_embedding(t, dim)[:, :dim // 2]], -1)),
    "3.3": lambda: exercises.check_text_weights(lambda cfg: 2 * cfg.context_dim * cfg.model_channels),
    "4.1": lambda: exercises.check_scaling_factor(lambda vae, x: 1 / x.std().item()),
    "4.2": lambda: exercises.check_downsample(lambda x, conv: F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)),
    "5.1": lambda: exercises.grade_negative_prompt("a red triangle"),
    "5.2": lambda: exercises.check_strength_range(0.05, 1.0),
    "6.1": lambda: exercises.check_online_softmax(lambda s, v, tile: (torch.exp(s) / torch.exp(s).sum()) @ v),
    "6.2": lambda: exercises.check_head_dim_split(lambda d: (max(16, 1 << (d - 1).bit_length()), 0)),
    "7.1": lambda: exercises.check_lr_schedule(lambda step, base, warmup, frac, total: base),
    "7.2": lambda: exercises.check_ema(lambda e, p, decay, step: [x.lerp_(y, 1 - decay) for x, y in zip(e, p)]),
    "8.1": lambda: exercises.check_conv_lora_merge(lambda W, down, up, alpha, m: W + m * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)),
    "8.2": lambda: exercises.check_emphasis(lambda z, w: z * w[..., None]),
    "9.1": lambda: exercises.check_v_prediction(lambda v, x, alpha, sigma: ((x - sigma * v) / alpha, v)),
    "9.2": lambda: exercises.check_family_rule(lambda shapes: "sd1"),
}


@pytest.mark.parametrize("exercise", sorted(WRONG))
def test_wrong_answer_fails(exercise):
    verdict = WRONG[exercise]()
    assert verdict.exercise == exercise
    assert not verdict.passed, repr(verdict)
    assert "not yet" in repr(verdict)


# ---- the chapters, the notebooks and this file agree ----------------------------------------------

def _exercise_cells():
    found = {}
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            number = cell.get("metadata", {}).get("ldm", {}).get("exercise")
            if number:
                found[number] = (path, "".join(cell["source"]))
    return found


def test_every_exercise_has_a_cell_and_a_solution():
    cells = _exercise_cells()
    assert sorted(cells) == sorted(SOLUTIONS) == sorted(WRONG)
    for number, (path, source) in cells.items():
        assert path.name[:2].lstrip("0") == number.split(".")[0], f"exercise {number} is in {path.name}"
        assert re.search(r"exercises\.(check|grade)_\w+\(", source), f"exercise {number}'s cell calls no grader"
    for chapter in sorted((ROOT / "docs").glob("[0-9][0-9]-*.md")):
        n = chapter.name[:2].lstrip("0")
        text = chapter.read_text(encoding="utf-8")
        assert "\n## Exercises\n" in text, f"{chapter.name} has no Exercises section"
        mine = sorted(k for k in cells if k.split(".")[0] == n)
        assert 2 <= len(mine) <= 3, f"chapter {n} has {len(mine)} exercises"
        for number in mine:
            assert f"**{number}**" in text, f"{chapter.name} does not state exercise {number}"
