"""Error versus steps for every sampler on the Gaussian-mixture toy, where the true distribution is known.

    python benchmarks/toy_samplers.py [--n 2000] [--steps 5 10 20 50]

Each sampler runs the exact denoiser of ldm.toy.ring() (no network), from the same noise, with SD 1.x's
schedule and the reference's default spacing. The error is the sliced Wasserstein-1 distance between
the samples and the true mixture (exact quantiles); the "exact samples" row is the floor that n
samples from the true distribution reach. NFE = network evaluations at 20 steps (Heun: 2N - 1, PLMS: N + 1).
"""
from __future__ import annotations

import argparse
import time

import torch

from ldm import samplers, toy

VARIANTS = [("ddim", False), ("ddpm", False), ("pndm", False), ("euler", False), ("euler", True),
            ("euler_a", False), ("heun", False), ("heun", True), ("lms", False), ("lms", True),
            ("dpmpp_2m", False), ("dpmpp_2m", True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="samples per run")
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    args = ap.parse_args()
    mixture = toy.ring()
    noise = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    floor = toy.sliced_wasserstein(mixture.sample(args.n, torch.Generator().manual_seed(1)), mixture)
    head = "| sampler | NFE@20 | " + " | ".join(f"{s} steps" for s in args.steps) + " |"
    print(head)
    print("|" + "---|" * (len(args.steps) + 2))
    print("| exact samples (floor) | - | " + " | ".join(f"{floor:.4f}" for _ in args.steps) + " |")
    for name, karras in VARIANTS:
        t0, row, nfe = time.time(), [], 0
        for steps in args.steps:
            calls = []

            def eps_fn(x, t):
                calls.append(1)
                return mixture.eps_fn(x, t)

            x = samplers.sample(name, eps_fn, noise, steps, karras=karras,
                                generator=torch.Generator().manual_seed(2))
            row.append(toy.sliced_wasserstein(x, mixture))
            nfe = len(calls) if steps == 20 else nfe
        label = name + (" (karras)" if karras else "")
        print(f"| {label} | {nfe} | " + " | ".join(f"{v:.4f}" for v in row) + f" |  <!-- {time.time() - t0:.1f} s -->",
              flush=True)


if __name__ == "__main__":
    main()
