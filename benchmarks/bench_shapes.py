"""How good the shipped shapes model is: its generations scored by the judge (ldm.judge), one table.

    python benchmarks/bench_shapes.py [--checkpoint PATH] [--n-one 200] [--n-two 100] [--seed 0] [--quick]
                                      [--batch 20] [--guidance-compare 1,3] [--out outputs/bench_shapes]

Every prompt comes from the world's grammar (ldm.shapes) and gets its own seed, so a run is
repeatable; all rows use the default settings (the model's 64x64, 25 Euler steps, guidance 7.5)
unless the row says otherwise. Rows, with the bars of the issue that asked for them:

1. one-shape prompts: captions of one-shape scenes that name a colour and a shape. Fractions with
   the colour right, the shape right, both (bar >= 90%), exactly one shape, and size / place /
   background right where the prompt names them.
2. two-shape prompts that name both colours: both shapes present with their colours (bar >= 70%),
   exactly two shapes, relation right where named.
3. guidance: rows 1 and 2 again at guidance 1 (no guidance; add 3 with --guidance-compare 1,3),
   same prompts and seeds. The bar: the default beats guidance 1 by a paired sign test (McNemar),
   z = (b - c) / sqrt(b + c) >= 2, with b the images right only at the default and c those right
   only at guidance 1.
4. negative prompt: colour-open prompts ("a circle", ...) without and with negative_prompt "red"
   (and "blue"): the fraction of images holding a red (blue) shape; shape-open prompts ("a red
   shape", ...) without and with "circle" (and "square", "triangle"): the fraction holding that
   shape. Same seeds, so the drop is paired: bar z >= 2 over the five pairs of sets together.
5. held-out colour/shape pairs (shapes.HELD_OUT, never in training): fraction right, no bar.
6. VAE: PSNR (dB, pixels in [0, 1]) of decode(encode(x).mode()) on world images with a seed that
   training never drew, and on held-out-pair images: 10 log10(1 / MSE) with the MSE over all
   images (bar >= 30 dB each), and the worst single image.
7. speed: seconds per image at the default settings, batch 1 (median of 5 runs after a warm-up;
   bar <= 1 s) and batch 8, with the torch threads the machine gives. Other processes on the machine
   slow it: the load average and the CPU seconds per image (all threads) are printed beside it.

It prints the settings, the table and PASS/FAIL per bar, and writes results.json and grid.png (the
first 32 one-shape generations under their prompts) to --out. --quick runs a smaller version (about
a fifth of the images) to try the script; its numbers are noisier. Exit status 0 either way.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ldm  # noqa: E402
from ldm import judge, shapes  # noqa: E402
from ldm.recipe import psnr  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / "ldm" / "data" / "ldm-shapes.safetensors"
BARS = {"one": 0.90, "two": 0.70, "z": 2.0, "psnr": 30.0, "speed": 1.0}


# --- prompts --------------------------------------------------------------------------------


def grammar_prompts(n: int, num_shapes: int, seed: int) -> list[str]:
    """n captions of random num_shapes scenes (never a held-out pair) that name every shape's colour;
    one-shape captions must also name the shape word, so "colour and shape right" means something."""
    rng = np.random.default_rng([seed, num_shapes])
    out = []
    while len(out) < n:
        text = shapes.caption(shapes.random_scene(rng, num_shapes=num_shapes), rng)
        specs = shapes.parse(text).shapes
        if all(s.color is not None for s in specs) and (num_shapes == 2 or specs[0].shape is not None):
            out.append(text)
    return out


# --- generation and scoring -----------------------------------------------------------------


def generate(pipe, prompts: list[str], seeds: list[int], batch: int, negative: str = "", **kw) -> list[Image.Image]:
    """One image per (prompt, seed), `batch` prompts per pipeline call (image i gets seeds[i])."""
    images = []
    for i in range(0, len(prompts), batch):
        images += pipe.generate(prompts[i:i + batch], seed=seeds[i:i + batch], negative_prompt=negative,
                                progress=False, **kw).images
    return images


def frac(values) -> tuple[float, int]:
    """(fraction True, n) over the values that are not None (None: the prompt did not ask)."""
    asked = [bool(v) for v in values if v is not None]
    return (sum(asked) / len(asked) if asked else float("nan")), len(asked)


def paired_z(base: list[bool], other: list[bool]) -> tuple[float, int, int]:
    """McNemar's sign test on paired outcomes: b = right in base only, c = right in other only,
    z = (b - c) / sqrt(b + c) (0 when no pair differs). z >= 2: base is better beyond chance."""
    b = sum(x and not y for x, y in zip(base, other))
    c = sum(y and not x for x, y in zip(base, other))
    return ((b - c) / math.sqrt(b + c) if b + c else 0.0), b, c


def one_shape_scores(images, prompts) -> dict:
    s = [judge.score(im, p) for im, p in zip(images, prompts)]
    both = [x["color"] and x["shape"] for x in s]
    return {"color": frac(x["color"] for x in s), "shape": frac(x["shape"] for x in s),
            "color+shape": frac(both), "count": frac(x["count"] for x in s),
            "size": frac(x["size"] for x in s), "position": frac(x["position"] for x in s),
            "background": frac(x["background"] for x in s), "_right": both}


def two_shape_scores(images, prompts) -> dict:
    s = [judge.score(im, p) for im, p in zip(images, prompts)]
    present = [x["shapes_present"] for x in s]
    return {"both present": frac(present), "count": frac(x["count"] for x in s),
            "relation": frac(x["relation"] for x in s), "_right": present}


def holds(images, *, color: str | None = None, shape: str | None = None) -> list[bool]:
    """Per image: does the judge find a shape of this colour (or this shape)?"""
    return [any((color is None or d.color == color) and (shape is None or d.shape == shape) for d in judge.read(im))
            for im in images]


# --- the VAE and the clock ------------------------------------------------------------------


@torch.no_grad()
def vae_psnr(pipe, n: int, seed: int, held_out: bool) -> dict:
    x, _, _ = shapes.batch(n, seed=seed, held_out=held_out)
    per_image = []
    sq = 0.0
    for chunk in x.split(50):
        chunk = chunk.to(pipe.device, pipe.vae_dtype)
        y = pipe.vae.decode(pipe.vae.encode(chunk).mode()).float().cpu()
        chunk = chunk.float().cpu()
        per_image.append(psnr(y, chunk))
        sq += float(((y.clamp(-1, 1) - chunk.clamp(-1, 1)) / 2).pow(2).sum())
    per_image = torch.cat(per_image)
    mse = sq / x.numel()
    return {"psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "worst": float(per_image.min()), "n": n}


def seconds_per_image(pipe, batch: int, runs: int) -> tuple[float, float]:
    """(wall-clock, CPU) seconds per image at the default settings: medians over `runs` generations.
    CPU time sums this process's threads; on a busy machine wall time grows, CPU time much less."""
    prompts = ["a red circle above a blue square"] * batch
    pipe.generate(prompts, seed=0, progress=False)  # warm-up
    wall, cpu = [], []
    for r in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        pipe.generate(prompts, seed=r, progress=False)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall) / batch, statistics.median(cpu) / batch


# --- output ---------------------------------------------------------------------------------


def save_grid(images, prompts, path: Path, cols: int = 8, scale: int = 2) -> None:
    """Images scaled up `scale` times, each over its prompt (wrapped to three lines)."""
    w, cols = images[0].width * scale, min(cols, len(images))
    label = 3 * 11 + 2
    sheet = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * (w + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, text) in enumerate(zip(images, prompts)):
        x, y = (i % cols) * w, (i // cols) * (w + label)
        sheet.paste(im.resize((w, w), Image.NEAREST), (x, y))
        words, lines = text.split(), [""]
        for word in words:
            if len(lines[-1]) + len(word) + 1 > w // 6 and lines[-1]:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        draw.text((x + 2, y + w + 1), "\n".join(lines[:3]), fill="black", spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def pct(v: tuple[float, int]) -> str:
    f, n = v
    return "-" if n == 0 else f"{100 * f:.1f}% (n={n})"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="default: the shipped ldm/data file")
    p.add_argument("--n-one", type=int, default=200, help="one-shape prompts")
    p.add_argument("--n-two", type=int, default=100, help="two-shape prompts")
    p.add_argument("--n-neg", type=int, default=20, help="seeds per prompt in the negative-prompt sets")
    p.add_argument("--n-held", type=int, default=20, help="seeds per held-out colour/shape pair")
    p.add_argument("--n-vae", type=int, default=500, help="images per VAE set")
    p.add_argument("--guidance-compare", default="1", help="guidance scales set beside the default 7.5, e.g. 1,3")
    p.add_argument("--speed-runs", type=int, default=5, help="timed generations per batch size (median)")
    p.add_argument("--seed", type=int, default=0, help="prompts and image seeds derive from it")
    p.add_argument("--batch", type=int, default=20, help="images per pipeline call")
    p.add_argument("--quick", action="store_true", help="a fifth of the images, 3 timing runs")
    p.add_argument("--out", default="outputs/bench_shapes")
    a = p.parse_args()
    if a.quick:
        a.n_one, a.n_two, a.n_neg, a.n_held = min(a.n_one, 40), min(a.n_two, 20), min(a.n_neg, 6), min(a.n_held, 6)
        a.n_vae, a.guidance_compare, a.speed_runs = min(a.n_vae, 100), "1", min(a.speed_runs, 3)
    for name in ("n_one", "n_two", "n_neg", "n_held", "n_vae", "batch", "speed_runs"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(a, name)}: must be >= 1")
    try:
        compare = [float(g) for g in a.guidance_compare.split(",") if g.strip()]
    except ValueError:
        raise SystemExit(f"--guidance-compare={a.guidance_compare!r}: expected numbers separated by commas, e.g. 1,3")
    if 1.0 not in compare:
        raise SystemExit(f"--guidance-compare={a.guidance_compare!r} must include 1 (the guidance bar compares with it)")
    path = Path(a.checkpoint)
    if not path.is_file():
        raise SystemExit(f"--checkpoint {path}: no such file; train the model (`ldm train`) or pass a checkpoint")
    out = Path(a.out)
    t_start = time.perf_counter()
    pipe = ldm.load(path)
    default_guidance = 7.5
    settings = (f"checkpoint {path} ({path.stat().st_size / 1e6:.1f} MB), {pipe.default_size}x{pipe.default_size}, "
                f"25 euler steps, guidance {default_guidance} (default), {pipe.device} {str(pipe.dtype)[6:]}, "
                f"torch {torch.__version__} with {torch.get_num_threads()} threads, seed {a.seed}, "
                f"{a.batch} images per call")
    res: dict = {"settings": settings, "args": vars(a)}

    # 1-3: grammar prompts at the default guidance and the compared ones, same seeds
    one = grammar_prompts(a.n_one, 1, a.seed)
    two = grammar_prompts(a.n_two, 2, a.seed)
    one_seeds = [a.seed * 1_000_000 + i for i in range(len(one))]
    two_seeds = [a.seed * 1_000_000 + 10_000 + i for i in range(len(two))]
    gs = list(dict.fromkeys([default_guidance] + compare))  # the default first
    one_by_g, two_by_g = {}, {}
    for g in gs:
        imgs1 = generate(pipe, one, one_seeds, a.batch, guidance=g)
        if g == default_guidance:
            save_grid(imgs1[:32], one[:32], out / "grid.png")
        one_by_g[g] = one_shape_scores(imgs1, one)
        two_by_g[g] = two_shape_scores(generate(pipe, two, two_seeds, a.batch, guidance=g), two)
    d1, d2 = one_by_g[default_guidance], two_by_g[default_guidance]
    z_g, b_g, c_g = paired_z(d1["_right"] + d2["_right"], one_by_g[1.0]["_right"] + two_by_g[1.0]["_right"])

    # 4: negative prompts, paired with the same prompts and seeds without one
    open_colour = [f"a {s}" for s in shapes.SHAPES for _ in range(a.n_neg)]
    open_shape = [f"a {c} shape" for c in ("red", "blue", "yellow") for _ in range(a.n_neg)]
    neg_seeds = [a.seed * 1_000_000 + 20_000 + i for i in range(len(open_colour))]
    plain_colour = generate(pipe, open_colour, neg_seeds, a.batch)
    plain_shape = generate(pipe, open_shape, neg_seeds, a.batch)
    negatives = []  # (what, the negative prompt, per image without it, per image with it)
    for colour in ("red", "blue"):
        with_neg = generate(pipe, open_colour, neg_seeds, a.batch, negative=colour)
        negatives.append((f"{colour} shape in 'a circle/square/triangle'", colour,
                          holds(plain_colour, color=colour), holds(with_neg, color=colour)))
    for shape in shapes.SHAPES:
        with_neg = generate(pipe, open_shape, neg_seeds, a.batch, negative=shape)
        negatives.append((f"{shape} in 'a red/blue/yellow shape'", shape,
                          holds(plain_shape, shape=shape), holds(with_neg, shape=shape)))
    z_n, b_n, c_n = paired_z(sum((without for _, _, without, _ in negatives), []),
                             sum((with_ for _, _, _, with_ in negatives), []))

    # 5: held-out colour/shape pairs
    held = []
    for i, (c, s) in enumerate(shapes.HELD_OUT):
        prompt = f"a {c} {s}"
        seeds = [a.seed * 1_000_000 + 30_000 + i * 1000 + j for j in range(a.n_held)]
        held.append((prompt, one_shape_scores(generate(pipe, [prompt] * a.n_held, seeds, a.batch), [prompt] * a.n_held)))
    held_all = frac(sum((h["_right"] for _, h in held), []))

    # 6: the VAE on images training never saw
    vae_new = vae_psnr(pipe, a.n_vae, 10**6 + a.seed, held_out=False)
    vae_held = vae_psnr(pipe, a.n_vae, 10**6 + 1 + a.seed, held_out=True)

    # 7: the clock
    runs = a.speed_runs
    load_before = os.getloadavg()[0]
    speed1, cpu1 = seconds_per_image(pipe, 1, runs)
    speed8, cpu8 = seconds_per_image(pipe, 8, runs)

    # --- the table
    print(settings)
    print()
    print("| row | measure | " + " | ".join(f"guidance {g:g}" for g in gs) + " | bar |")
    print("|---|---|" + "---|" * len(gs) + "---|")
    rows = [("1. one-shape", k) for k in ("color", "shape", "color+shape", "count", "size", "position", "background")]
    for row, k in rows:
        bar = f">= {BARS['one']:.0%}: {verdict(d1[k][0] >= BARS['one'])}" if k == "color+shape" else ""
        print(f"| {row} | {k} right | " + " | ".join(pct(one_by_g[g][k]) for g in gs) + f" | {bar} |")
    for k in ("both present", "count", "relation"):
        bar = f">= {BARS['two']:.0%}: {verdict(d2[k][0] >= BARS['two'])}" if k == "both present" else ""
        print(f"| 2. two-shape | {k} right | " + " | ".join(pct(two_by_g[g][k]) for g in gs) + f" | {bar} |")
    blank = " | ".join([""] * (len(gs) - 1))
    print(f"| 3. guidance | {default_guidance:g} vs 1: right only at {default_guidance:g} / only at 1 | "
          f"b={b_g}, c={c_g}, z={z_g:.1f} | {blank} | z >= {BARS['z']:g}: {verdict(z_g >= BARS['z'])} |")
    print()
    print("| row | measure | without negative | with negative | drop | bar |")
    print("|---|---|---|---|---|---|")
    for what, neg, without, with_ in negatives:
        fw, fn = frac(without), frac(with_)
        print(f"| 4. negative \"{neg}\" | {what} | {pct(fw)} | {pct(fn)} | {100 * (fw[0] - fn[0]):+.1f} pts | |")
    print(f"| 4. negative, all five | shown without only / with only | b={b_n}, c={c_n} | | z={z_n:.1f} | "
          f"z >= {BARS['z']:g}: {verdict(z_n >= BARS['z'])} |")
    print()
    print("| row | measure | value | bar |")
    print("|---|---|---|---|")
    for prompt, h in held:
        print(f"| 5. held-out | \"{prompt}\": color / shape / both right | {pct(h['color'])} / {pct(h['shape'])} / "
              f"{pct(h['color+shape'])} | none |")
    print(f"| 5. held-out | all pairs, color+shape right | {pct(held_all)} | none |")
    for name, v in (("world images, unseen seed", vae_new), ("held-out-pair images", vae_held)):
        print(f"| 6. VAE | PSNR on {v['n']} {name} (worst image) | {v['psnr']:.2f} dB ({v['worst']:.2f}) | "
              f">= {BARS['psnr']:g} dB: {verdict(v['psnr'] >= BARS['psnr'])} |")
    print(f"| 7. speed | s per image, batch 1, median of {runs} (load average {load_before:.1f}; CPU s "
          f"{cpu1:.3f}) | {speed1:.3f} s | <= {BARS['speed']:g} s: {verdict(speed1 <= BARS['speed'])} |")
    print(f"| 7. speed | s per image, batch 8 (CPU s {cpu8:.3f}) | {speed8:.3f} s | |")
    passes = {"one-shape color+shape": d1["color+shape"][0] >= BARS["one"],
              "two-shape both present": d2["both present"][0] >= BARS["two"],
              "guidance helps": z_g >= BARS["z"], "negative suppresses": z_n >= BARS["z"],
              "VAE PSNR unseen": vae_new["psnr"] >= BARS["psnr"], "VAE PSNR held-out": vae_held["psnr"] >= BARS["psnr"],
              "speed batch 1": speed1 <= BARS["speed"]}
    print()
    print(f"bars: {sum(passes.values())}/{len(passes)} PASS"
          + ("" if all(passes.values()) else f"; FAIL: {', '.join(k for k, v in passes.items() if not v)}")
          + f"; whole benchmark {time.perf_counter() - t_start:.0f} s")

    def plain(d):
        return {k: v for k, v in d.items() if not k.startswith("_")}

    res.update({"one_shape": {str(g): plain(one_by_g[g]) for g in gs},
                "two_shape": {str(g): plain(two_by_g[g]) for g in gs},
                "guidance_z": {"z": z_g, "b": b_g, "c": c_g},
                "negative": [{"what": w, "negative": n, "without": frac(x), "with": frac(y)} for w, n, x, y in negatives],
                "negative_z": {"z": z_n, "b": b_n, "c": c_n},
                "held_out": {pr: plain(h) for pr, h in held} | {"all": held_all},
                "vae": {"unseen": vae_new, "held_out": vae_held},
                "speed": {"batch1_s": speed1, "batch8_s_per_image": speed8, "batch1_cpu_s": cpu1,
                          "batch8_cpu_s_per_image": cpu8, "load_average": load_before},
                "passes": passes})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")


if __name__ == "__main__":
    main()
