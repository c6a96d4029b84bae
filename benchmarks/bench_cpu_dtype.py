"""The CPU's bf16 fast path (ldm.load(dtype="auto")) against fp32, measured in the same run.

    python benchmarks/bench_cpu_dtype.py                      # both parts
    python benchmarks/bench_cpu_dtype.py --only sd1 --threads 2 --repeats 3

dtype="auto" on a CPU with native bf16 (AVX512-BF16 or AMX; ldm.memory.cpu_has_native_bf16)
runs every network in bf16, the VAE included (until 2026-12-06 it kept the VAE in fp32; the
numbers in docs/05-pipeline.md are from then). Two parts:

  sd1     the full-size SD 1.x UNet (random weights, seeded) on a 512x512 image's latents with
          classifier-free guidance (batch 2, 64x64 latents, 77 context tokens), and the full CLIP
          ViT-L text encoder (batch 2): one forward each in fp32 and in bf16 (the same weights, cast),
          alternating fp32 / bf16 for --repeats rounds; the median seconds, the speed-up
          fp32 / bf16, and how far the bf16 output is from fp32's (max |diff|, relative L2).
  shipped ldm's shipped shapes model end to end (25 Euler steps, guidance 7.5, the default) on
          --prompts one-shape prompts: seconds per image, the pixel difference between the two
          images of each prompt (0-255), and the judge's colour+shape verdict for each dtype.

On a CPU without native bf16 "auto" is fp32, and the script says so (bf16 is then emulated and
slower; it still runs both, for the record).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ldm  # noqa: E402
from ldm import judge, shapes, weights  # noqa: E402
from ldm.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from ldm.memory import cpu_has_native_bf16  # noqa: E402
from ldm.unet import UNetConfig, UNetModel  # noqa: E402


def timed(fn) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def compare(name: str, fp32_fn, bf16_fn, repeats: int) -> dict:
    """Alternate fp32 / bf16 forwards (one warm-up each first); medians, speed-up and the error."""
    _, ref = timed(fp32_fn)
    _, low = timed(bf16_fn)
    t32, t16 = [], []
    for _ in range(repeats):
        t32.append(timed(fp32_fn)[0])
        t16.append(timed(bf16_fn)[0])
    ref, low = ref.float(), low.float()
    row = {"stage": name, "fp32_s": statistics.median(t32), "bf16_s": statistics.median(t16),
           "max_abs": float((low - ref).abs().max()), "rel_l2": float((low - ref).norm() / ref.norm())}
    row["speedup"] = row["fp32_s"] / row["bf16_s"]
    return row


@torch.inference_mode()
def bench_sd1(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig()).eval()  # SD 1.x, 860M parameters
    unet16 = copy.deepcopy(unet).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 77, 768, generator=g)
    rows = [compare("UNet 512x512, batch 2", lambda: unet(x, t, ctx),
                    lambda: unet16(x.bfloat16(), t, ctx.bfloat16()), repeats)]
    del unet, unet16
    te = CLIPTextModel(CLIPTextConfig()).eval()
    te16 = copy.deepcopy(te).to(torch.bfloat16)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    rows.append(compare("text encoder, batch 2", lambda: te(ids), lambda: te16(ids), repeats))
    return rows


def bench_shipped(n: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    pairs = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES if (c, s) not in shapes.HELD_OUT]
    prompts = [f"a {c} {s}" for c, s in (pairs[i] for i in rng.integers(len(pairs), size=n))]
    out = {}
    for label, dtype in (("fp32", torch.float32), ("auto", "auto")):
        pipe = ldm.load(weights.SHIPPED, device="cpu", dtype=dtype)
        pipe("a red circle", seed=0, progress=False)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            pipe("a red circle", seed=0, progress=False)
            times.append(time.perf_counter() - t)
        images = [pipe(p, seed=100 + i, progress=False)[0] for i, p in enumerate(prompts)]
        right = [bool((s := judge.score(im, p))["count"] and s["color"] and s["shape"])
                 for im, p in zip(images, prompts)]
        out[label] = {"dtype": f"unet {pipe.dtype}, vae {pipe.vae_dtype}", "s_per_image": statistics.median(times),
                      "images": images, "right": float(np.mean(right))}
    diffs = [np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
             for a, b in zip(out["fp32"]["images"], out["auto"]["images"])]
    out["max_px"] = max(int(d.max()) for d in diffs)
    out["mean_px"] = float(np.mean([d.mean() for d in diffs]))
    out["n"] = n
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("sd1", "shipped"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=24)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    native = cpu_has_native_bf16()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native}, "
          f"{torch.get_num_threads()} threads; dtype='auto' here means "
          f"{'bf16 UNet + text encoder, fp32 VAE' if native else 'fp32 (no native bf16)'}")
    if args.only in (None, "sd1"):
        print("\nfull-size SD 1.x, random weights: one forward (median of", args.repeats, "rounds)")
        print(f"{'stage':26s} {'fp32 s':>8s} {'bf16 s':>8s} {'fp32/bf16':>10s} {'max |diff|':>11s} {'rel L2':>8s}")
        for r in bench_sd1(args.repeats):
            print(f"{r['stage']:26s} {r['fp32_s']:8.3f} {r['bf16_s']:8.3f} {r['speedup']:9.2f}x "
                  f"{r['max_abs']:11.4f} {r['rel_l2']:8.4f}")
    if args.only in (None, "shipped"):
        r = bench_shipped(args.prompts, args.repeats)
        print(f"\nldm's shipped model, 64x64, 25 Euler steps, guidance 7.5, {r['n']} one-shape prompts")
        print(f"{'dtype':6s} {'networks':40s} {'s/image':>8s} {'judge right':>12s}")
        for label in ("fp32", "auto"):
            print(f"{label:6s} {r[label]['dtype']:40s} {r[label]['s_per_image']:8.3f} {r[label]['right']:11.0%}")
        print(f"speed-up fp32/auto {r['fp32']['s_per_image'] / r['auto']['s_per_image']:.2f}x; pixel difference "
              f"auto vs fp32: max {r['max_px']}, mean {r['mean_px']:.2f} (0-255)")


if __name__ == "__main__":
    main()
