"""Did the LoRA of ldm.finetune teach the shipped model its new colour, and leave the old ones alone?

    python benchmarks/bench_finetune.py                            # fine-tunes into a temp dir first (~5 min)
    python benchmarks/bench_finetune.py --lora runs/orange.safetensors [--seeds 16] [--control-seeds 3]
    python benchmarks/bench_finetune.py --steps 300 --rank 4       # options it does not know go to ldm.finetune

Every image is made at the default settings (the model's 64x64, 25 Euler steps, guidance 7.5) and
read by the judge (ldm.judge) with the new colour in its palette (extra_colors), so an image of the
new colour is named as such, and an old colour turned into it would be caught. Rows:

1. "an orange circle / square / triangle", --seeds seeds each (48 images by default), without and
   with the LoRA (weight 1, merged): the fraction judged the new colour, the right shape, both (an
   orange circle is there), and exactly one shape; and what colour the largest shape was painted.
2. control: "a red circle", ... every (colour, shape) pair of the world but its held-out ones,
   --control-seeds seeds each, without and with the LoRA: the same fractions, the colour+shape pair
   compared image by image (McNemar: b = right only without the LoRA, c = right only with it;
   z = (b - c) / sqrt(b + c), z >= 2 would say the LoRA broke old colours beyond chance).

Same prompts and seeds in both columns. It prints the table and writes results.json and grid.png
(row pairs: the new-colour images without, then with the LoRA) to --out. Exit status 0 either way.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ldm  # noqa: E402
from ldm import checkpoint, finetune, judge, shapes  # noqa: E402
from ldm.recipe import grid  # noqa: E402


def generate(pipe, prompts: list[str], seeds: list[int], batch: int) -> list:
    """One image per (prompt, seed) at the default settings, `batch` per pipeline call."""
    images = []
    for i in range(0, len(prompts), batch):
        images += pipe.generate(prompts[i:i + batch], seed=seeds[i:i + batch], progress=False).images
    return images


def scores(images, prompts, extra: dict) -> dict:
    """Per image, the judge's verdicts and the colour of the largest shape ('none': nothing found)."""
    s = [judge.score(im, p, extra) for im, p in zip(images, prompts)]
    painted = [(judge.read(im, extra) or [None])[0] for im in images]
    return {"color": [x["color"] for x in s], "shape": [x["shape"] for x in s],
            "color+shape": [x["shapes_present"] for x in s], "one shape": [x["count"] for x in s],
            "painted": [d.color if d else "none" for d in painted]}


def frac(values) -> float:
    return sum(map(bool, values)) / len(values)


def paired_z(base: list[bool], other: list[bool]) -> tuple[float, int, int]:
    """McNemar: b = right in base only, c = right in other only; z = (b - c) / sqrt(b + c)."""
    b = sum(bool(x) and not y for x, y in zip(base, other))
    c = sum(bool(y) and not x for x, y in zip(base, other))
    return ((b - c) / math.sqrt(b + c) if b + c else 0.0), b, c


def painted_text(colours: list[str], top: int = 3) -> str:
    return ", ".join(f"{c} {n / len(colours):.0%}" for c, n in Counter(colours).most_common(top))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora", default=None, help="a LoRA from ldm.finetune (default: run the fine-tune first)")
    p.add_argument("--checkpoint", default=None, help="base model (default: ldm's shipped model)")
    p.add_argument("--seeds", type=int, default=16, help="seeds per new-colour prompt (3 prompts)")
    p.add_argument("--control-seeds", type=int, default=3, help="seeds per control prompt (15 prompts)")
    p.add_argument("--batch", type=int, default=16, help="images per pipeline call")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="outputs/bench_finetune")
    args, finetune_args = p.parse_known_args()
    torch.set_num_threads(args.threads)
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    pipe = ldm.load(args.checkpoint or ldm.weights.SHIPPED, device="cpu", dtype=torch.float32)
    tmp = None
    ft_result = None
    if args.lora is None:  # fine-tune now, into a temporary folder (the networks come back unchanged)
        tmp = tempfile.TemporaryDirectory()
        argv = ["--out", str(Path(tmp.name) / "lora.safetensors"), "--threads", str(args.threads), *finetune_args]
        ft_result = finetune.main(argv, pipe=pipe)
        args.lora = ft_result["out"]
    elif finetune_args:
        p.error(f"unknown options {finetune_args} (options for ldm.finetune need no --lora)")
    meta = json.loads(checkpoint.safetensors_metadata(Path(args.lora)).get("ldm.finetune", "{}"))
    cfg = meta.get("config", {})
    color, rgb = cfg.get("color", "orange"), tuple(cfg.get("rgb", (255, 128, 0)))
    extra = {color: rgb}

    new_prompts = [finetune.article(f"a {color} {s}") for s in shapes.SHAPES for _ in range(args.seeds)]
    control = [f"a {c} {s}" for c in shapes.COLORS for s in shapes.SHAPES if (c, s) not in shapes.HELD_OUT]
    control_prompts = [q for q in control for _ in range(args.control_seeds)]
    prompts = new_prompts + control_prompts
    seeds = list(range(len(prompts)))

    t0 = time.time()
    images = {"base": generate(pipe, prompts, seeds, args.batch)}
    pipe.load_lora(args.lora, 1.0)
    images["lora"] = generate(pipe, prompts, seeds, args.batch)
    pipe.unload_loras()
    gen_minutes = (time.time() - t0) / 60
    n = len(new_prompts)
    res = {k: {"new": scores(v[:n], new_prompts, extra), "control": scores(v[n:], control_prompts, extra)}
           for k, v in images.items()}

    print(f"\nbase {pipe.name}, LoRA {args.lora} ({color} = RGB {rgb}); 25 Euler steps, guidance 7.5; "
          f"{len(prompts)} prompts x 2 generated in {gen_minutes:.1f} min")
    if ft_result:
        print(f"fine-tune: {ft_result['minutes']:.1f} min wall, {ft_result['cpu_minutes']:.1f} min CPU; "
              f"eps loss on the {color} scenes {ft_result['loss_before']['new']:.4f} -> "
              f"{ft_result['loss_after']['new']:.4f}, on world scenes {ft_result['loss_before']['world']:.4f} -> "
              f"{ft_result['loss_after']['world']:.4f}")
    cols = ("color", "shape", "color+shape", "one shape")
    head = f"{'prompts':<28} {'LoRA':<5} {'n':>4} " + " ".join(f"{c:>11}" for c in cols)
    head += "  painted as (largest shape)"
    print(head)
    print("-" * len(head))
    rows = []
    per_shape = [(new_prompts[i * args.seeds], "new", slice(i * args.seeds, (i + 1) * args.seeds))
                 for i in range(len(shapes.SHAPES))]
    for label, part, sl in [*per_shape, (f"all {color}", "new", slice(None)),
                            (f"control ({len(control)} old pairs)", "control", slice(None))]:
        for which in ("base", "lora"):
            r = res[which][part]
            vals = {c: frac(r[c][sl]) for c in cols}
            n_rows = len(r["color"][sl])
            print(f"{label:<28} {'with' if which == 'lora' else 'no':<5} {n_rows:>4} "
                  + " ".join(f"{100 * vals[c]:>10.1f}%" for c in cols) + "  " + painted_text(r["painted"][sl]))
            rows.append({"prompts": label, "lora": which == "lora", "n": n_rows, **vals,
                         "painted": dict(Counter(r["painted"][sl]))})
    z, b, c = paired_z(res["base"]["control"]["color+shape"], res["lora"]["control"]["color+shape"])
    print(f"\ncontrol colour+shape, paired: right only without the LoRA {b}, only with it {c}, z = {z:.2f} "
          f"({'the LoRA hurts old colours' if z >= 2 else 'no harm beyond chance'})")
    per_colour = {}
    for col in shapes.COLORS:
        idx = [i for i, q in enumerate(control_prompts) if q.split()[1] == col]
        per_colour[col] = [frac([res[w]["control"]["color+shape"][i] for i in idx]) for w in ("base", "lora")]
    print("control colour+shape per colour (no LoRA -> with): "
          + ", ".join(f"{k} {100 * a:.0f}% -> {100 * b_:.0f}%" for k, (a, b_) in per_colour.items()))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sheet = []
    for s in range(len(shapes.SHAPES)):  # per shape: a row without, a row with the LoRA (first 8 seeds)
        sl = slice(s * args.seeds, s * args.seeds + min(8, args.seeds))
        sheet += images["base"][sl] + images["lora"][sl]
    grid(sheet, cols=min(8, args.seeds)).save(out / "grid.png")
    (out / "results.json").write_text(json.dumps({
        "lora": str(args.lora), "color": color, "rgb": rgb, "base": pipe.name, "rows": rows,
        "control_paired": {"z": z, "b": b, "c": c}, "control_per_colour": per_colour,
        "generation_minutes": gen_minutes, "finetune": ft_result and {k: v for k, v in ft_result.items()}},
        indent=1, default=str))
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
